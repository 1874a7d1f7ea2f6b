"""Tiled InfoNCE: CLIP's loss without the B x B' logit matrix (memory O(B x chunk)).

The symmetric InfoNCE of :class:`~pairscout.align.losses.InfoNCELoss` splits into sparse positive terms and
two log-sum-exp terms over the logits ``z = t x y^T``::

    L = 1/2 [ 1/N_r sum_{i: rows}  (lse_j z_ij - mean_{j in P(i)} z_ij)       image -> text
            + 1/N_c sum_{j: cols}  (lse_i z_ij - z_{idx_j, j}) ]               text -> image

The positive terms are O((B + B') d) and stay in ordinary autograd. :class:`_TiledLSE` computes the two
log-sum-exp sums over column blocks of ``chunk`` captions: the row LSE online (running max and sum, as
Inf-CL and flash attention do), the column LSE per block; backward recomputes each block's logits and forms
``dL/dz = a P_row + b P_col`` (the two softmaxes) block by block, so no B x B' tensor ever exists (Inf-CL,
Cheng et al. 2024, "Breaking the memory barrier": tile-wise LSE with recomputation).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _TiledLSE(torch.autograd.Function):
    """``a * sum_i rmask_i lse_j(t x_i.y_j) + b * sum_j cmask_j lse_i(t x_i.y_j)`` over column blocks."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, t: Tensor, rmask: Tensor, cmask: Tensor, a: float, b: float,
                chunk: int) -> Tensor:  # noqa: D102
        n_img = x.shape[0]
        m = torch.full((n_img,), float("-inf"), dtype=x.dtype, device=x.device)
        s = torch.zeros(n_img, dtype=x.dtype, device=x.device)
        lse_col = torch.empty(y.shape[0], dtype=x.dtype, device=x.device)
        for c0 in range(0, y.shape[0], chunk):
            z = t * (x @ y[c0:c0 + chunk].T)
            lse_col[c0:c0 + chunk] = torch.logsumexp(z, dim=0)
            new_m = torch.maximum(m, z.max(dim=1).values)
            s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(dim=1)
            m = new_m
            del z
        lse_row = m + torch.log(s)
        ctx.save_for_backward(x, y, t, rmask, cmask, lse_row, lse_col)
        ctx.a, ctx.b, ctx.chunk = a, b, chunk
        return a * (rmask * lse_row).sum() + b * (cmask * lse_col).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, y, t, rmask, cmask, lse_row, lse_col = ctx.saved_tensors
        a, b, chunk = ctx.a, ctx.b, ctx.chunk
        dx = torch.zeros_like(x)
        dy = torch.empty_like(y)
        dt = torch.zeros((), dtype=x.dtype, device=x.device)
        ra = (a * rmask)[:, None]
        for c0 in range(0, y.shape[0], chunk):
            yc = y[c0:c0 + chunk]
            xy = x @ yc.T
            z = t * xy
            g = ra * torch.exp(z - lse_row[:, None])
            g += (b * cmask[c0:c0 + chunk])[None, :] * torch.exp(z - lse_col[None, c0:c0 + chunk])
            g *= grad
            dx += t * (g @ yc)
            dy[c0:c0 + chunk] = t * (g.T @ x)
            dt += (g * xy).sum()
            del xy, z, g
        return dx, dy, dt.reshape(t.shape), None, None, None, None, None


def tiled_infonce(x: Tensor, y: Tensor, t: Tensor, idx: Tensor, chunk: int) -> Tensor:
    """Symmetric multi-positive InfoNCE of L2-normalised ``x`` (B, d), ``y`` (B', d) at scale ``t`` (0-d),
    ``idx[j]`` = image row of caption j (-1: none), in blocks of ``chunk`` captions. Equals
    :class:`~pairscout.align.losses.InfoNCELoss`'s plain path in value and gradients."""
    n_img = x.shape[0]
    has_img = idx >= 0
    n_pos = torch.zeros(n_img, dtype=x.dtype, device=x.device).index_add_(
        0, idx[has_img], torch.ones(int(has_img.sum()), dtype=x.dtype, device=x.device))
    rows = n_pos > 0
    n_rows, n_cols = int(rows.sum()), int(has_img.sum())
    a, b = 0.5 / n_rows, 0.5 / n_cols
    lse = _TiledLSE.apply(x, y, t, rows.to(x.dtype), has_img.to(x.dtype), a, b, int(chunk))
    # positives: z_{idx_j, j} for t2i; mean over each image's captions for i2t
    yv, iv = y[has_img], idx[has_img]
    pos = t * (x[iv] * yv).sum(-1)  # (n_cols,)
    t2i_pos = pos.sum() / n_cols
    i2t_pos = (pos / n_pos[iv]).sum() / n_rows
    return lse - 0.5 * (t2i_pos + i2t_pos)
