"""``hf:`` -- Hugging Face ``transformers`` models, vision or text (per the spec's modality).

* ``id = "hf:BAAI/bge-large-en-v1.5"`` with ``revision`` (a commit sha or branch), or
  ``id = "hf:/path/to/dir"`` / ``weights = "/path/to/dir"``: a directory written by ``save_pretrained``.
* Vision: ``AutoModel`` + ``AutoImageProcessor`` (the processor is the image transform; ``image_size``
  overrides its resize/crop size). Pooling: ``cls`` (the class token), ``mean`` (of the patch tokens,
  prefix tokens excluded), ``cls+mean`` (both concatenated, as SAIL does), ``pooler`` (the model's
  ``pooler_output``). ``default`` = ``pooler`` for CLIP/SigLIP-style towers (they have a
  ``post_layernorm``), else ``cls`` where there is a class token, else ``mean``.
  Two-tower models (CLIP, SigLIP) are reduced to their ``vision_model`` / ``text_model``.
* Text: ``AutoModel`` + ``AutoTokenizer``. Pooling: ``mean`` over real tokens (``default``), ``cls``,
  ``last`` (last non-pad token, decoder-style embedders). ``options.prefix`` is prepended to every
  caption (e5: ``"query: "``). A model whose output has ``sentence_embeddings`` (NV-Embed) gives
  them as ``default``. Token outputs are padded to ``T = max_length or 64`` with a mask.
* ``layer = k``: ``hidden_states`` of block ``k`` (``k >= 0``: block k's output = ``hidden_states[k+1]``;
  negative counts from the end, ``-1`` = last block before any final norm).
* ``layers = [-1, -4]`` or ``"all"`` (a layer sweep): the final features as above plus those blocks'
  ``hidden_states`` from the same forward pass, pooled like ``layer`` (``default``/``pooler`` pooling reads
  the class token of a block where there is one, else the mean; text: the masked mean).
* ``options``: ``trust_remote_code`` (bool), ``dtype`` (``"bfloat16"``/``"float16"``, for big models),
  ``prefix`` (text).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pairscout.encoders._common import (
    check_weights_files,
    finish,
    hub_guard,
    is_local_path,
    pad_tokens,
    pool_text,
    spatial_tokens,
    sweep_blocks,
    text_token_length,
)
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

VISION_POOLINGS = ("default", "cls", "mean", "cls+mean", "pooler")
TEXT_POOLINGS = ("default", "mean", "cls", "last")


def resolve_source(spec: EncoderSpec) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is_local)``; a local path must exist."""
    if spec.weights:
        path = Path(spec.weights).expanduser()
    elif is_local_path(spec.target):
        path = Path(spec.target).expanduser()
    else:
        return spec.target, False
    if not path.exists():
        raise ModelLoadError(f"{spec.id}: the model directory {path} does not exist.",
                             fix="point `weights` (or the id) at a directory written by save_pretrained.")
    check_weights_files(spec.id, path)
    return str(path), True


def load_kwargs(spec: EncoderSpec, local: bool, offline: bool) -> dict[str, Any]:
    """Keyword arguments of a hub load (transformers or sentence-transformers) for this spec."""
    kw: dict[str, Any] = {}
    if not local and spec.revision:
        kw["revision"] = spec.revision
    if offline:
        kw["local_files_only"] = True
    if spec.options.get("trust_remote_code"):
        check_remote_code_allowed(spec)
        kw["trust_remote_code"] = True
    return kw


_REMOTE_CODE_ALLOWED = contextvars.ContextVar("pairscout_trust_remote_code", default=False)


@contextlib.contextmanager
def allow_remote_code(allowed: bool) -> Iterator[None]:
    """Within this block, entries with ``options.trust_remote_code`` may load (``--trust-remote-code``)."""
    token = _REMOTE_CODE_ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _REMOTE_CODE_ALLOWED.reset(token)


def remote_code_allowed() -> bool:
    """Whether an enclosing :func:`allow_remote_code` (the command's ``--trust-remote-code``) allows it."""
    return _REMOTE_CODE_ALLOWED.get()


