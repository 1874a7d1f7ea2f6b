"""The verdict of a ranking: which pair to align, which pairs are not distinguishable from it, which encoders
are near-duplicates, and why, in words a researcher can act on.

``rank.json["verdict"]`` = ``{"pair": [vision, text], "tied": [[v, t], ...], "duplicates": [[a, b], ...],
"reason": "...", ...}``.

* **pair**: the best-ranked pair.
* **tied**: every pair not distinguishable from it by a **paired test on the delete-a-group jackknife
  replicates of the difference** (not by overlapping intervals): with ``d_g = theta_best(g) - theta_c(g)`` over
  the G replicates, ``se_d^2 = (G-1)/G sum_g (d_g - mean d)^2``, ``t = d / se_d`` with G - 1 degrees of freedom,
  two-sided; tied when Holm's correction over the m - 1 comparisons leaves p > ``alpha`` (0.05): every pair
  called distinguishable is a claim "the best is better than it", and Holm keeps the chance of any false such
  claim below alpha (uncorrected, each truly tied pair would be dropped from the tied list 5 % of the time).
  Both pairs are measured on the same rows in every replicate, so the shared noise cancels and the test is much
  sharper than comparing intervals.
* **duplicates**: two encoders of the same modality whose embeddings have linear CKA >= 0.99 with each
  other (e.g. MiniLM and its int8 copy). Each is listed once; both rows stay in the table; a pair that differs
  from the verdict's pair only by swapping an encoder for its duplicate is always listed as tied, so the
  verdict prefers neither copy.
* Above chance: the verdict says so when the best pair's calibrated p-value (Holm-corrected across pairs) is
  not below ``alpha``: no pair is then distinguishable from shuffled pairings.

After ``pairscout probe``, :func:`update_from_probe` revisits the verdict with the probe's read-out: where the
probe separates pairs that the metrics left tied (a binomial z-test of the read-outs' difference on the held-out
images, Holm-corrected over the probed tied pairs, p < 0.05), the verdict moves to the probe's best pair among them
(``source = "probe"``); where the probe reads the metrics' best pair highest, the tied pairs it reads clearly
below that pair leave the tied list (the verdict is confirmed, not only left standing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pairscout.statistics import binomial_se

if TYPE_CHECKING:  # torch is imported where it is used: the Verdict record is read torch-free (report, CLI)
    import torch

PROBE_ADVICE = "To separate the tied pairs, run pairscout probe on them; align takes this pair unless told otherwise."
"""The rank verdict's last sentence when pairs are tied; a probe's revisit replaces it (the probe has run)."""
DUPLICATE_CKA = 0.99
"""Linear CKA (biased) between two encoders of one modality at or above which they count as near-duplicates."""
ALPHA = 0.05


@dataclass
class Verdict:
    """The recommended pair, the pairs tied with it, near-duplicate encoders, and the reason in words."""

    pair: tuple[str, str]
    tied: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""
    source: str = "rank"
    """``rank`` (metrics) or ``probe`` (moved by the probe's read-out)."""
    metric: str = ""
    above_chance: bool | None = None
    tests: list[dict[str, Any]] = field(default_factory=list)
    """Per compared pair: difference to the best, its jackknife se, t, p, tied or not."""
    controls_above: list[tuple[str, str]] = field(default_factory=list)
    """Control pairs (a ``baseline:`` encoder on either side) ranked above :attr:`pair`: the verdict never recommends
    a control when real pairs exist, and says when controls outscore them."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pair"] = list(self.pair)
        d["tied"] = [list(p) for p in self.tied]
        d["duplicates"] = [list(p) for p in self.duplicates]
        d["controls_above"] = [list(p) for p in self.controls_above]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(pair=(d["pair"][0], d["pair"][1]), tied=[(a, b) for a, b in d.get("tied", [])],
                   duplicates=[(a, b) for a, b in d.get("duplicates", [])], reason=d.get("reason", ""),
                   source=d.get("source", "rank"), metric=d.get("metric", ""), above_chance=d.get("above_chance"),
                   tests=list(d.get("tests", [])), controls_above=[(a, b) for a, b in d.get("controls_above", [])])


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
def jackknife_replicates(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], metric: str, *, groups: int, seed: int,
                         engine: Any = None, **kw: Any) -> torch.Tensor:
    """(G, m, t) leave-one-group-out values of a pair metric (groups :func:`pairscout.estimation.jackknife_groups`),
    from one estimation pass on ``engine``'s device and row shard (default: one process, where the tensors are)."""
    from pairscout.estimation import estimate

    return estimate(xs, ys, [metric], groups=groups, seed=seed, permutations=0, options={metric: kw},
                    engine=engine).replicates[metric]


def paired_test(est: np.ndarray, reps: np.ndarray, best: tuple[int, int], other: tuple[int, int]) -> dict[str, float]:
    """Paired jackknife test of ``est[best] - est[other]`` (formula in the module docstring)."""
    from scipy import stats

    d = float(est[best] - est[other])
    dg = reps[:, best[0], best[1]] - reps[:, other[0], other[1]]
    g = dg.shape[0]
    se = float(math.sqrt((g - 1) / g * float(((dg - dg.mean()) ** 2).sum())))
    if se == 0.0:
        p = 1.0 if d == 0.0 else 0.0
        t = math.copysign(math.inf, d) if d else 0.0
    else:
        t = d / se
        p = float(2 * stats.t.sf(abs(t), df=g - 1))
    return {"diff": d, "se": se, "t": t, "p": p}


def near_duplicates(embeddings: dict[str, torch.Tensor], threshold: float = DUPLICATE_CKA, screen_rows: int = 512,
                    seed: int = 0, precision: str | None = None, engine: Any = None) -> list[tuple[str, str, float]]:
    """Pairs of encoders (one modality, in the given order) whose embeddings have linear CKA >= threshold.

    Cheap: every pair is screened on ``screen_rows`` seeded random rows (Gram form, O(rows^2 d)); only pairs
    reading >= threshold - 0.02 there are measured on all rows (:func:`pairscout.metrics.pair_metric` on ``engine``).
    A sharded ``engine`` (:class:`pairscout.estimation.Engine`): the embeddings are this rank's rows under
    torch.distributed; the screen rows are gathered (at most ``screen_rows`` per model) and the full check is the
    sharded linear CKA.
    """
    import torch

    from pairscout.metrics import all_pairs_cka, pair_metric

    names = list(embeddings)
    if len(names) < 2:
        return []
    mats = [embeddings[k] for k in names]
    n = mats[0].shape[0]
    sharded = engine is not None and engine.sharded
    if sharded:
        from pairscout.metrics import sharded_rows as R

        counts = R.shard_counts(n, mats[0].device)
        n = sum(counts)

    def full_cka(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(pair_metric("cka_linear", [a], [b], engine=engine, precision=precision)[0, 0])
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:screen_rows] if n > screen_rows else None
    try:
        if sharded:
            sub = [R.gather_rows(x, rows if rows is not None else torch.arange(n), counts) for x in mats]
        else:
            sub = mats if rows is None else [x[rows.to(x.device)] for x in mats]
        c = all_pairs_cka(sub, sub, "linear", False, precision=precision)
        out = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if float(c[i, j]) >= threshold - 0.02:
                    full = float(c[i, j]) if rows is None else full_cka(mats[i], mats[j])
                    if full >= threshold:
                        out.append((names[i], names[j], full))
    except Exception:  # constant features etc.: such an encoder has no duplicate to report
        return []
    return out


def control_pairs(pairs: pd.DataFrame) -> np.ndarray:
    """(rows,) bool: the control pairs, those with a ``baseline:`` encoder on either side (from ``vision_id`` /
    ``text_id``), when pairs of real encoders are ranked too; all False otherwise (no ids, or a zoo of controls
    only, which has nothing to set them against)."""
    if "vision_id" not in pairs or "text_id" not in pairs:
        return np.zeros(len(pairs), dtype=bool)
    control = (pairs["vision_id"].astype(str).str.startswith("baseline:")
               | pairs["text_id"].astype(str).str.startswith("baseline:")).to_numpy()
    return control if not control.all() else np.zeros(len(pairs), dtype=bool)


def _pairs_str(pairs: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{v} x {t}" for v, t in pairs)


# ----------------------------------------------------------------------------------------------------------
# The verdict of a rank run
# ----------------------------------------------------------------------------------------------------------
def decide(pairs: pd.DataFrame, metric: str, est: np.ndarray | None, reps: np.ndarray | None, v_names: Sequence[str],
           t_names: Sequence[str], duplicates: Sequence[tuple[str, str, float]] = (), *, label: str | None = None,
           alpha: float = ALPHA) -> Verdict:
    """The verdict from ranked ``pairs`` (best first), the (m, t) estimates and (G, m, t) jackknife replicates of
    the ranking metric (None: no test possible), and the near-duplicate encoders."""
    label = label or metric
    control = control_pairs(pairs)  # compared against, never recommended
    first_real = int(np.argmax(~control))
    controls_above = [(str(v), str(t)) for v, t in zip(pairs["vision"].iloc[:first_real], pairs["text"].iloc[:first_real],
                                                       strict=True)]
    top_control = float(pairs[metric].iloc[0]) if controls_above and metric in pairs else float("nan")
    pairs = pairs[~control]
    best = (str(pairs["vision"].iloc[0]), str(pairs["text"].iloc[0]))
    vi, ti = {v: i for i, v in enumerate(v_names)}, {t: j for j, t in enumerate(t_names)}
    b = (vi[best[0]], ti[best[1]])
    tests: list[dict[str, Any]] = []
    tied: list[tuple[str, str]] = []
    if est is not None and reps is not None and reps.shape[0] >= 2:
        for v, t in zip(pairs["vision"].iloc[1:], pairs["text"].iloc[1:], strict=True):
            r = paired_test(est, reps, b, (vi[v], ti[t]))
            r["pair"] = [v, t]
            tests.append(r)
        if tests:  # "X is better than Y" is claimed for every pair called distinguishable: Holm over those claims
            from pairscout.statistics import holm

            for r, ph in zip(tests, holm(np.array([r["p"] for r in tests])).tolist(), strict=True):
                r.update({"p_holm": ph, "tied": bool(ph > alpha)})
                if r["tied"]:
                    tied.append((str(r["pair"][0]), str(r["pair"][1])))
    twin = {}
    for a, c, _ in duplicates:
        twin.setdefault(a, set()).add(c)
        twin.setdefault(c, set()).add(a)
    dup_pairs = [(v, best[1]) for v in sorted(twin.get(best[0], ()))] + [(best[0], t) for t in sorted(twin.get(best[1], ()))]
    dup_pairs = [p for p in dup_pairs if p[0] in vi and p[1] in ti]
    for p in dup_pairs:
        if p not in tied:
            tied.append(p)
    order = {(str(v), str(t)): k for k, (v, t) in enumerate(zip(pairs["vision"], pairs["text"], strict=True))}
    tied.sort(key=lambda p: order.get(p, 10**9))

    p_col = f"{metric}_p_holm"
    above = None
    if p_col in pairs and not pd.isna(pairs[p_col].iloc[0]):
        above = bool(pairs[p_col].iloc[0] < alpha)
    value = float(pairs[metric].iloc[0]) if metric in pairs else float("nan")
    among = " among pairs of real encoders" if control.any() else ""
    words = [f"{best[0]} x {best[1]} has the highest {label}{among} ({value:.3f})."]
    if above is False:
        words.append(f"It is not distinguishable from shuffled pairings (Holm-corrected p = {float(pairs[p_col].iloc[0]):.3g}): "
                     "no pair here aligns better than chance; do not align on this evidence.")
    elif above:
        z_col = f"{metric}_z"
        if z_col in pairs and not pd.isna(pairs[z_col].iloc[0]):
            words.append(f"It is {float(pairs[z_col].iloc[0]):.1f} null standard deviations above chance.")
    if controls_above:
        cv, ct = controls_above[0]
        words.append(f"{len(controls_above)} control "
                     f"{'pair' if len(controls_above) == 1 else 'pairs'} (a baseline encoder) "
                     f"{'ranks' if len(controls_above) == 1 else 'rank'} above it, first {cv} x {ct} ({top_control:.3f}). "
                     f"On these data {label} rewards what a baseline encoder also carries (captions repeated or "
                     "templated, class-like structure), so the ranking says little about real alignment; "
                     "pairscout probe reads alignment out directly.")
    elif control.any():
        words.append("It ranks above every control pair (a baseline encoder).")
    if est is None or reps is None:
        words.append("No jackknife replicates (--ci-groups 0), so ties with the next pairs were not tested.")
    elif tied:
        n_t = len([p for p in tied if p not in dup_pairs])
        if n_t:
            words.append(f"{n_t} other {'pair is' if n_t == 1 else 'pairs are'} not distinguishable from it (paired jackknife test, "
                         f"Holm-corrected over {len(tests)} comparison{'' if len(tests) == 1 else 's'}, p > {alpha}): "
                         f"{_pairs_str([p for p in tied if p not in dup_pairs][:6])}{' ...' if n_t > 6 else ''}.")
    elif len(pairs) == 1:
        words.append(f"It is the only pair{' of real encoders' if among else ''} ranked.")
    else:
        words.append(f"Every other pair{' of real encoders' if among else ''} is distinguishably lower (paired jackknife "
                     f"test, Holm-corrected over {len(tests)} "
                     f"comparison{'' if len(tests) == 1 else 's'}, p <= {alpha}).")
    for a, c, cka in duplicates:
        words.append(f"{a} and {c} are near-duplicates (linear CKA {cka:.3f} between them): the verdict prefers neither.")
    if above is not False and (len(tied) > len(dup_pairs) or (tied and est is not None)):  # at chance: nothing to separate
        words.append(PROBE_ADVICE)
    return Verdict(pair=best, tied=tied, duplicates=[(a, c) for a, c, _ in duplicates], reason=" ".join(words),
                   metric=metric, above_chance=above, tests=tests, controls_above=controls_above)


# ----------------------------------------------------------------------------------------------------------
# After a probe
# ----------------------------------------------------------------------------------------------------------
def _rank_reason(verdict: Verdict) -> str:
    """The rank verdict's reason without its advice to probe (after a probe that advice is done, and stale)."""
    return " ".join(verdict.reason.replace(PROBE_ADVICE, "").replace(PROBE_ADVICE.replace("pairscout probe", "`pairscout probe`")
                                                                      .replace("align takes", "`align` takes"), "").split())


def _against(got: dict[tuple[str, str], float], pairs: Sequence[tuple[str, str]]) -> str:
    """``0.707 for A x B, 0.655 for C x D``: each number with the pair it belongs to."""
    return ", ".join(f"{got[p]:.3f} for {p[0]} x {p[1]}" for p in pairs)


def update_from_probe(verdict: Verdict, probed: pd.DataFrame, target: str, n_items: int, *, label: str | None = None) -> Verdict:
    """Revisit a rank verdict with the probe's read-out ``target`` (a proportion over ``n_items`` held-out items).

    Among the verdict's pair and its tied pairs that were probed, the best by ``target`` becomes the verdict
    when its read-out exceeds the current pair's clearly: an unpaired binomial z-test of the difference (conservative
    for the same held-out items), Holm-corrected over its comparisons with the other probed pairs of the group,
    p < 0.05. Pairs it does not clearly exceed stay tied. Otherwise the verdict stays;
    the tied pairs that the probe reads clearly below it (the same margin) leave the tied list, and the reason
    says which were separated and which were not.
    """
    if label is None:
        from pairscout.metrics.registry import readout_label

        label = readout_label(target)
    group = [verdict.pair, *verdict.tied]
    verdict = Verdict(**{**asdict(verdict), "reason": _rank_reason(verdict)})
    got = {(str(v), str(t)): float(x) for v, t, x in zip(probed["vision"], probed["text"], probed[target], strict=True)
           if not pd.isna(x)}
    cands = [p for p in group if p in got]
    new = Verdict(**{**asdict(verdict), "pair": verdict.pair, "tied": list(verdict.tied), "duplicates": list(verdict.duplicates)})
    new.tests = list(verdict.tests)
    if len(cands) < 2:
        missing = [p for p in group if p not in got]
        if len(group) > 1:
            new.reason = verdict.reason + (f" The probe measured {len(cands)} of the {len(group)} tied pairs; probe "
                                           f"{_pairs_str(missing[:4])} to separate them.")
        return new
    top = max(cands, key=lambda p: got[p])

    family: dict[tuple[str, str], dict[tuple[str, str], float]] = {}

    def separated(a: tuple[str, str], b: tuple[str, str]) -> bool:
        """a reads clearly above b: unpaired binomial z-test of the difference, Holm-corrected over a's comparisons
        with every other probed pair of the group (as the metrics' tie tests are over theirs)."""
        from statistics import NormalDist

        from pairscout.statistics import holm

        if a not in family:
            others = [c for c in cands if c != a]
            ps = []
            for c in others:
                se = math.sqrt(binomial_se(got[a], n_items) ** 2 + binomial_se(got[c], n_items) ** 2)
                ps.append(2 * (1 - NormalDist().cdf(abs(got[a] - got[c]) / se)))
            family[a] = dict(zip(others, holm(np.array(ps)).tolist(), strict=True))
        return got[a] - got[b] > 0 and family[a][b] < ALPHA

    new = _moved(verdict, new, cands, top, got, separated, label, n_items)
    every = {(str(v), str(t)): float(x) for v, t, x in zip(probed["vision"], probed["text"], probed[target], strict=True) if not pd.isna(x)}
    outside = [p for p in every if p not in group and new.pair in got and every[p] > got[new.pair]]
    if outside:
        o = max(outside, key=lambda p: every[p])
        se = math.sqrt(binomial_se(every[o], n_items) ** 2 + binomial_se(got[new.pair], n_items) ** 2)
        if every[o] - got[new.pair] > 2 * se:
            new.reason += (f" Warning: the probe reads {every[o]:.3f} {label} for {o[0]} x {o[1]}, clearly above the verdict's "
                           f"{got[new.pair]:.3f}: here the metrics ranked against the read-out; consider align --pair {o[0]},{o[1]}.")
    return new


def _moved(verdict: Verdict, new: Verdict, cands: list[tuple[str, str]], top: tuple[str, str], got: dict[tuple[str, str], float],
           separated: Any, label: str, n_items: int) -> Verdict:
    group = [verdict.pair, *verdict.tied]
    if top != verdict.pair and verdict.pair in got and separated(top, verdict.pair):
        still = [p for p in cands if p != top and not separated(top, p)]
        dup_twins = [p for p in verdict.tied if p not in got]
        new.pair, new.tied, new.source = top, still + dup_twins, "probe"
        new.reason = (f"The metrics could not separate {len(group)} pairs; the probe's {label} does: {top[0]} x {top[1]} reads "
                      f"{got[top]:.3f} against {got[verdict.pair]:.3f} for {verdict.pair[0]} x {verdict.pair[1]} (the metrics' best), "
                      f"on {n_items} held-out items (binomial z-test, Holm-corrected over the probed tied pairs, p < {ALPHA}).")
        if still:
            new.reason += f" Not separated from it by the probe either: {_pairs_str(still)}."
        for a, c in verdict.duplicates:
            new.reason += f" {a} and {c} are near-duplicates: the verdict prefers neither."
        return new
    # the metrics' best pair stands: the probe confirms it over the pairs it reads clearly lower, the rest stay tied
    if verdict.pair not in got:
        new.reason = verdict.reason + (f" The probe did not read the verdict's pair {verdict.pair[0]} x {verdict.pair[1]}, so it "
                                       "cannot separate the tied pairs; probe it with them.")
        return new
    below = [p for p in cands if p != verdict.pair and separated(verdict.pair, p)]
    still = [p for p in cands if p != verdict.pair and p not in below]
    unread = [p for p in verdict.tied if p not in got]
    new.tied = [p for p in verdict.tied if p not in below]
    own = f"{got[verdict.pair]:.3f}"
    words = []
    if below:
        words.append(f"The probe's {label} separates the metrics' best pair from {_pairs_str(below)}: {own} against "
                     f"{_against(got, below)} on {n_items} held-out items (binomial z-test, Holm-corrected "
                     f"over the probed tied pairs, p < {ALPHA}); {'it is' if len(below) == 1 else 'they are'} no longer tied.")
    if still:
        words.append(f"The probe's {label} does not separate it from {_pairs_str(still)} ({own} against "
                     f"{_against(got, still)}); the metrics' best pair stands.")
    if unread:
        words.append(f"Not probed: {_pairs_str(unread[:4])}{' ...' if len(unread) > 4 else ''}.")
    new.reason = verdict.reason + " " + " ".join(words)
    return new


__all__ = ["ALPHA", "DUPLICATE_CKA", "Verdict", "decide", "jackknife_replicates", "near_duplicates",
           "paired_test", "update_from_probe"]
