"""One self-contained HTML page from saved run folders.

The page is rebuilt from the files alone (``rank.json`` + ``pairs.parquet`` + ``models.parquet`` of a
rank run, ``probe.json`` of a probe, ``train_log.json`` + ``config.json`` of an alignment), renders
every plot as inline SVG (each also saved as PNG and SVG in the run's ``plots/`` folder), inlines its
CSS and its one small script, and references no URL of any kind, so it opens offline and can be mailed.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

import pairscout
from pairscout import plots
from pairscout._io import atomic_write_text
from pairscout.errors import PairscoutError
from pairscout.metrics.registry import PROBE_TARGET, label

TEMPLATE = "report.html.j2"
FINAL_CARDS = (("i2t_r1", "image->text R@1"), ("t2i_r1", "text->image R@1"), ("mean_r5", "mean R@5"),
               ("zs_top1", "zero-shot top-1"), ("zs_top5", "zero-shot top-5"))


@dataclass
class RunFiles:
    """What one folder holds."""

    path: Path
    rank: Any = None
    probe: dict[str, Any] | None = None
    train_log: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PairscoutError(f"{path} is unreadable ({e}).", fix="re-run the command that wrote it.") from None


def collect(paths: list[str | Path]) -> list[RunFiles]:
    """Find the result files in each folder (a folder may hold a rank run, a probe and an alignment)."""
    from pairscout.ranking.result import RankResult

    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise PairscoutError(f"{p} is not a folder.", fix="pass the folders that `pairscout rank/probe/align --out` wrote.")
        run = RunFiles(p)
        if (p / "rank.json").is_file():
            run.rank = RankResult.load(p)
        if (p / "probe.json").is_file():
            run.probe = _read_json(p / "probe.json")
        for sub in (p, p / "train", p / "model"):
            if (sub / "train_log.json").is_file() and run.train_log is None:
                run.train_log = _read_json(sub / "train_log.json")
            if (sub / "config.json").is_file() and run.model_config is None:
                run.model_config = _read_json(sub / "config.json")
        if run.rank is None and run.probe is None and run.train_log is None:
            raise PairscoutError(f"{p} holds no pairscout results (no rank.json, probe.json or train_log.json).",
                                 fix="pass a folder written by `pairscout rank/probe/align --out DIR`.")
        runs.append(run)
    return runs


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(df: pd.DataFrame, columns: list[str], headers: dict[str, str] | None = None, digits: int = 3) -> dict[str, Any]:
    """Rows of strings plus raw sort keys, for the template's sortable tables."""
    cols = [c for c in columns if c in df]
    rows = []
    for _, r in df.iterrows():
        rows.append([{"text": _fmt(r[c], digits), "key": ("" if r[c] is None or (isinstance(r[c], float) and math.isnan(r[c])) else r[c])} for c in cols])
    return {"headers": [(headers or {}).get(c, c) for c in cols], "rows": rows}


def _rank_section(run: RunFiles) -> dict[str, Any]:
    from pairscout.ranking.compute import UNIMODAL_COLUMNS

    res = run.rank
    pdir = run.path / "plots"
    figs = []
    for m in res.metrics:
        figs.append(("heatmap", label(m), plots.render(plots.heatmap(res.matrix(m), label(m)), pdir, f"heatmap_{m}")))
    fig = plots.unimodal_bars(res.models, UNIMODAL_COLUMNS)
    unimodal = plots.render(fig, pdir, "unimodal_quality") if fig is not None else None
    cols = ["rank", "vision", "text"]
    headers = {}
    for m in [res.primary, *[x for x in res.metrics if x != res.primary]]:
        cols += [m, f"{m}_lo", f"{m}_hi"]
        headers.update({m: label(m), f"{m}_lo": "95% lo", f"{m}_hi": "95% hi"})
        if f"{m}_p" in res.pairs:
            cols.append(f"{m}_p")
            headers[f"{m}_p"] = "p"
    model_cols = ["name", "modality", "id", "dim", "params_m", "knn_acc", "nmi", "ari", "silhouette", "published_score", "published_metric", "published_source"]
    st = res.meta["settings"]
    return {
        "path": str(run.path),
        "best": res.recommended()[0],
        "verdict": res.meta.get("verdict"),
        "primary": label(res.primary),
        "score": st.get("score"),
        "n": st.get("n"),
        "dataset": res.meta.get("dataset", {}),
        "pairs": _table(res.pairs, cols, headers),
        "models": _table(res.models, model_cols),
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
        "timings": res.meta.get("timings_s", {}),
    }


