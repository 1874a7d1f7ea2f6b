"""Training checkpoints and the head-state format shared by checkpoints and saved models.

``out_dir/checkpoints/``: ``step_XXXXXXXX.safetensors`` (head and loss weights),
``step_XXXXXXXX.pt`` (optimiser state, RNG state, history) and ``latest.json`` (written last: the
checkpoint it names is complete). Every file is written to a temporary name and moved into place.
A checkpoint made with other settings or other data is refused on resume (:func:`open_checkpoints`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pairscout.errors import TrainError
from pairscout.files import atomic_torch_save, atomic_write_text, first_difference

CKPT_DIR = "checkpoints"
LOG_FILE = "train_log.json"
SIDES = ("vision", "text", "loss")


def head_state(vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module | None = None) -> dict[str, Tensor]:
    """One flat tensor dict (``vision.*``, ``text.*`` and, when given, ``loss.*``) for a safetensors file."""
    out: dict[str, Tensor] = {}
    for prefix, m in zip(SIDES, (vision_head, text_head, loss_fn), strict=True):
        if m is None:
            continue
        for k, v in m.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    return out


def load_head_state(state: dict[str, Tensor], vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module | None = None) -> None:
    """Load what :func:`head_state` wrote into the given modules (``loss_fn`` None: its entries are ignored)."""
    for prefix, m in zip(SIDES, (vision_head, text_head, loss_fn), strict=True):
        if m is None:
            continue
        m.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})


def save_heads(path: Path, vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module | None = None) -> None:
    from pairscout.embeddings.cache import atomic_save

    atomic_save(head_state(vision_head, text_head, loss_fn), path)


def latest_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    p = Path(out_dir) / CKPT_DIR / "latest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TrainError(f"{p} is unreadable.", fix="delete the checkpoints folder, or pass --force to start over.") from None


def open_checkpoints(out: Path | None, identity: dict[str, Any], *, resume: bool, force: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh). Without ``resume``, existing checkpoints are
    refused unless ``force`` (then deleted); with it, one made with other settings or data is refused."""
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is not None and not resume:
        if not force:
            raise TrainError(f"{out} holds checkpoints of an earlier run (step {ckpt.get('step')}).",
                             fix="pass --resume to continue it, --force to start over, or another --out folder.")  # fmt: skip
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
        return None
    if ckpt is not None:
        old = ckpt.get("identity", {})
        diff = first_difference(old.get("config", {}), identity["config"])
        if diff is None and old.get("data") != identity["data"]:
            diff = "the training embeddings"
        if diff is None and old.get("total_steps") != identity["total_steps"]:
            diff = f"total steps: {old.get('total_steps')} there, {identity['total_steps']} now"
        if diff is not None:
            raise TrainError(f"the checkpoint in {out / CKPT_DIR} was made with other settings ({diff}).",
                             fix="resume with the same settings, pass --force to start over, or use another --out folder.")  # fmt: skip
    return ckpt


def save_checkpoint(out: Path, step: int, modules: list[nn.Module], opt: torch.optim.Optimizer, device: torch.device,
                    state: dict[str, Any], identity: dict[str, Any], keep: int = 1) -> None:
    """Write checkpoint ``step`` (heads + loss weights, optimiser and RNG state, ``state``), then ``latest.json``;
    keep the newest ``keep`` checkpoints."""
    cdir = out / CKPT_DIR
    cdir.mkdir(parents=True, exist_ok=True)
    stem = f"step_{step:08d}"
    save_heads(cdir / f"{stem}.safetensors", *modules)
    atomic_torch_save({
        "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "step": step, **state,
    }, cdir / f"{stem}.pt")  # fmt: skip
    atomic_write_text(cdir / "latest.json", json.dumps(
        {"step": step, "weights": f"{stem}.safetensors", "state": f"{stem}.pt", "identity": identity}, indent=2, default=str))
    for p in sorted(cdir.glob("step_*.safetensors"))[: -max(1, keep)]:
        p.unlink(missing_ok=True)
        p.with_suffix(".pt").unlink(missing_ok=True)


def restore_checkpoint(out: Path, ckpt: dict[str, Any], modules: list[nn.Module], opt: torch.optim.Optimizer,
                       device: torch.device) -> dict[str, Any]:
    """Load a checkpoint into the modules and the optimiser, restore the RNG; return its saved state dict."""
    from safetensors.torch import load_file

    cdir = out / CKPT_DIR
    try:
        load_head_state(load_file(cdir / ckpt["weights"]), *modules)
        state = torch.load(cdir / ckpt["state"], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file: safetensors, pickle, zip errors alike
        raise TrainError(f"the checkpoint in {cdir} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:160]}).",
                         fix="delete that checkpoints folder, or pass --force to start over.") from None
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state
