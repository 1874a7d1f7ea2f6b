"""Comparison plots, each saved as PNG and SVG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        paths.append(p)
    plt.close(fig)
    return paths


def heatmap(matrix: pd.DataFrame, title: str, out: Path, stem: str) -> list[Path]:
    """Vision (rows) x text (columns) heatmap with the values written in the cells."""
    vals = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * vals.shape[1] + 2.5, 0.55 * vals.shape[0] + 1.8))
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    ax.set_xticks(range(vals.shape[1]), matrix.columns, rotation=35, ha="right")
    ax.set_yticks(range(vals.shape[0]), matrix.index)
    finite = vals[np.isfinite(vals)]
    mid = (finite.max() + finite.min()) / 2 if finite.size else 0
    for i, j in itertools.product(range(vals.shape[0]), range(vals.shape[1])):
        if np.isfinite(vals[i, j]):
            ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=8, color="black" if vals[i, j] > mid else "white")
    ax.set_xlabel("text encoder")
    ax.set_ylabel("vision encoder")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, out, stem)


def metric_scatter(pairs: pd.DataFrame, x: str, y: str, out: Path, stem: str, *, title: str | None = None) -> list[Path]:
    """One metric against another across all pairs, with Spearman's rho in the title."""
    from scipy.stats import spearmanr

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(pairs[x], pairs[y], s=28, alpha=0.85, color="#33658a")
    for _, r in pairs.iterrows():
        ax.annotate(f"{r['vision']}|{r['text']}", (r[x], r[y]), fontsize=5.5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ok = pairs[[x, y]].dropna()
    rho = spearmanr(ok[x], ok[y]).statistic if len(ok) > 2 and ok[x].nunique() > 1 and ok[y].nunique() > 1 else float("nan")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x} (Spearman {rho:.2f}, {len(ok)} pairs)")
    ax.grid(alpha=0.3)
    return _save(fig, out, stem)


def unimodal_bars(models: pd.DataFrame, columns: list[str], out: Path, stem: str) -> list[Path]:
    """Unimodal quality per model, one panel per measure, grouped by modality."""
    cols = [c for c in columns if c in models and models[c].notna().any()]
    if not cols:
        return []
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 0.32 * len(models) + 1.6), squeeze=False)
    colors = models["modality"].map({"vision": "#86bbd8", "text": "#f6ae2d"}).fillna("#999999")
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
    return _save(fig, out, stem)
