"""How a training step gets its data: checked inputs, batch ``s`` as a pure function of (seed, s), and
moving rows to the device.

- images: each epoch is a permutation of the images (generator seeded by ``seed`` and the epoch);
  a step takes the next ``batch_size`` of them (the last incomplete batch of an epoch is dropped).
- captions: ``captions="sample"`` draws one caption per image per step (generator seeded by ``seed``
  and the step); ``captions="all"`` puts every caption of the batch's images in the batch as
  multi-positives (the loss gets each caption's image row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from pairscout.embeddings.cache import Embeddings
from pairscout.errors import TrainError


@dataclass
class Side:
    pooled: Tensor
    tokens: Tensor | None
    mask: Tensor | None


def side(x: Tensor | Embeddings, tokens: Tensor | None, mask: Tensor | None, what: str) -> Side:
    if isinstance(x, Embeddings):
        tokens = x.tokens if tokens is None else tokens
        mask = x.token_mask if mask is None else mask
        x = x.pooled
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise TrainError(f"{what} features must be a (rows, dim) tensor, got {getattr(x, 'shape', type(x))}.", fix="pass pooled embeddings.")
    x = x.float()
    if not torch.isfinite(x).all():
        raise TrainError(f"{what} features hold NaN/inf values.", fix="re-encode them (pairscout encode --refresh).")
    if tokens is not None and tokens.shape[0] != x.shape[0]:
        raise TrainError(f"{what} tokens have {tokens.shape[0]} rows but the pooled features {x.shape[0]}.", fix="pass matching tensors.")
    return Side(x, tokens, mask)


def data_signature(*tensors: Tensor | None, rows: int = 2048) -> str:
    """A cheap content hash: shapes plus up to ``rows`` evenly spaced rows of each tensor."""
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str(tuple(t.shape)).encode())
        if t.shape[0]:
            sel = torch.linspace(0, t.shape[0] - 1, min(rows, t.shape[0])).long()
            h.update(t[sel].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Batches:
    """Batch ``s`` of a run as a pure function of (seed, s): image rows, caption rows, caption -> batch row."""

    def __init__(self, text_image_index: Tensor, n_images: int, batch_size: int, seed: int, captions: str) -> None:
        tii = text_image_index.long().cpu()
        self.counts = torch.bincount(tii, minlength=n_images)
        self.order = torch.argsort(tii, stable=True)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.pool = torch.nonzero(self.counts > 0).flatten()
        self.bs = min(batch_size, len(self.pool))
        self.per_epoch = max(1, len(self.pool) // self.bs)
        self.seed, self.captions = seed, captions
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.pool), generator=g), epoch
        images = self.pool[self._perm[k * self.bs : (k + 1) * self.bs]]
        counts, offsets = self.counts[images], self.offsets[images]
        if self.captions == "sample":
            g = torch.Generator().manual_seed((self.seed + 1) * 7_919 + step * 104_729)
            pick = offsets + (torch.rand(len(images), generator=g) * counts).long().clamp_max(counts - 1)
            return images, self.order[pick], None
        row = torch.repeat_interleave(torch.arange(len(images)), counts)
        start = torch.repeat_interleave(offsets, counts)
        within = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return images, self.order[start + within], row


def place(t: Tensor | None, device: torch.device, fits: bool) -> Tensor | None:
    if t is None or device.type != "cuda":
        return t
    return t.to(device) if fits else t.pin_memory()


def gather(t: Tensor | None, idx: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
    if t is None:
        return None
    out = t[idx.to(t.device)].to(device, non_blocking=True)
    return out.to(dtype) if dtype is not None else out
