"""What ``pairscout probe`` returns and saves (:class:`ProbeResult`), torch-free so the report can read it.

Files (written and read through the shared result helper :func:`pairscout._io.save_result` /
:func:`pairscout._io.load_result`, like :class:`~pairscout.ranking.RankResult`): ``probe.parquet`` /
``probe.csv`` (one row per probed pair), ``probe_correlations.parquet`` / ``probe_correlations.csv`` (one row per
predictor compared with the read-out, see :mod:`pairscout.align.predictors`) and ``probe.json`` (settings, read-out,
chance level, the verdict and both tables as records), written last so a folder holding it is complete.

Example:
    >>> res = ProbeResult.load("runs/demo")   # doctest: +SKIP
    >>> res.correlations[["metric", "spearman", "spearman_p_holm"]].head()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

PROBE_JSON, PROBE_TABLE, CORR_NAME = "probe.json", "probe", "probe_correlations"
CORR_TABLE = f"{CORR_NAME}.csv"
BASE_COLUMNS = ["metric", "n_pairs", "spearman", "spearman_p", "kendall", "kendall_p"]
"""The correlation columns every probe result has (runs made before the predictor table hold only these)."""


@dataclass
class ProbeResult:
    """Probed pairs (rank-run columns + probe read-outs) and the predictor-vs-read-out correlation table."""

    pairs: pd.DataFrame
    correlations: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """Every column correlated with the read-out (pair measures, unimodal scores, the ranking score)."""
        return list(self.meta.get("metrics", []))

    def save(self, out: str | Path) -> Path:
        """Write the folder (module docstring); returns it."""
        from pairscout._io import records, save_result

        payload = {**self.meta, "correlations": records(self.correlations), "pairs": records(self.pairs)}
        payload.pop("out", None)  # where it was saved is not a property of the result
        return save_result(out, {PROBE_TABLE: self.pairs, CORR_NAME: self.correlations}, PROBE_JSON, payload)

    @classmethod
    def load(cls, out: str | Path) -> ProbeResult:
        """Read what :meth:`save` wrote (also a folder of a run made before ``probe_correlations.parquet`` existed)."""
        from pairscout._io import load_result
        from pairscout.ranking.result import _VERDICT

        num, opt = (float, type(None)), type(None)
        shape = {"kind": str, "settings": dict, "train_config": dict, "metrics": list, "target": str, "target_why": str, "chance": num,
                 "n_test_items": (int, opt), "best_target": num, "above_chance": bool, "family_size": (int, opt),
                 "measures_from_rank": list, "measures_computed_by_probe": list, "measure_options": dict, "measure_failures": dict,
                 "rank_run": (str, opt), "primary": (str, opt), "dataset": dict, "dataset_fingerprint": (str, opt),
                 "n_pairs_ranked": (int, opt), "command": (str, opt), "verdict": (dict, opt), "correlations": list, "pairs": list,
                 "settings.top_k": int, "settings.bottom_k": int, "settings.middle_k": int, "settings.steps": int,
                 "settings.batch_size": int, "settings.out_dim": int, "settings.lr": float, "settings.test_fraction": float,
                 "settings.seed": int, "settings.target": (str, opt), **{f"verdict.{k}": v for k, v in _VERDICT.items()}}  # fmt: skip
        meta, frames = load_result(out, (PROBE_TABLE,), PROBE_JSON, what="probe result", optional=(CORR_NAME,), shape=shape,
                                   fix="run `pairscout probe RUN` first, or point at the folder it wrote.")  # fmt: skip
        meta.pop("pairs", None)
        rows = meta.pop("correlations", [])
        corr = frames.get(CORR_NAME)
        if corr is None:  # an older run: the table lives only in probe.json
            corr = pd.DataFrame(rows)
            corr = corr.reindex(columns=[*BASE_COLUMNS, *[c for c in corr.columns if c not in BASE_COLUMNS]])
            floats = [c for c in corr.columns if c.startswith(("spearman", "kendall"))]
            corr = corr.astype(dict.fromkeys(floats, float))
        return cls(pairs=frames[PROBE_TABLE], correlations=corr, meta=meta)