def _probe_section(run: RunFiles) -> dict[str, Any]:
    """Probe read-outs: each ranking metric against probe R@1, and unimodal quality against it."""
    probe = run.probe or {}
    pdir = run.path / "plots"
    pairs = pd.DataFrame(probe.get("pairs", []))
    corr = pd.DataFrame(probe.get("correlations", []))
    target = probe.get("target", PROBE_TARGET)
    figs = []
    if not pairs.empty and target in pairs:
        for m in probe.get("metrics", []):
            if m in pairs:
                fig = plots.metric_scatter(pairs, m, target, xlabel=label(m), ylabel=label(target))
                figs.append((m, plots.render(fig, pdir, f"probe_{target}_vs_{m}")))
    quality = []
    if run.rank is not None and not pairs.empty and target in pairs:
        models = run.rank.models.set_index("name")
        for side, col, qlabel in (("vision", "knn_acc", "vision k-NN accuracy"), ("text", "published_score", "text MTEB average (published)"),
                                 ("text", "knn_acc", "text k-NN accuracy")):
            if col in models and side in pairs:
                df = pairs.assign(quality=pairs[side].map(models[col]))
                if df["quality"].notna().sum() >= 2:
                    fig = plots.metric_scatter(df, "quality", target, xlabel=qlabel, ylabel=label(target))
                    quality.append((qlabel, plots.render(fig, pdir, f"probe_{target}_vs_{side}_{col}")))
    return {
        "path": str(run.path),
        "target": target,
        "pairs": _table(pairs, list(pairs.columns)) if not pairs.empty else None,
        "correlations": _table(corr, list(corr.columns)) if not corr.empty else None,
        "scatter": figs,
        "quality": quality,
        "settings": probe.get("settings", {}),
    }


def _align_section(run: RunFiles) -> dict[str, Any]:
    log = run.train_log or {}
    hist = log.get("history", [])
    train = [h for h in hist if "loss" in h and "eval" not in h]
    evals = [{"step": h["step"], **h["eval"]} for h in hist if isinstance(h.get("eval"), dict)]
    pdir = run.path / "plots"
    figs = []
    fig = plots.curves(train, "step", [k for k in ("loss", "lr", "samples_per_s") if any(k in h for h in train)], "training")
    if fig is not None:
        figs.append(("training", plots.render(fig, pdir, "training_curves")))
    keys = [k for k in ("i2t_r1", "t2i_r1", "zs_top1") if any(k in e for e in evals)]
    if keys:
        fig = plots.curves(evals, "step", keys, "held-out evaluation")
        if fig is not None:
            figs.append(("evaluation", plots.render(fig, pdir, "eval_curves")))
    cfg = run.model_config or {}
    return {
        "path": str(run.path),
        "config": log.get("config", {}),
        "model": {k: cfg.get(k) for k in ("vision", "text", "vision_head", "text_head", "loss", "dataset_fingerprint", "command", "versions") if k in cfg},
        "final": [(name, (log.get("metrics") or {}).get(k)) for k, name in FINAL_CARDS if (log.get("metrics") or {}).get(k) is not None],
        "pair": f"{(cfg.get('vision') or {}).get('name', '?')} + {(cfg.get('text') or {}).get('name', '?')}" if cfg else "",
        "figures": figs,
    }


def build_report(paths: list[str | Path], out: str | Path | None = None, *, title: str = "pairscout report") -> Path:
    """Write one HTML file for the given run folders; returns its path (default ``<first run>/report.html``)."""
    import jinja2

    runs = collect(paths)
    out = Path(out) if out is not None else runs[0].path / "report.html"
    if out.is_dir():  # `-o somefolder`: the page goes inside it, under the usual name
        out = out / "report.html"
    if not out.parent.is_dir():
        raise PairscoutError(f"the folder of the report file {out} does not exist.", fix="create it, or pass --out FILE in an existing folder.")
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("pairscout").joinpath("templates", name).read_text(encoding="utf-8")),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    ranks = [_rank_section(r) for r in runs if r.rank is not None]
    probes = [_probe_section(r) for r in runs if r.probe is not None]
    aligns = [_align_section(r) for r in runs if r.train_log is not None]
    page = env.get_template(TEMPLATE).render(
        title=title,
        ranks=ranks,
        probes=probes,
        aligns=aligns,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        version=pairscout.__version__,
        sources=[str(r.path) for r in runs],
        json_dump=lambda v: html.escape(json.dumps(v, indent=1, default=str)),
    )
    atomic_write_text(out, page)
    return out
