"""Comparison plots. Each function builds a matplotlib figure; :func:`render` saves it as PNG and
SVG beside the results and returns it as an inline ``<svg>`` for the HTML report (Agg backend: no
display needed)."""

from __future__ import annotations

import io
import itertools
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

from pairscout._io import atomic_path  # noqa: E402

MODALITY_COLORS = {"vision": "#86bbd8", "text": "#f6ae2d"}
plt.rcParams["svg.fonttype"] = "none"  # text stays text in SVG: small files, selectable labels


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
            p = out / f"{stem}.{ext}"
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
    fig, ax = plt.subplots(figsize=(1.1 * vals.shape[1] + 2.5, 0.55 * vals.shape[0] + 1.8))
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
            ax.text(j + 0.5, i + 0.5, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=8, color="black" if vals[i, j] > mid else "white")
    ax.set_xlabel("text encoder")
    ax.set_ylabel("vision encoder")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def spearman(x: pd.Series, y: pd.Series) -> float:
    from scipy.stats import spearmanr

    ok = pd.concat([x, y], axis=1).dropna()
    if len(ok) < 3 or ok.iloc[:, 0].nunique() < 2 or ok.iloc[:, 1].nunique() < 2:
        return float("nan")
    return float(spearmanr(ok.iloc[:, 0], ok.iloc[:, 1]).statistic)


def metric_scatter(df: pd.DataFrame, x: str, y: str, *, title: str | None = None, xlabel: str | None = None,
                   ylabel: str | None = None, label: Sequence[str] = ("vision", "text")) -> Figure:
    """One column against another across rows (pairs or models), Spearman's rho in the title."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    color = df["modality"].map(MODALITY_COLORS).fillna("#33658a") if "modality" in df else "#33658a"
    ax.scatter(df[x], df[y], s=28, alpha=0.85, color=color)
    for _, r in df.iterrows():
        ax.annotate("|".join(str(r[c]) for c in label), (r[x], r[y]), fontsize=5.5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    rho = spearman(df[x], df[y])
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title or f"{ylabel or y} vs {xlabel or x} (Spearman {rho:.2f}, {df[[x, y]].dropna().shape[0]} points)")
    ax.grid(alpha=0.3)
    return fig


def unimodal_bars(models: pd.DataFrame, columns: Sequence[str]) -> Figure | None:
    """Unimodal quality per model, one panel per measure, coloured by modality."""
    cols = [c for c in columns if c in models and models[c].notna().any()]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 0.32 * len(models) + 1.6), squeeze=False)
    colors = models["modality"].map(MODALITY_COLORS).fillna("#999999")
    for ax, c in zip(axes[0], cols, strict=True):
        vals = models[c].astype(float)
        ax.barh(models["name"], vals.fillna(0), color=colors)
        for y, v in enumerate(vals):
            if v != v:  # no value (e.g. no published score): say so instead of drawing a zero
                ax.text(0, y, " n/a", va="center", fontsize=6, color="#777777")
        ax.set_title(c)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        for lbl in ax.get_yticklabels():
            lbl.set_fontsize(7)
    fig.suptitle("unimodal quality (blue: vision, orange: text)")
    fig.tight_layout()
    return fig


def curves(history: Sequence[dict], x: str, ys: Sequence[str], title: str) -> Figure | None:
    """Training curves: each of ``ys`` against ``x`` from a list of log records (missing values skipped)."""
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.3), squeeze=False)
    drawn = False
    for ax, key in zip(axes[0], ys, strict=True):
        pts = [(h[x], h[key]) for h in history if h.get(key) is not None and h.get(x) is not None]
        if pts:
            xs, vs = zip(*pts, strict=True)
            ax.plot(xs, vs, marker="." if len(pts) < 30 else None, color="#33658a")
            drawn = True
        ax.set_xlabel(x)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return None
    return fig
