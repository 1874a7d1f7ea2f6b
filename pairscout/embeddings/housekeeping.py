"""Cache housekeeping: remove finished entries (and unfinished chunks) by model and/or dataset."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from pairscout.embeddings.cache import PART_NAME, EmbeddingCache
from pairscout.errors import CacheError


@dataclass
class Cleared:
    paths: list[Path] = field(default_factory=list)
    bytes: int = 0


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


def clear_cache(cache: EmbeddingCache, *, model: str | None = None, dataset: str | None = None, dry_run: bool = False) -> Cleared:
    """Remove the cache entries of ``model`` (an id such as ``pack:efficientnet-lite0``) and/or ``dataset``
    (a fingerprint, or its first characters, or a dataset name); neither: every entry. Only files the cache
    made are touched (``<root>/<slug>/<key>.safetensors`` with the cache's metadata, the chunk files of their
    ``.parts`` folders, and folders those leave empty): a user's own file in the cache folder stays.

    Raises:
        CacheError: ``model`` or ``dataset`` is given but empty (it would match every entry).
    """
    for what, v in (("--model", model), ("--dataset", dataset)):
        if v is not None and not str(v).strip():
            raise CacheError(f"{what} is empty, which would match every cache entry.",
                             fix=f"name the {what[2:]} to clear (see pairscout cache list), or leave {what} out to clear everything.")
    out = Cleared()
    if not cache.root.is_dir():
        return out
    for e in cache.entries():
        if model is not None and str(e.get("model_id")) != model:
            continue
        fp, name = str(e.get("dataset_fingerprint", "")), str(e.get("dataset", ""))
        if dataset is not None and not (fp.startswith(dataset) or name == dataset):
            continue
        out.paths.append(Path(e["path"]))
    if model is None and dataset is None:  # unfinished runs too
        out.paths += cache.unfinished()
    else:
        out.paths += [q for p in list(out.paths) for q in cache.unfinished(p)]
    for p in out.paths:
        out.bytes += _size(p)
        if not dry_run:
            _remove(p)
    return out


_PART_TMP = re.compile(r"\.\d+-\d+\.safetensors\.\w+\.tmp")
"""A chunk's temporary file left by a killed write (:func:`pairscout.files.atomic_path`)."""


def _remove(p: Path) -> None:
    """An entry file, or a ``.parts`` folder's chunk files (then the folder, and its parent, if left empty)."""
    if p.is_dir():
        for q in p.iterdir():
            if (PART_NAME.fullmatch(q.name) or _PART_TMP.fullmatch(q.name)) and q.is_file():
                q.unlink(missing_ok=True)
    else:
        p.unlink(missing_ok=True)
    for d in ((p,) if p.is_dir() else ()) + (p.parent,):
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty folder goes
