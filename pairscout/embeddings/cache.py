"""Content-addressed embedding cache.

One entry per (encoder spec, dataset fingerprint, precision), stored as a safetensors file with
string metadata (model id, revision, pooling, preprocessing, dataset fingerprint, versions, and a
blake2b checksum of every stored tensor)::

    <root>/<encoder-slug>/<key>.safetensors          finished entry
    <root>/<encoder-slug>/<key>.parts/<a>-<b>.safetensors   finished chunks of an interrupted run

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written file under a real name. A run that was
interrupted resumes from its finished chunks.

Trust nothing read back: an entry or chunk that does not parse, lacks a tensor, or whose bytes do not
match the checksums in its metadata (a flipped bit, a file cut short by a full disk) is reported,
removed and encoded again. Encoders that read local files (``emb:`` vectors, local ``weights``, ONNX
files, model folders) are keyed by the content of those files too (:mod:`pairscout.embeddings.inputs`),
so re-exporting a file under the same name is a cache miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pairscout.embeddings.inputs import DigestStore, inputs_digest
from pairscout.errors import CacheError
from pairscout.files import atomic_path, safe_name
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

LAYER_PREFIX = "layer."
"""Tensor-name prefix of a layer sweep's per-block features in an entry (``layer.7``)."""

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
    layers: dict[str, torch.Tensor] | None = None
    """A layer sweep: block index (0-based, as a string) -> (N, d_l) float32, rows as :attr:`pooled`;
    stored in the same cache file as ``layer.<block>`` tensors."""

    def layer(self, name: str | None) -> Embeddings:
        """These embeddings with block ``name``'s features as :attr:`pooled` (``None`` or ``"final"``: as they are)."""
        if name in (None, "final"):
            return self
        if not self.layers or name not in self.layers:
            from pairscout.errors import CacheError

            have = ", ".join(self.layers or {}) or "none"
            raise CacheError(f"the embeddings of {self.meta.get('model_id', '?')} have no layer {name!r} (layers: {have}).",
                             fix="rank again with the same --layers (or zoo layers) so the layer is encoded.")
        return Embeddings(pooled=self.layers[name], row_index=self.row_index, tokens=None, token_mask=None,
                          meta={**self.meta, "layer": name})

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def per_row(self, n_rows: int, reduce: str = "first", values: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per dataset row: the ``first`` caption's embedding or the ``mean`` of a row's captions
        (of ``values``, rows as :attr:`pooled`, when given: a layer of a sweep)."""
        values = self.pooled if values is None else values
        if values.shape[0] == n_rows and torch.equal(self.row_index, torch.arange(n_rows)):
            return values
        if reduce == "first":
            first = torch.full((n_rows,), -1, dtype=torch.long)
            order = torch.arange(len(self.row_index) - 1, -1, -1)
            first[self.row_index[order]] = order  # the lowest position of each row wins (written last)
            return values[first]
        if reduce == "mean":
            out = torch.zeros(n_rows, values.shape[1], dtype=torch.float64)
            out.index_add_(0, self.row_index, values.double())
            counts = torch.bincount(self.row_index, minlength=n_rows).clamp_min(1)
            return (out / counts[:, None]).float()
        raise ValueError(f"reduce must be 'first' or 'mean', not {reduce!r}")


def _slug(text: str) -> str:
    return safe_name(text, default="encoder")


ENTRY_NAME = re.compile(r"[0-9a-f]{24}\.safetensors")
"""The file name of a finished entry (:meth:`EmbeddingCache.key`)."""
PARTS_NAME = re.compile(r"[0-9a-f]{24}(\.tok)?\.parts")
"""The folder name of an interrupted run's chunks."""
PART_NAME = re.compile(r"(\d+)-(\d+)\.safetensors")
"""The file name of one finished chunk."""

CHECKSUMS = "pairscout_checksums"
"""Metadata key of a JSON {tensor name: blake2b-128 hex of its bytes}."""


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's dtype, shape and raw bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` holds either nothing or the complete file.

    The metadata gets the checksum of every tensor (verified by :func:`read_verified`).
    """
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUMS: json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
    except OSError as e:
        raise CacheError(
            f"cannot write the cache file {path} ({type(e).__name__}: {e.strerror or e}).",
            fix="free disk space, make the cache folder writable, or pass another --cache-dir.",
        ) from None


def read_verified(path: Path, wanted: set[str] | Callable[[str], bool] | None = None, required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]] | str:
    """The tensors (all, or ``wanted``) and metadata of a safetensors file, checked against its checksums.

    Returns the reason as a string when the file is unreadable, lacks a ``required`` tensor, has no
    checksums, or a tensor's bytes do not match.
    """
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            missing = [k for k in required if k not in keys]
            if missing:
                return f"it lacks the tensor(s) {', '.join(missing)}"
            keep = wanted if callable(wanted) else (lambda k: wanted is None or k in wanted)
            tensors = {k: f.get_tensor(k) for k in keys if keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return f"it is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    try:
        sums = json.loads(meta.get(CHECKSUMS, ""))
    except json.JSONDecodeError:
        return "it has no checksums (written by an older pairscout or another tool)"
    if not isinstance(sums, dict):
        return "its checksums are malformed"
    for k, t in tensors.items():
        if sums.get(k) != tensor_digest(t):
            return f"the checksum of its tensor {k!r} does not match (the file is damaged)"
    return tensors, meta


def _discard(path: Path, what: str, reason: str) -> None:
    log.warning("%s %s is bad (%s); it is removed and encoded again", what, path, reason)
    try:
        path.unlink()
    except OSError:
        pass


class EmbeddingCache:
    """Stores and finds embeddings by content. See the module docstring for the layout."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"the cache path {self.root} is a file, not a folder.", fix="pass a folder as --cache-dir (or $PAIRSCOUT_CACHE).")
        self._digests = DigestStore(self.root / "file-digests.json")

    # --- keys ------------------------------------------------------------------------------------
    @staticmethod
    def key(spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32", inputs: str | None = None) -> str:
        """Hash of the spec, the dataset, the precision and (when the spec reads local files) their content."""
        d = {"format": CACHE_FORMAT, "spec": spec.cache_identity(), "data": dataset_fingerprint, "precision": precision}
        if inputs is not None:
            d["inputs"] = inputs
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def entry_path(self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32") -> Path:
        key = self.key(spec, dataset_fingerprint, precision, inputs_digest(spec, self._digests))
        return self.root / _slug(spec.id) / f"{key}.safetensors"

    def parts_dir(self, spec: EncoderSpec, dataset_fingerprint: str, precision: str = "fp32", tokens: bool = False) -> Path:
        """Where the finished chunks of a run in progress live (runs with token features keep their own)."""
        return self.entry_path(spec, dataset_fingerprint, precision).with_suffix(".tok.parts" if tokens else ".parts")

    def check_writable(self, spec: EncoderSpec) -> None:
        """Raise :class:`CacheError` unless a new entry of ``spec`` can be written (checked before encoding)."""
        folder = self.root / _slug(spec.id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / ".write-check"):
                pass
            (folder / ".write-check").unlink(missing_ok=True)
        except OSError as e:
            raise CacheError(
                f"the cache folder {folder} is not writable ({type(e).__name__}: {e.strerror or e}).",
                fix="make it writable, free disk space, or pass another --cache-dir (or set $PAIRSCOUT_CACHE).",
            ) from None

    # --- finished entries -----------------------------------------------------------------------
    def load(
        self, spec: EncoderSpec, dataset_fingerprint: str, *, precision: str = "fp32", tokens: bool = False
    ) -> Embeddings | None:
        """The cached embeddings, or ``None`` on a miss (also when tokens are wanted but not stored)."""
        path = self.entry_path(spec, dataset_fingerprint, precision)
        if not path.exists():
            return None
        if not path.is_file():
            raise CacheError(f"the cache entry {path} of {spec.id} is not a regular file.", fix="remove it; it is encoded again.")
        if tokens:
            try:
                with safe_open(path, framework="pt") as f:
                    if "tokens" not in f.keys():
                        return None  # a pooled-only entry: encode again with tokens
            except (SafetensorError, OSError, ValueError, RuntimeError):
                pass  # reported below
        wanted = None if tokens else (lambda k: k in ("pooled", "row_index") or k.startswith(LAYER_PREFIX))
        got = read_verified(path, wanted, required=("pooled", "row_index"))
        if isinstance(got, str):
            _discard(path, f"cache entry of {spec.id}", got)
            return None
        tensors, raw_meta = got
        raw_meta.pop(CHECKSUMS, None)
        if tensors["pooled"].ndim != 2 or tensors["row_index"].shape != tensors["pooled"].shape[:1]:
            _discard(path, f"cache entry of {spec.id}", f"its tensors have shapes {tuple(tensors['pooled'].shape)} and {tuple(tensors['row_index'].shape)}")
            return None
        meta = {k: _maybe_json(v) for k, v in raw_meta.items()}
        return Embeddings(
            pooled=tensors["pooled"],
            row_index=tensors["row_index"],
            tokens=tensors.get("tokens") if tokens else None,
            token_mask=tensors.get("token_mask") if tokens else None,
            meta=meta,
            layers={k[len(LAYER_PREFIX):]: v for k, v in tensors.items() if k.startswith(LAYER_PREFIX)} or None,
        )

    def save(self, spec: EncoderSpec, dataset_fingerprint: str, emb: Embeddings, *, precision: str = "fp32") -> Path:
        path = self.entry_path(spec, dataset_fingerprint, precision)
        tensors = {"pooled": emb.pooled.float(), "row_index": emb.row_index.long()}
        if emb.tokens is not None:
            tensors["tokens"] = emb.tokens
            if emb.token_mask is not None:
                tensors["token_mask"] = emb.token_mask
        for k, v in (emb.layers or {}).items():
            tensors[LAYER_PREFIX + k] = v.float().contiguous()
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
                m = PART_NAME.fullmatch(p.name)
                if m:
                    out[(int(m.group(1)), int(m.group(2)))] = p
        return out

    @staticmethod
    def read_part(path: Path) -> dict[str, torch.Tensor] | None:
        """A finished chunk, or ``None`` (after removing it) when it is truncated, damaged or incomplete."""
        got = read_verified(path, required=("index", "pooled"))
        if isinstance(got, str):
            _discard(path, "chunk", got)
            return None
        tensors, _ = got
        n = tensors["index"].shape[0]
        if any(t.shape[:1] != (n,) for t in tensors.values()):
            _discard(path, "chunk", "its tensors disagree in rows")
            return None
        return tensors

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
        """Every finished entry with its metadata (for ``pairscout cache list`` and ``cache clear``).

        Only files this cache wrote: ``<root>/<slug>/<24 hex>.safetensors`` whose metadata holds the checksums
        and the model id it writes. Anything else in the folder (a user's own file, another tool's) is neither
        listed nor ever removed."""
        rows = []
        for p in sorted(self.root.glob("*/*.safetensors")):
            if not ENTRY_NAME.fullmatch(p.name) or not p.is_file() or p.is_symlink():
                continue
            try:
                with safe_open(p, framework="pt") as f:
                    raw = f.metadata() or {}
            except (SafetensorError, OSError, ValueError, RuntimeError):
                continue
            if CHECKSUMS not in raw or "model_id" not in raw:
                continue
            meta = {k: _maybe_json(v) for k, v in raw.items() if k != CHECKSUMS}
            rows.append({"path": str(p), "size_mb": p.stat().st_size / 2**20, **meta})
        return rows

    def unfinished(self, entry: Path | None = None) -> list[Path]:
        """The ``.parts`` folders of interrupted runs (of one entry path, or all), by the names this cache gives them."""
        dirs = [entry.with_suffix(".parts"), entry.with_suffix(".tok.parts")] if entry is not None else sorted(self.root.glob("*/*.parts"))
        return [d for d in dirs if PARTS_NAME.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
                and any(PART_NAME.fullmatch(q.name) for q in d.iterdir())]


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v
