"""Alignment heads trained on frozen, pre-encoded embeddings (SAIL, freeze-align).

- :mod:`.heads` - :class:`HeadConfig` and :func:`build_head`: linear, MLP, GLU (SAIL) and local-global
  (freeze-align) projectors.
- :mod:`.losses` - :class:`SigmoidLoss` (SigLIP / SAIL, with a memory-efficient chunked path) and
  :class:`InfoNCELoss` (CLIP), built by name with :func:`build_loss`.
- :mod:`.train` - :func:`train` two heads on pre-encoded embeddings (:class:`TrainConfig`, checkpoints, resume).
- :mod:`.evaluate` - retrieval Recall@K both ways, zero-shot accuracy, :func:`evaluate`.
- The probes that check a ranking (and which measure predicted them) live in :mod:`pairscout.evaluation`.
- :mod:`.model` - :func:`align` one pair and the :class:`AlignedModel` it gives (save / load, embed, zero-shot).

Names are imported lazily (PEP 562), so ``pairscout.cli`` can register the ``probe`` / ``align`` commands
without importing torch. The functions named like their modules are imported from the module:
``from pairscout.align.train import train``, ``from pairscout.align.evaluate import evaluate`` (a package attribute would be shadowed by the submodule).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # heads
    "HEAD_KINDS": "heads",
    "GLUHead": "heads",
    "HeadConfig": "heads",
    "HeadError": "heads",
    "LinearHead": "heads",
    "LocalGlobalHead": "heads",
    "MLPHead": "heads",
    "build_head": "heads",
    "masked_mean": "heads",
    # losses
    "LOSSES": "losses",
    "InfoNCELoss": "losses",
    "LossError": "losses",
    "SigmoidLoss": "losses",
    "build_loss": "losses",
    "chunked_sigmoid_negatives": "losses",
    "default_txt_image_index": "losses",
    # training, evaluation, aligned model
    "TrainConfig": "train_config",
    "TrainResult": "train_config",
    "TrainError": "train",
    "DivergenceError": "train",
    "EvalSet": "evaluate",
    "TEMPLATES": "evaluate",
    "retrieval_metrics": "evaluate",
    "zero_shot_metrics": "evaluate",
    "AlignedModel": "model",
    "AlignResult": "model",
    "align": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairscout.align' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pairscout.align.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