def check_remote_code_allowed(spec: EncoderSpec) -> None:
    """A zoo entry alone never runs a model repository's Python: the user must ask on the command line."""
    if not _REMOTE_CODE_ALLOWED.get():
        raise ModelLoadError(
            f"{spec.id} sets trust_remote_code: loading it runs Python code from the model's repository"
            f" (revision {spec.revision or 'unpinned'}), which pairscout does not do unless asked.",
            fix="pass --trust-remote-code if you trust that code (pin revision to a commit sha), or leave the model out.",
        )
    if not (spec.revision and len(spec.revision) == 40 and all(c in "0123456789abcdef" for c in spec.revision)):
        log.warning("%s runs remote code at revision %r, which is not a commit sha: the code can change under you",
                    spec.id, spec.revision or "main")


def _layer_index(layer: int) -> int:
    return layer + 1 if layer >= 0 else layer


class HFImageTransform:
    """Picklable wrapper of a transformers image processor: PIL image -> (C, H, W) tensor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, img) -> torch.Tensor:
        return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def _set_size(processor: Any, size: int) -> None:
    for attr in ("size", "crop_size"):
        cur = getattr(processor, attr, None)
        if cur is None:
            continue
        keys = set(cur.keys()) if hasattr(cur, "keys") else set()
        if "shortest_edge" in keys and attr == "size":
            new = {"shortest_edge": size}
        else:
            new = {"height": size, "width": size}
        setattr(processor, attr, new)


class HFVisionEncoder(Encoder):
    supports_layers = True
    supports_tokens = True

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(spec)
        if spec.pooling not in VISION_POOLINGS:
            raise ZooError(f"{spec.id}: pooling {spec.pooling!r} is not supported for vision.", fix=f"use one of {', '.join(VISION_POOLINGS)}.")
        if hasattr(model, "vision_model"):
            model = model.vision_model
        self.model = model.eval().requires_grad_(False)
        if spec.image_size:
            _set_size(processor, spec.image_size)
        self._transform = HFImageTransform(processor)
        cfg = getattr(model, "config", None)
        self.patch_size = getattr(cfg, "patch_size", None)
        # ViT-style models check the input size unless asked to resample their position embeddings
        self._interpolate = bool(spec.image_size) and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def image_transform(self) -> Callable:
        return self._transform

    def _n_prefix(self, T: int, pixels: torch.Tensor) -> int:
        p = self.patch_size
        if isinstance(p, (list, tuple)):
            p = p[0]
        if not isinstance(p, int) or p <= 0:
            return 0
        n_patch = (pixels.shape[-2] // p) * (pixels.shape[-1] // p)
        extra = T - n_patch
        return extra if 0 <= extra <= 16 else 0

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        x = pixels.to(self.device)
        dtype = next(self.model.parameters()).dtype
        kw: dict[str, Any] = {"output_hidden_states": self.spec.layer is not None or self.spec.layers is not None}
        if self._interpolate:
            kw["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=x.to(dtype), **kw)
        if self.spec.layer is not None:
            try:
                hidden = out.hidden_states[_layer_index(self.spec.layer)]
            except IndexError:
                raise ZooError(f"{self.spec.id}: layer = {self.spec.layer} is out of range ({len(out.hidden_states) - 1} blocks).",
                               fix="pick a block index within the model's depth.") from None
        else:
            hidden = out.last_hidden_state
        if hidden.ndim == 4:  # CNN-style (B, C, H, W)
            patches, cls = spatial_tokens(hidden), None
        else:
            n_prefix = self._n_prefix(hidden.shape[1], x)
            cls = hidden[:, 0] if n_prefix else None
            patches = hidden[:, n_prefix:]
        pooler = getattr(out, "pooler_output", None) if self.spec.layer is None else None
        pooling = self.spec.pooling
        if pooling == "default":
            if pooler is not None and hasattr(self.model, "post_layernorm"):
                pooling = "pooler"
            else:
                pooling = "cls" if cls is not None else ("pooler" if pooler is not None and hidden.ndim == 4 else "mean")
        if pooling == "pooler":
            if pooler is None:
                raise ZooError(f"{self.spec.id} has no pooler_output{' at a chosen layer' if self.spec.layer is not None else ''}.",
                               fix="use pooling = \"cls\" or \"mean\".")
            pooled = pooler.flatten(1)
        elif pooling == "mean":
            pooled = patches.mean(1)
        else:
            if cls is None:
                raise ZooError(f"{self.spec.id} has no class token, so pooling {pooling!r} is undefined.", fix="use pooling = \"mean\".")
            pooled = cls if pooling == "cls" else torch.cat([cls, patches.mean(1)], dim=-1)
        layers = None
        if self.spec.layers is not None:
            layers = {str(b): self._pool_block(out.hidden_states[b + 1], x).float()
                      for b in sweep_blocks(self.spec, len(out.hidden_states) - 1)}
        return finish(self.spec, EncoderOutput(pooled.float(), patches.float() if tokens else None, None, layers))

    def _pool_block(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One block's hidden state pooled for a layer sweep (``pooler``/``default``: class token, else mean)."""
        if hidden.ndim == 4:
            return spatial_tokens(hidden).mean(1)
        n_prefix = self._n_prefix(hidden.shape[1], x)
        cls, patches = (hidden[:, 0] if n_prefix else None), hidden[:, n_prefix:]
        pooling = self.spec.pooling if self.spec.pooling not in ("default", "pooler") else ("cls" if cls is not None else "mean")
        if pooling == "mean" or cls is None:
            return patches.mean(1)
        return cls if pooling == "cls" else torch.cat([cls, patches.mean(1)], dim=-1)


