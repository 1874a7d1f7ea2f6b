"""Evaluation of aligned embeddings: retrieval Recall@K both ways and zero-shot classification.

Every function here is pure (tensors in, a dict of floats out) and device-agnostic; :func:`evaluate`
runs two heads over a held-out :class:`EvalSet` and returns both families in one flat dict whose
primary metric is ``mean_r1`` (the mean of image->text and text->image Recall@1).

Definitions (science.md section 5):

- image -> text: an image's rank is the number of captions of OTHER images scoring at least as high
  as its best-scoring own caption (several captions: a hit on any of them counts); R@K = share of
  images with rank < K.
- text -> image: a caption's rank is the number of other images scoring at least as high as its own
  image; R@K = share of captions with rank < K.
- Ties count against the query, so constant or collapsed embeddings score chance, never 1.0.
- zero-shot: each class name goes through prompt templates ("a photo of a {c}."), the prompts'
  embeddings are normalised and averaged per class (then normalised again); an image is assigned
  the classes with the highest cosine. ``zs_top1`` / ``zs_top5`` are accuracies averaged per class
  (balanced accuracy), ``zs_top1_micro`` the plain share of images.

Example:
    >>> import torch
    >>> sim = torch.eye(3)
    >>> retrieval_metrics(sim, torch.arange(3))["mean_r1"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a photo of the {c}.",
    "a drawing of a {c}.",
    "a {c}.",
)
"""Prompt templates for zero-shot classification (CLIP's first template, plus a few short variants)."""

KS: tuple[int, ...] = (1, 5, 10)


def retrieval_ranks(img: Tensor, txt: Tensor, txt_image_index: Tensor, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Ranks (0 = first) of the correct match, image->text per image and text->image per caption.

    Args:
        img: (N, d) image embeddings, normalised if cosines are meant.
        txt: (M, d) caption embeddings.
        txt_image_index: (M,) the image row of each caption (0 .. N-1).
        chunk: images per block (memory O(chunk * M)).

    Returns:
        ``(i2t, t2i)``: (N,) and (M,) int64 ranks; an image with no caption gets rank M (a miss).
    """
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"need img (N, d) and txt (M, d), got {tuple(img.shape)} and {tuple(txt.shape)}")
    idx = txt_image_index.to(img.device, torch.long)
    if idx.shape != (txt.shape[0],):
        raise ValueError(f"txt_image_index must be ({txt.shape[0]},), got {tuple(idx.shape)}")
    txt = txt.to(img.device, img.dtype)
    n, m = img.shape[0], txt.shape[0]
    own = (img[idx] * txt).sum(-1)  # (M,) each caption's score with its own image
    i2t = torch.full((n,), m, dtype=torch.long, device=img.device)
    t2i = torch.zeros(m, dtype=torch.long, device=img.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        sim = img[a:b] @ txt.T  # (b-a, M)
        pos = idx[None, :] == torch.arange(a, b, device=img.device)[:, None]
        best = sim.masked_fill(~pos, float("-inf")).amax(1)
        has = pos.any(1)
        ahead = ((sim >= best[:, None]) & ~pos).sum(1)
        i2t[a:b] = torch.where(has, ahead, torch.full_like(ahead, m))
        t2i += ((sim >= own[None, :]) & ~pos).sum(0)
    return i2t.cpu(), t2i.cpu()


def retrieval_metrics(sim_or_img: Tensor, txt_image_index: Tensor, txt: Tensor | None = None, ks: Sequence[int] = KS,
                      txt_keys: Tensor | None = None, prefix: str = "") -> dict[str, float]:
    """Recall@K both ways, from a similarity matrix (N, M) or from embeddings ``(img, ..., txt=txt)``.

    ``txt_keys`` (M,): match by key (:func:`keyed_retrieval_ranks`: identical captions, or classes).
    Returns keys ``{prefix}i2t_r{k}``, ``{prefix}t2i_r{k}`` for each k, and ``{prefix}mean_r{k}`` (their mean).
    """
    if txt is None:  # a precomputed (N, M) similarity matrix: rows are images, columns captions
        sim = sim_or_img
        n = sim.shape[0]
        img, txt = torch.eye(n, dtype=sim.dtype, device=sim.device), sim.T.contiguous()  # eye @ sim = sim
    else:
        img = sim_or_img
    if txt_keys is None:
        i2t, t2i = retrieval_ranks(img, txt, txt_image_index)
    else:
        i2t, t2i = keyed_retrieval_ranks(img, txt, txt_image_index, txt_keys)
    out: dict[str, float] = {}
    for k in ks:
        a, b = float((i2t < k).float().mean()), float((t2i < k).float().mean())
        out[f"{prefix}i2t_r{k}"], out[f"{prefix}t2i_r{k}"], out[f"{prefix}mean_r{k}"] = a, b, (a + b) / 2
    return out


def keyed_retrieval_ranks(img: Tensor, txt: Tensor, txt_image_index: Tensor, txt_keys: Tensor, *,
                          chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Ranks when captions carry keys: image i and caption j match when j's key is the key of any caption of i.

    Keys are caption-text ids (identical captions are interchangeable: a hit on any of them counts) or class
    labels (class-aware retrieval: any caption of the same class is a hit). With every key distinct this is
    :func:`retrieval_ranks`. image -> text: non-matching captions scoring at least as high as the best
    matching one; text -> image: non-matching images scoring at least as high as the best matching one.
    """
    idx = txt_image_index.to(img.device, torch.long)
    keys = torch.unique(txt_keys.long(), return_inverse=True)[1].to(img.device)
    txt = txt.to(img.device, img.dtype)
    n, m = img.shape[0], txt.shape[0]
    inc = torch.zeros(n, int(keys.max()) + 1 if m else 1, dtype=torch.bool, device=img.device)
    inc[idx, keys] = True
    i2t = torch.full((n,), m, dtype=torch.long, device=img.device)
    best_t = torch.full((m,), float("-inf"), dtype=img.dtype, device=img.device)
    for a in range(0, n, chunk):  # pass 1: each caption's best matching image score, image -> text ranks
        b = min(a + chunk, n)
        sim = img[a:b] @ txt.T
        pos = inc[a:b][:, keys]
        best = sim.masked_fill(~pos, float("-inf")).amax(1)
        ahead = ((sim >= best[:, None]) & ~pos).sum(1)
        i2t[a:b] = torch.where(pos.any(1), ahead, torch.full_like(ahead, m))
        best_t = torch.maximum(best_t, sim.masked_fill(~pos, float("-inf")).amax(0))
    t2i = torch.zeros(m, dtype=torch.long, device=img.device)
    for a in range(0, n, chunk):  # pass 2: non-matching images at least as high
        b = min(a + chunk, n)
        sim = img[a:b] @ txt.T
        pos = inc[a:b][:, keys]
        t2i += ((sim >= best_t[None, :]) & ~pos).sum(0)
    return i2t.cpu(), t2i.cpu()


def keyed_chance(txt_image_index: Tensor, txt_keys: Tensor, n_img: int, k: int = 1) -> dict[str, float]:
    """Expected R@k of random scores (no ties) under keyed matching: per query, 1 - C(neg, k) / C(all, k)."""
    keys = torch.unique(txt_keys.long(), return_inverse=True)[1]
    inc = torch.zeros(n_img, int(keys.max()) + 1, dtype=torch.bool)
    inc[txt_image_index.long(), keys] = True
    pos = inc[:, keys]  # (N, M)
    n, m = pos.shape

    def hit(npos: Tensor, total: int) -> Tensor:
        neg = total - npos.double()
        out = torch.ones_like(neg)
        for r in range(min(k, total)):
            out = out * ((neg - r).clamp_min(0) / (total - r))
        return 1 - out

    i2t = float(hit(pos.sum(1), m).mean())
    t2i = float(hit(pos.sum(0), n).mean())
    return {f"i2t_r{k}": i2t, f"t2i_r{k}": t2i, f"mean_r{k}": (i2t + t2i) / 2}


def class_embeddings(prompt_emb: Tensor) -> Tensor:
    """(C, P, d) embeddings of P prompts per class -> (C, d): normalise, average per class, normalise."""
    if prompt_emb.ndim == 2:
        prompt_emb = prompt_emb[:, None]
    return F.normalize(F.normalize(prompt_emb.float(), dim=-1).mean(1), dim=-1)


def zero_shot_metrics(img: Tensor, class_emb: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot accuracy of images (N, d) against class embeddings (C, d), both normalised.

    ``zs_top{k}``: top-k accuracy averaged over the classes present in ``labels``;
    ``zs_top{k}_micro``: over images. k larger than C is clipped to C.
    """
    labels = labels.to(img.device, torch.long)
    sim = img.float() @ class_emb.to(img.device).float().T  # (N, C)
    own = sim.gather(1, labels[:, None])
    rank = (sim > own).sum(1)  # classes strictly ahead of the true one
    out: dict[str, float] = {}
    classes = torch.unique(labels)
    for k in ks:
        hit = (rank < min(k, class_emb.shape[0])).float()
        per_class = torch.stack([hit[labels == c].mean() for c in classes])
        out[f"zs_top{k}"] = float(per_class.mean())
        out[f"zs_top{k}_micro"] = float(hit.mean())
    return out


@dataclass
class EvalSet:
    """Held-out pre-encoded data for :func:`evaluate` (features BEFORE the heads).

    Attributes:
        vision: (N, d_v) image features.
        text: (M, d_t) caption features.
        text_image_index: (M,) the image row (0 .. N-1) of each caption.
        labels: (N,) class ids for zero-shot, or None.
        class_prompts: (C, P, d_t) text features of P templated prompts per class, or None.
        vision_tokens, vision_token_mask, text_tokens, text_token_mask: token features for heads that
            read them (``local_global``); class_prompt_tokens / _mask likewise, shaped (C * P, T, d).
    """

    vision: Tensor
    text: Tensor
    text_image_index: Tensor
    labels: Tensor | None = None
    class_prompts: Tensor | None = None
    vision_tokens: Tensor | None = None
    vision_token_mask: Tensor | None = None
    text_tokens: Tensor | None = None
    text_token_mask: Tensor | None = None
    class_prompt_tokens: Tensor | None = None
    class_prompt_token_mask: Tensor | None = None
    text_keys: Tensor | None = None
    """(M,) caption-text ids: identical captions share one, and a hit on any of them counts (None: all distinct)."""


@torch.no_grad()
def project(head: nn.Module, x: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None, *,
            device: torch.device | str = "cpu", batch_size: int = 4096) -> Tensor:
    """Run ``head`` over features in batches on ``device``; (N, out) normalised float32 on ``device``."""
    outs = []
    for a in range(0, x.shape[0], batch_size):
        sl = slice(a, a + batch_size)
        tok = None if tokens is None else tokens[sl].to(device).float()
        msk = None if mask is None else mask[sl].to(device)
        outs.append(F.normalize(head(x[sl].to(device).float(), tok, msk).float(), dim=-1))
    return torch.cat(outs) if outs else x.new_zeros(0, 0)


def evaluate(vision_head: nn.Module, text_head: nn.Module, data: EvalSet, *, device: torch.device | str = "cpu") -> dict[str, float]:
    """Retrieval (and zero-shot, when ``data`` has labels and class prompts) of two heads on held-out data.

    Returns a flat dict: ``i2t_r1 .. mean_r10`` (identical captions interchangeable when ``data.text_keys``) and,
    with labels, class-aware ``class_i2t_r1 .. class_mean_r10`` and, with class prompts too, ``zs_top1``,
    ``zs_top5`` (+ ``_micro``).
    The heads are put in eval mode and restored to their previous mode.
    """
    modes = (vision_head.training, text_head.training)
    vision_head.eval()
    text_head.eval()
    try:
        img = project(vision_head, data.vision, data.vision_tokens, data.vision_token_mask, device=device)
        txt = project(text_head, data.text, data.text_tokens, data.text_token_mask, device=device)
        out = retrieval_metrics(img, data.text_image_index, txt=txt, txt_keys=data.text_keys)
        if data.labels is not None:  # class-aware retrieval: any caption of the same class is a hit
            cls = data.labels.long()[data.text_image_index.long()]
            out.update(retrieval_metrics(img, data.text_image_index, txt=txt, txt_keys=cls, prefix="class_"))
        if data.labels is not None and data.class_prompts is not None:
            c, p, d = data.class_prompts.shape
            prom = project(text_head, data.class_prompts.reshape(c * p, d), data.class_prompt_tokens,
                           data.class_prompt_token_mask, device=device)
            out.update(zero_shot_metrics(img, class_embeddings(prom.reshape(c, p, -1)), data.labels))
    finally:
        vision_head.train(modes[0])
        text_head.train(modes[1])
    return out
