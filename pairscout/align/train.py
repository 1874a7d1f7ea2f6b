"""Train two alignment heads on frozen, pre-encoded embeddings (SAIL / freeze-align style).

:func:`train` takes image features (N, d_v), caption features (M, d_t) and each caption's image row,
and trains one head per side with a contrastive loss (:mod:`pairscout.align.losses`). Everything
that changes the numbers lives in one :class:`TrainConfig`.

How a step is made (all of it a pure function of ``config.seed`` and the step number, so a resumed run
draws the same batches as an uninterrupted one, with no sampler state to save):

- images: each epoch is a permutation of the images (generator seeded by ``seed`` and the epoch);
  a step takes the next ``batch_size`` of them (the last incomplete batch of an epoch is dropped).
- captions: ``captions="sample"`` draws one caption per image per step (generator seeded by ``seed``
  and the step); ``captions="all"`` puts every caption of the batch's images in the batch as
  multi-positives (the loss gets each caption's image row).
- learning rate: linear warm-up over ``warmup`` (a fraction of the steps), then cosine decay to
  ``min_lr * lr`` (or constant with ``schedule="constant"``).
- the features stay where they are on CPU; on CUDA they are moved to the GPU when they fit in half
  of its free memory, else pinned and streamed batch by batch.

Checkpoints (``out_dir/checkpoints/``): ``step_XXXXXXXX.safetensors`` (head and loss weights),
``step_XXXXXXXX.pt`` (optimiser state, RNG state, history) and ``latest.json`` (written last: the
checkpoint it names is complete). Every file is written to a temporary name and moved into place.
``resume=True`` continues from the latest checkpoint and reproduces the uninterrupted run; a
checkpoint made with other settings or other data is refused. A NaN/inf loss or gradient stops the
run before the optimiser step, keeps the last good checkpoint, and raises :class:`DivergenceError`.

``out_dir/train_log.json`` holds the config, the history (loss, lr, scale, samples/s, evaluations),
timings and versions.

Example:
    >>> import torch
    >>> x = torch.randn(256, 32); y = x @ torch.linalg.qr(torch.randn(32, 32))[0]
    >>> res = train(x, y, torch.arange(256), TrainConfig(head="linear", out_dim=32, steps=50, batch_size=64))
    >>> res.history[-1]["loss"] < res.history[0]["loss"]
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pairscout._io import atomic_torch_save, atomic_write_text
from pairscout.align.evaluate import EvalSet, evaluate
from pairscout.align.heads import HeadConfig, HeadError, build_head
from pairscout.align.losses import build_loss
from pairscout.encode.cache import Embeddings, atomic_save
from pairscout.errors import PairscoutError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total_steps, info)``; ``info`` has ``loss``, ``lr``, ``samples_per_s``. Called after every step."""

CKPT_DIR = "checkpoints"
LOG_FILE = "train_log.json"
OPTIMIZERS = ("adamw", "lion")
DEFAULT_LR = {"adamw": 1e-3, "lion": 3e-4}
"""Lion's sign update moves every weight by lr per step, so its lr sits 3-10x below AdamW's (SAIL: 1e-5 at
batch 32,768 over many steps); 3e-4 suits the short runs on a few thousand pairs that pairscout makes."""


class TrainError(PairscoutError):
    """A training run cannot start or continue (bad config, checkpoint from other settings, ...)."""


