"""The measures pairscout ranks pairs by: one record per measure, the one place that names them.

Rank (which measures, the default primary), probe (which columns it correlates), the report and the plots
(labels), the CLI help and the README read :data:`MEASURES`. Adding a measure is one :class:`Measure`
record here and its function (all pairs: ``f(xs, ys, **opts) -> (m, t) float64``; optionally its row-sharded
form for ``torchrun``).

Every value of a measure is computed by one function, :func:`pair_metric` (all pairs, one process or row-sharded
per the :class:`Placement` it is given, an optional row mask); :func:`measure` (one pair) calls it.

Example:
    >>> from pairscout.metrics import MEASURES, measure, pair_metric
    >>> MEASURES["cka_linear"].label
    'linear CKA'
    >>> import torch; x = torch.randn(50, 4, dtype=torch.float64)
    >>> round(measure("cka_linear", x, 2 * x), 6)
    1.0
    >>> pair_metric("cka_linear", [x, -x], [2 * x]).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pairscout.errors import MetricError

if TYPE_CHECKING:
    import torch

AllPairs = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class Measure:
    """One pair measure: what it is called, what its values mean, how it is computed and tested against chance."""

    name: str
    """Key in result columns, ``--metrics`` and ``--primary``."""
    label: str
    """Human name for tables, plots and the report."""
    all_pairs: AllPairs = field(repr=False)
    """``f(xs, ys, **opts) -> (m, t) float64``: every (vision, text) pair at once."""
    sharded: AllPairs | None = field(default=None, repr=False)
    """The same from this process's rows under ``torchrun`` (:mod:`pairscout.metrics.sharded`), equal to
    ``all_pairs`` on all rows; None: every process gathers the rows and runs ``all_pairs``."""
    takes_precision: bool = False
    """Takes the products' precision (``precision=``; the engine's by default): the CKA family."""
    range: tuple[float, float] = (0.0, 1.0)
    """Values it takes (debiased estimators can dip slightly below 0)."""
    direction: Literal["higher", "lower"] = "higher"
    """Which way means more aligned."""
    cost: Literal["cheap", "moderate", "expensive"] = "cheap"
    """Cost class for n rows, d dims, k neighbours (details in ``cost_note``)."""
    cost_note: str = ""
    options: tuple[str, ...] = ()
    """Keyword options it takes (``k``, ``preprocess``, ``sigma_frac``, RBF's absolute ``sigmas``, ...)."""
    min_rows: int = 2
    null: str = "permutation: rows of the text side shuffled, the measure recomputed"
    """How ``rank`` computes its chance level and p-value (:mod:`pairscout.metrics.calibration`; the API's
    :func:`pairscout.metrics.stats.permutation_null` always recomputes on shuffled rows)."""
    null_kind: Literal["recompute", "neighbours"] = "recompute"
    interval: str = "delete-a-group jackknife (no duplicated rows)"
    """How ``pairscout rank`` computes its 95 % interval (:func:`pairscout.ranking.compute.jackknife_ci`)."""
    bootstrap: bool = False
    """Whether :func:`pairscout.metrics.stats.bootstrap_ci` supports it (row resampling)."""
    default: bool = True
    """Computed by ``pairscout rank`` unless ``--metrics`` says otherwise."""
    reference: str = ""

    def kwargs(self, opts: dict[str, Any]) -> dict[str, Any]:
        """The subset of ``opts`` this measure takes."""
        return {k: v for k, v in opts.items() if k in self.options}


def _fn(module: str, name: str, *bound: Any) -> Callable[..., Any]:
    """``pairscout.metrics.<module>.<name>`` with leading arguments ``bound`` after the data; imported on
    first call, so reading the registry (CLI help, settings) does not import torch."""

    def f(a: Any, b: Any, *args: Any, **kw: Any) -> Any:
        return getattr(importlib.import_module(f"pairscout.metrics.{module}"), name)(a, b, *bound, *args, **kw)

    f.__qualname__ = f.__name__ = name
    return f


def _cka(kernel: str, debiased: bool) -> AllPairs:
    return _fn("cka", "all_pairs_cka", kernel, debiased)


def _sharded_cka(kernel: str, debiased: bool) -> AllPairs:
    return _fn("sharded", "sharded_cka", kernel, debiased)


def _more(name: str) -> AllPairs:
    """The all-pairs form of the single-pair ``pairscout.metrics.measures.<name>`` (imported on first call)."""

    def every(xs: Any, ys: Any, **kw: Any) -> Any:
        mod = importlib.import_module("pairscout.metrics.measures")
        return mod.all_pairs(getattr(mod, name))(xs, ys, **kw)

    every.__name__ = every.__qualname__ = f"all_pairs_{name}"
    return every


KORNBLITH = "Kornblith et al. 2019, Similarity of Neural Network Representations Revisited (ICML)"
SONG = "Song et al. 2012, Feature Selection via Dependence Maximization (JMLR): unbiased HSIC"
HUH = "Huh et al. 2024, The Platonic Representation Hypothesis (ICML)"
LINEAR_COST = "O(n (Dx Dy + sum d^2)) feature form or O(n^2 d) Gram tiles, whichever is cheaper"
CKA_NULL = "exact permutation moments (closed form, rows of the text side shuffled) + gamma tail"
RBF_COST = "O(n^2 d) Gram tiles, memory bounded"
KNN_COST = "O(n^2 d) neighbour search, then O(n k) per pair"

MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("cka_linear", "linear CKA", _cka("linear", False), sharded=_sharded_cka("linear", False), takes_precision=True, cost="cheap",
                cost_note=LINEAR_COST, bootstrap=True, null=CKA_NULL, reference=KORNBLITH),
        Measure("cka_linear_debiased", "linear CKA (debiased)", _cka("linear", True), sharded=_sharded_cka("linear", True), takes_precision=True,
                range=(-1.0, 1.0), cost="cheap", cost_note=LINEAR_COST, min_rows=4, null=CKA_NULL, reference=f"{KORNBLITH}; {SONG}"),
        Measure("cka_rbf", "RBF CKA", _cka("rbf", False), sharded=_sharded_cka("rbf", False), takes_precision=True, cost="moderate", cost_note=RBF_COST,
                options=("sigma_frac", "sigmas"), bootstrap=True, null=CKA_NULL, reference=KORNBLITH),
        Measure("cka_rbf_debiased", "RBF CKA (debiased)", _cka("rbf", True), sharded=_sharded_cka("rbf", True), takes_precision=True, range=(-1.0, 1.0),
                cost="moderate", cost_note=RBF_COST, options=("sigma_frac", "sigmas"), min_rows=4, default=False,
                null=CKA_NULL, reference=f"{KORNBLITH}; {SONG}"),
        Measure("mutual_knn", "mutual k-NN", _fn("knn", "all_pairs_mutual_knn"), sharded=_fn("sharded", "sharded_mutual_knn"), cost="moderate", cost_note=KNN_COST,
                options=("k", "preprocess"), null="exact permutation moments of the neighbour overlap (closed form) + gamma tail",
                null_kind="neighbours", bootstrap=True, reference=HUH),
        Measure("cknna", "CKNNA", _fn("knn", "all_pairs_cknna"), sharded=_fn("sharded", "sharded_cknna"), range=(-1.0, 1.0), cost="moderate",
                cost_note="O(n^2 d) neighbour search, then O(n k^2) per pair", options=("k", "preprocess"), min_rows=4,
                null="49 permutations of the neighbour lists (bit look-ups, O(n k) each) + fitted tail", null_kind="neighbours", reference=HUH),
        Measure("svcca", "SVCCA", _more("svcca"), cost="moderate", cost_note="two SVDs O(n d^2), then O(k^3)",
                options=("keep", "max_dims"), min_rows=4, default=False,
                reference="Raghu et al. 2017, SVCCA (NeurIPS)"),
        Measure("pwcca", "PWCCA", _more("pwcca"), cost="moderate", cost_note="two SVDs O(n d^2), then O(k^3)",
                options=("keep", "max_dims"), min_rows=4, default=False,
                reference="Morcos et al. 2018, Insights on representational similarity with CCA (NeurIPS)"),
        Measure("procrustes", "Procrustes similarity", _more("procrustes"), cost="moderate",
                cost_note="two thin SVDs O(n d^2)", default=False,
                reference="Ding et al. 2021 (NeurIPS); Williams et al. 2021, Generalized shape metrics (NeurIPS)"),
        Measure("rsa", "RSA (RDM Spearman)", _more("rsa"), range=(-1.0, 1.0), cost="moderate",
                cost_note="O(n^2 d) distances on at most max_rows rows, O(n^2 log n) ranks",
                options=("distance", "method", "max_rows"), min_rows=3, default=False,
                reference="Kriegeskorte et al. 2008, Representational similarity analysis (Front. Syst. Neurosci.)"),
        Measure("cycle_knn", "cycle k-NN", _more("cycle_knn"), cost="moderate", cost_note=KNN_COST,
                options=("k", "preprocess"), min_rows=3, default=False, reference=HUH),
        Measure("matching", "matching accuracy (QAP)", _more("matching"), cost="expensive",
                cost_note="QAP (FAQ) O(m^3) per iteration on at most max_rows rows, repeats draws",
                options=("max_rows", "repeats"), min_rows=3, default=False,
                reference="Maniparambil et al. 2024, Do Vision and Language Encoders Represent the World Similarly? (CVPR)"),
    )
}
"""Every pair measure by name, in display order."""

