"""What ``pairscout probe`` is asked (:class:`ProbeSettings`: every default of the command) and what it returns and saves
(:class:`ProbeResult`): both torch-free, so the CLI and the report read them without importing torch.

Files (written and read through the shared result helper :func:`pairscout.files.save_result` /
:func:`pairscout.files.load_result`, like :class:`~pairscout.ranking.RankResult`): ``probe.parquet`` /
``probe.csv`` (one row per probed pair), ``probe_correlations.parquet`` / ``probe_correlations.csv`` (one row per
predictor compared with the read-out, see :mod:`pairscout.evaluation.predictors`), the same table over the non-baseline pairs
only (``probe_correlations_without_baselines.*``: baseline pairs never carry a correlation alone) and ``probe.json``
(settings, read-out, chance level, the verdict and the tables as records), written last so a folder holding it is complete.

``probe.json`` fields added by the fused probe (typed views: :attr:`ProbeResult.target_choice`, :attr:`ProbeResult.regret`):

- ``target_choice``: :class:`~pairscout.evaluation.readouts.TargetChoice` - the target, why, the statistic's definition,
  ``separated`` (False: no read-out tells the non-baseline pairs apart beyond noise) and ``separation``, one
  :class:`~pairscout.evaluation.readouts.ReadoutSeparation` per read-out (F, p, between-pair and noise variance, spread);
- ``regret``: :class:`~pairscout.evaluation.regret.Regret` - the oracle pair and the regret of pairscout's verdict,
  freeze-align's and SAIL's rules and a random pair, with paired bootstrap intervals, and one sentence;
- ``selection``: which pairs were probed and why (the budget line); ``readouts``: every recorded read-out and which
  way is better; ``curve_steps``: the steps the held-out loss was read at (columns ``heldout_loss@STEP``).

Example:
    >>> res = ProbeResult.load("runs/demo")   # doctest: +SKIP
    >>> res.correlations[["metric", "spearman", "spearman_p_holm"]].head()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pairscout.align.train_config import TrainConfig

PROBE_JSON, PROBE_TABLE, CORR_NAME = "probe.json", "probe", "probe_correlations"
CORR_REAL_NAME = "probe_correlations_without_baselines"
CORR_TABLE = f"{CORR_NAME}.csv"
BASE_COLUMNS = ["metric", "n_pairs", "spearman", "spearman_p", "kendall", "kendall_p"]
"""The correlation columns every probe result has (runs made before the predictor table hold only these)."""


@dataclass
class ProbeSettings:
    """The probe's budget and split (the same for every pair)."""

    top_k: int | None = None
    """Probe the K best-ranked pairs (with ``bottom_k`` / ``middle_k``); None: as many pairs as ``budget`` allows."""
    bottom_k: int | None = None
    middle_k: int | None = None
    """Pairs evenly spaced between the top and the bottom ones."""
    all_pairs: bool = False
    """Probe every pair of the run (``--pairs all``), whatever the budget."""
    budget: int = 12_600
    """Pair-steps (pairs x ``steps``) the default selection may spend: 12,600 = 42 pairs x 300 steps (every pair of a 7 x 6
    zoo). The pairs train fused (:mod:`pairscout.evaluation.fused`) at ``out_dim`` 128, so this costs less wall time than 10 pairs
    one by one at 512 did (``benchmarks/results/probe_fused.md``)."""
    steps: int = 300
    """Optimiser steps per pair (the same for every pair)."""
    curve: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    """Fractions of ``steps`` after which the held-out loss is read (the learning curve and its area)."""
    bootstrap: int = 400
    """Paired bootstrap resamplings of the held-out images (separation of the read-outs, regret intervals)."""
    batch_size: int = 256
    out_dim: int = 128
    """Probe output dimension (SAIL: 2048). 128 (was 512) makes a pair-step about 4x cheaper, so that every pair of the demo
    trains fused in less time than 10 pairs did one by one (``benchmarks/results/probe_fused.md``)."""
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-7
    """SAIL's probing weight decay."""
    loss_norm: str = "batch"
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    target: str | None = None
    """Read-out the metrics are correlated with; None: chosen from the data (``pairscout.evaluation.probe.choose_readout``)."""
    class_level: bool = False
    """Train with every caption of the same class as a positive (identical captions always are)."""

    def __post_init__(self) -> None:
        from pairscout.bounds import check_fields

        check_fields(self)  # every numeric setting against its declared range (pairscout.bounds)

    def curve_steps(self) -> list[int]:
        """The steps (1..steps) the held-out loss is read at."""
        return sorted({max(1, min(self.steps, round(f * self.steps))) for f in self.curve})

    def train_config(self) -> TrainConfig:
        return TrainConfig(head="linear", out_dim=self.out_dim, loss="sigmoid", loss_norm=self.loss_norm, optimizer=self.optimizer,
                           lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, steps=self.steps,
                           seed=self.seed, device=self.device, log_every=max(1, self.steps // 10))  # fmt: skip


@dataclass
class ProbeResult:
    """Probed pairs (rank-run columns + probe read-outs) and the predictor-vs-read-out correlation table."""

    pairs: pd.DataFrame
    correlations: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    correlations_without_baselines: pd.DataFrame | None = None
    """The correlation table over the non-baseline pairs only (None: an older run)."""

    @property
    def target_choice(self) -> Any:
        """The :class:`~pairscout.evaluation.readouts.TargetChoice` (None: a run made before targets were chosen by separation)."""
        from pairscout.evaluation.readouts import TargetChoice

        d = self.meta.get("target_choice")
        return TargetChoice.from_dict(d) if d else None

    @property
    def regret(self) -> Any:
        """The :class:`~pairscout.evaluation.regret.Regret` table (None when the probe made none)."""
        from pairscout.evaluation.regret import Regret

        d = self.meta.get("regret")
        return Regret.from_dict(d) if d else None

    @property
    def metrics(self) -> list[str]:
        """Every column correlated with the read-out (pair measures, unimodal scores, the ranking score)."""
        return list(self.meta.get("metrics", []))

    def save(self, out: str | Path) -> Path:
        """Write the folder (module docstring); returns it."""
        from pairscout.files import records, save_result

        payload = {**self.meta, "correlations": records(self.correlations), "pairs": records(self.pairs)}
        tables = {PROBE_TABLE: self.pairs, CORR_NAME: self.correlations}
        if self.correlations_without_baselines is not None:
            payload["correlations_without_baselines"] = records(self.correlations_without_baselines)
            tables[CORR_REAL_NAME] = self.correlations_without_baselines
        payload.pop("out", None)  # where it was saved is not a property of the result
        return save_result(out, tables, PROBE_JSON, payload)

    @classmethod
    def load(cls, out: str | Path) -> ProbeResult:
        """Read what :meth:`save` wrote (also a folder of a run made before ``probe_correlations.parquet`` existed)."""
        from pairscout.files import load_result
        from pairscout.ranking.result import VERDICT_SHAPE

        num, opt = (float, type(None)), type(None)
        shape = {"kind": str, "settings": dict, "train_config": dict, "metrics": list, "target": str, "target_why": str, "chance": num,
                 "n_test_items": (int, opt), "best_target": num, "above_chance": bool, "family_size": (int, opt),
                 "measures_from_rank": list, "measures_computed_by_probe": list, "measure_options": dict, "measure_failures": dict,
                 "rank_run": (str, opt), "primary": (str, opt), "dataset": dict, "dataset_fingerprint": (str, opt),
                 "n_pairs_ranked": (int, opt), "command": (str, opt), "verdict": (dict, opt), "correlations": list, "pairs": list,
                 "settings.top_k": (int, opt), "settings.bottom_k": (int, opt), "settings.middle_k": (int, opt), "settings.steps": int,
                 "settings.batch_size": int, "settings.out_dim": int, "settings.lr": float, "settings.test_fraction": float,
                 "settings.seed": int, "settings.target": (str, opt), **{f"verdict.{k}": v for k, v in VERDICT_SHAPE.items()}}  # fmt: skip
        meta, frames = load_result(out, (PROBE_TABLE,), PROBE_JSON, what="probe result", optional=(CORR_NAME, CORR_REAL_NAME), shape=shape,
                                   fix="run `pairscout probe RUN` first, or point at the folder it wrote.")  # fmt: skip
        meta.pop("pairs", None)
        meta.pop("correlations_without_baselines", None)
        rows = meta.pop("correlations", [])
        corr = frames.get(CORR_NAME)
        if corr is None:  # an older run: the table lives only in probe.json
            corr = pd.DataFrame(rows)
            corr = corr.reindex(columns=[*BASE_COLUMNS, *[c for c in corr.columns if c not in BASE_COLUMNS]])
            floats = [c for c in corr.columns if c.startswith(("spearman", "kendall"))]
            corr = corr.astype(dict.fromkeys(floats, float))
        return cls(pairs=frames[PROBE_TABLE], correlations=corr, meta=meta, correlations_without_baselines=frames.get(CORR_REAL_NAME))
