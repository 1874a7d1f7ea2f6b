"""Alignment heads trained on frozen, pre-encoded embeddings (SAIL, freeze-align).

- :mod:`.heads` - :class:`HeadConfig` and :func:`build_head`: linear, MLP, GLU (SAIL) and local-global
  (freeze-align) projectors.
- :mod:`.losses` - :class:`SigmoidLoss` (SigLIP / SAIL, with a memory-efficient chunked path) and
  :class:`InfoNCELoss` (CLIP), built by name with :func:`build_loss`.
"""

from __future__ import annotations

from pairscout.align.heads import (
    HEAD_KINDS,
    GLUHead,
    HeadConfig,
    HeadError,
    LinearHead,
    LocalGlobalHead,
    MLPHead,
    build_head,
    masked_mean,
)
from pairscout.align.losses import (
    LOSSES,
    InfoNCELoss,
    LossError,
    SigmoidLoss,
    build_loss,
    chunked_sigmoid_negatives,
    default_txt_image_index,
)

__all__ = [
    "HEAD_KINDS",
    "LOSSES",
    "GLUHead",
    "HeadConfig",
    "HeadError",
    "InfoNCELoss",
    "LinearHead",
    "LocalGlobalHead",
    "LossError",
    "MLPHead",
    "SigmoidLoss",
    "build_head",
    "build_loss",
    "chunked_sigmoid_negatives",
    "default_txt_image_index",
    "masked_mean",
]
