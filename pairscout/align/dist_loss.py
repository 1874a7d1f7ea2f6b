"""Contrastive losses over torch.distributed ranks: each rank holds its slice of the global batch.

Sigmoid loss (SigLIP, Zhai et al. 2023, sec. 3.3 "efficient chunked implementation"; big_vision's
``chunked_sigmoid`` and open_clip's ``SigLipLoss`` with neighbour exchange are the models). With W ranks,
rank r holds images ``x_r`` (B_r = B / W rows) and captions ``y_r`` (B'_r rows). The global loss

    L = 1/N * sum_r sum_s sum_{i in r, j in s} -log sigmoid(l_ij * (t x_i . y_j + b))

(N = B for ``norm="batch"``, B * B' for ``"pairs"``; l_ij = +1 for positives, -1 otherwise) splits into
W x W blocks (r, s). Rank r computes its own block (r, r), then passes the caption features round the ring in
both directions at once (open_clip's ``bidir``; :class:`_ExchangeBoth`: ``isend`` to ranks r - 1 and r + 1,
``irecv`` from both, through ``torch.distributed``): after round k it holds the captions of ranks r - k and
r + k and adds those two blocks; with an even W the opposite rank's captions take one more one-way hop
(:class:`_Exchange`). That is ceil((W - 1) / 2) rounds instead of W - 1 hops. No rank ever holds more than a
(B_r, B'_s) logit block; with ``chunk`` set, only (B_r, chunk) at a time
(:func:`~pairscout.align.losses.chunked_sigmoid_negatives`, logits recomputed in backward). Each rank does keep
the caption blocks it received until backward (B' x d features in all, as open_clip's exchange does).

The exchange is differentiable: its backward sends the gradient of the received block back to the rank it
came from, so rank r ends with ``dL_all / d y_r``, the gradient of every rank's loss with respect to its own
captions. Each rank returns ``W * S_r / N`` (S_r: its blocks' sum); DistributedDataParallel averages the
gradients over ranks, ``1/W sum_r d(W S_r / N) = dL``, so a W-process step equals a one-process step on the
same global batch (``tests/test_ddp.py``).

Positives across ranks: every caption carries an id (its global image row, or its caption key when identical
captions are positives of each other) and every image its global row; ``positives(image_ids, caption_ids)``
(the trainer's) gives the (len(image_ids), len(caption_ids)) positive mask of any block. The ids are small
int vectors and travel by ``all_gather``; the features by the ring.

InfoNCE (CLIP) needs every row's softmax over the whole other side, so it is not blockwise-separable:
:func:`infonce_across_ranks` all-gathers both sides with gradient (``torch.distributed.nn.functional.
all_gather``, whose backward sums the gradients into the owner rank, open_clip's ``gather_with_grad`` +
``local_loss``) and each rank computes the terms of its own rows: (B_r, B') and (B'_r, B) logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pairscout.align.losses import InfoNCELoss, SigmoidLoss, _compute_dtype, chunked_sigmoid_negatives

Positives = Callable[[Tensor, Tensor], Tensor]
"""``positives(image_ids (n,), caption_ids (m,)) -> (n, m) bool``: which image-caption pairs are positives."""


def _swap(x: Tensor, src: int, dst: int, shape: tuple[int, ...], group) -> Tensor:
    """Send ``x`` to rank ``dst`` and receive a tensor of ``shape`` from rank ``src`` (point to point)."""
    out = x.new_empty(shape)
    ops = [dist.P2POp(dist.isend, x.contiguous(), dst, group), dist.P2POp(dist.irecv, out, src, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _Exchange(torch.autograd.Function):
    """One hop of the ring: send ``x`` to ``dst``, receive ``rows`` rows from ``src``. Backward is the reverse
    hop: the gradient of the received block goes back to ``src``, the gradient of ``x`` comes from ``dst``."""

    @staticmethod
    def forward(ctx, x: Tensor, src: int, dst: int, rows: int, group) -> Tensor:  # noqa: D102
        ctx.src, ctx.dst, ctx.group, ctx.shape = src, dst, group, tuple(x.shape)
        return _swap(x, src, dst, (rows, *x.shape[1:]), group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return _swap(grad, ctx.dst, ctx.src, ctx.shape, ctx.group), None, None, None, None


class _ExchangeBoth(torch.autograd.Function):
    """One bidirectional round (open_clip's ``bidir`` neighbour exchange): send ``to_left`` to the left neighbour
    and ``to_right`` to the right one, receive a block from each. Backward is the same round with the gradients:
    each received block's gradient goes back to the neighbour it came from, and the gradients of the two sent
    tensors arrive from the neighbours they went to (autograd hands zeros for an unused output)."""

    @staticmethod
    def forward(ctx, to_left: Tensor, to_right: Tensor, left: int, right: int, rows_left: int, rows_right: int, group):  # noqa: D102
        ctx.left, ctx.right, ctx.group = left, right, group
        ctx.sent = (tuple(to_left.shape), tuple(to_right.shape))
        return _swap_both(to_left, to_right, left, right, (rows_left, *to_left.shape[1:]), (rows_right, *to_right.shape[1:]), group)

    @staticmethod
    def backward(ctx, g_from_left: Tensor, g_from_right: Tensor):  # noqa: D102
        g_to_left, g_to_right = _swap_both(g_from_left, g_from_right, ctx.left, ctx.right, *ctx.sent, ctx.group)
        return g_to_left, g_to_right, None, None, None, None, None


def _swap_both(to_left: Tensor, to_right: Tensor, left: int, right: int, shape_left: tuple[int, ...],
               shape_right: tuple[int, ...], group) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Send to both neighbours and receive from both (``left != right``, i.e. at least 3 ranks)."""
    from_left, from_right = to_left.new_empty(shape_left), to_right.new_empty(shape_right)
    ops = [dist.P2POp(dist.isend, to_left.contiguous(), left, group), dist.P2POp(dist.isend, to_right.contiguous(), right, group),
           dist.P2POp(dist.irecv, from_left, left, group), dist.P2POp(dist.irecv, from_right, right, group)]  # fmt: skip
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return from_left, from_right


def exchange(x: Tensor, src: int, dst: int, rows: int, group=None) -> Tensor:
    """Differentiable ring hop (see :class:`_Exchange`); ``rows``: how many rows ``src`` sends."""
    return _Exchange.apply(x, src, dst, int(rows), group)


def gather_ids(ids: Tensor, group=None) -> list[Tensor]:
    """Every rank's ``ids`` (1-d, any length per rank), in rank order: one all_gather of the lengths, one of
    the ids padded to the longest."""
    world = dist.get_world_size(group)
    n = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c) for c in counts]
    pad = torch.full((max(sizes),), -1, dtype=torch.long, device=ids.device)
    pad[: ids.numel()] = ids
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad, group=group)
    return [o[:s] for o, s in zip(out, sizes, strict=True)]


