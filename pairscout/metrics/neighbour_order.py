"""One canonical form of a neighbour list: exact per-entry similarities and one order of each row's entries, so
lists found on row shards (:mod:`.sharded_rows`) equal those of one process (:mod:`.knn`)."""

from __future__ import annotations

import torch

F64 = torch.float64


def entry_dots(a: torch.Tensor, ra: torch.Tensor, b: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``a[ra[p]] . b[cb[p]]`` per entry p, products and sum in float64 and rounded to a's dtype once: the same value
    whichever block of rows it is computed in (a GEMM's rounding depends on the shapes it is given)."""
    out = torch.empty(ra.numel(), dtype=a.dtype, device=a.device)
    step = max(1, 2**22 // max(a.shape[1], 1))
    for s in range(0, ra.numel(), step):
        out[s:s + step] = (a[ra[s:s + step]].to(F64) * b[cb[s:s + step]].to(F64)).sum(-1).to(a.dtype)
    return out


def row_dots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n, w) ``x[r] . x[idx[r, p]]`` for every row r and entry p: :func:`entry_dots` of every entry (the same
    float64 products and sums, so the same values), without gathering the row itself once per entry."""
    out = torch.empty(idx.shape, dtype=x.dtype, device=x.device)
    x64 = x.to(F64)
    step = max(1, 2**22 // max(x.shape[1] * max(idx.shape[1], 1), 1))
    for s in range(0, idx.shape[0], step):
        out[s:s + step] = (x64[s:s + step, None, :] * x64[idx[s:s + step]]).sum(-1).to(x.dtype)
    return out


def canonical_order(idx: torch.Tensor, val: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Each row's entries by similarity (descending), equal similarities by index (ascending), unused (-1) last:
    one order whatever order ``topk`` returned tied values in (so sharded and single-process lists are equal)."""
    big = torch.iinfo(idx.dtype).max
    o1 = torch.argsort(torch.where(idx >= 0, idx, torch.full_like(idx, big)), dim=1, stable=True)
    key = torch.where(idx >= 0, val, torch.full_like(val, float("-inf"))).gather(1, o1)
    perm = o1.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))
    return (idx.gather(1, perm), val.gather(1, perm), *(() if w is None else (w.gather(1, perm),)))
