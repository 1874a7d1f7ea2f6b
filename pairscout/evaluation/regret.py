"""The verdict's regret: had I followed the verdict (or the rule I would use without pairscout), how far am I from
the best probed pair?

For the probe's target (oriented so that higher is better: a loss is negated), over the probed pairs:

- **oracle**: the pair with the best read-out;
- **regret** of a rule's pair = oracle's read-out minus the pair's (0: the rule found the best pair), with a 95 %
  **paired bootstrap interval** over the held-out images (the same resampling for both pairs,
  :mod:`pairscout.evaluation.readouts`; percentile interval);
- the candidates are the pairs without a weight-free baseline encoder (``Regret.over``; every probed pair when fewer
than two are left): the baselines are controls, not choices. The rules (:func:`rule_pairs`): **pairscout** (the rank run's verdict), **freeze-align** (the pair with the highest
  biased linear CKA, ``cka_linear``), **SAIL** (the vision encoder with the best k-NN accuracy with the text encoder
  with the best published MTEB score, where one is known for a probed text encoder, else with the best k-NN
  accuracy of its own), **random** (the expected regret of a pair drawn uniformly from the probed pairs).

:class:`Regret` is recorded in ``probe.json`` (``regret``), printed by ``pairscout probe`` and shown in the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

RULES = {
    "pairscout": "pairscout's verdict",
    "freeze_align": "freeze-align: max linear CKA",
    "sail": "SAIL: best vision k-NN x best text score",
    "random": "a random pair (expected)",
}


@dataclass
class RuleRegret:
    """One rule's pair and its regret."""

    rule: str
    label: str
    pair: tuple[str, str] | None
    """None for ``random`` (an expectation over the pairs), or when the rule's pair was not probed."""
    why: str
    value: float
    """The rule's pair's read-out (for ``random``: the mean over the pairs)."""
    regret: float
    lo: float
    hi: float
    rank: int | None = None
    """The pair's place among the probed pairs by the read-out (1 = oracle)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pair"] = None if self.pair is None else list(self.pair)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleRegret:
        d = dict(d)
        d["pair"] = None if d.get("pair") is None else (d["pair"][0], d["pair"][1])
        return cls(**d)


@dataclass
class Regret:
    """The regret table of a probe (``probe.json`` ``regret``)."""

    target: str
    direction: str
    """``higher`` or ``lower`` is better (a lower-is-better read-out's regret is the pair's minus the oracle's)."""
    oracle: tuple[str, str]
    oracle_value: float
    n_pairs: int
    n_items: int
    interval: str = "95 % paired bootstrap over the held-out images, percentile"
    over: str = "probed pairs"
    """Which pairs are the candidates: ``pairs without a baseline encoder`` (the default when there are 2 or more: the
    weight-free baselines are controls, not choices) or every ``probed pairs``."""
    rules: list[RuleRegret] = field(default_factory=list)
    sentence: str = ""
    conclusive: bool = True
    """False when the target does not separate the pairs beyond noise: the table is no evidence either way."""

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "direction": self.direction, "oracle": list(self.oracle), "oracle_value": self.oracle_value,
                "n_pairs": self.n_pairs, "n_items": self.n_items, "interval": self.interval, "over": self.over, "rules": [r.to_dict() for r in self.rules],
                "sentence": self.sentence, "conclusive": self.conclusive}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Regret:
        return cls(target=d["target"], direction=d["direction"], oracle=(d["oracle"][0], d["oracle"][1]), oracle_value=d["oracle_value"],
                   n_pairs=d["n_pairs"], n_items=d["n_items"], interval=d.get("interval", ""), over=d.get("over", "probed pairs"), rules=[RuleRegret.from_dict(r) for r in d.get("rules", [])],
                   sentence=d.get("sentence", ""), conclusive=d.get("conclusive", True))

    def rule(self, name: str) -> RuleRegret | None:
        return next((r for r in self.rules if r.rule == name), None)


def rule_pairs(pairs: pd.DataFrame, verdict_pair: tuple[str, str] | None, models: pd.DataFrame | None) -> dict[str, tuple[tuple[str, str] | None, str]]:
    """``{rule: (pair or None, why)}`` for pairscout, freeze-align and SAIL (module docstring)."""
    out: dict[str, tuple[tuple[str, str] | None, str]] = {}
    if verdict_pair is not None:
        out["pairscout"] = (tuple(verdict_pair), "the rank run's verdict")
    if "cka_linear" in pairs and pairs["cka_linear"].notna().any():
        r = pairs.loc[pairs["cka_linear"].astype(float).idxmax()]
        out["freeze_align"] = ((str(r["vision"]), str(r["text"])), f"highest linear CKA ({float(r['cka_linear']):.3f})")
    if models is not None and not models.empty and "modality" in models:
        vis = models[(models["modality"] == "vision") & models["name"].isin(set(pairs["vision"]))]
        txt = models[(models["modality"] == "text") & models["name"].isin(set(pairs["text"]))]
        if "knn_acc" in vis and vis["knn_acc"].notna().any() and not txt.empty:
            v = vis.loc[vis["knn_acc"].astype(float).idxmax()]
            pub = pd.to_numeric(txt.get("published_score"), errors="coerce") if "published_score" in txt else None
            if pub is not None and pub.notna().any():
                t = txt.loc[pub.idxmax()]
                tw = f"best published score ({float(t['published_score']):.1f}, {t.get('published_metric', 'MTEB')})"
            elif "knn_acc" in txt and txt["knn_acc"].notna().any():
                t = txt.loc[txt["knn_acc"].astype(float).idxmax()]
                tw = f"no published MTEB score: best own k-NN accuracy ({float(t['knn_acc']):.3f})"
            else:
                t = None
            if t is not None:
                out["sail"] = ((str(v["name"]), str(t["name"])), f"vision: best k-NN accuracy ({float(v['knn_acc']):.3f}); text: {tw}")
    return out