class HFTextEncoder(Encoder):
    supports_layers = True
    supports_tokens = True

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__(spec)
        if spec.pooling not in TEXT_POOLINGS:
            raise ZooError(f"{spec.id}: pooling {spec.pooling!r} is not supported for text.", fix=f"use one of {', '.join(TEXT_POOLINGS)}.")
        if hasattr(model, "text_model"):
            model = model.text_model
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.eval().requires_grad_(False)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(f"{spec.id}: its tokenizer has neither a pad nor an eos token.", fix="use a tokenizer that can pad.")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        limit = getattr(tokenizer, "model_max_length", 512) or 512
        self.max_length = spec.max_length or int(min(limit, 512))
        self.prefix = str(spec.options.get("prefix", ""))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        batch = self.tokenizer([self.prefix + t for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch, output_hidden_states=self.spec.layer is not None or self.spec.layers is not None)
        mask = batch["attention_mask"]
        if self.spec.layer is not None:
            hidden = out.hidden_states[_layer_index(self.spec.layer)]
        elif isinstance(out, dict) and "last_hidden_state" not in out and "sentence_embeddings" in out:
            hidden = None
        else:
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out["last_hidden_state"]
        sent = out.get("sentence_embeddings") if isinstance(out, dict) else None
        if self.spec.pooling == "default" and sent is not None and self.spec.layer is None:
            pooled = sent
        elif hidden is None:
            raise ZooError(f"{self.spec.id} gives only sentence embeddings.", fix="use pooling = \"default\" and no layer.")
        else:
            pooled = pool_text(hidden, mask, self.spec.pooling, self.spec)
        tok = mask_t = None
        if tokens:
            if hidden is None:
                raise ZooError(f"{self.spec.id} gives no token features.", fix="drop --tokens for this encoder.")
            tok, mask_t = pad_tokens(hidden.float(), mask, text_token_length(self.spec))
        layers = None
        if self.spec.layers is not None:
            block_pooling = "mean" if self.spec.pooling == "default" else self.spec.pooling
            layers = {str(b): pool_text(out.hidden_states[b + 1], mask, block_pooling, self.spec).float()
                      for b in sweep_blocks(self.spec, len(out.hidden_states) - 1)}
        return finish(self.spec, EncoderOutput(pooled.float(), tok, mask_t, layers))


def _dtype(spec: EncoderSpec) -> torch.dtype | None:
    name = spec.options.get("dtype")
    if not name:
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ZooError(f"{spec.id}: options.dtype = {name!r} is not a torch dtype.", fix="use \"bfloat16\", \"float16\" or \"float32\".")
    return dt


def build(spec: EncoderSpec) -> Encoder:
    from transformers import AutoModel

    if spec.options.get("trust_remote_code"):
        check_remote_code_allowed(spec)  # before any download
    src, local = resolve_source(spec)
    dtype = _dtype(spec)
    with hub_guard(spec, local=local, what=src) as offline:
        kw = load_kwargs(spec, local, offline)
        model_kw = dict(kw, dtype=dtype) if dtype is not None else kw
        model = AutoModel.from_pretrained(src, **model_kw)
        if spec.modality == "vision":
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(src, **kw)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    if spec.modality == "vision":
        return HFVisionEncoder(spec, model, processor)
    return HFTextEncoder(spec, model, tokenizer)
