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

The pieces live beside this module: :mod:`.train_config` (settings, result, optimiser, schedule),
:mod:`.batches` (inputs and batches), :mod:`.checkpoints` (files). Checkpoints go to ``out_dir/checkpoints/``.
``resume=True`` continues from the latest checkpoint and reproduces the uninterrupted run; a
checkpoint made with other settings or other data is refused. A NaN/inf loss or gradient stops the
run before the optimiser step, keeps the last good checkpoint, and raises :class:`DivergenceError`.

``out_dir/train_log.json`` holds the config, the history (loss, lr, scale, samples/s, evaluations),
timings and versions.

Under ``torchrun`` (W > 1 processes) the heads train data-parallel (:mod:`.ddp`): ``batch_size`` stays the
GLOBAL batch, each rank takes its B / W slice of every global batch, the heads and the loss's scale and bias are
wrapped in DistributedDataParallel and the loss runs across ranks (:mod:`.dist_loss`: the sigmoid loss passes
caption features round a ring, no rank holds the B x B logits). A W-process run equals a one-process run on the
same global batch up to float rounding; rank 0 alone writes checkpoints and the log and evaluates.

Example:
    >>> import torch
    >>> x = torch.randn(256, 32); y = x @ torch.linalg.qr(torch.randn(32, 32))[0]
    >>> res = train(x, y, torch.arange(256), TrainConfig(head="linear", out_dim=32, steps=50, batch_size=64))
    >>> res.history[-1]["loss"] < res.history[0]["loss"]
    True
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pairscout.align.batches import Batches, data_signature, gather, place, side
from pairscout.align.checkpoints import (
    CKPT_DIR,
    LOG_FILE,
    head_state,
    latest_checkpoint,
    load_head_state,
    open_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from pairscout.align.evaluate import EvalSet, evaluate
from pairscout.align.heads import build_head
from pairscout.align.train_config import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    OPTIMIZERS,
    TrainConfig,
    TrainResult,
    build_optimizer,
    lr_factor,
)
from pairscout.embeddings.cache import Embeddings
from pairscout.errors import DivergenceError, HeadError, TrainError
from pairscout.files import atomic_write_text
from pairscout.provenance import versions

