"""Cache housekeeping: remove finished entries (and unfinished chunks) by model and/or dataset."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pairscout.encode.cache import EmbeddingCache


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
    made are touched (``<root>/<model>/<key>.safetensors`` and their ``.parts`` folders)."""
    out = Cleared()
    if not cache.root.is_dir():
        return out
    for e in cache.entries():
        if model is not None and str(e.get("model_id")) != model:
            continue
        fp, name = str(e.get("dataset_fingerprint", "")), str(e.get("dataset", ""))
        if dataset is not None and not (fp.startswith(dataset) or name == dataset):
            continue
        p = Path(e["path"])
        out.paths.append(p)
    if model is None and dataset is None:  # unfinished runs too
        out.paths += sorted(p for p in cache.root.glob("*/*.parts") if p.is_dir())
    else:
        out.paths += [q for p in list(out.paths) for q in (p.with_suffix(".parts"), p.with_suffix(".tok.parts")) if q.is_dir()]
    for p in out.paths:
        out.bytes += _size(p)
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if not dry_run:
        for d in cache.root.iterdir():
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return out
