"""Input checks shared by the metrics: tensors in, one-line :class:`MetricError` out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pairscout.errors import MetricError
from pairscout.tensors import from_numpy

ArrayLike = Any  # torch.Tensor | np.ndarray


def as_matrix(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor (numpy accepted), checked finite.

    Raises:
        MetricError: not 2-D, no rows/columns, non-floating-point, NaN or inf (naming ``name``).
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise MetricError(f"{name} is a numpy array of {x.dtype} ({'complex' if x.dtype.kind == 'c' else 'not real numbers'}).",
                              fix="pass real-valued float embeddings.")
        x = from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise MetricError(f"{name} is a {type(x).__name__}, not a tensor or numpy array.",
                          fix="pass an (n, d) torch.Tensor or numpy array.")
    if x.requires_grad:  # a measure is a read-out, never part of a graph: numpy and in-place steps need a plain tensor
        x = x.detach()
    if x.is_meta:
        raise MetricError(f"{name} is a meta tensor (shape only, no values).", fix="pass a tensor with data (e.g. on cpu or cuda).")
    if x.is_complex():
        raise MetricError(f"{name} is complex ({x.dtype}); its imaginary part would be dropped.", fix="pass real-valued float embeddings.")
    if device is not None and x.device != device:
        x = x.to(device)
    if x.ndim != 2:
        raise MetricError(f"{name} has shape {tuple(x.shape)}, expected a 2-D (n, d) matrix.",
                          fix="pool token features to one vector per row first.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise MetricError(f"{name} is empty (shape {tuple(x.shape)}).", fix="pass at least one row and one column.")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    # fast path: a finite sum means every entry is finite (an overflowing sum of finite values falls through)
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise MetricError(f"{name} contains NaN or inf in {bad} of {x.shape[0]} rows.",
                          fix="re-encode that model (check for fp16 overflow) or drop the bad rows from every model.")
    return x


def as_matrices(xs: ArrayLike | Sequence[ArrayLike], name: str,
                device: torch.device | None = None) -> list[torch.Tensor]:
    """A list of checked matrices; a single matrix becomes a list of one. Names read ``name[i]``."""
    if isinstance(xs, torch.Tensor | np.ndarray):
        return [as_matrix(xs, name, device)]
    xs = list(xs)
    if not xs:
        raise MetricError(f"{name} is an empty list of embeddings.", fix="pass at least one (n, d) matrix.")
    out = []
    for i, x in enumerate(xs):
        out.append(as_matrix(x, f"{name}[{i}]", device))
        device = out[0].device
    return out


def check_same_rows(groups: dict[str, list[torch.Tensor]], min_rows: int = 1, why: str = "") -> int:
    """Check every matrix has the same number of rows (>= ``min_rows``); return it."""
    n = None
    first = ""
    for gname, mats in groups.items():
        for i, m in enumerate(mats):
            label = f"{gname}[{i}]" if len(mats) > 1 else gname
            if n is None:
                n, first = m.shape[0], label
            elif m.shape[0] != n:
                raise MetricError(f"{label} has {m.shape[0]} rows but {first} has {n}; rows must be the same pairs.",
                                  fix="encode the same n image-caption pairs with every model.")
    assert n is not None
    if n < min_rows:
        raise MetricError(f"{first} has only {n} rows; {why or 'this metric'} needs at least {min_rows}.",
                          fix=f"use at least {min_rows} rows.")
    return n


SAFE_F32 = (2.0**-16, 2.0**16)
"""Largest |x| range whose fourth powers (HSIC of a linear kernel, summed over rows) stay normal float32."""


def compute_dtype(mats: Sequence[torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """float64 if asked or if any input is float64, else float32 (half precision is promoted).

    Also float64 when any matrix's largest |x| is outside :data:`SAFE_F32`: products of data scaled
    by 1e20 overflow float32 and those of data scaled by 1e-20 underflow to 0, so a scale-invariant
    measure (CKA) would read 0.0. In float64 the whole float32 range is safe.
    """
    if dtype is not None:
        return dtype
    if any(m.dtype == torch.float64 for m in mats):
        return torch.float64
    for m in mats:
        top = float(m.abs().max()) if m.numel() else 1.0
        if top != 0.0 and not SAFE_F32[0] <= top <= SAFE_F32[1]:
            return torch.float64
    return torch.float32


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, safe over the whole float range: each row is first scaled by a power of two
    (exact) so its largest |x| is in [0.5, 1), then normalised; zero rows stay zero."""
    top = x.abs().amax(dim=1, keepdim=True)
    _, exp = torch.frexp(top)
    scale = torch.where(top > 0, torch.ldexp(torch.ones_like(top), -exp), torch.ones_like(top))
    return torch.nn.functional.normalize(x * scale, p=2, dim=1)


def pow2_unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` times the power of two that puts its largest |value| in [0.5, 1) when it lies outside
    :data:`SAFE_F32` (else ``x`` itself): exact (only the exponent changes), so a scale-invariant measure's value is unchanged, and its products (fourth powers in HSIC) stay
    normal floats for data anywhere in float64's range (1e-300 or 1e300, where they under- or overflow)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0 or not math.isfinite(top) or SAFE_F32[0] <= top <= SAFE_F32[1]:
        return x  # already safe (every embedding a model makes): no copy, bit-identical results
    _, e = math.frexp(top)
    if abs(e) < 1000:
        return x * 2.0**-e
    half = -e // 2  # two steps: 2**-e alone overflows for subnormal data
    return x * 2.0**half * 2.0 ** (-e - half)


def check_not_constant(mats: Sequence[torch.Tensor], names: Sequence[str], what: str) -> None:
    """Raise MetricError naming the first matrix whose rows are all the same vector (all-zero included)."""
    for m, name in zip(mats, names, strict=True):
        if m.shape[0] >= 2 and bool((m == m[:1]).all()):
            kind = "all-zero" if not bool(m[:1].any()) else "constant (every row the same vector)"
            raise MetricError(f"{name} is {kind}; {what} is undefined for it.",
                              fix="leave that model out, or check that its encoder produced real embeddings.")
