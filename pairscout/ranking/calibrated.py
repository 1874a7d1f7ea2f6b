"""What ``rank`` adds to the raw metric values so that its answer can be trusted: settings adapted to small
data (said, never silent), a calibrated score and corrected p-value per metric and pair, and the verdict.

Small data. The delete-a-group jackknife leaves ``n - ceil(n / G)`` rows per replicate, and the neighbour
metrics need k well below the rows they see. Rule (recorded in ``rank.json["adapted"]`` and printed):

* groups: ``G_eff = min(G, n // 5)`` (at least 5 rows per deleted group); below 2, intervals are off;
* k of mutual k-NN / CKNNA: ``k_eff = min(k, (n_rep - 1) // 2)`` with ``n_rep`` the rows of the smallest
  replicate (``n`` without intervals), so no neighbourhood covers more than half the rows it is drawn from;
  if ``k_eff`` falls below the metric's minimum (1 for mutual k-NN, 2 for CKNNA) the run stops with one line
  naming k, n and the option to change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pairscout.errors import PairscoutError
from pairscout.metrics.calibration import N_PERM
from pairscout.ranking import verdict as V

if TYPE_CHECKING:
    from pairscout.ranking.settings import RankSettings

log = logging.getLogger(__name__)

MIN_ROWS_PER_GROUP = 5


def adapt_to_size(settings: RankSettings, n: int, metrics: Sequence[str]) -> tuple[RankSettings, dict[str, Any]]:
    """Settings adapted to ``n`` rows (module docstring) and a record of what changed and why."""
    notes: dict[str, Any] = {}
    groups = settings.ci_groups
    if groups > 1 and n // MIN_ROWS_PER_GROUP < groups:
        g = n // MIN_ROWS_PER_GROUP
        notes["ci_groups"] = {"asked": groups, "used": g if g >= 2 else 0,
                              "why": f"{n} rows allow at most {g} jackknife groups of >= {MIN_ROWS_PER_GROUP} rows"}
        groups = g if g >= 2 else 0
    k = settings.knn_k
    if any(m in ("mutual_knn", "cknna") for m in metrics):
        n_rep = n - -(-n // groups) if groups > 1 else n
        k_max = (n_rep - 1) // 2
        need = 2 if "cknna" in metrics else 1
        if k_max < need:
            which = "CKNNA" if "cknna" in metrics else "mutual k-NN"
            raise PairscoutError(f"{which} needs k >= {need} neighbours within half of the {n_rep} rows each estimate sees "
                                 f"(n = {n}, --knn-k {settings.knn_k}, --ci-groups {groups}).",
                                 fix="use more data, or drop mutual_knn/cknna with --metrics, or pass --ci-groups 0.")
        if k > k_max:
            notes["knn_k"] = {"asked": k, "used": k_max,
                              "why": f"k must stay <= (rows - 1) / 2 = {k_max} for the {n_rep} rows each estimate sees"}
            k = k_max
    return dataclasses.replace(settings, ci_groups=groups, knn_k=k), notes


def rank_verdict(pairs: pd.DataFrame, xs: list[torch.Tensor], ys: list[torch.Tensor], v_names: Sequence[str],
                 t_names: Sequence[str], settings: RankSettings, primary: str, values: dict[str, np.ndarray],
                 reps: np.ndarray | None = None, engine: Any = None) -> V.Verdict:
    """The verdict of a ranking (see :mod:`pairscout.ranking.verdict`), tested on the primary metric's jackknife
    replicates ``reps`` (G, m, t) of the estimation pass (None without groups: ties are not tested); the
    near-duplicate check runs on ``engine`` (under torchrun ``xs``, ``ys`` are this rank's rows)."""
    from pairscout.metrics import registry

    est = np.asarray(values[primary], dtype=np.float64)
    prec = None if getattr(settings, "precision", "auto") == "auto" else settings.precision
    dups = (V.near_duplicates(dict(zip(v_names, xs, strict=True)), precision=prec, engine=engine)
            + V.near_duplicates(dict(zip(t_names, ys, strict=True)), precision=prec, engine=engine))
    label = registry.label(primary)
    if settings.score == "combined":
        label = f"combined score (ties tested on {label})"
    return V.decide(pairs, primary, est, reps, v_names, t_names, dups, label=label)


__all__ = ["N_PERM", "adapt_to_size", "rank_verdict"]
