"""The result of ranking: two tables and every setting that produced them.

``pairs``: one row per vision x text pair, ranked (columns ``vision``, ``text``, ``vision_id``,
``text_id``, ``rank``, ``score``, then for each metric ``<m>``, ``<m>_lo``, ``<m>_hi``, ``<m>_se`` (jackknife 95 % CI),
``<m>_null`` / ``<m>_null_sd`` (mean and sd under shuffled pairings), ``<m>_z`` (calibrated score in null sds),
``<m>_p`` and ``<m>_p_holm`` (p-value, Holm-corrected across pairs); see :mod:`pairscout.metrics.calibration`).
``meta["verdict"]``: the recommended pair, ties, near-duplicates and the reason (:mod:`pairscout.ranking.verdict`).
``models``: one row per encoder with its unimodal quality (k-NN accuracy, clustering, published scores).
``meta``: settings (zoos with revisions, dataset fingerprint, n, seed, preprocessing, metrics),
package versions, failures, timings. Saved as parquet + CSV + JSON; :meth:`RankResult.load` reads
it back, so probe and report work from the files alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pairscout._io import first_difference, load_result, save_result

PAIRS = "pairs"
MODELS = "models"
META = "rank.json"


_VERDICT = {"pair": list, "tied": list, "duplicates": list, "reason": str, "source": str, "metric": str,
            "above_chance": (bool, type(None)), "tests": list}
SHAPE: dict[str, Any] = {
    "kind": str, "settings": dict, "dataset": dict, "vision_order": list, "text_order": list, "failures": dict,
    "verdict": (dict, type(None)), "verdict_rank": (dict, type(None)), "adapted": dict, "null_methods": dict, "timings_s": dict,
    "versions": dict, "command": (str, type(None)), "plots": list, "layers": dict, "distributed": dict,
    "settings.metrics": list, "settings.primary": (str, type(None)), "settings.score": str, "settings.knn_k": int,
    "settings.clip_quantile": (float, type(None)), "settings.ci_groups": int, "settings.permutations": int, "settings.caption_reduce": str,
    "settings.seed": int, "settings.layers": (str, list, type(None)), "settings.layer_rows": int, "settings.precision": str,
    "settings.vision_zoo": dict, "settings.text_zoo": dict, "settings.dataset_fingerprint": str, "settings.n": int,
    "dataset.name": str, "dataset.fingerprint": str, "dataset.n": int, "dataset.has_labels": bool, "dataset.params": dict,
    **{f"verdict.{k}": v for k, v in _VERDICT.items()}, **{f"verdict_rank.{k}": v for k, v in _VERDICT.items()},
}
"""The JSON types of ``rank.json``'s fields: a hand-edited file is refused in one line at load, not deep in a command."""


@dataclass
class RankResult:
    pairs: pd.DataFrame
    models: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.meta["settings"]["primary"]

    @property
    def metrics(self) -> list[str]:
        return list(self.meta["settings"]["metrics"])

    def best(self) -> tuple[str, str]:
        row = self.pairs.iloc[0]
        return str(row["vision"]), str(row["text"])

    def recommended(self) -> tuple[tuple[str, str], str]:
        """The verdict's pair and its reason (``rank.json["verdict"]``, updated by ``probe``); the best-ranked
        pair for runs made before verdicts existed."""
        v = self.meta.get("verdict")
        if v:
            return (str(v["pair"][0]), str(v["pair"][1])), str(v.get("reason", ""))
        return self.best(), "the best-ranked pair (this run has no verdict)"

    def top(self, k: int) -> pd.DataFrame:
        return self.pairs.head(k)

    def matrix(self, metric: str) -> pd.DataFrame:
        """The vision x text matrix of one metric (rows and columns in zoo order)."""
        if not isinstance(metric, str) or metric not in self.pairs or metric in ("vision", "text"):
            from pairscout.errors import MetricError

            have = [c for c in (self.meta.get("settings") or {}).get("metrics", []) if c in self.pairs] or [c for c in self.pairs if c not in ("vision", "text", "rank")]
            raise MetricError(f"this rank result has no metric {metric!r}.", fix=f"pick one of: {', '.join(map(str, have))}.")
        m = self.pairs.pivot(index="vision", columns="text", values=metric)
        v_order = [x for x in self.meta.get("vision_order", m.index) if x in m.index]
        t_order = [x for x in self.meta.get("text_order", m.columns) if x in m.columns]
        return m.loc[v_order, t_order]

    # --- files -------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        return save_result(out, {PAIRS: self.pairs, MODELS: self.models}, META, self.meta)

    @classmethod
    def load(cls, out: str | Path) -> RankResult:
        meta, frames = load_result(out, (PAIRS, MODELS), META, what="rank result", shape=SHAPE,
                                   fix="run `pairscout rank --out DIR` first, or point at that DIR.")
        return cls(pairs=frames[PAIRS], models=frames[MODELS], meta=meta)


def settings_conflict(out: Path, settings: dict[str, Any]) -> str | None:
    """The first setting in which the run saved in ``out`` differs from ``settings``, or None."""
    meta_path = out / META
    if not meta_path.is_file():
        return None
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return "unreadable rank.json"
    diff = first_difference(old, settings)
    return None if diff is None else diff.split(":", 1)[0]
