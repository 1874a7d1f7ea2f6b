"""Content digests of an encoder's local file inputs, so the cache key follows the bytes, not the path.

An ``emb:`` file, a local ``weights`` file or model folder, an ``onnx:`` file or an ``hf:``/``st:``/``timm:``
id that names a local path: each is hashed (blake2b-128 of every regular file's bytes, with the relative
names of a folder's files). Re-exporting ``feats.npy`` under the same name therefore misses the cache.

Fast path: a digest is remembered per (path, size, mtime_ns, inode) in this process and in
``<cache>/file-digests.json``, so an unchanged multi-GB weights folder is hashed once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

_MEMO: dict[tuple[str, int, int, int], str] = {}
_LOCAL_SOURCES = ("emb", "onnx", "hf", "st", "timm", "pack")


def local_inputs(spec: EncoderSpec) -> list[Path]:
    """The local files / folders the spec reads its weights or vectors from (none for hub ids)."""
    cands: list[str] = []
    if spec.weights:
        cands.append(spec.weights)
    if spec.source in _LOCAL_SOURCES:
        cands.append(spec.target)
    out: list[Path] = []
    for c in cands:
        p = Path(c).expanduser()
        try:
            if p.exists():
                out.append(p.resolve())
        except OSError:
            continue
    return out


def _files(p: Path) -> list[Path]:
    if p.is_dir():
        # hidden files (.git, .cache/huggingface lock and metadata files) are not model content
        return sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    return [p]


def _stat_key(p: Path) -> tuple[str, int, int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (str(p), st.st_size, st.st_mtime_ns, st.st_ino)


def _hash_file(p: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class DigestStore:
    """Remembered file digests, keyed by (path, size, mtime_ns, inode); persisted beside the cache."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._disk: dict[str, Any] | None = None
        self._dirty = False

    def _load(self) -> dict[str, Any]:
        if self._disk is None:
            self._disk = {}
            if self.path is not None and self.path.is_file():
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8"))
                    if isinstance(data, dict):
                        self._disk = data
                except (OSError, ValueError):
                    pass  # a damaged store only costs a re-hash
        return self._disk

    def file_digest(self, p: Path) -> str:
        key = _stat_key(p)
        if key is None:  # not a regular file (FIFO, device, vanished): never read it
            return "not-a-regular-file"
        if key in _MEMO:
            return _MEMO[key]
        disk = self._load()
        rec = disk.get(key[0])
        if isinstance(rec, list) and len(rec) == 4 and tuple(rec[:3]) == key[1:]:
            digest = str(rec[3])
        else:
            digest = _hash_file(p)
            disk[key[0]] = [*key[1:], digest]
            self._dirty = True
        _MEMO[key] = digest
        return digest

    def save(self) -> None:
        if not self._dirty or self.path is None or self._disk is None:
            return
        from pairscout.files import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(self._disk))
        except OSError as e:  # a read-only cache still works, it only re-hashes next time
            log.debug("could not save file digests to %s: %s", self.path, e)
        self._dirty = False


def inputs_digest(spec: EncoderSpec, store: DigestStore | None = None) -> str | None:
    """One digest over every local input of ``spec`` (``None`` when it reads nothing local)."""
    paths = local_inputs(spec)
    if not paths:
        return None
    store = store or DigestStore(None)
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(b"P")
        for f in _files(p):
            rel = f.relative_to(p).as_posix() if p.is_dir() else ""
            h.update(rel.encode() + b"\0" + store.file_digest(f).encode())
    store.save()
    return h.hexdigest()