DEFAULT_MEASURES: tuple[str, ...] = tuple(name for name, m in MEASURES.items() if m.default)
"""What ``pairscout rank`` computes by default."""

UNIMODAL_LABELS: dict[str, str] = {
    "knn_acc": "k-NN accuracy",
    "nmi": "clustering NMI",
    "ari": "clustering ARI",
    "silhouette": "silhouette",
    "published_score": "published score",
}
"""Per-model quality columns of a rank run (``models.csv``) and their human names."""

PROBE_TARGET = "mean_r1"
"""The probe read-out the measures are correlated with (``probe.json`` ``target``; the report's default)."""

PROBE_LABELS: dict[str, str] = {
    "mean_r1": "probe R@1 (mean of both directions)",
    "i2t_r1": "image->text R@1",
    "t2i_r1": "text->image R@1",
    "mean_r5": "mean R@5",
    "score": "combined score",
}


def get(name: str) -> Measure:
    """The record of ``name``; an unknown name is a :class:`MetricError` listing the known ones."""
    try:
        return MEASURES[name]
    except KeyError:
        raise MetricError(f"unknown pair metric {name!r}.", fix=f"use one of {', '.join(MEASURES)}.") from None


def label(name: str) -> str:
    """Human name of a measure or of a unimodal / probe column (the name itself when unknown)."""
    if name in MEASURES:
        return MEASURES[name].label
    return UNIMODAL_LABELS.get(name, PROBE_LABELS.get(name, name))


