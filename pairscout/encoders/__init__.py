"""Encoders: one factory, one module per source.

:func:`build_encoder` turns an :class:`~pairscout.zoo.spec.EncoderSpec` into an
:class:`~pairscout.encoders.base.Encoder` by the prefix of its id:

====================  ====================================  ==========================================
prefix                module                                what it loads
====================  ====================================  ==========================================
``timm:``             :mod:`.timm_source`                   any timm model (``arch.tag``), hub or file
``hf:``               :mod:`.hf_source`                     transformers vision / text models
``st:``               :mod:`.st_source`                     sentence-transformers models
``onnx:``             :mod:`.onnx_source`                   a local ONNX encoder (onnxruntime)
``emb:``              :mod:`.emb_source`                    precomputed embeddings (.npy/.safetensors/.pt)
``pack:``             :mod:`.packs`                         pretrained models that install with pip
``baseline:``         :mod:`.baselines`                     weight-free baselines (pixels, TF-IDF, ...)
====================  ====================================  ==========================================

Adding a source is one new module with a ``build(spec) -> Encoder`` function and one line in
:data:`pairscout.zoo.spec.SOURCE_MODULES` (the one list of sources), or at run time :func:`register_source`. Modules are imported
lazily: importing this package does not import torch models, transformers or onnxruntime.

Example::

    from pairscout.encoders import build_encoder
    from pairscout.zoo.spec import SOURCE_MODULES, EncoderSpec, add_source

    enc = build_encoder(EncoderSpec(id="pack:all-MiniLM-L6-v2", modality="text"))
    out = enc.encode_texts(["a dog on a beach"])   # out.pooled: (1, 384)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pairscout.encoders.base import Encoder, EncoderOutput, PrecomputedEncoder
from pairscout.errors import ZooError
from pairscout.zoo.spec import SOURCE_MODULES, EncoderSpec, add_source

__all__ = ["Encoder", "EncoderOutput", "PrecomputedEncoder", "SOURCE_MODULES", "LAYER_SOURCES", "build_encoder", "can_sweep", "register_source"]

_BUILDERS: dict[str, Callable[[EncoderSpec], Encoder]] = {}


def register_source(prefix: str, builder: Callable[[EncoderSpec], Encoder]) -> None:
    """Register a builder for ``prefix`` at run time (plugins, tests): ids ``<prefix>:...`` become valid in
    zoos and specs, and are built by ``builder``. Overrides the module of a shipped prefix."""
    add_source(prefix)
    _BUILDERS[prefix] = builder


def _builder(prefix: str) -> Callable[[EncoderSpec], Encoder]:
    if prefix in _BUILDERS:
        return _BUILDERS[prefix]
    module = SOURCE_MODULES.get(prefix)
    if not module:
        raise ZooError(f"no encoder source is registered for the prefix {prefix!r}.",
                       fix=f"use one of {', '.join(p + ':' for p in SOURCE_MODULES)}.")
    return importlib.import_module(module).build


def build_encoder(spec: EncoderSpec) -> Encoder:
    """Build the frozen encoder ``spec`` describes (model in eval mode, on the CPU).

    Raises:
        ZooError: the spec is inconsistent (unknown source or pack, wrong modality, bad pooling).
        ModelLoadError: the weights cannot be loaded (missing package, unreachable hub, bad file).
        DataError: an ``emb:`` file is missing.
    """
    enc = _builder(spec.source)(spec)
    if spec.layers is not None and not enc.supports_layers:
        raise ZooError(f"{spec.id}: this encoder cannot read hidden layers, so layers cannot be swept.",
                       fix=f"remove layers from its zoo entry (sources that can: {', '.join(LAYER_SOURCES)}).")
    return enc


LAYER_SOURCES = ("timm:", "hf:", "st:", "baseline:random-net", "pack:efficientnet-lite*", "pack:all-MiniLM-L6-v2",
                 "pack:all-mpnet-base-v2", "pack:dinov2-s14-imgfocus")
"""Encoders that can read hidden layers for a layer sweep (``layers`` in a zoo entry, ``rank --layers``)."""


def can_sweep(spec: EncoderSpec) -> bool:
    """Whether ``spec``'s encoder can read hidden layers, known from its id alone (no model is built)."""
    import fnmatch

    return any(spec.id.startswith(p) if p.endswith(":") else fnmatch.fnmatch(spec.id, p) for p in LAYER_SOURCES)
