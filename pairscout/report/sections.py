"""What each kind of run contributes to the report: the rank run's ranking, the probe's "which measure predicts?",
the alignment's training. Each function turns one run's saved files into plain data for the template (strings,
sort keys, inline SVG plots); plots are also saved as PNG + SVG in the run's ``plots/`` folder.

Conventions a person reading the page relies on: human names (registry labels) everywhere, the points that matter
labelled and nothing else, no plot of fewer than three points (a number goes in a table), and with several runs each
plot and heading names its run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pairscout import plots
from pairscout.metrics.registry import MEASURES, UNIMODAL_LABELS, label

FINAL_CARDS = (("i2t_r1", "image->text R@1"), ("t2i_r1", "text->image R@1"), ("mean_r5", "mean R@5"),
               ("zs_top1", "zero-shot top-1"), ("zs_top5", "zero-shot top-5"))  # fmt: skip
EVAL_LABELS = {"i2t_r1": "image->text R@1", "t2i_r1": "text->image R@1", "mean_r1": "mean R@1", "mean_r5": "mean R@5",
               "zs_top1": "zero-shot top-1", "zs_top5": "zero-shot top-5"}  # fmt: skip
TRAIN_LABELS = {"loss": "training loss", "lr": "learning rate", "samples_per_s": "images per second"}
MODEL_HEADERS = {"name": "encoder", "modality": "modality", "id": "id", "dim": "dim", "params_m": "params (M)",
                 **UNIMODAL_LABELS, "published_metric": "published metric", "published_source": "published source"}  # fmt: skip
MIN_POINTS = 3
"""A scatter or curve of fewer points is not drawn."""


@dataclass
class RunFiles:
    """What one folder holds, and how the report names it."""

    path: Path
    rank: Any = None
    """A :class:`~pairscout.ranking.RankResult`."""
    probe: Any = None
    """A :class:`~pairscout.evaluation.result.ProbeResult`."""
    train_log: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    label: str = ""
    """Run name in headings and on plots (the folder name, with its parent where two runs share a name)."""
    extra: dict[str, Any] = field(default_factory=dict)


def fmt(v: Any, digits: int = 3) -> str:
    """A cell's text: floats to ``digits`` places, NaN / None empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_p(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return "<0.001" if v < 1e-3 else f"{v:.3f}"


def _key(v: Any) -> Any:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def table(df: pd.DataFrame, columns: list[tuple[str, str]], *, sticky: int = 0, formats: dict[str, Any] | None = None,
          keys: dict[str, str] | None = None, wrap: tuple[str, ...] = ()) -> dict[str, Any]:
    """Rows of cell texts plus raw sort keys for the template's sortable tables. ``columns``: (column, header);
    ``sticky``: how many leading columns stay in view while the table scrolls sideways; ``keys``: a column whose
    values sort another (an interval's text sorts by its lower end); ``wrap``: columns of prose or paths whose
    cells wrap at a bounded width (``long``): on one line such a cell can be wider than the window beside the sticky
    columns, and scrolling never shows all of it. Numeric columns are right-aligned (``num``)."""
    cols = [(c, h) for c, h in columns if c in df]
    keys = keys or {}
    num = {c: pd.api.types.is_numeric_dtype(df[keys.get(c, c)]) and not pd.api.types.is_bool_dtype(df[c]) for c, _ in cols}
    rows = []
    for _, r in df.iterrows():
        rows.append([{"text": (formats or {}).get(c, fmt)(r[c]), "key": _key(r[keys.get(c, c)]), "num": num[c], "long": c in wrap}
                     for c, _ in cols])
    return {"headers": [h for _, h in cols], "rows": rows, "sticky": sticky}


def _tag(fig: Any, run: RunFiles, several: bool) -> Any:
    """With several runs on the page, the run's name in front of the plot's title (also in the PNG / SVG files)."""
    if several and fig is not None:
        if fig.get_suptitle():
            fig.suptitle(f"run {run.label}: {fig.get_suptitle()}", fontsize=plots.TITLE_SIZE)
        elif fig.axes:
            ax = fig.axes[0]
            ax.set_title(f"run {run.label}: {ax.get_title()}", fontsize=plots.TITLE_SIZE)
    return fig


def _describe_dataset(ds: dict[str, Any], n: Any) -> str:
    return f"{ds.get('name', '?')}, n = {n}" + (f", {ds['n_classes']} classes" if ds.get("n_classes") else "")


