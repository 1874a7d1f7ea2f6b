"""Comparison plots. Each function builds a matplotlib figure; :func:`render` saves it as PNG and
SVG beside the results and returns it as an inline ``<svg>`` for the HTML report (Agg backend: no
display needed)."""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pairscout.files import atomic_path, safe_name  # noqa: E402

MODALITY_COLORS = {"vision": "#86bbd8", "text": "#f6ae2d"}
GROUP_COLORS = {"top": "#33658a", "middle": "#86bbd8", "bottom": "#f26419", "chosen": "#33658a"}
LABEL_SIZE, TICK_SIZE, TITLE_SIZE = 9, 9, 11
"""Type sizes (points) of the figures: at the report's scale (about 1.3 px per point) none is below 11 px."""
plt.rcParams["svg.fonttype"] = "none"  # text stays text in SVG: small files, selectable labels
plt.rcParams["svg.hashsalt"] = "pairscout"  # clip-path ids from a fixed salt, not random: the same runs give the same page
plt.rcParams["text.parse_math"] = False  # names are text: "$" or "^" in an encoder name is printed, never parsed as TeX


@dataclass
class Plot:
    stem: str
    svg: str
    """Inline ``<svg>`` element: no XML header, DOCTYPE or metadata, so it references nothing outside."""
    paths: list[Path] = field(default_factory=list)


def render(fig: Figure, out: Path | None, stem: str) -> Plot:
    """Save ``fig`` as ``out/stem.png`` and ``out/stem.svg`` (when ``out``) and return it inline."""
    paths = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "svg"):
            p = out / f"{safe_name(stem)}.{ext}"  # stems name measures and targets: one path component
            with atomic_path(p) as tmp:  # a full disk leaves the old plot or none, never a truncated one
                fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
            paths.append(p)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)
    # inline in HTML the parser supplies the SVG and xlink namespaces: drop the declarations so the
    # page holds no URL at all
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)
    return Plot(stem, text, paths)


def heatmap(matrix: pd.DataFrame, title: str) -> Figure:
    """Vision (rows) x text (columns) heatmap with the values written in the cells."""
    vals = matrix.to_numpy(dtype=float)
    # compact cells: the report shows two heatmaps a row, and its type must stay >= 10 px at that size
    fig, ax = plt.subplots(figsize=(0.7 * vals.shape[1] + 2.6, 0.42 * vals.shape[0] + 1.6))
    # vector cells (pcolormesh), not a raster image: crisp at any zoom and a few KB in SVG
    im = ax.pcolormesh(np.ma.masked_invalid(vals), cmap="viridis", edgecolors="white", linewidth=0.5)
    ax.set_xlim(0, vals.shape[1])
    ax.set_ylim(vals.shape[0], 0)
    ax.set_xticks(np.arange(vals.shape[1]) + 0.5, matrix.columns, rotation=35, ha="right")
    ax.set_yticks(np.arange(vals.shape[0]) + 0.5, matrix.index)
    finite = vals[np.isfinite(vals)]
    mid = (finite.max() + finite.min()) / 2 if finite.size else 0
    for i, j in itertools.product(range(vals.shape[0]), range(vals.shape[1])):
        if np.isfinite(vals[i, j]):
            ax.text(j + 0.5, i + 0.5, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=9, color="black" if vals[i, j] > mid else "white")
    ax.set_xlabel("text encoder")
    ax.set_ylabel("vision encoder")
    ax.set_title(title, fontsize=TITLE_SIZE + 1)
    ax.tick_params(labelsize=TICK_SIZE + 1)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def spearman(x: pd.Series, y: pd.Series) -> float:
    from scipy.stats import spearmanr

    ok = pd.concat([x, y], axis=1).dropna()
    if len(ok) < 3 or ok.iloc[:, 0].nunique() < 2 or ok.iloc[:, 1].nunique() < 2:
        return float("nan")
    return float(spearmanr(ok.iloc[:, 0], ok.iloc[:, 1]).statistic)


def _style(ax: plt.Axes) -> None:
    ax.tick_params(labelsize=TICK_SIZE)
    ax.xaxis.label.set_size(LABEL_SIZE + 1)
    ax.yaxis.label.set_size(LABEL_SIZE + 1)
    ax.grid(alpha=0.3)