def regret_table(pairs: pd.DataFrame, target: str, values: np.ndarray, reps: np.ndarray, choices: dict[str, tuple[tuple[str, str] | None, str]],
                 *, higher_better: bool = True, n_items: int = 0, conclusive: bool = True, label: str | None = None,
                 over: str = "probed pairs", run: str = "RUN") -> Regret:
    """The regret of each rule's pair against the oracle (module docstring).

    ``values`` (P,) the target per probed pair (rows of ``pairs``), ``reps`` (R, P) its paired bootstrap replicates,
    ``choices`` from :func:`rule_pairs`.
    """
    sign = 1.0 if higher_better else -1.0
    v, r = sign * np.asarray(values, dtype=float), sign * np.asarray(reps, dtype=float)
    ok = np.isfinite(v)
    keys = list(zip(pairs["vision"].astype(str), pairs["text"].astype(str), strict=True))
    o = int(np.nanargmax(np.where(ok, v, -np.inf)))
    order = np.argsort(-np.where(ok, v, -np.inf), kind="stable")
    place = {int(i): k + 1 for k, i in enumerate(order)}

    def interval(d: np.ndarray) -> tuple[float, float]:
        return (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if d.size else (math.nan, math.nan)

    rows: list[RuleRegret] = []
    for rule in ("pairscout", "freeze_align", "sail"):
        if rule not in choices:
            continue
        pair, why = choices[rule]
        i = keys.index(pair) if pair in keys else None
        if i is None or not ok[i]:
            rows.append(RuleRegret(rule, RULES[rule], pair, why + " (not probed)", math.nan, math.nan, math.nan, math.nan))
            continue
        lo, hi = interval(r[:, o] - r[:, i])
        rows.append(RuleRegret(rule, RULES[rule], pair, why, float(sign * v[i]), float(v[o] - v[i]), lo, hi, place[i]))
    mean_rep = r[:, o] - np.nanmean(np.where(ok, r, np.nan), axis=1) if r.size else np.array([])
    lo, hi = interval(mean_rep)
    rows.append(RuleRegret("random", RULES["random"], None, f"mean over the {int(ok.sum())} {over}", float(sign * np.nanmean(v[ok])),
                           float(v[o] - np.nanmean(v[ok])), lo, hi))
    res = Regret(target=target, direction="higher" if higher_better else "lower", oracle=keys[o], oracle_value=float(sign * v[o]),
                 n_pairs=int(ok.sum()), n_items=n_items, over=over, rules=rows, conclusive=conclusive)
    res.sentence = sentence(res, label or target, run)
    return res


def sentence(res: Regret, label: str, run: str = "RUN") -> str:
    """One sentence a researcher can act on (``run``: the rank run's folder, for the command it names)."""
    ov = f"{res.oracle[0]} x {res.oracle[1]}"
    ps = res.rule("pairscout")
    if not res.conclusive:
        return (f"The probe cannot tell the pairs apart on this data ({label} does not separate them beyond noise): the regret table "
                "is no evidence for or against any rule.")
    others = [r for r in res.rules if r.rule not in ("pairscout",) and r.regret == r.regret]
    cmp = "; ".join(f"{r.label.split(':')[0]} {r.regret:.3g}" for r in others)
    if ps is None or ps.regret != ps.regret:
        return f"The best probed pair is {ov} ({label} {res.oracle_value:.3f}); regret of the other rules: {cmp}."
    if ps.regret == 0:
        return f"pairscout's verdict is the best probed pair by {label} ({ov}, {res.oracle_value:.3f}); the other rules cost {cmp}: align it."
    if ps.lo <= 0:
        return (f"pairscout's verdict ({ps.pair[0]} x {ps.pair[1]}) is within noise of the best probed pair {ov} (regret {ps.regret:.3g} "
                f"[{ps.lo:.3g}, {ps.hi:.3g}] {label}; the other rules: {cmp}): either is a sound choice to align.")
    return (f"The probe found a clearly better pair than pairscout's verdict: {ov} ({label} {res.oracle_value:.3f}, regret of the verdict "
            f"{ps.regret:.3g} [{ps.lo:.3g}, {ps.hi:.3g}]; the other rules: {cmp}): align {ov} (pairscout align {run} --pair "
            f"{res.oracle[0]},{res.oracle[1]}).")
