"""The fused multi-pair probe trainer: the linear heads of many pairs trained in one pass.

Every pair keeps what :func:`pairscout.align.train.train` gives it one by one: its own two linear heads (initialised
exactly as ``train`` initialises them from the pair's seed), its own sigmoid loss with its own learnable scale and
bias, its own batches (a :class:`~pairscout.align.batches.Batches` per pair, from its seed), its own gradient clipping
and its own optimiser state. What is shared is the work: each side's weights are stacked per input width,
``W[g]: (P_g, d_in, d_out)``, so a step is one batched product per distinct width (``torch.baddbmm``), and the loss of
all P pairs is one batched product ``(P, B, D) x (P, D, B')`` (``torch.bmm``). Pairs are grouped by their exact input
width (no padding), so nothing is computed for a pair that it would not compute alone. AdamW (and Lion) act element by
element, so the stacked optimiser steps each pair exactly as its own optimiser would; the result equals training the
pairs one by one up to float rounding (``tests/test_fused_probe.py``).

Along the way the held-out sigmoid loss of every pair is read at a few fixed steps (``curve_steps``) as per-image
contributions (:func:`pairscout.evaluation.readouts.heldout_loss_items`): the learning curve and its area.

Example:
    >>> import torch
    >>> x = torch.randn(64, 8)
    >>> pairs = [FusedPair(x, x @ torch.randn(8, 6), torch.arange(64)), FusedPair(x, torch.randn(64, 5), torch.arange(64))]
    >>> res = fused_train(pairs, TrainConfig(head="linear", out_dim=4, steps=20, batch_size=16))
    >>> res[0].final_loss < res[1].final_loss
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairscout.align.batches import Batches
from pairscout.align.heads import LinearHead
from pairscout.align.losses import SigmoidLoss
from pairscout.align.train_config import TrainConfig, lr_factor
from pairscout.errors import DivergenceError, TrainError

__all__ = ["FusedPair", "FusedResult", "HeldOut", "fused_train"]

ProgressFn = Callable[[int, int], None]
"""``progress(step, total_steps)`` after every fused step."""


@dataclass
class HeldOut:
    """A pair's held-out features and which (image, caption) pairs are positives, for the held-out loss curve."""

    vision: Tensor
    """(n, d_v) held-out image features."""
    text: Tensor
    """(m, d_t) held-out caption features."""
    positives: Tensor
    """(n, m) bool: caption j is a positive of image i (its own caption, or one with the same key)."""


@dataclass
class FusedPair:
    """One pair's training inputs (what :func:`~pairscout.align.train.train` takes for it)."""

    vision: Tensor
    """(N, d_v) training image features."""
    text: Tensor
    """(M, d_t) training caption features."""
    text_image_index: Tensor
    """(M,) the image row of each caption."""
    caption_keys: Tensor | None = None
    """(M,) key per caption: captions with one key are positives of each other's images (``train``'s ``caption_keys``)."""
    seed: int | None = None
    """The pair's own seed (heads' initialisation and batches); None: ``config.seed``."""
    heldout: HeldOut | None = None
    label: str = ""


@dataclass
class FusedResult:
    """One pair's trained heads, loss parameters and record."""

    vision_head: LinearHead
    text_head: LinearHead
    loss_fn: SigmoidLoss
    history: list[dict[str, Any]]
    final_loss: float
    curve: dict[int, Tensor] = field(default_factory=dict)
    """step -> (n,) per-image contributions to the held-out sigmoid loss at that step (their sum is the loss)."""
    samples_per_s: float = 0.0


