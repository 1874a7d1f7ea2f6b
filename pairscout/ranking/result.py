"""The result of ranking: two tables and every setting that produced them.

``pairs``: one row per vision x text pair, ranked (columns ``vision``, ``text``, ``vision_id``,
``text_id``, ``rank``, ``score``, then for each metric ``<m>``, ``<m>_lo``, ``<m>_hi``, ``<m>_se`` (jackknife 95 % CI),
``<m>_null`` / ``<m>_null_sd`` (mean and sd under shuffled pairings), ``<m>_z`` (calibrated score in null sds),
``<m>_p`` and ``<m>_p_holm`` (p-value, Holm-corrected across pairs); see :mod:`pairscout.metrics.calibration`).
``verdict``: the recommended pair, ties, near-duplicates and the reason (a typed :class:`~pairscout.ranking.verdict.Verdict`,
the latest of ``revisions``: rank's own from ``rank.json``, then the probe's, see :mod:`pairscout.runs`).
``models``: one row per encoder with its unimodal quality (k-NN accuracy, clustering, published scores).
``meta``: settings (zoos with revisions, dataset fingerprint, n, seed, preprocessing, metrics),
package versions, failures, timings. Saved as parquet + CSV + JSON; :meth:`RankResult.load` reads
it back, so probe and report work from the files alone.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pairscout.errors import PairscoutError
from pairscout.files import first_difference, load_result, rewrite_fix, save_result

if TYPE_CHECKING:
    from pairscout.ranking.verdict import Verdict

PAIRS = "pairs"
MODELS = "models"
META = "rank.json"
VERDICTS_JSON = "verdicts.json"
"""The verdict's revisions (:class:`VerdictRevision`), written only by :class:`pairscout.runs.RunStore`."""

PAIR_KEYS = ("rank", "vision", "text", "vision_id", "text_id", "score")
"""The columns every ``pairs`` table starts with (a layer-swept run adds ``vision_layer``, ``text_layer``, ``layer_*``)."""
METRIC_SUFFIXES = ("", "_lo", "_hi", "_se", "_null", "_null_sd", "_z", "_p", "_p_holm")
"""Per metric ``<m>``: value, 95 % jackknife interval, its se, null mean and sd, calibrated z, p and Holm-corrected p."""


def pair_columns(metrics: list[str]) -> list[str]:
    """The documented columns of a ``pairs`` table for these metrics (a run may add more, never fewer)."""
    return [*PAIR_KEYS, *(f"{m}{s}" for m in metrics for s in METRIC_SUFFIXES)]


def new_run_id() -> str:
    """A fresh id for a rank run (what a verdict revision is bound to)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class VerdictRevision:
    """One revision of a run's verdict: the verdict, which stage made it, from which folder, when."""

    verdict: Verdict
    by: str
    """``rank`` (the metrics) or ``probe`` (the probe's read-out)."""
    where: str = ""
    """The folder holding the evidence (the probe's output folder)."""
    created: str = ""
    rank_run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "where": self.where, "created": self.created, "rank_run_id": self.rank_run_id,
                "verdict": self.verdict.to_dict()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerdictRevision:
        from pairscout.ranking.verdict import Verdict

        return cls(verdict=Verdict.from_dict(d["verdict"]), by=str(d.get("by", "")), where=str(d.get("where", "")),
                   created=str(d.get("created", "")), rank_run_id=str(d.get("rank_run_id", "")))  # fmt: skip


def _unreadable(path: Path, what: str, e: Exception) -> PairscoutError:
    return PairscoutError(f"the {what} {path} is unreadable ({type(e).__name__}: {e}).",
                          fix=rewrite_fix(path, restore=False))  # fmt: skip


def read_revisions(run: str | Path, rank_meta: dict[str, Any]) -> list[VerdictRevision]:
    """Every revision of the verdict of the rank run in ``run``, oldest first (rank's own first)."""
    from pairscout.ranking.verdict import Verdict

    run = Path(run)
    run_id = str(rank_meta.get("run_id", ""))
    own = rank_meta.get("verdict_rank") or rank_meta.get("verdict")
    if not own:
        return []
    try:
        revs = [VerdictRevision(verdict=Verdict.from_dict(own), by="rank", where=str(run), created=str(rank_meta.get("created", "")),
                                rank_run_id=run_id)]  # fmt: skip
        if rank_meta.get("verdict_rank") and rank_meta.get("verdict"):  # a folder from before revisions: probe rewrote rank.json
            revs.append(VerdictRevision(verdict=Verdict.from_dict(rank_meta["verdict"]), by="probe", where=str(run), rank_run_id=run_id))
        path = run / VERDICTS_JSON
        if path.is_file():
            for d in json.loads(path.read_text(encoding="utf-8")).get("revisions", []):
                rev = VerdictRevision.from_dict(d)
                if rev.rank_run_id == run_id:  # a revision of this rank run, not of one this folder held before
                    revs.append(rev)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _unreadable(run / VERDICTS_JSON, "verdict revisions", e) from None
    return revs


VERDICT_SHAPE = {"pair": list, "tied": list, "duplicates": list, "reason": str, "source": str, "metric": str,
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
    **{f"verdict.{k}": v for k, v in VERDICT_SHAPE.items()}, **{f"verdict_rank.{k}": v for k, v in VERDICT_SHAPE.items()},
}
"""The JSON types of ``rank.json``'s fields: a hand-edited file is refused in one line at load, not deep in a command."""


@dataclass
class RankResult:
    pairs: pd.DataFrame
    models: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    revisions: list[VerdictRevision] = field(default_factory=list)
    """The verdict's revisions, oldest first (rank's own, then the probe's); filled by :meth:`load`."""

    @property
    def run_id(self) -> str:
        """This rank run's id (what verdict revisions and probes are bound to); empty for older runs."""
        return str(self.meta.get("run_id", ""))

    @property
    def settings(self) -> dict[str, Any]:
        """Every setting of the run (``rank.json["settings"]``: zoos with revisions, dataset fingerprint, n, seed, ...)."""
        return dict(self.meta.get("settings", {}))

    @property
    def rank_verdict(self) -> Verdict | None:
        """The verdict rank itself gave (before any probe)."""
        from pairscout.ranking.verdict import Verdict

        own = self.meta.get("verdict_rank") or self.meta.get("verdict")
        return Verdict.from_dict(own) if own else None

    @property
    def verdict(self) -> Verdict | None:
        """The current verdict: the latest revision (the probe's, once probed), else rank's own; None for runs
        made before verdicts existed."""
        return self.revisions[-1].verdict if self.revisions else self.rank_verdict

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
        """The current verdict's pair and its reason (:attr:`verdict`); the best-ranked pair for runs made before
        verdicts existed."""
        v = self.verdict
        if v is not None:
            return (str(v.pair[0]), str(v.pair[1])), v.reason
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
        """Write ``pairs``, ``models`` and ``rank.json`` (last) into ``out``; a run gets its ``run_id`` here."""
        self.meta.setdefault("run_id", new_run_id())
        return save_result(out, {PAIRS: self.pairs, MODELS: self.models}, META, self.meta)

    @classmethod
    def load(cls, out: str | Path) -> RankResult:
        """Read a run folder (also one written by an older version), with its verdict revisions."""
        meta, frames = load_result(out, (PAIRS, MODELS), META, what="rank result", shape=SHAPE,
                                   fix="run `pairscout rank --out DIR` first, or point at that DIR.")
        return cls(pairs=frames[PAIRS], models=frames[MODELS], meta=meta, revisions=read_revisions(out, meta))


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
