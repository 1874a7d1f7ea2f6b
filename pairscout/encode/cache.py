"""Content-addressed embedding cache.

One entry per (encoder spec, dataset fingerprint, precision), stored as a safetensors file with
string metadata (model id, revision, pooling, preprocessing, dataset fingerprint, versions)::

    <root>/<encoder-slug>/<key>.safetensors          finished entry
    <root>/<encoder-slug>/<key>.parts/<a>-<b>.safetensors   finished chunks of an interrupted run

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written file under a real name. A run that was
interrupted resumes from its finished chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pairscout._io import atomic_path
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever the layout or the meaning of a stored tensor changes."""


def default_cache_dir() -> Path:
    """``$PAIRSCOUT_CACHE``, else ``$XDG_CACHE_HOME/pairscout``, else ``~/.cache/pairscout``."""
    env = os.environ.get("PAIRSCOUT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pairscout"


@dataclass
class Embeddings:
    """One encoder's embeddings of one dataset."""

    pooled: torch.Tensor
    """(N, d) float32; N = dataset rows (vision) or flattened captions (text)."""
    row_index: torch.Tensor
    """(N,) int64: the dataset row of each embedding (identity for vision)."""
    tokens: torch.Tensor | None = None
    """(N, T, d_tok) float16 token features, when encoded with tokens."""
    token_mask: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def per_row(self, n_rows: int, reduce: str = "first") -> torch.Tensor:
        """One vector per dataset row: the ``first`` caption's embedding or the ``mean`` of a row's captions."""
        if self.pooled.shape[0] == n_rows and torch.equal(self.row_index, torch.arange(n_rows)):
            return self.pooled
        if reduce == "first":
            first = torch.full((n_rows,), -1, dtype=torch.long)
            order = torch.arange(len(self.row_index) - 1, -1, -1)
            first[self.row_index[order]] = order  # the lowest position of each row wins (written last)
            return self.pooled[first]
        if reduce == "mean":
            out = torch.zeros(n_rows, self.dim, dtype=torch.float64)
            out.index_add_(0, self.row_index, self.pooled.double())
            counts = torch.bincount(self.row_index, minlength=n_rows).clamp_min(1)
            return (out / counts[:, None]).float()
        raise ValueError(f"reduce must be 'first' or 'mean', not {reduce!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "encoder"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` holds either nothing or the complete file."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


class EmbeddingCache:
    """Stores and finds embeddings by content. See the module docstring for the layout."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    # --- keys ------------------------------------------------------------------------------------
    @staticmethod
    def key(spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32") -> str:
        blob = json.dumps(
            {"format": CACHE_FORMAT, "spec": spec.cache_identity(), "data": dataset_fingerprint, "precision": precision},
            sort_keys=True,
            default=str,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def entry_path(self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32") -> Path:
        return self.root / _slug(spec.id) / f"{self.key(spec, dataset_fingerprint, precision)}.safetensors"

    def parts_dir(self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32", tokens: bool = False) -> Path:
        """Where the finished chunks of a run in progress live (runs with token features keep their own)."""
        return self.entry_path(spec, dataset_fingerprint, precision).with_suffix(".tok.parts" if tokens else ".parts")

    # --- finished entries -----------------------------------------------------------------------
    def load(
        self, spec: EncoderSpec, dataset_fingerprint: str, *, precision: str = "fp32", tokens: bool = False
    ) -> Embeddings | None:
        """The cached embeddings, or ``None`` on a miss (also when tokens are wanted but not stored)."""
        path = self.entry_path(spec, dataset_fingerprint, precision)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                raw_meta = f.metadata() or {}
                wanted = [k for k in f.keys() if tokens or k not in ("tokens", "token_mask")]
                tensors = {k: f.get_tensor(k) for k in wanted}
                has_tokens = "tokens" in f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            log.warning("cache entry %s is unreadable (%s); it will be recomputed", path, e)
            return None
        if tokens and not has_tokens:
            return None
        meta = {k: _maybe_json(v) for k, v in raw_meta.items()}
        return Embeddings(
            pooled=tensors["pooled"],
            row_index=tensors["row_index"],
            tokens=tensors.get("tokens") if tokens else None,
            token_mask=tensors.get("token_mask") if tokens else None,
            meta=meta,
        )

    def save(self, spec: EncoderSpec, dataset_fingerprint: str, emb: Embeddings, *, precision: str = "fp32") -> Path:
        path = self.entry_path(spec, dataset_fingerprint, precision)
        tensors = {"pooled": emb.pooled.float(), "row_index": emb.row_index.long()}
        if emb.tokens is not None:
            tensors["tokens"] = emb.tokens
            if emb.token_mask is not None:
                tensors["token_mask"] = emb.token_mask
        atomic_save(tensors, path, {k: json.dumps(v, default=str) for k, v in emb.meta.items()})
        return path

    # --- chunks of a run in progress ------------------------------------------------------------
    def finished_parts(
        self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32", tokens: bool = False
    ) -> dict[tuple[int, int], Path]:
        d = self.parts_dir(spec, dataset_fingerprint, precision, tokens)
        out: dict[tuple[int, int], Path] = {}
        if d.is_dir():
            for p in d.glob("*.safetensors"):
                m = re.fullmatch(r"(\d+)-(\d+)\.safetensors", p.name)
                if m:
                    out[(int(m.group(1)), int(m.group(2)))] = p
        return out

    def write_part(
        self,
        spec: EncoderSpec,
        dataset_fingerprint: str,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor],
        precision: str = "fp32",
        tokens: bool = False,
    ) -> Path:
        path = self.parts_dir(spec, dataset_fingerprint, precision, tokens) / f"{start:09d}-{end:09d}.safetensors"
        atomic_save(tensors, path)
        return path

    def drop_parts(self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32", tokens: bool = False) -> None:
        shutil.rmtree(self.parts_dir(spec, dataset_fingerprint, precision, tokens), ignore_errors=True)

    # --- housekeeping ---------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every finished entry with its metadata (for ``pairscout cache list``)."""
        rows = []
        for p in sorted(self.root.glob("*/*.safetensors")):
            try:
                with safe_open(p, framework="pt") as f:
                    meta = {k: _maybe_json(v) for k, v in (f.metadata() or {}).items()}
            except (SafetensorError, OSError):
                continue
            rows.append({"path": str(p), "size_mb": p.stat().st_size / 2**20, **meta})
        return rows


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v