class DivergenceError(TrainError):
    """The loss or a gradient became NaN/inf."""


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
    batch_size: int = 512
    """Images per step (clipped to the number of images)."""
    steps: int | None = None
    """Optimiser steps; None: from ``epochs``, else 500."""
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
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"optimizer {self.optimizer!r} is unknown.", fix=f"use one of {', '.join(OPTIMIZERS)}.")
        if self.captions not in ("sample", "all"):
            raise TrainError(f"captions={self.captions!r} is unknown.", fix="use 'sample' or 'all'.")
        if self.schedule not in ("cosine", "constant"):
            raise TrainError(f"schedule={self.schedule!r} is unknown.", fix="use 'cosine' or 'constant'.")
        if self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise TrainError(f"batch_size={self.batch_size} and steps={self.steps} must be >= 1.", fix="pass positive numbers.")
        if not 0.0 <= self.warmup < 1.0:
            raise TrainError(f"warmup={self.warmup} must be a fraction in [0, 1).", fix="use e.g. 0.1.")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"lr={self.lr} must be > 0.", fix="use e.g. 1e-3 (AdamW) or 1e-4 (Lion).")

    @property
    def peak_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.optimizer])

    def total_steps(self, n_images: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * max(1, n_images // min(self.batch_size, n_images))))
        return 500

    def head_config(self, in_dim: int, token_dim: int | None = None) -> HeadConfig:
        opts = dict(self.head_options)
        if token_dim is not None:
            opts.setdefault("token_dim", token_dim)
        return HeadConfig(kind=self.head, in_dim=int(in_dim), out_dim=self.out_dim, hidden_mult=self.hidden_mult, **opts)

    def build_loss(self) -> nn.Module:
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


# --- data ---------------------------------------------------------------------------------------
@dataclass
class _Side:
    pooled: Tensor
    tokens: Tensor | None
    mask: Tensor | None


def _side(x: Tensor | Embeddings, tokens: Tensor | None, mask: Tensor | None, what: str) -> _Side:
    if isinstance(x, Embeddings):
        tokens = x.tokens if tokens is None else tokens
        mask = x.token_mask if mask is None else mask
        x = x.pooled
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise TrainError(f"{what} features must be a (rows, dim) tensor, got {getattr(x, 'shape', type(x))}.", fix="pass pooled embeddings.")
    x = x.float()
    if not torch.isfinite(x).all():
        raise TrainError(f"{what} features hold NaN/inf values.", fix="re-encode them (pairscout encode --refresh).")
    if tokens is not None and tokens.shape[0] != x.shape[0]:
        raise TrainError(f"{what} tokens have {tokens.shape[0]} rows but the pooled features {x.shape[0]}.", fix="pass matching tensors.")
    return _Side(x, tokens, mask)


def data_signature(*tensors: Tensor | None, rows: int = 2048) -> str:
    """A cheap content hash: shapes plus up to ``rows`` evenly spaced rows of each tensor."""
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str(tuple(t.shape)).encode())
        if t.shape[0]:
            sel = torch.linspace(0, t.shape[0] - 1, min(rows, t.shape[0])).long()
            h.update(t[sel].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Batches:
    """Batch ``s`` of a run as a pure function of (seed, s): image rows, caption rows, caption -> batch row."""

    def __init__(self, text_image_index: Tensor, n_images: int, batch_size: int, seed: int, captions: str) -> None:
        tii = text_image_index.long().cpu()
        self.counts = torch.bincount(tii, minlength=n_images)
        self.order = torch.argsort(tii, stable=True)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.pool = torch.nonzero(self.counts > 0).flatten()
        self.bs = min(batch_size, len(self.pool))
        self.per_epoch = max(1, len(self.pool) // self.bs)
        self.seed, self.captions = seed, captions
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.pool), generator=g), epoch
        images = self.pool[self._perm[k * self.bs : (k + 1) * self.bs]]
        counts, offsets = self.counts[images], self.offsets[images]
        if self.captions == "sample":
            g = torch.Generator().manual_seed((self.seed + 1) * 7_919 + step * 104_729)
            pick = offsets + (torch.rand(len(images), generator=g) * counts).long().clamp_max(counts - 1)
            return images, self.order[pick], None
        row = torch.repeat_interleave(torch.arange(len(images)), counts)
        start = torch.repeat_interleave(offsets, counts)
        within = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return images, self.order[start + within], row


def _place(t: Tensor | None, device: torch.device, fits: bool) -> Tensor | None:
    if t is None or device.type != "cuda":
        return t
    return t.to(device) if fits else t.pin_memory()


def _gather(t: Tensor | None, idx: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
    if t is None:
        return None
    out = t[idx.to(t.device)].to(device, non_blocking=True)
    return out.to(dtype) if dtype is not None else out


# --- optimiser and schedule -----------------------------------------------------------------------
def _optimizer(config: TrainConfig, modules: list[nn.Module]) -> torch.optim.Optimizer:
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


# --- files --------------------------------------------------------------------------------------
def head_state(vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module) -> dict[str, Tensor]:
    """One flat tensor dict (``vision.*``, ``text.*``, ``loss.*``) for a safetensors file."""
    out: dict[str, Tensor] = {}
    for prefix, m in (("vision", vision_head), ("text", text_head), ("loss", loss_fn)):
        for k, v in m.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    return out


def load_head_state(state: dict[str, Tensor], vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module) -> None:
    for prefix, m in (("vision", vision_head), ("text", text_head), ("loss", loss_fn)):
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sub)


def latest_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    p = Path(out_dir) / CKPT_DIR / "latest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TrainError(f"{p} is unreadable.", fix="delete the checkpoints folder, or pass --force to start over.") from None


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
    return None


# --- the run ------------------------------------------------------------------------------------
def train(
    vision: Tensor | Embeddings,
    text: Tensor | Embeddings,
    text_image_index: Tensor | None = None,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    eval_data: EvalSet | None = None,
    progress: ProgressFn | None = None,
    *,
    vision_tokens: Tensor | None = None,
    vision_token_mask: Tensor | None = None,
    text_tokens: Tensor | None = None,
    text_token_mask: Tensor | None = None,
    resume: bool = False,
    force: bool = False,
) -> TrainResult:
    """Train a vision head and a text head so that matching image and caption features meet.

    Args:
        vision: (N, d_v) image features (or :class:`Embeddings`, whose tokens are used too).
        text: (M, d_t) caption features (or :class:`Embeddings`; its ``row_index`` is the default
            ``text_image_index``).
        text_image_index: (M,) the image row of each caption.
        config: the settings (default :class:`TrainConfig`).
        out_dir: where checkpoints and ``train_log.json`` go (None: nothing is written).
        eval_data: held-out data evaluated every ``config.eval_every`` steps and at the end.
        progress: ``progress(step, total, info)`` after every step.
        vision_tokens, vision_token_mask, text_tokens, text_token_mask: token features for the
            ``local_global`` head.
        resume: continue from the latest checkpoint in ``out_dir`` (a fresh start when there is none).
        force: start over even though ``out_dir`` holds checkpoints (they are deleted).

    Raises:
        TrainError: bad inputs, or a checkpoint from other settings / data on resume.
        HeadError: the head needs token features the embeddings lack.
        DivergenceError: the loss or a gradient became NaN/inf (the last good checkpoint is kept).
    """
    from pairscout.encode.runner import pick_device

    config = config or TrainConfig()
    if text_image_index is None:
        if not isinstance(text, Embeddings):
            raise TrainError("text_image_index is needed with plain caption tensors.", fix="pass each caption's image row.")
        text_image_index = text.row_index
    v = _side(vision, vision_tokens, vision_token_mask, "image")
    t = _side(text, text_tokens, text_token_mask, "caption")
    tii = torch.as_tensor(text_image_index).long().cpu()
    n_img = v.pooled.shape[0]
    if tii.shape != (t.pooled.shape[0],):
        raise TrainError(f"text_image_index has shape {tuple(tii.shape)} for {t.pooled.shape[0]} captions.", fix="give one image row per caption.")
    if len(tii) and (int(tii.min()) < 0 or int(tii.max()) >= n_img):
        raise TrainError(f"text_image_index must lie in [0, {n_img}), got {int(tii.min())}..{int(tii.max())}.", fix="give each caption's image row.")
    batches = _Batches(tii, n_img, config.batch_size, config.seed, config.captions)
    if len(batches.pool) < 2:
        raise TrainError(f"only {len(batches.pool)} image(s) have captions; contrastive training needs >= 2.", fix="use more data.")

    device = pick_device(config.device)
    total = config.total_steps(len(batches.pool))
    v_cfg = config.head_config(v.pooled.shape[1], None if v.tokens is None else int(v.tokens.shape[-1]))
    t_cfg = config.head_config(t.pooled.shape[1], None if t.tokens is None else int(t.tokens.shape[-1]))
    for side, cfg, name in ((v, v_cfg, "image"), (t, t_cfg, "caption")):
        if cfg.needs_tokens and side.tokens is None:
            raise HeadError(f"head {cfg.kind} needs token features but the {name} embeddings have none.",
                            fix="encode with `pairscout encode --tokens` and train with them, or choose --head glu.")  # fmt: skip

    identity = {"config": config.identity(), "data": data_signature(v.pooled, t.pooled, tii, v.tokens, t.tokens), "total_steps": total}
    out = Path(out_dir) if out_dir is not None else None
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is not None and not resume:
        if not force:
            raise TrainError(f"{out} holds checkpoints of an earlier run (step {ckpt.get('step')}).",
                             fix="pass --resume to continue it, --force to start over, or another --out folder.")  # fmt: skip
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
        ckpt = None
    if ckpt is not None:
        diff = _first_difference(ckpt.get("identity", {}).get("config", {}), identity["config"])
        if diff is None and ckpt.get("identity", {}).get("data") != identity["data"]:
            diff = "the training embeddings"
        if diff is None and ckpt.get("identity", {}).get("total_steps") != total:
            diff = f"total steps: {ckpt['identity'].get('total_steps')} there, {total} now"
        if diff is not None:
            raise TrainError(f"the checkpoint in {out / CKPT_DIR} was made with other settings ({diff}).",
                             fix="resume with the same settings, pass --force to start over, or use another --out folder.")  # fmt: skip

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        vision_head, text_head = build_head(v_cfg).to(device), build_head(t_cfg).to(device)
        loss_fn = config.build_loss().to(device)
        modules = [vision_head, text_head, loss_fn]
        opt = _optimizer(config, modules)
        history: list[dict[str, Any]] = []
        start = 0
        timings = {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}
        samples_done = 0
        if ckpt is not None:
            cdir = out / CKPT_DIR
            from safetensors.torch import load_file

            load_head_state(load_file(cdir / ckpt["weights"]), vision_head, text_head, loss_fn)
            state = torch.load(cdir / ckpt["state"], map_location="cpu", weights_only=True)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            history, start = list(state["history"]), int(state["step"])
            timings.update(state.get("timings", {}))
            samples_done = int(state.get("samples", 0))
            log.info("resuming from step %d of %d", start, total)

        fits = True
        if device.type == "cuda":
            need = sum(x.numel() * x.element_size() for x in (v.pooled, t.pooled, v.tokens, t.tokens) if x is not None)
            fits = need < 0.5 * torch.cuda.mem_get_info(device)[0]
        vx, tx = _place(v.pooled, device, fits), _place(t.pooled, device, fits)
        vt, vm = _place(v.tokens, device, fits), _place(v.mask, device, fits)
        tt, tm = _place(t.tokens, device, fits), _place(t.mask, device, fits)
        amp = device.type == "cuda" and config.amp
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        peak = config.peak_lr
        base_lrs = [peak for _ in opt.param_groups]

        def write_log(status: str, metrics: dict[str, float] | None = None) -> None:
            if out is None:
                return
            tr = timings["train"]
            payload = {
                "kind": "pairscout.train", "status": status, "config": config.to_dict(), "total_steps": total,
                "step": step_done, "device": str(device), "samples_per_s": samples_done / tr if tr > 0 else None,
                "timings_s": {k: round(x, 3) for k, x in timings.items()}, "metrics": metrics or {},
                "history": history, "versions": {"torch": torch.__version__},
                "data": {"n_images": n_img, "n_captions": int(t.pooled.shape[0]), "vision_dim": int(v.pooled.shape[1]),
                         "text_dim": int(t.pooled.shape[1]), "signature": identity["data"]},
            }  # fmt: skip
            atomic_write_text(out / LOG_FILE, json.dumps(payload, indent=2, default=str) + "\n")

        def save_checkpoint(step: int) -> None:
            t0 = time.perf_counter()
            cdir = out / CKPT_DIR
            cdir.mkdir(parents=True, exist_ok=True)
            stem = f"step_{step:08d}"
            atomic_save(head_state(vision_head, text_head, loss_fn), cdir / f"{stem}.safetensors")
            atomic_torch_save({
                "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history, "step": step, "timings": timings, "samples": samples_done,
            }, cdir / f"{stem}.pt")  # fmt: skip
            atomic_write_text(cdir / "latest.json", json.dumps(
                {"step": step, "weights": f"{stem}.safetensors", "state": f"{stem}.pt", "identity": identity}, indent=2, default=str))
            old = sorted(cdir.glob("step_*.safetensors"))[: -max(1, config.keep_checkpoints)]
            for p in old:
                p.unlink(missing_ok=True)
                p.with_suffix(".pt").unlink(missing_ok=True)
            timings["checkpoint"] += time.perf_counter() - t0

        def run_eval(step: int) -> dict[str, float]:
            t0 = time.perf_counter()
            m = evaluate(vision_head, text_head, eval_data, device=device)
            history.append({"step": step, "eval": m})
            timings["eval"] += time.perf_counter() - t0
            return m

        step_done = start
        window_t, window_n = time.perf_counter(), 0
        last_loss = float("nan")
        for step in range(start, total):
            t0 = time.perf_counter()
            f = lr_factor(step, total, config)
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * f
            img_idx, cap_idx, cap_row = batches(step)
            xb = _gather(vx, img_idx, device)
            yb = _gather(tx, cap_idx, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                zi = vision_head(xb, _gather(vt, img_idx, device, torch.float32), _gather(vm, img_idx, device))
                zt = text_head(yb, _gather(tt, cap_idx, device, torch.float32), _gather(tm, cap_idx, device))
                loss = loss_fn(zi, zt, None if cap_row is None else cap_row.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip else None
            bad = ~torch.isfinite(loss.detach()) if gnorm is None else ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))
            if bool(bad):
                value = float(loss.detach())
                what = f"the loss became {value}" if not math.isfinite(value) else "a gradient became NaN/inf"
                kept = latest_checkpoint(out) if out is not None else None
                history.append({"step": step + 1, "diverged": True, "loss": value})
                write_log("diverged")
                where = (f"the last good checkpoint (step {kept['step']}) is kept in {out / CKPT_DIR}" if kept
                         else "no checkpoint had been written yet")  # fmt: skip
                raise DivergenceError(f"training diverged at step {step + 1} of {total}: {what}; stopped, {where}.",
                                      fix="lower --lr (e.g. by 3x), keep --grad-clip on, then --resume or --force.")  # fmt: skip
            opt.step()
            last_loss = float(loss.detach())
            step_done = step + 1
            bs = len(img_idx)
            samples_done += bs
            window_n += bs
            timings["train"] += time.perf_counter() - t0
            rate = samples_done / timings["train"] if timings["train"] > 0 else 0.0
            if step_done % max(1, config.log_every) == 0 or step_done == total:
                now = time.perf_counter()
                rec = {"step": step_done, "loss": last_loss, "lr": peak * f, "scale": float(loss_fn.logit_scale.detach().exp()),
                       "samples_per_s": window_n / max(now - window_t, 1e-9)}  # fmt: skip
                if hasattr(loss_fn, "logit_bias"):
                    rec["bias"] = float(loss_fn.logit_bias.detach())
                history.append(rec)
                window_t, window_n = now, 0
            if eval_data is not None and config.eval_every and step_done % config.eval_every == 0 and step_done != total:
                run_eval(step_done)
            if out is not None and config.checkpoint_every and step_done % config.checkpoint_every == 0 and step_done != total:
                save_checkpoint(step_done)
                write_log("running")
            if progress is not None:
                progress(step_done, total, {"loss": last_loss, "lr": peak * f, "samples_per_s": rate})

        metrics = run_eval(total) if eval_data is not None else {}
        if out is not None:
            if start < total or latest_checkpoint(out) is None:
                save_checkpoint(total)
            write_log("finished", metrics)

    rate = samples_done / timings["train"] if timings["train"] > 0 else 0.0
    vision_head.eval()
    text_head.eval()
    return TrainResult(vision_head=vision_head, text_head=text_head, loss_fn=loss_fn, config=config, history=history,
                       metrics=metrics, steps=total, samples_per_s=rate, timings={k: round(x, 3) for k, x in timings.items()},
                       device=str(device), out_dir=out)  # fmt: skip