def _natural(text: str) -> tuple:
    """Sort key that puts "#2" before "#14"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def point_labels(ax: plt.Axes, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], gap: float = 0.065,
                 same: float = 0.02) -> list:
    """Short labels beside chosen points, each with a leader line to its own marker, never on top of each other.

    Only points whose markers overlap (closer than ``same``, axes fraction) share one label ("#1, #2"); every other
    point gets its own. Labels stand in one column per side (left of points in the right 30 % of the axes, right of
    the others), at their point's height where free, pushed down by ``gap`` where not, so a leader line always ends
    on the marker its label names. Each label is an annotation with ``gid="point-label"`` (the browser test checks
    that none overlaps another)."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    pts = [((x - x0) / ((x1 - x0) or 1), (y - y0) / ((y1 - y0) or 1), str(t)) for x, y, t in zip(xs, ys, texts, strict=True)
           if np.isfinite(x) and np.isfinite(y)]  # fmt: skip
    groups: list[list[tuple[float, float, str]]] = []
    for p in sorted(pts, key=lambda p: -p[1]):
        near = next((g for g in groups if any(math.hypot(q[0] - p[0], q[1] - p[1]) < same for q in g)), None)
        if near is None:
            groups.append([p])
        else:
            near.append(p)
    anchors = [(float(np.mean([q[0] for q in g])), float(np.mean([q[1] for q in g])), g) for g in groups]
    anchors.sort(key=lambda a: -a[1])  # one vertical stack over both sides: no two labels share a band
    placed: list[float] = []
    for _, py, _ in anchors:
        placed.append(min(py, placed[-1] - gap) if placed else py)
    shift = max(0.0, 0.03 - min(placed, default=0.5))  # pushed below the axes: move the stack up as a whole
    anns = []
    for (x, py, g), y in zip(anchors, placed, strict=True):
        right = x <= 0.7
        a = ax.annotate(", ".join(sorted((t for _, _, t in g), key=_natural)), (x, py), xycoords="axes fraction",
                        xytext=(x + (0.07 if right else -0.07), y + shift), textcoords="axes fraction", fontsize=LABEL_SIZE,
                        ha="left" if right else "right", va="center",
                        arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6, "shrinkA": 1, "shrinkB": 3.5})  # fmt: skip
        a.set_gid("point-label")
        anns.append(a)
    return anns


