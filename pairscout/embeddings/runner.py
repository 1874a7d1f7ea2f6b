"""Encode a paired dataset with an encoder, through the cache.

:func:`encode` is the one entry point: cache hit -> load; miss -> batched encoding (parallel image
loading with a DataLoader, device picked automatically, bf16 autocast on GPU), written chunk by
chunk so an interrupted run resumes where it stopped, then merged into one cache entry.
:func:`encode_zoo` runs it for every encoder of a zoo and keeps going past a model that fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from pairscout import distributed
from pairscout.embeddings.cache import LAYER_PREFIX, EmbeddingCache, Embeddings
from pairscout.encoders.base import Encoder, EncoderOutput, PrecomputedEncoder
from pairscout.errors import DataError, EmbeddingError, PairscoutError, ZooError
from pairscout.runtime import default_workers, pick_device  # noqa: F401 - re-exported
from pairscout.version import __version__
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(model_name, rows_done, rows_total)``; called after every batch."""


@dataclass
class EncodeSettings:
    """How to encode (none of it changes the embeddings except ``amp``, which sets the precision key)."""

    device: str | None = None
    batch_size: int | None = None
    """Default: 64 images or 256 captions."""
    num_workers: int | None = None
    """Image-loading processes; default: CPU count - 1 (at most 8)."""
    chunk_batches: int = 16
    """Batches per resumable chunk on disk."""
    amp: bool = True
    """bf16 autocast on CUDA (recorded as precision ``bf16``); ignored on CPU."""
    tokens: bool = False
    """Also encode token-level features (needed by the local+global projector)."""
    trust_remote_code: bool = False
    """Let zoo entries with ``options.trust_remote_code`` run their repository's code (``--trust-remote-code``)."""

    def __post_init__(self) -> None:
        """Impossible values are one-line errors naming the option, before any work."""
        from pairscout.bounds import check_fields

        check_fields(self)  # every numeric setting against its declared range (pairscout.bounds)


class _ImageRows(TorchDataset):
    """DataLoader view: row index -> (index, tensor | None, error message)."""

    def __init__(self, dataset: Any, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(self.dataset.load_image(i)), ""
        except DataError as e:  # turned into a clean error in the main process
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - a transform failing on one image names that image
            return i, None, f"image {self.dataset.image_id(i)} ({self.dataset.locate(i)}) could not be preprocessed: {e}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
    errors = [b[2] for b in batch if b[2]]
    if errors:
        return idx, None, errors
    return idx, torch.stack([b[1] for b in batch]), []


def _chunks(order: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, len(order))) for s in range(0, len(order), chunk)]


def _precision(device: torch.device, settings: EncodeSettings) -> str:
    return "bf16" if (device.type == "cuda" and settings.amp) else "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _to_cpu(out: EncoderOutput, tokens: bool) -> dict[str, torch.Tensor]:
    t = {"pooled": out.pooled.detach().float().cpu()}
    for k, v in (out.layers or {}).items():
        t[LAYER_PREFIX + k] = v.detach().float().cpu()
    if tokens:
        if out.tokens is None:
            raise ZooError("the encoder returned no token features.", fix="use an encoder that supports tokens, or drop --tokens.")
        t["tokens"] = out.tokens.detach().to(torch.float16).cpu()
        if out.token_mask is not None:
            t["token_mask"] = out.token_mask.detach().bool().cpu()
    return t


