"""``st:`` -- sentence-transformers models (text), from the hub (with ``revision``) or a local directory.

* ``id = "st:sentence-transformers/all-MiniLM-L6-v2"`` or ``id = "st:/path/to/dir"`` /
  ``weights = "/path/to/dir"`` (a directory written by ``SentenceTransformer.save``).
* Pooled = the model's own ``sentence_embedding`` (its pooling and normalisation modules), one
  forward pass that also gives ``token_embeddings``, padded to ``T = max_length or 64`` with a mask.
* ``max_length`` truncates inputs (else the model's ``max_seq_length``); ``options.prefix`` is
  prepended to every caption; ``options.trust_remote_code`` is passed through.
* ``layers = [-1, -3]`` or ``"all"`` (a layer sweep): besides the sentence embedding, the masked mean of
  those blocks' hidden states (the transformer module's ``all_layer_embeddings``), same forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from pairscout.encoders._common import (
    finish,
    hub_guard,
    masked_mean,
    pad_tokens,
    sweep_blocks,
    text_token_length,
)
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.encoders.hf_source import check_remote_code_allowed, load_kwargs, resolve_source
from pairscout.errors import ZooError
from pairscout.zoo.spec import EncoderSpec


class STEncoder(Encoder):
    """A :class:`sentence_transformers.SentenceTransformer` as a frozen caption encoder."""

    supports_layers = True
    supports_tokens = True

    def __init__(self, spec: EncoderSpec, model: Any) -> None:
        super().__init__(spec)
        if spec.modality != "text":
            raise ZooError(f"{spec.id}: sentence-transformers models are text encoders.", fix='set modality = "text".')
        if spec.pooling != "default" or spec.layer is not None:
            raise ZooError(f"{spec.id}: st: models use their own pooling, so pooling/layer cannot be set.",
                           fix="remove pooling/layer, or load the model with hf: to choose them.")
        self.model = model.eval().requires_grad_(False)
        if spec.layers is not None:
            first = self.model[0]
            inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
            if getattr(inner, "config", None) is None:
                raise ZooError(f"{spec.id}: this sentence-transformers model exposes no transformer, so layers cannot be read.",
                               fix="remove layers from its zoo entry, or load the model with hf:.")
            inner.config.output_hidden_states = True
        if spec.max_length:
            self.model.max_seq_length = spec.max_length
        self.prefix = str(spec.options.get("prefix", ""))

    def _features(self, texts: list[str]) -> dict[str, Any]:
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        feats = prep(texts)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        out = self.model(self._features([self.prefix + t for t in texts]))
        pooled = out["sentence_embedding"].float()
        tok = mask = None
        if tokens:
            tok, mask = pad_tokens(out["token_embeddings"].float(), out["attention_mask"], text_token_length(self.spec))
        layers = None
        if self.spec.layers is not None:
            hs = out.get("all_layer_embeddings")
            if hs is None:
                raise ZooError(f"{self.spec.id}: the model gave no hidden states, so layers cannot be read.",
                               fix="remove layers from its zoo entry, or load the model with hf:.")
            layers = {str(b): masked_mean(hs[b + 1], out["attention_mask"]).float() for b in sweep_blocks(self.spec, len(hs) - 1)}
        return finish(self.spec, EncoderOutput(pooled, tok, mask, layers))


def load_sentence_transformer(spec: EncoderSpec, path_or_id: str, *, local: bool) -> Any:
    from sentence_transformers import SentenceTransformer

    with hub_guard(spec, local=local, what=path_or_id) as offline:
        return SentenceTransformer(path_or_id, device="cpu", **load_kwargs(spec, local, offline))


def build(spec: EncoderSpec) -> STEncoder:
    if spec.options.get("trust_remote_code"):
        check_remote_code_allowed(spec)  # before any download
    src, local = resolve_source(spec)
    return STEncoder(spec, load_sentence_transformer(spec, src, local=local))