def metric_scatter(df: pd.DataFrame, x: str, y: str, *, title: str | None = None, xlabel: str | None = None,
                   ylabel: str | None = None, label: Sequence[str] = ("vision", "text"), highlight: Sequence[int] | None = None,
                   notes: dict[int, str] | None = None, n_label: int = 3, stat: str | None = None) -> Figure:
    """One column against another across rows (pairs or models), Spearman's rho in the title.

    Only the points that matter are labelled (the ``highlight`` row positions, default: the ``n_label`` highest in
    ``y``), each by a short key (the pair's rank ``#`` when there is a ``rank`` column), listed under the plot with
    its full name and ``notes`` ("verdict", "tied"); rows with a ``group`` column (top / middle / bottom) are
    coloured by it, with a legend. ``stat`` replaces the Spearman line under the title (e.g. "no correlation: ...").
    """
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    d = df.reset_index(drop=True)
    ok = d[[x, y]].astype(float).notna().all(axis=1)
    if "group" in d:
        for g, color in GROUP_COLORS.items():
            sel = ok & (d["group"] == g)
            if sel.any():
                ax.scatter(d.loc[sel, x], d.loc[sel, y], s=36, alpha=0.9, color=color, label=f"{g} pairs" if g != "chosen" else "pairs",
                           edgecolor="white", linewidth=0.5)  # fmt: skip
        ax.legend(fontsize=LABEL_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: never on a point
    else:
        color = d["modality"].map(MODALITY_COLORS).fillna("#33658a") if "modality" in d else "#33658a"
        ax.scatter(d.loc[ok, x], d.loc[ok, y], s=36, alpha=0.9, color=color if isinstance(color, str) else color[ok], edgecolor="white", linewidth=0.5)
    rho = spearman(d[x], d[y])
    n = int(ok.sum())
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    stat = stat or (f"Spearman {rho:+.2f} over {n} points" if rho == rho else f"{n} points")
    ax.set_title(title or f"{ylabel or y} vs {xlabel or x}\n{stat}", fontsize=TITLE_SIZE)
    _style(ax)
    rows = list(highlight) if highlight is not None else list(d[ok].sort_values(y, ascending=False).index[:n_label])
    rows = [r for r in dict.fromkeys(rows) if r in d.index and ok[r]]
    if rows:
        ax.autoscale_view()
        keys = [str(d.loc[r, "rank"]) if "rank" in d else str(i + 1) for i, r in enumerate(rows)]
        point_labels(ax, d.loc[rows, x].astype(float).tolist(), d.loc[rows, y].astype(float).tolist(), [f"#{k}" if "rank" in d else k for k in keys])
        lines = [f"{'#' if 'rank' in d else ''}{k}  {' × '.join(str(d.loc[r, c]) for c in label if c in d)}"
                 + (f"  ({(notes or {})[r]})" if (notes or {}).get(r) else "") for k, r in zip(keys, rows, strict=True)]  # fmt: skip
        fig.text(0.02, -0.01, "\n".join(lines), ha="left", va="top", fontsize=LABEL_SIZE, color="#333333", linespacing=1.4)
    return fig


def unimodal_bars(models: pd.DataFrame, columns: Sequence[str], labels: dict[str, str] | None = None, min_values: int = 2,
                  per_row: int = 3) -> Figure | None:
    """Unimodal quality per model, one panel per measure (human names from ``labels``, default the registry's),
    coloured by modality, at most ``per_row`` panels a row. A measure with fewer than ``min_values`` values
    (e.g. one published score) gets no panel: a bar chart of n/a says nothing."""
    from pairscout.metrics.registry import label as registry_label

    cols = [c for c in columns if c in models and pd.to_numeric(models[c], errors="coerce").notna().sum() >= min_values]
    if not cols:
        return None
    rows = -(-len(cols) // per_row)
    ncols = min(per_row, len(cols))
    fig, axes = plt.subplots(rows, ncols, figsize=(3.6 * ncols + 1.4, (0.26 * len(models) + 1.0) * rows), squeeze=False, sharey=True)
    colors = models["modality"].map(MODALITY_COLORS).fillna("#999999")
    for i, ax in enumerate(axes.flat):
        if i >= len(cols):
            ax.set_visible(False)
            continue
        c = cols[i]
        vals = pd.to_numeric(models[c], errors="coerce").astype(float)
        ax.barh(models["name"], vals.fillna(0), color=colors)
        for y, v in enumerate(vals):
            if v != v:  # no value: say so instead of drawing a zero
                ax.text(0, y, " n/a", va="center", fontsize=TICK_SIZE - 1, color="#777777")
        ax.set_title((labels or {}).get(c) or registry_label(c), fontsize=TITLE_SIZE)
        if i == 0:  # shared y: once inverts them all
            ax.invert_yaxis()
        _style(ax)
        ax.grid(axis="y", alpha=0)
    fig.suptitle("unimodal quality (blue: vision encoders, orange: text encoders)", fontsize=TITLE_SIZE)
    fig.tight_layout()
    return fig


def curves(history: Sequence[dict], x: str, ys: Sequence[str], title: str, min_points: int = 3,
           labels: dict[str, str] | None = None) -> Figure | None:
    """Training curves: each of ``ys`` against ``x`` from a list of log records (missing values skipped). A series
    with fewer than ``min_points`` points gets no panel (a one-point "curve" is a number: show it in a table);
    None when no series has enough."""
    series = {k: [(h[x], h[k]) for h in history if h.get(k) is not None and h.get(x) is not None] for k in ys}
    keep = [k for k in ys if len(series[k]) >= min_points]
    if not keep:
        return None
    fig, axes = plt.subplots(1, len(keep), figsize=(3.6 * len(keep) + 0.6, 3.0), squeeze=False)
    for ax, key in zip(axes[0], keep, strict=True):
        xs, vs = zip(*series[key], strict=True)
        ax.plot(xs, vs, marker="." if len(xs) < 30 else None, color="#33658a")
        ax.set_xlabel(x)
        ax.set_title((labels or {}).get(key, key), fontsize=TITLE_SIZE)
        _style(ax)
    fig.suptitle(title, fontsize=TITLE_SIZE)
    fig.tight_layout()
    return fig


KIND_COLORS = {"pair measure": "#33658a", "vision encoder alone": "#86bbd8", "text encoder alone": "#f6ae2d", "ranking score": "#555555"}


def forest(corr: pd.DataFrame, title: str) -> Figure | None:
    """Spearman rho of every predictor with its 95 % interval, in the table's order (strongest first); filled
    markers: Holm-corrected p < 0.05. ``corr``: :func:`pairscout.evaluation.predictors.correlations` output."""
    d = corr[corr["spearman"].notna()].reset_index(drop=True)
    if len(d) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(d) + 1.3))
    ys = np.arange(len(d))
    for i, r in d.iterrows():
        color = KIND_COLORS.get(str(r.get("kind", "")).split(" (")[0], "#33658a")  # "pair measure (probe)" -> pair measure
        lo, hi = r.get("spearman_lo", np.nan), r.get("spearman_hi", np.nan)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [i, i], color=color, lw=1.6, alpha=0.8)
        sig = bool(r.get("spearman_p_holm", 1.0) < 0.05)
        ax.plot([r["spearman"]], [i], "o", ms=6, color=color, markerfacecolor=color if sig else "white", markeredgewidth=1.4)
    ax.axvline(0, color="#999999", lw=0.8)
    ax.set_yticks(ys, [str(r.get("label") or r["metric"]) for _, r in d.iterrows()])
    ax.set_ylim(len(d) - 0.5, -0.5)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho with the probe read-out (95 % interval)")
    ax.set_title(title, fontsize=TITLE_SIZE)
    _style(ax)
    kinds = {str(k).split(" (")[0] for k in d.get("kind", [])}
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in KIND_COLORS.items() if k in kinds]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="#333333", markerfacecolor="white", label="not significant after Holm"))
    ax.legend(handles=handles, fontsize=LABEL_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
