"""Every setting of a training run (:class:`TrainConfig`), what a run returns (:class:`TrainResult`),
the optimiser and the learning-rate schedule.

The dataclass owns every default; ``pairscout align`` reads its defaults from it, and so does
:class:`~pairscout.evaluation.result.ProbeSettings`. That is why this is a module of its own and not part of
:mod:`.train`: it imports no torch (only under ``TYPE_CHECKING`` and inside functions), so ``import pairscout.cli``
stays light (about 1.2 s on a busy 2-core machine, against 4.4 s for ``import pairscout.align.train``, which
loads torch; ``python -X importtime -c "import pairscout.cli"``; ``tests/test_imports.py`` checks torch stays out).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairscout.errors import TrainError

if TYPE_CHECKING:  # torch stays out of `import pairscout.cli` (the CLI reads its defaults from here)
    import torch
    from torch import nn

    from pairscout.align.heads import HeadConfig

OPTIMIZERS = ("adamw", "lion")
DEFAULT_STEPS = 200
"""Steps when neither ``steps`` nor ``epochs`` is given: about 2 min for the default demo pair on 2 CPU cores."""
DEFAULT_LR = {"adamw": 1e-3, "lion": 3e-4}
"""Lion's sign update moves every weight by lr per step, so its lr sits 3-10x below AdamW's (SAIL: 1e-5 at
batch 32,768 over many steps); 3e-4 suits the short runs on a few thousand pairs that pairscout makes."""


@dataclass
class TrainConfig:
    """Every setting of a training run. All but the ``RUN_ONLY`` fields change the curve."""

    head: str = "glu"
    """Head kind on both sides: ``linear`` | ``mlp`` | ``glu`` (SAIL) | ``local_global`` (freeze-align, needs tokens)."""
    out_dim: int = 1024
    """Dimension of the shared space (SAIL: 1024 for GLU, 2048 for probes)."""
    hidden_mult: int = 8
    """GLU hidden width = hidden_mult x input dim (SAIL: 8)."""
    head_options: dict[str, Any] = field(default_factory=dict)
    """Other :class:`HeadConfig` fields (``mlp_hidden``, ``dropout``)."""
    loss: str = "sigmoid"
    """``sigmoid`` (SigLIP / SAIL) or ``infonce`` (CLIP / freeze-align)."""
    loss_norm: str = "batch"
    """Sigmoid loss: divide by the number of images (``batch``, SigLIP) or of logits (``pairs``, SAIL)."""
    chunk: int | None = None
    """Sigmoid loss: captions per logit block (memory O(B * chunk)); None computes the full B x B' block."""
    init_scale: float = 20.0
    """Sigmoid loss: initial logit scale t (SAIL: 20)."""
    init_bias: float = -10.0
    """Sigmoid loss: initial logit bias b (SAIL / SigLIP: -10)."""
    temperature: float = 0.07
    """InfoNCE: initial temperature (CLIP: 0.07)."""
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``lion`` (the ``lion-pytorch`` package)."""
    lr: float | None = None
    """Peak learning rate; None: 1e-3 for AdamW, 3e-4 for Lion."""
    weight_decay: float = 1e-4
    """Decoupled weight decay on weight matrices (not on biases, norms, scale, bias)."""
    batch_size: int = 256
    """Images per step (clipped to the number of images)."""
    steps: int | None = None
    """Optimiser steps; None: from ``epochs``, else :data:`DEFAULT_STEPS` (200)."""
    epochs: float | None = None
    """Passes over the images (used when ``steps`` is None)."""
    warmup: float = 0.1
    """Fraction of the steps with a linear warm-up."""
    schedule: str = "cosine"
    """``cosine`` (to ``min_lr``) or ``constant`` after warm-up."""
    min_lr: float = 0.0
    """Final learning rate as a fraction of ``lr`` (cosine)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    captions: str = "sample"
    """``sample`` one caption per image per step, or ``all`` captions as multi-positives."""
    seed: int = 0
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    device: str = "auto"
    eval_every: int = 0
    """Evaluate on ``eval_data`` every N steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: only at the end; needs ``out_dir``)."""
    log_every: int = 10
    """Record loss, lr and throughput in the history every N steps."""
    keep_checkpoints: int = 1
    """Checkpoints kept on disk (the newest). Each holds the heads and the optimiser state (AdamW: 3x the weights)."""

    RUN_ONLY = ("device", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints")

    def __post_init__(self) -> None:
        from pairscout.bounds import check_fields

        check_fields(self, TrainError)  # every numeric setting against its declared range (pairscout.bounds)
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"optimizer {self.optimizer!r} is unknown.", fix=f"use one of {', '.join(OPTIMIZERS)}.")
        if self.captions not in ("sample", "all"):
            raise TrainError(f"captions={self.captions!r} is unknown.", fix="use 'sample' or 'all'.")
        if self.schedule not in ("cosine", "constant"):
            raise TrainError(f"schedule={self.schedule!r} is unknown.", fix="use 'cosine' or 'constant'.")

    @property
    def peak_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.optimizer])

    def total_steps(self, n_images: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * max(1, n_images // min(self.batch_size, n_images))))
        return DEFAULT_STEPS

    def head_config(self, in_dim: int, token_dim: int | None = None) -> HeadConfig:
        from pairscout.align.heads import HeadConfig

        opts = dict(self.head_options)
        if token_dim is not None:
            opts.setdefault("token_dim", token_dim)
        return HeadConfig(kind=self.head, in_dim=int(in_dim), out_dim=self.out_dim, hidden_mult=self.hidden_mult, **opts)

    def build_loss(self) -> nn.Module:
        from pairscout.align.losses import build_loss

        if self.loss.lower() in ("infonce", "clip"):
            return build_loss("infonce", init_temperature=self.temperature)
        return build_loss(self.loss, init_scale=self.init_scale, init_bias=self.init_bias, norm=self.loss_norm, chunk=self.chunk)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that change the curve (checkpoints from other ones are refused on resume)."""
        d = self.to_dict()
        for k in self.RUN_ONLY:
            d.pop(k)
        d["lr"] = self.peak_lr
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained heads and loss, and the record of the run."""

    vision_head: nn.Module
    text_head: nn.Module
    loss_fn: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    """Final evaluation on ``eval_data`` (empty without it)."""
    steps: int
    samples_per_s: float
    timings: dict[str, float]
    device: str
    out_dir: Path | None = None

    @property
    def final_loss(self) -> float:
        losses = [h["loss"] for h in self.history if "loss" in h]
        return float(losses[-1]) if losses else float("nan")

    def loss_parameters(self) -> dict[str, float]:
        """The learned logit scale t (and bias b for the sigmoid loss)."""
        out = {"scale": float(self.loss_fn.logit_scale.detach().exp())}
        if hasattr(self.loss_fn, "logit_bias"):
            out["bias"] = float(self.loss_fn.logit_bias.detach())
        return out

    def summary(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "steps": self.steps, "final_loss": self.final_loss,
                "samples_per_s": self.samples_per_s, "metrics": self.metrics, "loss_parameters": self.loss_parameters(),
                "timings_s": self.timings, "device": self.device}  # fmt: skip


# --- optimiser and schedule -----------------------------------------------------------------------
def build_optimizer(config: TrainConfig, modules: list[nn.Module]) -> torch.optim.Optimizer:
    import torch

    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise TrainError("optimizer 'lion' needs the lion-pytorch package.", fix="pip install lion-pytorch, or use --optimizer adamw.") from None
        return Lion(groups, lr=config.peak_lr, betas=(0.9, 0.99))
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine (or constant)."""
    warm = int(round(config.warmup * total))
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant" or total <= warm:
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return config.min_lr + (1.0 - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