class _Side:
    """One side (vision or text) of every pair: weights stacked per distinct input width, ``W[g]: (P_g, d_g, D)``.

    Each group also holds its pairs' distinct feature tables once, ``X[g]: (U_g, N, d_g)`` (pairs sharing an encoder share
    a table), so a step gathers a group's batch rows with one indexing op, ``X[g][u, rows]``.
    """

    def __init__(self, heads: list[LinearHead], feats: Sequence[Tensor], device: torch.device) -> None:
        widths: dict[int, list[int]] = {}
        for p, h in enumerate(heads):
            widths.setdefault(h.config.in_dim, []).append(p)
        self.groups = list(widths.values())
        self.W = [nn.Parameter(torch.stack([heads[p].proj.weight.detach().T for p in g]).contiguous().to(device)) for g in self.groups]
        self.b = [nn.Parameter(torch.stack([heads[p].proj.bias.detach() for p in g]).contiguous().to(device)) for g in self.groups]
        self.X, self.u = [], []
        for g in self.groups:
            tables: list[Tensor] = []
            which = []
            for p in g:
                f = feats[p]
                k = next((i for i, t in enumerate(tables) if t is f or (t.shape == f.shape and torch.equal(t, f))), None)
                if k is None:
                    tables.append(f)
                    k = len(tables) - 1
                which.append(k)
            self.X.append(torch.stack([t.float() for t in tables]).to(device))
            self.u.append(torch.tensor(which, device=device))
        order = [p for g in self.groups for p in g]
        self.in_order = order == list(range(len(heads)))
        self.inverse = torch.argsort(torch.tensor(order)).to(device)  # group order -> pair order
        self.index = [torch.tensor(g, device=device) for g in self.groups]

    def __call__(self, rows: Tensor) -> Tensor:
        """(P, B, D) outputs of every pair for its batch ``rows[p]`` (``rows``: (P, B) on the device): one gather and
        one batched product per width."""
        outs = []
        for g, X, u, W, b in zip(self.index, self.X, self.u, self.W, self.b, strict=True):
            r = rows.index_select(0, g)
            x = X[0].index_select(0, r[0])[None].expand(len(g), -1, -1) if len(u) == 1 and bool((r == r[0]).all()) else X[u[:, None], r]
            outs.append(torch.baddbmm(b[:, None, :], x, W))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if self.in_order else out.index_select(0, self.inverse)

    def sq_norms(self, n: int) -> Tensor:
        """(P,) squared gradient norm of each pair's weight and bias."""
        out = torch.zeros(n, device=self.W[0].device)
        for idx, W, b in zip(self.index, self.W, self.b, strict=True):
            out.index_add_(0, idx, W.grad.pow(2).sum((1, 2)) + b.grad.pow(2).sum(1))
        return out

    def scale_grads(self, coef: Tensor) -> None:
        for idx, W, b in zip(self.index, self.W, self.b, strict=True):
            c = coef[idx]
            W.grad.mul_(c[:, None, None])
            b.grad.mul_(c[:, None])

    def project(self, p: int, x: Tensor) -> Tensor:
        """Pair p's head applied to ``x`` (rows, d_p)."""
        gi = next(i for i, g in enumerate(self.groups) if p in g)
        k = self.groups[gi].index(p)
        return torch.addmm(self.b[gi][k], x, self.W[gi][k])

    def head(self, p: int, in_dim: int, out_dim: int) -> LinearHead:
        from pairscout.align.heads import HeadConfig

        gi = next(i for i, g in enumerate(self.groups) if p in g)
        k = self.groups[gi].index(p)
        h = LinearHead(HeadConfig(kind="linear", in_dim=in_dim, out_dim=out_dim))
        with torch.no_grad():
            h.proj.weight.copy_(self.W[gi][k].detach().T.cpu())
            h.proj.bias.copy_(self.b[gi][k].detach().cpu())
        return h.eval()


def _check(pairs: Sequence[FusedPair], config: TrainConfig) -> None:
    if not pairs:
        raise TrainError("the fused trainer got no pairs.", fix="pass one pair or more.")
    if config.head != "linear" or config.loss.lower() != "sigmoid" or config.captions != "sample":
        raise TrainError(f"the fused trainer trains linear heads with the sigmoid loss on one sampled caption per image; got head={config.head}, "
                         f"loss={config.loss}, captions={config.captions}.", fix="train other heads one pair at a time (pairscout align).")
    if config.head_options.get("dropout"):
        raise TrainError("the fused trainer has no dropout.", fix="drop head_options['dropout'].")


