"""Contrastive losses for alignment heads: SigLIP's sigmoid loss (as SAIL uses it) and CLIP's InfoNCE.

Both losses own their learnable temperature (and the sigmoid loss its bias), so pass ``loss.parameters()``
to the optimiser together with the heads' parameters. Both L2-normalise their inputs, so heads return
un-normalised embeddings. Both compute logits and sums in float32 with autocast disabled, whatever the
input dtype (bf16 autocast friendly); gradients come back in the inputs' dtype.

Multi-positive batches (several captions per image): ``txt`` holds B' >= B captions and
``txt_image_index[j]`` names the image row of caption j (``-1``: a caption with no image in the batch, a
negative for every image). Default when ``txt_image_index`` is None: B' must be a multiple of B and the
captions come in blocks, ``txt = cat([captions_1, captions_2, ...])``, i.e. ``txt_image_index[j] = j % B``.

Examples:
    >>> import torch
    >>> loss_fn = build_loss("sigmoid", norm="pairs", chunk=1024)
    >>> img, txt = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
    >>> loss = loss_fn(img, txt)
    >>> loss.backward()
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairscout.errors import LossError

__all__ = [
    "LossError",
    "SigmoidLoss",
    "InfoNCELoss",
    "build_loss",
    "chunked_sigmoid_negatives",
    "default_txt_image_index",
    "LOSSES",
]

Norm = Literal["batch", "pairs"]
NORMS = ("batch", "pairs")


def default_txt_image_index(n_img: int, n_txt: int, device: torch.device | str | None = None) -> Tensor:
    """Caption -> image row for blocked captions: ``j % n_img``; n_txt must be a multiple of n_img.

    Raises:
        ValueError: n_txt is not a positive multiple of n_img (pass ``txt_image_index`` explicitly).
    """
    if n_img <= 0 or n_txt <= 0 or n_txt % n_img:
        raise ValueError(
            f"{n_txt} captions for {n_img} images: without txt_image_index the captions must be "
            f"k blocks of {n_img} (k >= 1); pass txt_image_index (B',) naming each caption's image row"
        )
    return torch.arange(n_txt, device=device) % n_img


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (tests, gradcheck); everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pair(img: Tensor, txt: Tensor, txt_image_index: Tensor | None) -> Tensor:
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"need img (B, d) and txt (B', d) with the same d; got {tuple(img.shape)}, {tuple(txt.shape)}"
        )
    if txt_image_index is None:
        return default_txt_image_index(img.shape[0], txt.shape[0], img.device)
    idx = txt_image_index.to(device=img.device, dtype=torch.long)
    if idx.shape != (txt.shape[0],):
        raise ValueError(f"txt_image_index must have shape ({txt.shape[0]},), got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= img.shape[0]):
        raise ValueError(f"txt_image_index values must lie in [-1, {img.shape[0] - 1}]")
    return idx


# ----------------------------------------------------------------------------------------------------------
# Chunked sigmoid loss: the all-negatives part sum_ij softplus(z_ij) over column chunks.
#
# -log sigmoid(s z) = softplus(-s z), so with every pair taken as a negative (s = -1) the loss is
# sum_ij softplus(z_ij), and each positive (i, j) corrects it by softplus(-z) - softplus(z) = -z_ij. The
# correction needs only the B' positive logits (O(B' d), left to autograd), so the B x B' part needs no
# label matrix and its gradient is simply dN/dz_ij = sigmoid(z_ij); with the correction,
# dL/dz = sigmoid(z) - [label > 0], as for the plain loss.
# ----------------------------------------------------------------------------------------------------------


def _negatives_pass(img: Tensor, txt: Tensor, t: Tensor, b: Tensor, chunk: int, value: bool, grads: bool):
    """One pass over column chunks: ``N = sum softplus(z)`` (if value) and ``dN/d(img, txt, t, b)`` (if grads).

    Returns ``(N or None, [g_img, g_txt, g_t, g_b] or None)``, in img's dtype. Peak extra memory: two
    (B, chunk) blocks plus, with grads, one (B, d) and one (B', d) accumulator. Per block:
    ``z = img @ (t txt_c).T + b``; ``dN/dz = sigmoid(z)``; ``dN/dt = sum sigmoid(z) (z - b) / t``.
    """
    total = img.new_zeros((), dtype=torch.float64) if value else None
    if grads:
        g_img = torch.zeros_like(img)
        g_txt = torch.empty_like(txt)
        g_dot = img.new_zeros((), dtype=torch.float64)  # sum sigmoid(z) * z
        g_b = img.new_zeros((), dtype=torch.float64)  # sum sigmoid(z)
    for j0 in range(0, txt.shape[0], chunk):
        txt_c = txt[j0 : j0 + chunk]
        z = torch.addmm(b, img, (t * txt_c).T)  # logits block (B, c), bias fused into the GEMM
        if value:
            total += F.softplus(z).sum()  # tree sum per block in img's dtype, float64 across blocks
        if grads:
            sig = torch.sigmoid(z)  # dN/dz
            g_dot += torch.dot(sig.view(-1), z.view(-1))
            del z
            g_b += sig.sum()
            g_img.addmm_(sig, txt_c)
            torch.mm(sig.T, img, out=g_txt[j0 : j0 + chunk])
            del sig
        else:
            del z
    if not grads:
        return total.to(img.dtype), None
    g_b = g_b.to(img.dtype)
    g_t = (g_dot.to(img.dtype) - b * g_b) / t
    return (None if total is None else total.to(img.dtype)), [g_img.mul_(t), g_txt.mul_(t), g_t, g_b]


class _ChunkedSigmoidNegatives(torch.autograd.Function):
    """N(img, txt, t, b) = sum_ij softplus(t * img_i . txt_j + b), computed over column chunks of the logits.

    ``recompute=True``: backward recomputes every chunk's logits and saves only (img, txt, t, b), i.e.
    4 matmuls of B x B' x d per step. ``recompute=False``: forward also computes the gradients (the loss is a
    scalar, so dN/dinputs is known up to the incoming scalar gradient) and keeps them for backward: 3 matmuls
    per step, like the plain loss, at the cost of holding (B + B') x d gradients between forward and backward
    (backward may then run once only). Memory is O(B * chunk + (B + B') * d) either way, never O(B * B').
    """

    @staticmethod
    def forward(ctx, img, txt, t, b, chunk: int, recompute: bool, want_grads: bool):  # noqa: D102
        ctx.chunk, ctx.recompute = chunk, recompute
        if recompute or not want_grads:
            ctx.save_for_backward(img, txt, t, b)
            ctx.grads = None
            return _negatives_pass(img, txt, t, b, chunk, value=True, grads=False)[0]
        total, ctx.grads = _negatives_pass(img, txt, t, b, chunk, value=True, grads=True)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.recompute:
            img, txt, t, b = ctx.saved_tensors
            with torch.no_grad():
                _, grads = _negatives_pass(img, txt, t, b, ctx.chunk, value=False, grads=True)
        else:
            grads, ctx.grads = ctx.grads, None  # scaled in place and handed over: frees them with the graph
            if grads is None:
                raise RuntimeError(
                    "chunked sigmoid loss (recompute=False): backward ran twice or its forward ran without "
                    "gradients; use recompute=True for retain_graph / double backward"
                )
        return (*(g.mul_(grad_out) for g in grads), None, None, None)


def chunked_sigmoid_negatives(
    img: Tensor, txt: Tensor, t: Tensor, b: Tensor, chunk: int, *, recompute: bool = True
) -> Tensor:
    """``sum_ij softplus(t * img_i . txt_j + b)`` without materialising the B x B' logits (differentiable).

    Args:
        img: (B, d) float32 (or float64), already normalised if the caller wants cosines.
        txt: (B', d), same dtype as img.
        t, b: 0-d tensors (scale, bias), same dtype.
        chunk: columns (captions) per block; memory is O(B * chunk).
        recompute: recompute logits in backward (least memory) or keep gradients from forward (fewer matmuls).
    """
    if chunk < 1:
        raise LossError(f"chunk={chunk} must be a positive number of columns", fix="use e.g. chunk=1024")
    want = torch.is_grad_enabled() and any(x.requires_grad for x in (img, txt, t, b))
    return _ChunkedSigmoidNegatives.apply(img, txt, t, b, int(chunk), bool(recompute), want)


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learnable scale and bias (SAIL's alignment loss).

    ``z_ij = t * x_i . y_j + b`` for L2-normalised x (images), y (captions); label +1 where caption j belongs
    to image i, -1 elsewhere; ``L = -sum_ij log sigmoid(label_ij * z_ij) / norm`` where
    ``norm="batch"`` divides by B (number of images; SigLIP, open_clip) and ``norm="pairs"`` divides by
    B * B' (the number of logits; SAIL's 1/|B|^2 when B' = B).

    Args:
        init_scale: initial t; stored as ``logit_scale = log t`` (SigLIP: 10, SAIL: 20).
        init_bias: initial b (``logit_bias``), -10 as in SigLIP / SAIL.
        norm: "batch" or "pairs", as above.
        chunk: None computes the full B x B' logits (plain, reference); an int streams over blocks of that
            many captions with a custom autograd function, memory O(B * chunk + (B + B') * d) (e.g. 512-1024 at
            B = 32k: one (B, chunk) float32 block is 64-128 MB, and two are live at a time).
        recompute: chunked path only; True recomputes the logits in backward (least memory), False keeps the
            (B + B') x d gradients from the forward pass (one matmul fewer per step).
        learnable: False freezes scale and bias (buffers instead of parameters).

    Shapes: ``forward(img (B, d), txt (B', d), txt_image_index (B',) long | None) -> scalar``.
    """

    def __init__(
        self,
        init_scale: float = 20.0,
        init_bias: float = -10.0,
        norm: Norm = "batch",
        chunk: int | None = None,
        recompute: bool = True,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise LossError(f"sigmoid loss norm={norm!r} is unknown", fix=f"use one of {', '.join(NORMS)}")
        if chunk is not None and int(chunk) < 1:
            raise LossError(f"sigmoid loss chunk={chunk} must be a positive int or None", fix="use e.g. 1024")
        if init_scale <= 0:
            raise LossError(f"sigmoid loss init_scale={init_scale} must be > 0", fix="use e.g. 20")
        self.norm: Norm = norm
        self.chunk = None if chunk is None else int(chunk)
        self.recompute = bool(recompute)
        scale = torch.tensor(math.log(init_scale), dtype=torch.float32)
        bias = torch.tensor(float(init_bias), dtype=torch.float32)
        if learnable:
            self.logit_scale = nn.Parameter(scale)
            self.logit_bias = nn.Parameter(bias)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", bias)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, chunk={self.chunk}, recompute={self.recompute}"

    # open_clip-style pieces: logits, ground truth, loss. The plain path is the reference.
    def get_logits(self, img: Tensor, txt: Tensor) -> Tensor:
        """(B, B') logits ``t * img @ txt.T + b`` of already-normalised inputs, in their dtype."""
        return self.logit_scale.to(img.dtype).exp() * img @ txt.T + self.logit_bias.to(img.dtype)

    @staticmethod
    def get_ground_truth(txt_image_index: Tensor, n_img: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, B') labels: +1 where caption j belongs to image i, -1 elsewhere."""
        rows = torch.arange(n_img, device=txt_image_index.device)
        return torch.where(rows[:, None] == txt_image_index[None, :], 1.0, -1.0).to(dtype)

    def _normaliser(self, n_img: int, n_txt: int) -> float:
        return float(n_img) if self.norm == "batch" else float(n_img) * float(n_txt)

    def forward(self, img: Tensor, txt: Tensor, txt_image_index: Tensor | None = None, pos_mask: Tensor | None = None) -> Tensor:
        """Loss (0-d float32) of image embeddings (B, d) against caption embeddings (B', d); not normalised.

        ``pos_mask`` (B, B') bool, optional: every True entry is a positive (e.g. identical captions of other
        images, or same-class captions), overriding ``txt_image_index``; it should include each caption's own image.
        """
        idx = _check_pair(img, txt, txt_image_index)
        if pos_mask is not None and pos_mask.shape != (img.shape[0], txt.shape[0]):
            raise ValueError(f"pos_mask must be ({img.shape[0]}, {txt.shape[0]}), got {tuple(pos_mask.shape)}")
        with torch.autocast(device_type=img.device.type, enabled=False):
            dt = _compute_dtype(img)
            x = F.normalize(img.to(dt), dim=-1)
            y = F.normalize(txt.to(dt), dim=-1)
            norm = self._normaliser(x.shape[0], y.shape[0])
            if self.chunk is None:
                logits = self.get_logits(x, y)
                if pos_mask is None:
                    labels = self.get_ground_truth(idx, x.shape[0], logits.dtype)
                else:
                    labels = pos_mask.to(logits.device, logits.dtype) * 2 - 1
                return -F.logsigmoid(labels * logits).sum() / norm
            t = self.logit_scale.to(dt).exp()
            b = self.logit_bias.to(dt)
            negatives = chunked_sigmoid_negatives(x, y, t, b, self.chunk, recompute=self.recompute)
            if pos_mask is None:
                has_img = idx >= 0
                pos_cos = (x[idx[has_img]] * y[has_img]).sum(-1)
            else:
                pi, pj = pos_mask.to(x.device).nonzero(as_tuple=True)
                pos_cos = (x[pi] * y[pj]).sum(-1)
            positives = t * pos_cos.sum() + b * pos_cos.shape[0]  # sum of positive logits
            return (negatives - positives) / norm


class InfoNCELoss(nn.Module):
    """CLIP's symmetric cross-entropy with a learnable temperature (freeze-align's loss).

    ``z = t * x @ y.T`` for L2-normalised x (B images), y (B' captions), ``t = exp(logit_scale)`` (init
    1 / 0.07, clamped to ``max_scale`` as in CLIP). ``L = (L_img->txt + L_txt->img) / 2``:

    - text -> image: each caption's row of ``z.T`` is a softmax over the B images, target its own image
      (captions with index -1 are left out of this term).
    - image -> text: each image's row of ``z`` is a softmax over the B' captions; with several captions
      per image the target is uniform over its captions, i.e. the row's loss is the MEAN over its
      positives of ``-log softmax(z_i)_j`` (standard CLIP when each image has one caption). Images with no
      caption in the batch are left out of this term.

    ``chunk``: None computes the full (B, B') logits (the reference); an int streams over blocks of that many
    captions (:func:`~pairscout.align.tiled_infonce.tiled_infonce`: log-sum-exp tiles recomputed in backward,
    memory O(B * chunk)); same value and gradients.

    Shapes: ``forward(img (B, d), txt (B', d), txt_image_index (B',) long | None) -> scalar``.
    """

    def __init__(
        self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < init_temperature:
            raise LossError(f"infonce init_temperature={init_temperature} must be > 0", fix="use e.g. 0.07")
        if chunk is not None and (isinstance(chunk, bool) or int(chunk) != chunk or int(chunk) < 1):
            raise LossError(f"infonce chunk={chunk} must be a positive int or None", fix="use e.g. 1024")
        self.chunk = None if chunk is None else int(chunk)
        scale = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.max_scale = float(max_scale)

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}, chunk={self.chunk}"

    def forward(self, img: Tensor, txt: Tensor, txt_image_index: Tensor | None = None, pos_mask: Tensor | None = None) -> Tensor:
        """Loss (0-d float32) of image embeddings (B, d) against caption embeddings (B', d); not normalised.

        ``pos_mask`` (B, B') bool, optional: several positives per caption too; each side's target is uniform
        over its positives.
        """
        idx = _check_pair(img, txt, txt_image_index)
        with torch.autocast(device_type=img.device.type, enabled=False):
            dt = _compute_dtype(img)
            x = F.normalize(img.to(dt), dim=-1)
            y = F.normalize(txt.to(dt), dim=-1)
            t = self.logit_scale.to(dt).exp().clamp(max=self.max_scale)
            if self.chunk is not None:
                from pairscout.align.tiled_infonce import tiled_infonce

                return tiled_infonce(x, y, t, idx, self.chunk)
            logits = t * x @ y.T  # (B, B')
            if pos_mask is not None:
                pm = pos_mask.to(logits.device, dt)
                r, c = pm.sum(1) > 0, pm.sum(0) > 0
                li2t = F.cross_entropy(logits[r], pm[r] / pm[r].sum(1, keepdim=True))
                lt2i = F.cross_entropy(logits.T[c], pm.T[c] / pm.T[c].sum(1, keepdim=True))
                return (li2t + lt2i) / 2
            has_img = idx >= 0
            loss_t2i = F.cross_entropy(logits.T[has_img], idx[has_img])
            pos = (torch.arange(x.shape[0], device=x.device)[:, None] == idx[None, :]).to(dt)
            n_pos = pos.sum(1)
            rows = n_pos > 0
            target = pos[rows] / n_pos[rows, None]
            loss_i2t = F.cross_entropy(logits[rows], target)
            return (loss_i2t + loss_t2i) / 2


LOSSES: dict[str, type[nn.Module]] = {"sigmoid": SigmoidLoss, "infonce": InfoNCELoss}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``"sigmoid"`` (:class:`SigmoidLoss`) or ``"infonce"`` (:class:`InfoNCELoss`).

    Keyword arguments go to the class. Raises :class:`LossError` for an unknown name or argument.
    """
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"sigmoid": "sigmoid", "siglip": "sigmoid", "infonce": "infonce", "clip": "infonce"}
    if key not in aliases:
        raise LossError(f"loss {name!r} is unknown", fix=f"use one of {', '.join(LOSSES)}")
    cls = LOSSES[aliases[key]]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise LossError(f"loss {name!r} got a bad argument ({err})", fix=f"see help({cls.__name__})") from err