# --- rank ------------------------------------------------------------------------------------------------------------
def rank_section(run: RunFiles, several: bool = False) -> dict[str, Any]:
    """Verdict, ranking table (sticky names, one interval column per measure), heatmaps, unimodal quality, provenance."""
    from pairscout.ranking.compute import UNIMODAL_COLUMNS

    res = run.rank
    pdir = run.path / "plots"
    figs = []
    for m in res.metrics:
        fig = _tag(plots.heatmap(res.matrix(m), label(m)), run, several)
        figs.append(("heatmap", label(m), plots.render(fig, pdir, f"heatmap_{m}")))
    fig = _tag(plots.unimodal_bars(res.models, UNIMODAL_COLUMNS), run, several)
    unimodal = plots.render(fig, pdir, "unimodal_quality") if fig is not None else None
    pairs = res.pairs.copy()
    if "vision_layer" in pairs:  # a layer sweep: each name with the layer it was scored at
        for side in ("vision", "text"):
            pairs[side] = pairs[side].astype(str) + " @" + pairs[f"{side}_layer"].astype(str)
    cols = [("rank", "#"), ("vision", "vision"), ("text", "text")]
    formats: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for m in [res.primary, *[x for x in res.metrics if x != res.primary]]:
        cols.append((m, label(m)))
        if f"{m}_lo" in pairs:
            pairs[f"{m}_ci"] = [f"{lo:.3f} – {hi:.3f}" if lo == lo else "" for lo, hi in zip(pairs[f"{m}_lo"], pairs[f"{m}_hi"], strict=True)]
            cols.append((f"{m}_ci", "95 % interval"))
            keys[f"{m}_ci"] = f"{m}_lo"
        pcol = f"{m}_p_holm" if f"{m}_p_holm" in pairs else f"{m}_p"
        if pcol in pairs:
            cols.append((pcol, "p (Holm)" if pcol.endswith("_holm") else "p"))
            formats[pcol] = fmt_p
    st = res.meta["settings"]
    verdict = res.verdict.to_dict() if res.verdict is not None else {}  # the latest revision (the probe's, once probed)
    (v, t), why = res.recommended()
    models = res.models.copy()
    return {
        "label": run.label,
        "path": str(run.path),
        "pair": f"{v} + {t}",
        "verdict": verdict,
        "reason": why,
        "tied": [" × ".join(p) for p in verdict.get("tied", [])],
        "primary": label(res.primary),
        "score": st.get("score"),
        "n": st.get("n"),
        "dataset": res.meta.get("dataset", {}),
        "data": _describe_dataset(res.meta.get("dataset", {}), st.get("n")),
        "n_pairs": len(res.pairs),
        "pairs": table(pairs, cols, sticky=3, formats=formats, keys=keys),
        "models": table(models, list(MODEL_HEADERS.items()), sticky=1, wrap=("published_metric", "published_source")),
        "heatmaps": figs,
        "unimodal": unimodal,
        "failures": res.meta.get("failures", {}),
        "settings": {k: v for k, v in st.items() if k not in ("vision_zoo", "text_zoo")},
        "zoos": [
            {"name": e.get("name"), "id": e.get("id"), "modality": e.get("modality"), "revision": e.get("revision") or "", "pooling": e.get("pooling")}
            for z in ("vision_zoo", "text_zoo") for e in st.get(z, {}).get("encoders", [])
        ],
        "versions": res.meta.get("versions", {}),
        "command": res.meta.get("command") or "",
        # the stage totals (timings_s also holds the metrics phase's own breakdown, a dict: not a stage)
        "timings": {k: v for k, v in res.meta.get("timings_s", {}).items() if isinstance(v, int | float)},
    }


# --- probe -----------------------------------------------------------------------------------------------------------
def _corr_display(corr: pd.DataFrame) -> pd.DataFrame:
    """The correlation table with labels and kinds filled in (probe runs made before they were saved lack them)."""
    from pairscout.evaluation import predictors as P

    d = corr.copy()
    info = pd.DataFrame([P.describe(m) for m in d["metric"]], index=d.index)
    for c in ("label", "kind"):
        if c not in d or d[c].isna().all():
            d[c] = info[c]
    if "computed_by" in d:  # "pair measure (probe)": who computed it, without a column of its own
        d["kind"] = [f"{k} ({c})" if k == "pair measure" and c else k for k, c in zip(d["kind"], d["computed_by"].fillna(""), strict=True)]
    if "spearman_lo" in d:
        d["interval"] = [f"{lo:+.2f} – {hi:+.2f}" if lo == lo else "" for lo, hi in zip(d["spearman_lo"], d["spearman_hi"], strict=True)]
    if "spearman_p_holm" not in d:  # an older run: sort by the uncorrected p
        d = d.sort_values(["spearman_p", "spearman"], ascending=[True, False], na_position="last").reset_index(drop=True)
    return d