def fused_train(pairs: Sequence[FusedPair], config: TrainConfig, *, curve_steps: Sequence[int] = (),
                progress: ProgressFn | None = None) -> list[FusedResult]:
    """Train every pair's two linear heads and sigmoid loss in one pass; one :class:`FusedResult` per pair, in order.

    Args:
        pairs: the pairs' inputs. Every pair must give the same batch size (``min(batch_size, images with captions)``).
        config: the shared settings (``head="linear"``, ``loss="sigmoid"``, ``captions="sample"``); ``config.seed`` is
            the seed of pairs that name none.
        curve_steps: steps (1..total) after which the held-out loss of pairs with :attr:`FusedPair.heldout` is read.
        progress: ``progress(step, total)`` after every step.

    Raises:
        TrainError: settings the fused trainer does not cover, or pairs of different batch sizes.
        DivergenceError: a pair's loss or gradient became NaN/inf (named; one-by-one training would stop too).
    """
    from pairscout.runtime import pick_device

    _check(pairs, config)
    device = pick_device(config.device)
    n = len(pairs)
    seeds = [config.seed if p.seed is None else int(p.seed) for p in pairs]
    batches = []
    for p, s in zip(pairs, seeds, strict=True):
        tii = torch.as_tensor(p.text_image_index).long().cpu()
        b = Batches(tii, int(p.vision.shape[0]), config.batch_size, s, config.captions)
        if len(b.pool) < 2:
            raise TrainError(f"pair {p.label or '?'}: only {len(b.pool)} image(s) have captions; contrastive training needs >= 2.", fix="use more data.")
        batches.append(b)
    if len({b.bs for b in batches}) > 1:
        raise TrainError(f"the fused pairs have different batch sizes ({sorted({b.bs for b in batches})}).", fix="fuse pairs of one split only.")
    total = config.total_steps(len(batches[0].pool))
    keys = []
    for p in pairs:
        if p.caption_keys is None:
            keys.append(None)
            continue
        tii = torch.as_tensor(p.text_image_index).long().cpu()
        key_of = torch.unique(torch.as_tensor(p.caption_keys).long().cpu(), return_inverse=True)[1]
        inc = torch.zeros(int(p.vision.shape[0]), int(key_of.max()) + 1, dtype=torch.bool)
        inc[tii, key_of] = True
        keys.append((key_of, inc))

    # every pair's heads and loss initialised exactly as train() initialises them (same seed, same order)
    v_heads, t_heads, losses = [], [], []
    from pairscout.align.heads import build_head

    with torch.random.fork_rng(devices=[]):
        for p, s in zip(pairs, seeds, strict=True):
            torch.manual_seed(s)
            v_heads.append(build_head(config.head_config(int(p.vision.shape[1]))))
            t_heads.append(build_head(config.head_config(int(p.text.shape[1]))))
            losses.append(config.build_loss())
    vision = _Side(v_heads, [p.vision for p in pairs], device)
    text = _Side(t_heads, [p.text for p in pairs], device)
    logit_scale = nn.Parameter(torch.stack([lf.logit_scale.detach() for lf in losses]).to(device))
    logit_bias = nn.Parameter(torch.stack([lf.logit_bias.detach() for lf in losses]).to(device))
    decay = [*vision.W, *text.W]
    no_decay = [*vision.b, *text.b, logit_scale, logit_bias]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "lion":
        from lion_pytorch import Lion

        opt = Lion(groups, lr=config.peak_lr, betas=(0.9, 0.99))
    else:  # the fused kernel (one pass per tensor) where this torch has it for the device; the same update element by element
        try:
            opt = torch.optim.AdamW(groups, lr=config.peak_lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (RuntimeError, TypeError, ValueError):
            opt = torch.optim.AdamW(groups, lr=config.peak_lr, betas=(0.9, 0.999), eps=1e-8)
    norm = float(batches[0].bs) if config.loss_norm == "batch" else float(batches[0].bs) ** 2
    eye = torch.eye(batches[0].bs, dtype=torch.bool, device=device)
    amp = device.type == "cuda" and config.amp
    histories: list[list[dict[str, Any]]] = [[] for _ in pairs]
    curves: list[dict[int, Tensor]] = [{} for _ in pairs]
    want = {int(s) for s in curve_steps if 1 <= int(s) <= total}
    loss_vals = torch.full((n,), float("nan"))
    t_train = 0.0
    for step in range(total):
        t0 = time.perf_counter()
        f = lr_factor(step, total, config)
        for g in opt.param_groups:
            g["lr"] = config.peak_lr * f
        drawn = [b(step) for b in batches]
        img_rows = torch.stack([d[0] for d in drawn]).to(device)
        cap_rows = torch.stack([d[1] for d in drawn]).to(device)
        pos = torch.stack([eye if keys[p] is None else keys[p][1][drawn[p][0]][:, keys[p][0][drawn[p][1]]].to(device) for p in range(n)])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            zi, zt = vision(img_rows), text(cap_rows)
        per_pair = _sigmoid_losses(zi, zt, logit_scale, logit_bias, pos) / norm
        opt.zero_grad(set_to_none=True)
        per_pair.sum().backward()
        sq = vision.sq_norms(n) + text.sq_norms(n) + logit_scale.grad.pow(2) + logit_bias.grad.pow(2)
        gnorm = sq.sqrt()
        lv = per_pair.detach()
        bad = ~(torch.isfinite(lv) & torch.isfinite(gnorm))
        if bool(bad.any()):
            names = [pairs[i].label or str(i) for i in torch.nonzero(bad).flatten().tolist()]
            raise DivergenceError(f"probe training diverged at step {step + 1} of {total} for {', '.join(names)}.",
                                  fix="lower --lr (e.g. by 3x).")
        if config.grad_clip:
            coef = (config.grad_clip / (gnorm + 1e-6)).clamp(max=1.0)
            vision.scale_grads(coef)
            text.scale_grads(coef)
            logit_scale.grad.mul_(coef)
            logit_bias.grad.mul_(coef)
        opt.step()
        t_train += time.perf_counter() - t0
        done = step + 1
        if done % max(1, config.log_every) == 0 or done == total:
            loss_vals = lv.float().cpu()
            sc, bi = logit_scale.detach().exp().cpu(), logit_bias.detach().cpu()
            for p in range(n):
                histories[p].append({"step": done, "loss": float(loss_vals[p]), "lr": config.peak_lr * f, "scale": float(sc[p]), "bias": float(bi[p])})
        if done in want:
            for p, c in _heldout_curve(pairs, vision, text, logit_scale, logit_bias, device).items():
                curves[p][done] = c
        if progress is not None:
            progress(done, total)
    rate = total * batches[0].bs * n / t_train if t_train > 0 else 0.0
    out = []
    for p, pr in enumerate(pairs):
        lf = config.build_loss()
        with torch.no_grad():
            lf.logit_scale.copy_(logit_scale.detach()[p].cpu())
            lf.logit_bias.copy_(logit_bias.detach()[p].cpu())
        out.append(FusedResult(vision_head=vision.head(p, int(pr.vision.shape[1]), config.out_dim),
                               text_head=text.head(p, int(pr.text.shape[1]), config.out_dim), loss_fn=lf.eval(),
                               history=histories[p], final_loss=float(loss_vals[p]), curve=curves[p], samples_per_s=rate))
    return out


def _sigmoid_losses(zi: Tensor, zt: Tensor, logit_scale: Tensor, logit_bias: Tensor, pos: Tensor) -> Tensor:
    """(P,) un-normalised sigmoid loss of each pair: ``-sum log sigmoid(label * (t x.y + b))`` (as :class:`SigmoidLoss`)."""
    with torch.autocast(device_type=zi.device.type, enabled=False):
        x = F.normalize(zi.float(), dim=-1)
        y = F.normalize(zt.float(), dim=-1)
        logits = torch.bmm(logit_scale.exp()[:, None, None] * x, y.transpose(1, 2)) + logit_bias[:, None, None]
        labels = pos.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum((1, 2))


@torch.no_grad()
def _heldout_curve(pairs: Sequence[FusedPair], vision: _Side, text: _Side, logit_scale: Tensor, logit_bias: Tensor,
                   device: torch.device) -> dict[int, Tensor]:
    """Per pair with held-out data: (n,) per-image contributions to its held-out sigmoid loss now."""
    from pairscout.evaluation.readouts import heldout_loss_items

    have = [p for p, pr in enumerate(pairs) if pr.heldout is not None]
    if not have:
        return {}
    out = {}
    for p in have:
        h = pairs[p].heldout
        img = vision.project(p, h.vision.float().to(device))
        txt = text.project(p, h.text.float().to(device))
        out[p] = heldout_loss_items(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), h.positives.to(device),
                                    float(logit_scale[p].exp()), float(logit_bias[p])).cpu()
    return out


def heldout_positives(text_image_index: Tensor, n_images: int, text_keys: Tensor | None = None) -> Tensor:
    """(n, m) bool positives of a held-out set: caption j is a positive of image i when it is i's own caption or shares
    a key with one of i's captions (identical captions are interchangeable, as in the read-outs)."""
    tii = torch.as_tensor(text_image_index).long()
    if text_keys is None:
        return torch.arange(n_images)[:, None] == tii[None, :]
    key_of = torch.unique(torch.as_tensor(text_keys).long(), return_inverse=True)[1]
    inc = torch.zeros(n_images, int(key_of.max()) + 1 if len(key_of) else 1, dtype=torch.bool)
    inc[tii, key_of] = True
    return inc[:, key_of]
