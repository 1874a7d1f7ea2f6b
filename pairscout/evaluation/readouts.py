"""The probe's read-outs as sums of per-image contributions, their bootstrap, and which read-out separates the pairs.

Every read-out of a probed pair is written as a sum over the held-out images, ``value = sum_i c_i``
(:func:`item_contributions`), so one resampling of the held-out images (multinomial counts ``k_i``) gives every
read-out of every pair at once, ``value* = sum_i k_i c_i``, and the same resampling for all pairs (paired):

- ``zs_top1`` / ``zs_top5``: zero-shot hit of image i, weighted ``1 / (C n_class(i))`` (the per-class balanced
  accuracy of :func:`~pairscout.align.evaluate.zero_shot_metrics`);
- ``class_map``: class-aware mean average precision, image -> captions (any caption of the image's class is a
  positive; ties count against the query), ``AP_i / n``;
- ``class_mean_r1`` and ``mean_r1`` / ``mean_r5`` / ``mean_r10``: class-aware and instance retrieval, the mean of
  both directions: image i's own hit ``/ 2n`` plus its captions' hits ``/ 2m`` (identical captions interchangeable,
  as :func:`~pairscout.align.evaluate.evaluate` reads them);
- ``heldout_loss``: the sigmoid loss of the held-out set with the pair's learned scale and bias, image i's row
  ``/ n`` (lower is better); ``loss_auc``: the area under the held-out loss curve read at fixed steps
  (trapezoid, normalised to the step range; lower is better).

**Separation** (:func:`separation`): does a read-out tell the non-baseline pairs apart beyond the noise of the
held-out rows? The statistic is ``F = s^2_between / sigma^2_noise``: the between-pair variance of the P pairs'
values over the mean paired-bootstrap variance of a pair's deviation from the pairs' mean (times P / (P - 1), so
that F is about 1 when the pairs do not differ). Under no difference, (P - 1) F is about chi-square with P - 1
degrees of freedom; the read-out separates the pairs when that p-value is below 0.05 / K (Bonferroni over the K
read-outs compared). The probe's target is the separating read-out with the largest F.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pairscout.metrics.registry import READOUT_LABELS


@dataclass(frozen=True)
class Readout:
    """One read-out of a probed pair: its name, which way is better, and what its chance level is."""

    label: str
    """Human name."""
    better: Literal["higher", "lower"]
    chance: Literal["classes", "class_pairs", "captions", "class_captions"] | None
    """How its chance level is computed (:func:`pairscout.evaluation.probe.chance_level`): ``classes``: k of the C
    classes (zero-shot); ``class_pairs``: the share of (image, caption) pairs of one class (class-aware mAP);
    ``captions`` / ``class_captions``: R@k of a random ranking, identical captions (or a class's captions)
    interchangeable; None: a loss, which has none on this scale."""
    k: int = 0
    """The rank cut-off (top-k, R@k); 0 where there is none."""

    @property
    def needs(self) -> str:
        """What the dataset must have: ``labels and names`` (zero-shot), ``labels`` (class-aware) or nothing."""
        return {"classes": "labels and names", "class_pairs": "labels", "class_captions": "labels"}.get(self.chance or "", "")


READOUTS: dict[str, Readout] = {
    name: Readout(READOUT_LABELS[name], *rest)  # type: ignore[arg-type]
    for name, rest in {
        "zs_top1": ("higher", "classes", 1),
        "zs_top5": ("higher", "classes", 5),
        "class_map": ("higher", "class_pairs"),
        "class_mean_r1": ("higher", "class_captions", 1),
        "mean_r1": ("higher", "captions", 1),
        "mean_r5": ("higher", "captions", 5),
        "mean_r10": ("higher", "captions", 10),
        "heldout_loss": ("lower", None),
        "loss_auc": ("lower", None),
    }.items()
}
"""Every read-out the probe records per pair, by column (human names: :data:`pairscout.metrics.registry.READOUT_LABELS`,
the vocabulary every stage reads)."""
ALPHA = 0.05
BOOTSTRAP = 400
"""Bootstrap resamplings of the held-out images."""
STATISTIC = ("F = between-pair variance of the non-baseline pairs' read-out / mean paired-bootstrap variance of a pair's "
             "deviation from their mean x P/(P-1) (about 1 when the pairs do not differ); p: (P-1) F against chi-square with "
             "P-1 degrees of freedom; separates when p < 0.05 / K, Bonferroni over the K read-outs compared")  # fmt: skip


def direction(readout: str) -> int:
    """+1 when higher is better, -1 when lower is (losses)."""
    rec = READOUTS.get(readout)
    return -1 if rec is not None and rec.better == "lower" else 1


def heldout_loss_items(img: Tensor, txt: Tensor, positives: Tensor, scale: float, bias: float) -> Tensor:
    """(n,) image i's share of the held-out sigmoid loss: ``-sum_j log sigmoid(label_ij (t x_i.y_j + b)) / n``
    (normalised embeddings in; ``positives`` (n, m) bool)."""
    logits = scale * img.float() @ txt.float().T + bias
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum(1) / img.shape[0]


def _ap_items(sim: Tensor, pos: Tensor) -> Tensor:
    """(n,) average precision of each row's positives among all columns, ties counted against the query."""
    s, order = sim.sort(dim=1, descending=True)
    p = pos.gather(1, order).float()
    ge = torch.searchsorted(-s.contiguous(), -s.contiguous(), right=True).float()  # columns scoring >= this one
    cum = p.cumsum(1)
    pos_ge = cum.gather(1, (ge.long() - 1).clamp_min(0))
    npos = p.sum(1)
    ap = (p * pos_ge / ge).sum(1) / npos.clamp_min(1)
    return torch.where(npos > 0, ap, torch.zeros_like(ap))


def item_contributions(img: Tensor, txt: Tensor, text_image_index: Tensor, *, text_keys: Tensor | None = None,
                       labels: Tensor | None = None, class_emb: Tensor | None = None, positives: Tensor | None = None,
                       scale: float | None = None, bias: float | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """(n,) per-image contributions of every read-out the inputs allow (module docstring); each sums to the read-out.

    ``img`` (n, D), ``txt`` (m, D) normalised projected embeddings; ``class_emb`` (C, D) normalised class embeddings;
    ``positives`` (n, m), ``scale``, ``bias``: for the held-out loss.
    """
    from pairscout.align.evaluate import keyed_retrieval_ranks, retrieval_ranks

    tii = torch.as_tensor(text_image_index).long()
    n, m = img.shape[0], txt.shape[0]
    out: dict[str, np.ndarray] = {}

    def both(i2t: Tensor, t2i: Tensor, k: int) -> np.ndarray:
        own = (i2t < k).double() / (2 * n)
        caps = torch.zeros(n, dtype=torch.float64).index_add_(0, tii, (t2i < k).double() / (2 * m))
        return (own + caps).numpy()

    i2t, t2i = keyed_retrieval_ranks(img, txt, tii, text_keys) if text_keys is not None else retrieval_ranks(img, txt, tii)
    for k in ks:
        out[f"mean_r{k}"] = both(i2t, t2i, k)
    if labels is not None:
        lab = torch.as_tensor(labels).long().cpu()
        cls = lab[tii]
        ci2t, ct2i = keyed_retrieval_ranks(img, txt, tii, cls)
        out["class_mean_r1"] = both(ci2t, ct2i, 1)
        sim = (img.float() @ txt.float().T).cpu()
        out["class_map"] = (_ap_items(sim, lab[:, None] == cls[None, :]) / n).double().numpy()
        if class_emb is not None:
            s = (img.float() @ class_emb.float().T).cpu()
            rank = (s > s.gather(1, lab[:, None])).sum(1)
            classes, counts = torch.unique(lab, return_counts=True)
            weight = torch.zeros(int(lab.max()) + 1, dtype=torch.float64)
            weight[classes] = 1.0 / (len(classes) * counts.double())
            for k in (1, 5):
                out[f"zs_top{k}"] = ((rank < min(k, class_emb.shape[0])).double() * weight[lab]).numpy()
    if positives is not None and scale is not None and bias is not None:
        out["heldout_loss"] = heldout_loss_items(img, txt, positives.to(img.device), scale, bias).double().cpu().numpy()
    return out


def curve_area(curve: dict[int, Any]) -> np.ndarray | None:
    """Per-image contributions to the area under a held-out loss curve ``{step: (n,)}`` (trapezoid over the steps,
    divided by the step range: the curve's mean height); None with fewer than two points."""
    steps = sorted(curve)
    if len(steps) < 2:
        return None
    ys = [np.asarray(curve[s], dtype=np.float64) for s in steps]
    area = sum((steps[i + 1] - steps[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def bootstrap_counts(n: int, reps: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(reps, n) multinomial counts of a resampling of n held-out images with replacement (fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64) if n else np.zeros((reps, 0))


@dataclass
class ReadoutSeparation:
    """How well one read-out tells the non-baseline pairs apart (``probe.json`` ``separation``: one per read-out)."""

    readout: str
    label: str
    direction: str
    """``higher`` or ``lower`` is better."""
    n_pairs: int
    """Non-baseline pairs compared."""
    between_var: float
    """Sample variance of their values."""
    noise_var: float
    """Mean paired-bootstrap variance of a pair's deviation from their mean, x P/(P-1)."""
    f: float
    """between_var / noise_var: about 1 when the pairs do not differ."""
    p: float
    """Chi-square p of (P-1) F with P-1 degrees of freedom."""
    separates: bool
    """p below the Bonferroni threshold (0.05 / the read-outs compared)."""
    spread: tuple[float, float] = (math.nan, math.nan)
    """Lowest and highest value among the compared pairs."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = list(self.spread)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadoutSeparation:
        d = dict(d)
        d["spread"] = tuple(d.get("spread", (math.nan, math.nan)))
        return cls(**d)


@dataclass
class TargetChoice:
    """Which read-out the probe's correlations and regret use, and why (``probe.json`` ``target_choice``)."""

    target: str
    why: str
    statistic: str = STATISTIC
    separated: bool = True
    """False: no read-out separates the non-baseline pairs beyond noise (no correlation is evidence either way)."""
    overridden: bool = False
    separation: list[ReadoutSeparation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "why": self.why, "statistic": self.statistic, "separated": self.separated,
                "overridden": self.overridden, "separation": [s.to_dict() for s in self.separation]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetChoice:
        return cls(target=d["target"], why=d.get("why", ""), statistic=d.get("statistic", STATISTIC), separated=d.get("separated", True),
                   overridden=d.get("overridden", False), separation=[ReadoutSeparation.from_dict(s) for s in d.get("separation", [])])


def separation(values: np.ndarray, reps: np.ndarray, readout: str, k_compared: int) -> ReadoutSeparation:
    """The separation statistic (module docstring) of one read-out over P pairs: ``values`` (P,), ``reps`` (R, P)."""
    from scipy import stats

    rec = READOUTS.get(readout)
    label, way = (rec.label, rec.better) if rec is not None else (readout, "higher")
    ok = np.isfinite(values)
    v, r = values[ok], reps[:, ok]
    p_n = len(v)
    nan = math.nan
    if p_n < 3:
        return ReadoutSeparation(readout, label, way, p_n, nan, nan, nan, nan, False, (nan, nan) if not p_n else (float(v.min()), float(v.max())))
    between = float(np.var(v, ddof=1))
    dev = r - r.mean(1, keepdims=True)
    noise = float(np.var(dev, axis=0, ddof=1).mean() * p_n / (p_n - 1))
    if noise > 0:
        f = between / noise
    else:
        f = math.inf if between > 0 else nan
    p = float(stats.chi2.sf(f * (p_n - 1), p_n - 1)) if math.isfinite(f) else (0.0 if f == math.inf else nan)
    sep = bool(p == p and p < ALPHA / max(1, k_compared))
    return ReadoutSeparation(readout, label, way, p_n, between, noise, float(f), p, sep, (float(v.min()), float(v.max())))


def choose_target(seps: Sequence[ReadoutSeparation], fallback: str, override: str | None = None,
                  over: str = "non-baseline pairs") -> TargetChoice:
    """The separating read-out with the largest F; ``override`` (``--target``) wins; none separating: ``fallback``, flagged.
    ``over``: which pairs the separation was measured on (the non-baseline pairs, or all probed pairs when fewer than 3
    pairs lack a baseline encoder), for the sentence."""
    by = {s.readout: s for s in seps}
    if override is not None:
        s = by.get(override)
        why = f"chosen with --target ({STATISTIC.split(';')[0].split(' = ')[0]} = {s.f:.3g})" if s is not None and s.f == s.f else "chosen with --target"
        return TargetChoice(override, why, separated=bool(s is None or s.separates or not any(x.separates for x in seps)),
                            overridden=True, separation=list(seps))
    good = [s for s in seps if s.separates]
    if good:
        best = max(good, key=lambda s: s.f)
        others = ", ".join(f"{s.label} {s.f:.3g}" for s in sorted(seps, key=lambda s: -(s.f if s.f == s.f else -1)) if s is not best)
        return TargetChoice(best.readout, f"it separates the {best.n_pairs} {over} most clearly against its own sampling noise "
                            f"(F = {best.f:.3g}, p = {best.p:.2g}; the others: {others})", separation=list(seps))
    top = max((s for s in seps if s.f == s.f), key=lambda s: s.f, default=None)
    tail = f" (largest F: {top.label} {top.f:.3g}, p = {top.p:.2g})" if top is not None else ""
    return TargetChoice(fallback, f"no read-out separates the {over} beyond the noise of the held-out rows{tail}",
                        separated=False, separation=list(seps))


def cannot_tell(choice: TargetChoice, n_items: int, over: str = "non-baseline pairs") -> str:
    """The one line a researcher reads when nothing separates the pairs (``over``: which pairs were compared)."""
    n = next((s.n_pairs for s in choice.separation), 0)
    top = max((s for s in choice.separation if s.f == s.f), key=lambda s: s.f, default=None)
    best = f" (most: {top.label}, F = {top.f:.2f}, p = {top.p:.2g})" if top is not None else ""
    return (f"the probe cannot tell the {n} {over} apart: no read-out differs between them by more than the noise of "
            f"{n_items} held-out images{best}; its correlations and regret are not evidence either way (use more held-out data, "
            "harder captions, or more classes).")