__all__ = [
    "CKPT_DIR", "DEFAULT_LR", "DEFAULT_STEPS", "LOG_FILE", "OPTIMIZERS", "DivergenceError", "TrainConfig", "TrainError",
    "TrainResult", "data_signature", "head_state", "latest_checkpoint", "load_head_state", "lr_factor", "train",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total_steps, info)``; ``info`` has ``loss``, ``lr``, ``samples_per_s``. Called after every step."""


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
    caption_keys: Tensor | None = None,
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
        caption_keys: (M,) optional key per caption (caption-text id, or class label for class-level training):
            an image and a caption are positives when the caption's key is the key of any caption of the image,
            so identical captions of other images are never negatives.

    Raises:
        TrainError: bad inputs, or a checkpoint from other settings / data on resume.
        HeadError: the head needs token features the embeddings lack.
        DivergenceError: the loss or a gradient became NaN/inf (the last good checkpoint is kept).
    """
    from pairscout.runtime import pick_device

    config = config or TrainConfig()
    if text_image_index is None:
        if not isinstance(text, Embeddings):
            raise TrainError("text_image_index is needed with plain caption tensors.", fix="pass each caption's image row.")
        text_image_index = text.row_index
    v = side(vision, vision_tokens, vision_token_mask, "image")
    t = side(text, text_tokens, text_token_mask, "caption")
    tii = torch.as_tensor(text_image_index).long().cpu()
    n_img = v.pooled.shape[0]
    if tii.shape != (t.pooled.shape[0],):
        raise TrainError(f"text_image_index has shape {tuple(tii.shape)} for {t.pooled.shape[0]} captions.", fix="give one image row per caption.")
    if len(tii) and (int(tii.min()) < 0 or int(tii.max()) >= n_img):
        raise TrainError(f"text_image_index must lie in [0, {n_img}), got {int(tii.min())}..{int(tii.max())}.", fix="give each caption's image row.")
    batches = Batches(tii, n_img, config.batch_size, config.seed, config.captions)
    key_of, key_inc = None, None
    if caption_keys is not None:  # image x key incidence: positives of a batch are inc[images][:, keys[captions]]
        key_of = torch.unique(torch.as_tensor(caption_keys).long().cpu(), return_inverse=True)[1]
        key_inc = torch.zeros(n_img, int(key_of.max()) + 1, dtype=torch.bool)
        key_inc[tii, key_of] = True
    if len(batches.pool) < 2:
        raise TrainError(f"only {len(batches.pool)} image(s) have captions; contrastive training needs >= 2.", fix="use more data.")

    device = pick_device(config.device)
    total = config.total_steps(len(batches.pool))
    v_cfg = config.head_config(v.pooled.shape[1], None if v.tokens is None else int(v.tokens.shape[-1]))
    t_cfg = config.head_config(t.pooled.shape[1], None if t.tokens is None else int(t.tokens.shape[-1]))
    for s, cfg, name in ((v, v_cfg, "image"), (t, t_cfg, "caption")):
        if cfg.needs_tokens and s.tokens is None:
            raise HeadError(f"head {cfg.kind} needs token features but the {name} embeddings have none.",
                            fix="encode with `pairscout encode --tokens` and train with them, or choose --head glu.")  # fmt: skip

    identity = {"config": config.identity(), "data": data_signature(v.pooled, t.pooled, tii, v.tokens, t.tokens), "total_steps": total}
    out = Path(out_dir) if out_dir is not None else None
    from pairscout import distributed
    from pairscout.align.ddp import on_main

    world = distributed.rank_world()[1]
    ckpt = on_main(lambda: open_checkpoints(out, identity, resume=resume, force=force))  # rank 0 decides, all follow

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        vision_head, text_head = build_head(v_cfg).to(device), build_head(t_cfg).to(device)
        loss_fn = config.build_loss().to(device)
        modules = [vision_head, text_head, loss_fn]
        opt = build_optimizer(config, modules)
        history: list[dict[str, Any]] = []
        start = 0
        timings = {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}
        samples_done = 0
        if ckpt is not None:
            state = restore_checkpoint(out, ckpt, modules, opt, device)
            history, start = list(state["history"]), int(state["step"])
            timings.update(state.get("timings", {}))
            samples_done = int(state.get("samples", 0))
            log.info("resuming from step %d of %d", start, total)
        par = None
        if world > 1:  # torchrun: data-parallel heads, the loss across ranks, rank 0 alone writes (pairscout.align.ddp)
            from pairscout.align.ddp import DataParallel

            par = DataParallel(batches.bs, config.batch_size, vision_head, text_head, loss_fn, device, key_of, key_inc, config.seed, start)
            out = out if distributed.is_main() else None

        fits = True
        if device.type == "cuda":
            need = sum(x.numel() * x.element_size() for x in (v.pooled, t.pooled, v.tokens, t.tokens) if x is not None)
            fits = need < 0.5 * torch.cuda.mem_get_info(device)[0]
        vx, tx = place(v.pooled, device, fits), place(t.pooled, device, fits)
        vt, vm = place(v.tokens, device, fits), place(v.mask, device, fits)
        tt, tm = place(t.tokens, device, fits), place(t.mask, device, fits)
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
                "history": history, "versions": versions(("torch",)),
                "data": {"n_images": n_img, "n_captions": int(t.pooled.shape[0]), "vision_dim": int(v.pooled.shape[1]),
                         "text_dim": int(t.pooled.shape[1]), "signature": identity["data"]},
            }  # fmt: skip
            atomic_write_text(out / LOG_FILE, json.dumps(payload, indent=2, default=str) + "\n")

        def checkpoint(step: int) -> None:
            t0 = time.perf_counter()
            save_checkpoint(out, step, modules, opt, device, {"history": history, "timings": timings, "samples": samples_done},
                            identity, config.keep_checkpoints)  # fmt: skip
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
            if par is not None:
                img_idx, cap_idx, cap_row = par.slice(img_idx, cap_idx, cap_row)
            xb = gather(vx, img_idx, device)
            yb = gather(tx, cap_idx, device)
            xt, xm = gather(vt, img_idx, device, torch.float32), gather(vm, img_idx, device)
            yt, ym = gather(tt, cap_idx, device, torch.float32), gather(tm, cap_idx, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                if par is None:
                    zi, zt = vision_head(xb, xt, xm), text_head(yb, yt, ym)
                    pos = None if key_inc is None else key_inc[img_idx][:, key_of[cap_idx]].to(device)
                    loss = loss_fn(zi, zt, None if cap_row is None else cap_row.to(device), **({} if pos is None else {"pos_mask": pos}))
                else:
                    zi, zt = par.model(xb, xt, xm, yb, yt, ym)
                    loss = par.loss(zi, zt, img_idx, cap_idx, cap_row)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.detach() if par is None else par.mean(loss)  # the global loss on every rank
            gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip else None
            bad = ~torch.isfinite(loss_value) if gnorm is None else ~(torch.isfinite(loss_value) & torch.isfinite(gnorm))
            if bool(bad):
                value = float(loss_value)
                what = f"the loss became {value}" if not math.isfinite(value) else "a gradient became NaN/inf"
                kept = latest_checkpoint(out) if out is not None else None
                history.append({"step": step + 1, "diverged": True, "loss": value})
                write_log("diverged")
                where = (f"the last good checkpoint (step {kept['step']}) is kept in {out / CKPT_DIR}" if kept
                         else "no checkpoint had been written yet")  # fmt: skip
                raise DivergenceError(f"training diverged at step {step + 1} of {total}: {what}; stopped, {where}.",
                                      fix="lower --lr (e.g. by 3x), keep --grad-clip on, then --resume or --force." if out is not None
                                      else "lower --lr (e.g. by 3x) and run again.")  # fmt: skip  # without a folder (probe): no --resume
            opt.step()
            last_loss = float(loss_value)
            step_done = step + 1
            bs = len(img_idx) * world
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
            if eval_data is not None and config.eval_every and step_done % config.eval_every == 0 and step_done != total and distributed.is_main():
                run_eval(step_done)
            if out is not None and config.checkpoint_every and step_done % config.checkpoint_every == 0 and step_done != total:
                checkpoint(step_done)
                write_log("running")
            if progress is not None:
                progress(step_done, total, {"loss": last_loss, "lr": peak * f, "samples_per_s": rate})

        metrics = on_main(lambda: run_eval(total)) if eval_data is not None else {}  # once, on rank 0
        if out is not None:
            if start < total or latest_checkpoint(out) is None:
                checkpoint(total)
            write_log("finished", metrics)

    rate = samples_done / timings["train"] if timings["train"] > 0 else 0.0
    vision_head.eval()
    text_head.eval()
    return TrainResult(vision_head=vision_head, text_head=text_head, loss_fn=loss_fn, config=config, history=history,
                       metrics=metrics, steps=total, samples_per_s=rate, timings={k: round(x, 3) for k, x in timings.items()},
                       device=str(device), out_dir=out)  # fmt: skip