class Placement(Protocol):
    """Where :func:`pair_metric` runs: the products' precision and, under ``torchrun``, this process's rows
    ``[lo, hi)`` of the global rows (:class:`pairscout.estimation.Engine` is one; it resolves all three once)."""

    precision: str
    lo: int
    hi: int

    @property
    def sharded(self) -> bool: ...


def pair_metric(name: str, xs: Any, ys: Any, *, engine: Placement | None = None, rows: torch.Tensor | None = None,
                scale_free: bool = False, **opts: Any) -> torch.Tensor:
    """The (m, t) float64 values of measure ``name`` for every pair (xs[i], ys[j]): how every stage computes a measure.

    Args:
        xs, ys: (n, d) embeddings (one matrix or a list; tensors or numpy); under a sharded engine this process's rows.
        engine: precision and row shard (:class:`Placement`). None: one process, where ``xs`` are. A sharded engine runs
            the record's sharded form (every process gets the one-process value on all rows), or, for a measure
            without one, gathers every model's rows on every process first.
        rows: (n,) bool mask of the global rows to use (tensors only; None: all).
        scale_free: scale each matrix by a power of two first (exact; see :func:`measure`). One process only.
        opts: the measure's options; those it does not take are ignored. ``precision`` (the CKA family) defaults
            to the engine's.

    Raises:
        MetricError: unknown measure (listing the known ones), degenerate input.
    """
    m = get(name)
    kw = m.kwargs(opts)
    if m.takes_precision and "precision" in opts:
        kw["precision"] = opts["precision"]
    elif m.takes_precision and engine is not None:
        kw["precision"] = engine.precision
    sharded = engine is not None and engine.sharded
    if rows is not None:
        import torch

        xs, ys = ([z] if isinstance(z, torch.Tensor) else list(z) for z in (xs, ys))
        keep = (rows[engine.lo:engine.hi] if sharded else rows).to(xs[0].device)  # type: ignore[union-attr]
        xs, ys = [x[keep] for x in xs], [y[keep] for y in ys]
    if sharded:
        if scale_free:
            raise MetricError("scale_free needs every row in one process.", fix="pass scale_free=False under torchrun.")
        if m.sharded is not None:
            return m.sharded(list(xs), list(ys), **kw)
        from pairscout.metrics.sharded_rows import gather_all, shard_counts

        counts = shard_counts(xs[0].shape[0], xs[0].device)
        return m.all_pairs([gather_all(x, counts) for x in xs], [gather_all(y, counts) for y in ys], **kw)
    if scale_free:
        xs, ys = _scale_free(xs, "xs", opts), _scale_free(ys, "ys", opts)
    return m.all_pairs(xs, ys, **kw)


