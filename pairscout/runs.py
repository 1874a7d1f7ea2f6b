"""Run folders and the one store that reads them (:class:`RunStore`).

A **run folder** is what ``pairscout rank --out DIR`` writes: ``rank.json`` (settings, provenance, the rank
verdict, a ``run_id``), ``pairs.{parquet,csv}``, ``models.{parquet,csv}`` and ``plots/``. Later stages add
their own files beside it (``probe.json`` and its tables, an ``align/`` folder) and never rewrite rank's.

**Verdict revisions.** rank writes the verdict once, in ``rank.json``. A stage that revisits it (``probe``)
does not edit ``rank.json``: it asks the store to append a revision to ``verdicts.json``, a file only the store
writes. Each revision names the stage, where its evidence lives and the ``run_id`` of the rank run it revises;
a revision of another rank run (a folder re-ranked since) is ignored. Run folders made before revisions existed
(the probe rewrote ``rank.json``'s ``verdict`` and kept the original as ``verdict_rank``) load as rank's verdict
plus one probe revision.

**Replaced as a whole.** :func:`replace_folder` builds a run in a staging folder beside its target and swaps
it in with two renames, so a folder holds the complete old run or the complete new one, never a mix (a probe
of the old run does not survive a new rank).

**Read once.** :class:`RunStore` keeps each run folder's results and each cached embedding it has read, keyed
by the file's identity (path, size, modification time), so a stage that asks three times reads once, and a file
rewritten meanwhile is read again. :data:`STORE` is the process-wide store the stages share (mteb's
``ResultCache`` is the model).

Example:
    >>> from pairscout.runs import STORE
    >>> res = STORE.rank("runs/demo")          # doctest: +SKIP
    >>> STORE.verdict("runs/demo").pair        # doctest: +SKIP
    ('efficientnet-lite2', 'all-MiniLM-L6-v2')
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairscout._io import atomic_write_text
from pairscout.errors import PairscoutError

if TYPE_CHECKING:
    from pairscout.align.probe_result import ProbeResult
    from pairscout.encode.cache import EmbeddingCache, Embeddings
    from pairscout.ranking.result import RankResult
    from pairscout.ranking.verdict import Verdict
    from pairscout.zoo.spec import EncoderSpec

RANK_JSON = "rank.json"
PROBE_JSON = "probe.json"
VERDICTS_JSON = "verdicts.json"


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


def _identity(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _unreadable(path: Path, what: str, e: Exception) -> PairscoutError:
    return PairscoutError(f"the {what} {path} is unreadable ({type(e).__name__}: {e}).",
                          fix="run the command that wrote it again (with --force).")  # fmt: skip


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


class RunStore:
    """Reads run folders and cached embeddings once per process (see the module docstring)."""

    def __init__(self) -> None:
        self._ranks: dict[tuple[str, int, int], RankResult] = {}
        self._probes: dict[tuple[str, int, int], ProbeResult] = {}
        self._embeddings: dict[tuple[Any, ...], Embeddings] = {}
        self.reads = 0
        """How many result files and cache entries this store has read from disk (tests check it)."""

    # --- rank ------------------------------------------------------------------------------------------
    def rank(self, run: str | Path) -> RankResult:
        """The rank result saved in ``run`` (with its verdict revisions); one-line error if there is none."""
        from pairscout.ranking.result import RankResult

        run = Path(run)
        key = _identity(run / RANK_JSON)
        if key is not None and key in self._ranks:
            res = self._ranks[key]
        else:
            res = RankResult.load(run)
            self.reads += 1
            if key is not None:
                self._ranks[key] = res
        res.revisions = read_revisions(run, res.meta)
        return res

    def verdicts(self, run: str | Path) -> list[VerdictRevision]:
        return self.rank(run).revisions

    def verdict(self, run: str | Path) -> Verdict | None:
        """The latest revision of the run's verdict (rank's own when nothing revised it)."""
        return self.rank(run).verdict

    def revise_verdict(self, run: str | Path, verdict: Verdict, *, by: str, where: str | Path = "") -> VerdictRevision:
        """Append a revision of the verdict of the rank run in ``run`` (written to ``verdicts.json``)."""
        run = Path(run)
        res = self.rank(run)
        rev = VerdictRevision(verdict=verdict, by=by, where=str(where or run), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              rank_run_id=str(res.meta.get("run_id", "")))  # fmt: skip
        path = run / VERDICTS_JSON
        kept: list[dict[str, Any]] = []
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                kept = [d for d in json.loads(path.read_text(encoding="utf-8")).get("revisions", [])
                        if d.get("rank_run_id") == rev.rank_run_id and d.get("by") != by]  # a stage's newer revision replaces its older one
        atomic_write_text(path, json.dumps({"kind": "pairscout.verdicts", "revisions": [*kept, rev.to_dict()]}, indent=2) + "\n")
        res.revisions = read_revisions(run, res.meta)
        return rev

    # --- probe -----------------------------------------------------------------------------------------
    def probe(self, folder: str | Path) -> ProbeResult | None:
        """The probe result saved in ``folder``, or None when it holds none."""
        from pairscout.align.probe_result import ProbeResult

        folder = Path(folder)
        key = _identity(folder / PROBE_JSON)
        if key is None:
            return None
        if key not in self._probes:
            self._probes[key] = ProbeResult.load(folder)
            self.reads += 1
        return self._probes[key]

    # --- embeddings ------------------------------------------------------------------------------------
    def embeddings(self, cache: EmbeddingCache, spec: EncoderSpec, fingerprint: str, *, precision: str = "fp32",
                   tokens: bool = False) -> Embeddings | None:  # fmt: skip
        """A cached entry (as :meth:`EmbeddingCache.load`), read from disk once per process."""
        path = cache.entry_path(spec, fingerprint, precision)
        ident = _identity(path)
        if ident is None:
            return cache.load(spec, fingerprint, precision=precision, tokens=tokens)
        key = (ident, cache.key(spec, fingerprint, precision), tokens)
        if key not in self._embeddings:
            hit = cache.load(spec, fingerprint, precision=precision, tokens=tokens)
            if hit is None:
                return None
            self._embeddings[key] = hit
            self.reads += 1
        return self._embeddings[key]

    def forget(self) -> None:
        """Drop everything read so far."""
        self._ranks.clear()
        self._probes.clear()
        self._embeddings.clear()


STORE = RunStore()
"""The store the stages of one process share."""


# --- whole-folder replacement ------------------------------------------------------------------------------
def check_replaceable(out: str | Path) -> None:
    """Refuse (one line) an ``--out`` that a run may not replace: a file, or a folder of other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PairscoutError(f"--out {out} is an existing file, not a folder.", fix="pass a folder path for the results.")
    if out.is_dir() and not (out / RANK_JSON).is_file() and any(out.iterdir()):
        raise PairscoutError(f"--out {out} is a folder that holds files but no pairscout run; replacing it would delete them.",
                             fix="choose a new or empty folder for --out.")  # fmt: skip


@contextlib.contextmanager
def replace_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on a clean exit it replaces ``out`` as a whole.

    The old folder is renamed aside, the staging folder renamed into place, then the old one removed: at every
    moment ``out`` holds the complete old content or the complete new one. On an error the staging folder is
    removed and ``out`` is untouched. A folder that holds files but no pairscout run is never replaced.
    """
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = out.parent / f".{out.name}.partial-{tag}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{tag}"
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    except OSError:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the old run back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
