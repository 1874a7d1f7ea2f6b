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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairscout.errors import PairscoutError
from pairscout.files import atomic_write_text
from pairscout.ranking.result import META as RANK_JSON
from pairscout.ranking.result import VERDICTS_JSON, RankResult, VerdictRevision, read_revisions

if TYPE_CHECKING:
    from pairscout.embeddings.cache import EmbeddingCache, Embeddings
    from pairscout.evaluation.result import ProbeResult
    from pairscout.ranking.verdict import Verdict
    from pairscout.zoo.spec import EncoderSpec

PROBE_JSON = "probe.json"


def _identity(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


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
        run = Path(run)
        key = _identity(run / RANK_JSON)
        if key is not None and key in self._ranks:
            res = self._ranks[key]
            res.revisions = read_revisions(run, res.meta)  # verdicts.json may have gained a revision since
        else:
            res = RankResult.load(run)  # reads the revisions itself
            self.reads += 1
            if key is not None:
                self._ranks[key] = res
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
        from pairscout.evaluation.result import ProbeResult

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
def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_replaceable(out: str | Path, keep: tuple[str | Path, ...] = ()) -> None:
    """Refuse (one line) an ``--out`` that a run may not replace: a file, or a folder of other files (the
    ``keep`` paths inside it, such as an embedding cache, do not count: they are carried over)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PairscoutError(f"--out {out} is an existing file, not a folder.", fix="pass a folder path for the results.")
    parent = out.resolve().parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise PairscoutError(f"a run is written beside --out {out} and swapped in whole, but {parent} is read-only.",
                             fix="choose an --out inside a folder you may write to.")  # fmt: skip
    kept = {Path(k).resolve() for k in keep}
    if out.is_dir() and not (out / RANK_JSON).is_file() and any(p.resolve() not in kept for p in out.iterdir()):
        raise PairscoutError(f"--out {out} is a folder that holds files but no pairscout run; replacing it would delete them.",
                             fix="choose a new or empty folder for --out.")  # fmt: skip


@contextlib.contextmanager
def replace_folder(out: str | Path, keep: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on a clean exit it replaces ``out`` as a whole.

    The old folder is renamed aside, the staging folder renamed into place, then the old one removed: at every
    moment ``out`` holds the complete old content or the complete new one. On an error the staging folder is
    removed and ``out`` is untouched. A folder that holds files but no pairscout run is never replaced. Paths of
    ``keep`` that lie inside ``out`` (an embedding cache kept in the run folder) move into the new folder as they are.
    """
    check_replaceable(out, keep)
    out = Path(out).resolve()
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
    carried = [Path(k).resolve() for k in keep if Path(k).exists() and _inside(Path(k), out) and Path(k).resolve() != out]
    for k in carried:  # moved, not copied: a rename inside one file system
        dest = staging / k.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(k, dest)
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    except OSError:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the old run back
        for k in carried:  # and what was carried over, where it was
            if (staging / k.relative_to(out)).exists() and not k.exists():
                os.replace(staging / k.relative_to(out), k)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