def measure(name: str, x: Any, y: Any, **opts: Any) -> float:
    """The value of measure ``name`` for one pair (x, y) of (n, d) embeddings (:func:`pair_metric` of the pair), for
    data of any magnitude: each side is first scaled by a power of two (exact); ``opts`` it does not take are ignored."""
    from pairscout.metrics.validate import as_matrix

    get(name)
    return float(pair_metric(name, [as_matrix(x, "x")], [as_matrix(y, "y")], scale_free=True, **opts)[0, 0])


def _scale_free(mats: Any, name: str, opts: dict[str, Any]) -> list[Any]:
    """Checked matrices, each scaled by a power of two (exact) to max |value| in [0.5, 1): every measure here is
    invariant to isotropic scaling, and this keeps that promise over the whole float64 range (``x * 1e-200``
    would underflow CKA's fourth-power sums to 0, ``x * 1e200`` overflow them). Not with absolute RBF ``sigmas``."""
    from pairscout.metrics.validate import as_matrices, pow2_unit

    mats = as_matrices(mats, name)
    if "sigmas" in opts:
        return mats
    return [pow2_unit(t.detach()) for t in mats]


def names_help(names: Sequence[str] | None = None) -> str:
    """``"cka_linear, cka_linear_debiased, ..."``: for CLI help and messages."""
    return ", ".join(names if names is not None else MEASURES)


# --- the probe's read-outs: named here with every other measure and score, so any stage can say them in words
READOUT_LABELS = {
    "zs_top1": "zero-shot top-1", "zs_top5": "zero-shot top-5", "class_mean_r1": "class-aware R@1", "class_mean_r5": "class-aware R@5",
    "mean_r1": "R@1 (mean of both directions)", "mean_r5": "R@5 (mean)", "mean_r10": "R@10 (mean)",
    "class_map": "class-aware mAP", "heldout_loss": "held-out sigmoid loss", "loss_auc": "held-out loss curve area",
}  # fmt: skip
"""Human names of the probe's read-outs (:data:`pairscout.evaluation.probe.TARGETS`)."""


def readout_label(target: str) -> str:
    """``"zero-shot top-1"`` for ``zs_top1``; the name itself when unknown."""
    return READOUT_LABELS.get(target, label(target))