def _highlights(pairs: pd.DataFrame, verdict: dict[str, Any], target: str) -> tuple[list[int], dict[int, str]]:
    """The probed pairs a plot labels: the verdict's pair, its tied pairs and the three best read-outs."""
    keys = list(zip(pairs["vision"].astype(str), pairs["text"].astype(str), strict=True))
    notes: dict[int, str] = {}
    if verdict.get("pair"):
        for i, k in enumerate(keys):
            if list(k) == list(verdict["pair"]):
                notes[i] = "verdict"
            elif [*k] in [list(p) for p in verdict.get("tied", [])]:
                notes[i] = "tied with the verdict"
    best = list(pairs[target].astype(float).sort_values(ascending=False).index[:3]) if target in pairs else []
    for i in best:
        notes.setdefault(i, "best read-out" if i == best[0] else "")
    rows = sorted(notes, key=lambda i: (pairs.loc[i, "rank"] if "rank" in pairs else i))
    return rows, notes


def probe_section(run: RunFiles, several: bool = False) -> dict[str, Any]:
    """Which measure predicts the probe: the sorted table, a forest plot of every rho, scatter plots of the primary
    measure, the strongest predictor and the encoders' own k-NN accuracy, and the probed pairs."""
    from pairscout.metrics.registry import readout_label

    res = run.probe
    meta = res.meta
    pdir = run.path / "plots"
    pairs = res.pairs.reset_index(drop=True)
    target = meta.get("target", "mean_r1")
    tlabel = readout_label(target)
    corr = _corr_display(res.correlations) if not res.correlations.empty else res.correlations
    verdict = meta.get("verdict") or {}
    rows, notes = _highlights(pairs, verdict, target) if target in pairs else ([], {})
    figs = []
    if not corr.empty and corr["spearman"].notna().sum() >= 2:
        fig = _tag(plots.forest(corr, f"which measure predicts the probe's {tlabel}?"), run, several)
        figs.append(("forest", f"Spearman rho of every predictor with the probe's {tlabel}, 95 % interval (Fisher z); "
                     "filled: significant after Holm's correction over the predictors", plots.render(fig, pdir, f"probe_{target}_forest")))
    primary = meta.get("primary")
    ranked = list(corr["metric"][corr["spearman"].notna()]) if not corr.empty else []
    wanted = [primary, *(ranked[:1]), "vision_knn_acc", "text_knn_acc"]
    for m in dict.fromkeys(w for w in wanted if w):
        if m not in pairs or target not in pairs or pairs[[m, target]].astype(float).dropna().shape[0] < MIN_POINTS:
            continue
        xl = corr.set_index("metric")["label"].get(m, label(m)) if not corr.empty else label(m)
        why = "the primary measure" if m == primary else ("the strongest predictor" if ranked and m == ranked[0] else "the encoder alone")
        stat = None if meta.get("above_chance", True) else f"{len(pairs)} pairs; the probe is at chance: no correlation computed"
        fig = _tag(plots.metric_scatter(pairs, m, target, xlabel=xl, ylabel=tlabel, highlight=rows, notes=notes, stat=stat), run, several)
        figs.append(("scatter", f"{xl} against the probe's {tlabel} ({why}); labelled: the verdict, its tied pairs, the best read-outs",
                     plots.render(fig, pdir, f"probe_{target}_vs_{m}")))
    corr_cols = [("label", "predictor"), ("answer", "predicts?"), ("spearman", "Spearman rho"), ("interval", "95 % interval"),
                 ("spearman_p_holm", "p (Holm)"), ("spearman_p", "p"), ("kendall", "Kendall tau"), ("n_pairs", "pairs"), ("kind", "kind")]  # fmt: skip
    p_fmt = dict.fromkeys(("spearman_p", "spearman_p_holm", "kendall_p", "kendall_p_holm"), fmt_p)
    measures = [m for m in MEASURES if m in pairs]
    n_items = int(meta.get("n_test_items") or 0)
    if n_items and target in pairs and meta.get("target_direction", "higher") == "higher":  # a proportion's binomial half-width
        from pairscout.statistics import binomial_se

        pairs[f"{target}_hw"] = [1.96 * binomial_se(float(x), n_items) if x == x else float("nan") for x in pairs[target]]
    pair_cols = [("rank", "#"), ("group", "group"), ("vision", "vision"), ("text", "text"), (target, f"{tlabel} (read-out)"),
                 (f"{target}_hw", f"± 95 % (binomial, {n_items} images)"),
                 ("i2t_r1", "image->text R@1"), ("t2i_r1", "text->image R@1"), ("mean_r5", "mean R@5"),
                 *[(m, label(m)) for m in measures], ("final_loss", "final loss"), ("train_s", "seconds")]  # fmt: skip
    best = corr[corr["spearman"].notna()].head(1) if "spearman" in corr else corr
    return {
        "regret": _regret(res.regret, tlabel),
        "selection": meta.get("selection", ""),
        "cannot_tell": _cannot_tell(res, meta),
        "label": run.label,
        "path": str(run.path),
        "target": target,
        "target_label": tlabel,
        "chance": meta.get("chance"),
        "above_chance": meta.get("above_chance", True),
        "best_target": meta.get("best_target"),
        "why": (lambda w: w[:1].upper() + w[1:])(str(meta.get("target_why", ""))),
        "family_size": meta.get("family_size"),
        "best": None if best.empty else {"label": best["label"].iloc[0], "rho": float(best["spearman"].iloc[0]),
                                           "p": float(best["spearman_p"].iloc[0]),
                                           "p_holm": float(best["spearman_p_holm"].iloc[0]) if "spearman_p_holm" in best else None},
        "correlations": table(corr, corr_cols, sticky=1, formats=p_fmt, keys={"interval": "spearman_lo"}) if not corr.empty else None,
        "figures": figs,
        "pairs": table(pairs, pair_cols, sticky=4) if not pairs.empty else None,
        "settings": meta.get("settings", {}),
    }