def _sigmoid_block(loss_fn: SigmoidLoss, x: Tensor, y: Tensor, pos: Tensor, t: Tensor, b: Tensor) -> Tensor:
    """``sum_ij -log sigmoid(l_ij z_ij)`` of one (rows of x, rows of y) block, as SigmoidLoss computes it."""
    if loss_fn.chunk is None:
        logits = loss_fn.get_logits(x, y)
        labels = pos.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum()
    negatives = chunked_sigmoid_negatives(x, y, t, b, loss_fn.chunk, recompute=loss_fn.recompute)
    pi, pj = pos.nonzero(as_tuple=True)
    pos_cos = (x[pi] * y[pj]).sum(-1)
    return negatives - (t * pos_cos.sum() + b * pos_cos.shape[0])


def sigmoid_across_ranks(loss_fn: SigmoidLoss, img: Tensor, txt: Tensor, img_ids: Tensor, txt_ids: Tensor,
                         positives: Positives, group=None) -> Tensor:  # fmt: skip
    """This rank's share ``W * S_r / N`` of the global sigmoid loss (module docstring); differentiable.

    Args:
        loss_fn: the :class:`SigmoidLoss` (its scale, bias, ``norm``, ``chunk``, ``recompute``).
        img: (B_r, d) this rank's image embeddings (not normalised); B_r must be the same on every rank.
        txt: (B'_r, d) this rank's caption embeddings (B'_r may differ between ranks).
        img_ids, txt_ids: (B_r,), (B'_r,) long ids that ``positives`` understands.
        positives: the positive mask of an (image ids, caption ids) block.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    all_txt_ids = gather_ids(txt_ids, group)
    rows = [len(i) for i in all_txt_ids]
    with torch.autocast(device_type=img.device.type, enabled=False):
        dt = _compute_dtype(img)
        x = F.normalize(img.to(dt), dim=-1)
        y = F.normalize(txt.to(dt), dim=-1)
        t, b = loss_fn.logit_scale.to(dt).exp(), loss_fn.logit_bias.to(dt)
        total = _sigmoid_block(loss_fn, x, y, positives(img_ids, txt_ids), t, b)
        left, right = (rank - 1) % world, (rank + 1) % world
        to_left = to_right = y
        rounds, odd = divmod(world - 1, 2)
        for k in range(1, rounds + 1):  # round k: the captions of ranks r - k and r + k arrive together
            src_l, src_r = (rank - k) % world, (rank + k) % world
            to_right, to_left = _ExchangeBoth.apply(to_left, to_right, left, right, rows[src_l], rows[src_r], group)
            for block, src in ((to_right, src_l), (to_left, src_r)):
                total = total + _sigmoid_block(loss_fn, x, block, positives(img_ids, all_txt_ids[src].to(img_ids.device)), t, b)
        if odd:  # an even world: the opposite rank's captions come one more hop from the left
            src = (rank - rounds - 1) % world
            block = exchange(to_right, left, right, rows[src], group)
            total = total + _sigmoid_block(loss_fn, x, block, positives(img_ids, all_txt_ids[src].to(img_ids.device)), t, b)
        norm = loss_fn._normaliser(x.shape[0] * world, sum(rows))
        return total * (world / norm)


def infonce_across_ranks(loss_fn: InfoNCELoss, img: Tensor, txt: Tensor, img_ids: Tensor, txt_ids: Tensor,
                         positives: Positives, group=None) -> Tensor:  # fmt: skip
    """This rank's share of the global multi-positive InfoNCE (CLIP; uniform target over each row's positives):

        L = 1/2 [ 1/N_i sum_i (lse_j z_ij - mean_{j in P(i)} z_ij) + 1/N_t sum_j (lse_i z_ij - mean_{i in P(j)} z_ij) ]

    over the global batch (N_i, N_t: images / captions with a positive), ``z = t x y^T``; rank r sums the
    terms of its own images and captions against the all-gathered other side, times W (DDP averages).
    Equals :class:`InfoNCELoss`'s plain path on the concatenated batch; ``chunk`` is not applied here.
    """
    import warnings

    from torch.distributed.nn.functional import all_gather as _all_gather

    def all_gather(t: Tensor, group) -> tuple[Tensor, ...]:
        with warnings.catch_warnings():  # deprecated for a private API in torch 2.x; it is the public autograd all-gather
            warnings.simplefilter("ignore", FutureWarning)
            return _all_gather(t, group=group)

    world = dist.get_world_size(group)
    all_txt_ids, all_img_ids = gather_ids(txt_ids, group), gather_ids(img_ids, group)
    rows = [len(i) for i in all_txt_ids]
    with torch.autocast(device_type=img.device.type, enabled=False):
        dt = _compute_dtype(img)
        x = F.normalize(img.to(dt), dim=-1)
        y = F.normalize(txt.to(dt), dim=-1)
        t = loss_fn.logit_scale.to(dt).exp().clamp(max=loss_fn.max_scale)
        pad = y.new_zeros((max(rows), y.shape[1]))
        pad = torch.cat([y, pad[: max(rows) - y.shape[0]]])
        ys = torch.cat([g[:n] for g, n in zip(all_gather(pad, group=group), rows, strict=True)])
        xs = torch.cat(all_gather(x, group=group))
        cap_ids, im_ids = torch.cat(all_txt_ids).to(img_ids.device), torch.cat(all_img_ids).to(img_ids.device)
        p_i = positives(img_ids, cap_ids).to(dt)  # (B_r, B')
        p_t = positives(im_ids, txt_ids).to(dt).T  # (B'_r, B)
        terms = []
        for z, p in ((t * x @ ys.T, p_i), (t * y @ xs.T, p_t)):
            n = p.sum(1)
            keep = n > 0
            terms.append((torch.logsumexp(z[keep], dim=1) - (p[keep] * z[keep]).sum(1) / n[keep]).sum())
        counts = torch.tensor([float((p_i.sum(1) > 0).sum()), float((p_t.sum(1) > 0).sum())], dtype=torch.float64, device=x.device)
        dist.all_reduce(counts, group=group)
        return (terms[0] / counts[0].to(dt) + terms[1] / counts[1].to(dt)) * (world / 2)
