"""The lines ``pairscout align`` says beside its table: which pair it trains and why, and how it compares with the
run's probe."""

from __future__ import annotations

from pathlib import Path


def _which_pair(rank, run: Path, chosen: tuple[str, str] | None) -> str:
    """One line on the pair align trains and why: the verdict's full reason was printed by rank (and is in the
    report), so repeating it here buried the one thing align adds, which pair; ties and a verdict no better than
    chance stay visible because they are reasons not to trust the choice."""
    verdict = rank.verdict.to_dict() if rank.verdict is not None else None  # the latest revision
    if chosen is not None and tuple(chosen) not in set(zip(rank.pairs["vision"], rank.pairs["text"], strict=True)):
        return ""  # not a pair of the run: align's own one-line error follows, nothing is aligned
    if chosen is not None:
        line = f"aligning {chosen[0]} x {chosen[1]} (--pair)"
        if verdict and tuple(verdict["pair"]) != chosen:
            line += f"; the verdict of {run} is {verdict['pair'][0]} x {verdict['pair'][1]}"
        return line
    if not verdict:
        v, t = rank.best()
        return f"aligning the best-ranked pair {v} x {t} ({run} has no verdict)"
    v, t = verdict["pair"]
    why = "the probe's best of the pairs the metrics tied" if verdict.get("source") == "probe" else "ranked first"
    if verdict.get("above_chance") is False:
        why += ", but no better than shuffled pairings"
    n = len(verdict.get("tied", []))
    if n:
        others = f"{n} other pair{'s' if n > 1 else ''}"
        why += f"; still tied with {others} after the probe" if len(rank.revisions) > 1 else f"; tied with {others} (`pairscout probe {run}` can separate them)"
    return f"aligning the verdict's pair {v} x {t} of {run}: {why}"


def _against_probe(run: Path, res) -> str:
    """One line when the run's probe read this pair clearly higher than the aligned model does (a real head
    should not lose to the short linear probe; when it does, the budget or the head is the first suspect)."""
    from pairscout.align.probe_result import ProbeResult
    from pairscout.ranking.verdict import binomial_se

    try:
        probe = ProbeResult.load(run)
    except Exception:  # noqa: BLE001 - no probe in the run: nothing to compare with
        return ""
    target, n_items = probe.meta.get("target"), int(probe.meta.get("n_test_items") or 0)
    v, t = res.model.vision_spec.name, res.model.text_spec.name
    row = probe.pairs[(probe.pairs["vision"] == v) & (probe.pairs["text"] == t)]
    mine = res.metrics.get(target)
    if row.empty or mine is None or not n_items or target not in row:
        return ""
    theirs = float(row[target].iloc[0])
    se = (binomial_se(theirs, n_items) ** 2 + binomial_se(float(mine), n_items) ** 2) ** 0.5
    if theirs - float(mine) <= 2 * se:
        return ""
    steps = probe.meta.get("settings", {}).get("steps")
    return (f"note: the probe's linear heads ({steps} steps) read {theirs:.3f} {target} on this pair, clearly above this "
            f"model's {float(mine):.3f}: more --steps, or --head linear, may align it better")