def _regret(rg: Any, tlabel: str) -> dict[str, Any] | None:
    """The regret table of a probe (:class:`~pairscout.evaluation.regret.Regret`) as a small sortable table and its sentence."""
    if rg is None:
        return None
    df = pd.DataFrame([{"rule": r.label, "pair": f"{r.pair[0]} × {r.pair[1]}" if r.pair else r.why, "rank": r.rank, "value": r.value,
                        "regret": r.regret, "interval": "" if r.lo != r.lo else f"{r.lo:.3f} – {r.hi:.3f}", "lo": r.lo, "why": r.why if r.pair else ""}
                       for r in rg.rules])  # fmt: skip
    cols = [("rule", "rule"), ("pair", "pair"), ("rank", "place by the read-out"), ("value", tlabel), ("regret", "regret"),
            ("interval", "95 % interval (paired bootstrap)"), ("why", "why this pair")]  # fmt: skip
    df["why"] = [r.why for r in rg.rules]
    return {"sentence": rg.sentence, "table": table(df, cols, sticky=1, keys={"interval": "lo"}, formats={"rank": lambda v: "" if v != v or v is None else f"{int(v)}"},
                                                    wrap=("why",)),
            "interval": rg.interval, "n_items": rg.n_items, "n_pairs": rg.n_pairs, "over": rg.over}


def _cannot_tell(res: Any, meta: dict[str, Any]) -> str:
    """The line a researcher reads when no read-out separates the probed pairs (empty otherwise)."""
    choice = res.target_choice
    if choice is None or choice.separated:
        return ""
    from pairscout.evaluation.readouts import cannot_tell

    return cannot_tell(choice, int(meta.get("n_test_items") or 0), meta.get("separation_over", "non-baseline pairs"))


# --- align -----------------------------------------------------------------------------------------------------------
def align_section(run: RunFiles, several: bool = False) -> dict[str, Any]:
    """Training curves (each of >= 3 points), held-out evaluation as curves when evaluated >= 3 times, else a table."""
    from pairscout.zoo.spec import shown_name

    log = run.train_log or {}
    hist = log.get("history", [])
    train = [h for h in hist if "loss" in h and "eval" not in h]
    evals = [{"step": h["step"], **h["eval"]} for h in hist if isinstance(h.get("eval"), dict)]
    pdir = run.path / "plots"
    figs = []
    fig = plots.curves(train, "step", [k for k in TRAIN_LABELS if any(k in h for h in train)], "training", labels=TRAIN_LABELS)
    if fig is not None:
        figs.append(("training", plots.render(_tag(fig, run, several), pdir, "training_curves")))
    keys = [k for k in ("i2t_r1", "t2i_r1", "zs_top1") if any(k in e for e in evals)]
    fig = plots.curves(evals, "step", keys, "held-out evaluation", labels=EVAL_LABELS) if keys else None
    if fig is not None:
        figs.append(("held-out evaluation", plots.render(_tag(fig, run, several), pdir, "eval_curves")))
    eval_table = None
    if evals and fig is None:  # one or two evaluations: numbers, not a plot
        ev = pd.DataFrame(evals)
        eval_table = table(ev, [("step", "step"), *[(k, v) for k, v in EVAL_LABELS.items()]], formats={"step": lambda v: f"{v:.0f}"})
    cfg = run.model_config or {}
    metrics = log.get("metrics") or {}
    return {
        "label": run.label,
        "path": str(run.path),
        "config": log.get("config", {}),
        "model": {k: cfg.get(k) for k in ("vision", "text", "vision_head", "text_head", "loss", "dataset_fingerprint", "command", "versions") if k in cfg},
        "final": [(name, metrics.get(k)) for k, name in FINAL_CARDS if metrics.get(k) is not None],
        "pair": f"{shown_name(cfg.get('vision'))} × {shown_name(cfg.get('text'))}" if cfg else "",
        "figures": figs,
        "eval_table": eval_table,
    }
