"""The settings of a ranking (:class:`RankSettings`): every default of ``pairscout rank`` lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pairscout.metrics.registry import DEFAULT_MEASURES

PRECISIONS = ("auto", "float64", "float32", "tf32")
"""Choices of :attr:`RankSettings.precision` (``--precision``)."""

DEBIASED_BELOW = 10_000
"""Below this many rows the default primary metric is debiased linear CKA: biased CKA is inflated at
small n (two independent random 384-d embeddings of 1,000 rows read 0.26; the debiased estimator 0.00)."""


@dataclass
class RankSettings:
    """Everything that changes the numbers of a ranking (saved in the result's JSON)."""

    metrics: Sequence[str] = DEFAULT_MEASURES
    """Pair measures to compute (names of :data:`pairscout.metrics.MEASURES`)."""
    primary: str | None = None
    """Metric the pairs are ranked by; default: ``cka_linear``, ``cka_linear_debiased`` when n < 10,000."""
    score: str = "primary"
    """``primary`` ranks by the primary metric; ``combined`` by the mean of each metric's within-run z-score."""
    knn_k: int = 10
    """k of mutual k-NN / CKNNA."""
    clip_quantile: float | None = None
    """Clip each embedding at this quantile of |x| before the neighbourhood metrics (platonic-rep uses 0.95)."""
    rbf_sigma_frac: float = 1.0
    ci_groups: int = 10
    """Groups of the delete-a-group jackknife behind every confidence interval (0 turns them off)."""
    permutations: int = 199
    """Monte-Carlo shuffled pairings behind the calibrated scores and p-values of CKNNA (49 at the default; any other
    value as given); the null moments of CKA and mutual k-NN are exact in closed form. 0 turns calibration off
    (:mod:`pairscout.metrics.calibration`)."""
    null_method: str = "auto"
    """``auto``: closed-form null moments for CKA and mutual k-NN, permutations for CKNNA; ``permutation``: all by
    permutation (this many)."""
    caption_reduce: str = "first"
    """Text vector per image: the ``first`` caption's or the ``mean`` of all captions'."""
    seed: int = 0
    layers: str | None = None
    """A layer sweep for every encoder that can read hidden layers: ``"all"`` or block indices ``"-1,-4,-8"``
    (negative from the end); the final features are always a candidate. Zoo entries may set their own
    ``layers``. Each pair's layers are chosen on ``layer_rows`` selection rows and every reported number is
    measured on the other rows (:mod:`pairscout.ranking.layered`)."""
    layer_rows: int = 1000
    """Selection rows of a layer sweep: ``min(layer_rows, n // 2)`` seeded rows (memory views x rows^2 float64)."""
    precision: str = "auto"
    """Precision of the large CKA products (:func:`pairscout.metrics.all_pairs_cka`): ``auto`` follows
    :func:`pairscout.runtime.metric_precision` on the metrics' device (float32 products on GPUs, exact float64 on
    CPU); ``float64``, ``float32`` or ``tf32`` (CUDA tensor cores) force one. Reductions are float64 in every case."""

    def __post_init__(self) -> None:
        """Impossible settings are one-line errors naming the option, before any encoding."""
        from pairscout.bounds import check_fields
        from pairscout.errors import PairscoutError

        if isinstance(self.metrics, str):  # "cka_linear" or "cka_linear,mutual_knn" as the CLI takes it, not letters
            object.__setattr__(self, "metrics", [m.strip() for m in self.metrics.split(",") if m.strip()])
        check_fields(self)  # every numeric setting against its declared range (pairscout.bounds)
        if self.layers is not None:
            parse_layers(self.layers)
        if self.caption_reduce not in ("first", "mean"):
            raise PairscoutError(f"--caption-reduce {self.caption_reduce!r} is unknown.", fix="use 'first' or 'mean'.")
        if self.precision not in PRECISIONS:
            raise PairscoutError(f"--precision {self.precision!r} is unknown.", fix=f"use one of {', '.join(PRECISIONS)}.")

    def metric_options(self, metric: str) -> dict[str, Any]:
        """The keyword options of ``metric`` (per its registry record) from these settings: ``k``, ``preprocess``
        (clipping), ``sigma_frac``. The CKA products' precision is the engine's (resolved once per run)."""
        from pairscout.metrics.knn import Preprocess
        from pairscout.metrics.registry import get

        return get(metric).kwargs({"k": self.knn_k, "preprocess": Preprocess(clip_quantile=self.clip_quantile),
                                   "sigma_frac": self.rbf_sigma_frac})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        return d


def parse_layers(text: str | list[int]) -> list[int] | str:
    """``"all"`` or a comma list of block indices (``"-1,-4,-8"``) -> what an encoder spec's ``layers`` takes.

    Raises:
        PairscoutError: anything else, naming the option and the forms it takes.
    """
    from pairscout.errors import PairscoutError

    if isinstance(text, list):
        return text
    t = str(text).strip()
    if t == "all":
        return "all"
    try:
        out = [int(p) for p in t.split(",") if p.strip()]
    except ValueError:
        out = []
    if not out:
        raise PairscoutError(f"--layers {text!r} is neither 'all' nor a comma list of block indices.",
                             fix="pass --layers all or e.g. --layers -1,-4,-8 (negative counts from the last block).")
    return out