def _iter_vision(enc: Encoder, dataset: Any, rows: np.ndarray, settings: EncodeSettings, device: torch.device, bs: int) -> Iterator[dict[str, torch.Tensor]]:
    workers = settings.num_workers if settings.num_workers is not None else default_workers()
    loader = DataLoader(
        _ImageRows(dataset, enc.image_transform()),
        batch_size=bs,
        sampler=rows.tolist(),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    for idx, pixels, errors in loader:
        if errors:
            raise DataError(errors[0]) if len(errors) == 1 else DataError(f"{errors[0]} (and {len(errors) - 1} more bad images in this batch)")
        fmt = torch.channels_last if enc.channels_last else torch.contiguous_format
        out = enc.encode_images(pixels.to(device, non_blocking=True, memory_format=fmt), tokens=settings.tokens)
        yield {"index": idx, **_to_cpu(out, settings.tokens)}


def _iter_text(enc: Encoder, texts: list[str], rows: np.ndarray, settings: EncodeSettings, bs: int) -> Iterator[dict[str, torch.Tensor]]:
    for s in range(0, len(rows), bs):
        idx = rows[s : s + bs]
        out = enc.encode_texts([texts[i] for i in idx], tokens=settings.tokens)
        yield {"index": torch.from_numpy(idx.astype(np.int64)), **_to_cpu(out, settings.tokens)}


def _merge(parts: Sequence[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    idx = torch.cat([p["index"] for p in parts])
    if len(idx) != n or not torch.equal(torch.sort(idx).values, torch.arange(n)):
        raise PairscoutError(f"cached chunks cover {len(idx)} of {n} rows.", fix="delete the .parts folder of this entry and encode again.")
    out = {}
    for k in parts[0]:
        if k == "index":
            continue
        cat = torch.cat([p[k] for p in parts])
        full = torch.empty_like(cat)
        full[idx] = cat
        out[k] = full
    return out


def check_embeddings(spec: EncoderSpec, pooled: torch.Tensor) -> None:
    """Refuse embeddings no metric can compare: not (rows, d >= 1), NaN/inf, or the same vector for every row.

    Raises:
        EmbeddingError: naming the model (a model failure: the others carry on).
    """
    if pooled.ndim != 2 or pooled.shape[1] == 0:
        raise EmbeddingError(f"encoder {spec.id} produced features of shape {tuple(pooled.shape)}, not (rows, dim >= 1).",
                             fix="check the encoder's output (pooling, layer, options.key).")
    if not torch.is_floating_point(pooled) or not torch.isfinite(pooled).all():
        bad = torch.nonzero(~torch.isfinite(pooled).all(dim=1)).flatten()[:5].tolist() if torch.is_floating_point(pooled) else []
        raise EmbeddingError(f"encoder {spec.id} produced NaN/inf features (rows {bad}).", fix="check its weights and preprocessing, or run it in fp32 (--no-amp).")
    if pooled.shape[0] >= 2 and bool((pooled == pooled[:1]).all()):
        what = "all-zero" if not bool(pooled[:1].any()) else "constant (the same vector for every row)"
        raise EmbeddingError(f"encoder {spec.id} produced {what} embeddings; no metric can compare them.",
                             fix="check that the model's weights loaded and that its output depends on the input; it is left out.")


def encode(
    spec_or_encoder: EncoderSpec | Encoder,
    dataset: Any,
    *,
    cache: EmbeddingCache | None = None,
    settings: EncodeSettings | None = None,
    progress: ProgressFn | None = None,
    refresh: bool = False,
) -> Embeddings:
    """Embeddings of ``dataset`` by one encoder, from the cache when present.

    Vision encoders embed each image row; text encoders embed every caption (``row_index`` maps a
    caption to its row; :meth:`Embeddings.per_row` gives one vector per row). Chunks are written as
    they finish, so calling this again after a crash resumes the run.

    Args:
        spec_or_encoder: the encoder's spec (built lazily, only on a cache miss) or a built encoder.
        dataset: a :class:`~pairscout.data.PairedDataset`.
        cache: where entries live (default: :func:`~pairscout.embeddings.cache.default_cache_dir`).
        settings: device, batch size, workers, amp, tokens.
        progress: callback ``(model, done, total)``.
        refresh: ignore a finished entry and its chunks and encode again.
    """
    settings = settings or EncodeSettings()
    cache = cache or EmbeddingCache()
    enc = spec_or_encoder if isinstance(spec_or_encoder, Encoder) else None
    spec = enc.spec if enc is not None else spec_or_encoder
    device = pick_device(settings.device)
    precision = _precision(device, settings)
    fp = dataset.fingerprint
    tok = settings.tokens

    rank, world = distributed.rank_world()
    if refresh:
        if rank == 0:
            cache.drop_parts(spec, fp, precision, tok)
        distributed.barrier()
    else:
        hit = cache.load(spec, fp, precision=precision, tokens=tok)
        if hit is not None:
            log.info("cache hit for %s", spec.id)
            check_embeddings(spec, hit.pooled)
            if progress:
                progress(spec.name, len(hit.pooled), len(hit.pooled))
            return hit

    from pairscout.encoders import build_encoder  # imported late: sources pull heavy packages

    if rank == 0:
        cache.check_writable(spec)  # a read-only or unusable cache fails now, not after the encoding

    t0 = time.perf_counter()
    if enc is None:
        from pairscout.encoders.hf_source import allow_remote_code, remote_code_allowed

        with allow_remote_code(settings.trust_remote_code or remote_code_allowed()):  # the command's --trust-remote-code too
            enc = build_encoder(spec)
    enc.to(device)

    if spec.modality == "vision":
        n = len(dataset)
        row_index = torch.arange(n)
        order = np.arange(n)
    else:
        texts, caption_rows = dataset.flat_captions()
        n = len(texts)
        row_index = torch.from_numpy(np.asarray(caption_rows, dtype=np.int64))
        # longest first: fewer padding tokens per batch and the memory peak shows up at once
        order = np.argsort([-len(t) for t in texts], kind="stable")

    if isinstance(enc, PrecomputedEncoder):
        # a file's row i is row i of the whole dataset (not of a --n subset of it): read all, keep this view's rows
        positions, file_n = dataset.file_rows(spec.modality)
        out = enc.load(file_n, tokens=tok, subset=None if file_n == n else len(positions))
        merged = _to_cpu(out, tok)
        if file_n != n:
            sel = torch.from_numpy(positions)
            merged = {k: (v[sel] if v is not None else None) for k, v in merged.items()}
    else:
        bs = settings.batch_size or (64 if spec.modality == "vision" else 256)
        chunk = bs * max(1, settings.chunk_batches)
        done = cache.finished_parts(spec, fp, precision, tok)
        parts: list[dict[str, torch.Tensor]] = []
        todo: list[tuple[int, int]] = []
        for a, b in _chunks(order, chunk):
            p = done.get((a, b))
            part = cache.read_part(p) if p is not None else None  # a damaged chunk is removed and redone
            if part is not None:
                parts.append(part)
            else:
                todo.append((a, b))
        n_done = sum(b - a for a, b in _chunks(order, chunk)) - sum(b - a for a, b in todo)
        if n_done:
            log.info("%s: resuming, %d of %d rows already encoded", spec.id, n_done, n)
        if world > 1:  # every process listed the same finished chunks; now each takes its share
            distributed.barrier()
            todo, n_done = todo[rank::world], 0
        if progress:
            progress(spec.name, n_done, n)
        if todo:
            if spec.modality == "text":
                enc.fit(texts)
            rows = np.concatenate([order[a:b] for a, b in todo])
            if spec.modality == "vision":
                batches = _iter_vision(enc, dataset, rows, settings, device, bs)
            else:
                batches = _iter_text(enc, texts, rows, settings, bs)
            chunk_iter = iter(todo)
            a, b = next(chunk_iter)
            buf: list[dict[str, torch.Tensor]] = []
            filled = 0
            with torch.inference_mode(), _autocast(device, precision):
                for batch in batches:
                    buf.append(batch)
                    filled += len(batch["index"])
                    n_done += len(batch["index"])
                    if progress:
                        progress(spec.name, n_done, n)
                    if filled >= b - a:
                        part = {k: torch.cat([x[k] for x in buf]) for k in buf[0]}
                        cache.write_part(spec, fp, a, b, part, precision, tok)
                        parts.append(part)
                        buf, filled = [], 0
                        nxt = next(chunk_iter, None)
                        if nxt is None:
                            break
                        a, b = nxt
        if world > 1:  # gather the other processes' chunks from the shared cache
            distributed.barrier()
            wanted = set(_chunks(order, chunk))
            parts = [q for key, p in sorted(cache.finished_parts(spec, fp, precision, tok).items())
                     if key in wanted and (q := cache.read_part(p)) is not None]
        merged = _merge(parts, n)

    pooled = merged["pooled"]
    check_embeddings(spec, pooled)
    if spec.dim is not None and pooled.shape[1] != spec.dim:
        raise ZooError(f"encoder {spec.id} produced {pooled.shape[1]}-d features but its zoo entry says dim = {spec.dim}.", fix="correct the zoo entry's dim.")

    meta = {
        "model_id": spec.id,
        "name": spec.name,
        "modality": spec.modality,
        "revision": spec.revision,
        "pooling": spec.pooling,
        "spec": spec.cache_identity(),
        "dataset": getattr(dataset, "name", ""),
        "dataset_fingerprint": fp,
        "n": n,
        "dim": int(pooled.shape[1]),
        "precision": precision,
        "device": str(device),
        "tokens": tok,
        "encode_seconds": round(time.perf_counter() - t0, 3),
        "pairscout_version": __version__,
        "torch_version": torch.__version__,
    }
    layers = {k[len(LAYER_PREFIX):]: v for k, v in merged.items() if k.startswith(LAYER_PREFIX)} or None
    for v in (layers or {}).values():
        check_embeddings(spec, v)
    if layers:
        meta["layers"] = list(layers)
    emb = Embeddings(pooled=pooled, row_index=row_index, tokens=merged.get("tokens"), token_mask=merged.get("token_mask"), meta=meta,
                     layers=layers)
    distributed.barrier()  # every process has read the chunks before rank 0 removes them
    if rank == 0:
        cache.save(spec, fp, emb, precision=precision)
        cache.drop_parts(spec, fp, precision, tok)
    distributed.barrier()
    return emb


@dataclass
class ZooEncoding:
    """The embeddings of every encoder that succeeded, and the errors of those that failed."""

    embeddings: dict[str, Embeddings] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def encode_zoo(
    specs: Sequence[EncoderSpec],
    dataset: Any,
    *,
    cache: EmbeddingCache | None = None,
    settings: EncodeSettings | None = None,
    progress: ProgressFn | None = None,
    refresh: bool = False,
) -> ZooEncoding:
    """Encode with every spec; a model that fails is recorded in ``failures`` and the rest go on.

    Bad data (:class:`DataError`) is not a model failure: it stops the run, since every model would
    meet it. Any other exception raised by a model's own code (a ``ValueError`` of a tokenizer, a shape
    error in a custom model) fails that model, with its type and message; the others carry on.
    """
    result = ZooEncoding()
    for spec in specs:
        try:
            result.embeddings[spec.name] = encode(spec, dataset, cache=cache, settings=settings, progress=progress, refresh=refresh)
        except DataError:
            raise
        except PairscoutError as e:
            log.error("%s failed: %s", spec.id, e)
            result.failures[spec.name] = str(e)
        except (MemoryError, torch.cuda.OutOfMemoryError) as e:
            log.error("%s failed: %s", spec.id, type(e).__name__)
            result.failures[spec.name] = f"encoder {spec.id} ran out of memory ({type(e).__name__}); try a smaller --batch-size."
        except Exception as e:  # noqa: BLE001 - a model raising inside its own code fails that model only (README)
            reason = " ".join(str(e).split())[:200]
            log.error("%s failed inside the model's code: %s: %s", spec.id, type(e).__name__, reason)
            log.info("where %s failed:", spec.id, exc_info=True)  # shown with --verbose
            result.failures[spec.name] = f"encoder {spec.id} raised {type(e).__name__}: {reason} (run with --verbose for where)."
    return result
