"""Small tensor helpers shared by the encoders, the metrics and the alignment heads."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def masked_mean(tokens: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean over the token axis of (B, T, d), counting only tokens where token_mask (B, T) is true.

    ``sum_t m_t h_t / max(1, sum_t m_t)``: a row with no valid token gives zeros, and padding (even
    NaN/inf) never counts. Without a mask, the plain mean over T.
    """
    if token_mask is None:
        return tokens.mean(dim=1)
    if token_mask.shape != tokens.shape[:2]:
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != tokens (B, T) {tuple(tokens.shape[:2])}")
    keep = token_mask.to(device=tokens.device, dtype=torch.bool)
    summed = tokens.masked_fill(~keep[..., None], 0.0).sum(dim=1)
    return summed / keep.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)


def from_numpy(a: np.ndarray) -> Tensor:
    """A numpy array as a tensor: big-endian data in native byte order first (``torch.from_numpy`` refuses it),
    strided data made contiguous; memory is shared where it can be."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(a))
