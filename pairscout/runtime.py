"""The runtime policy, in one place: which device a command runs on, how many loader workers, and which
precision the large metric products use there.

Every stage takes the user's ``--device`` through :func:`pick_device` (encode, rank's metrics, probe, align,
zero-shot), so one spelling means the same everywhere: ``auto`` (the default: this process's GPU under
torchrun, else cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else is a one-line error
naming the choices. torch.distributed helpers live in :mod:`pairscout.distributed`.
"""

from __future__ import annotations

import os

import torch

from pairscout import distributed
from pairscout.errors import PairscoutError

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device ``requested`` names (None or ``"auto"``: this process's GPU under torchrun, else the best
    available: cuda > mps > cpu).

    Raises:
        PairscoutError: not a device name, an unsupported type, or a CUDA / MPS device that is not there.
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    local = distributed.local_device()
    if local is not None and requested in (None, "auto", "cuda"):
        return local  # one GPU per process under torchrun
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError, TypeError):
            raise PairscoutError(f"device {requested!r} is not a device name.", fix=f"pass --device {DEVICES}.") from None
        if dev.type not in ("cpu", "cuda", "mps"):
            raise PairscoutError(f"device {requested!r} is not supported.", fix=f"pass --device {DEVICES}.")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PairscoutError(f"device {requested!r} was asked for but CUDA is not available.",
                                     fix="pass --device cpu or auto.")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise PairscoutError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s).",
                                     fix=f"pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise PairscoutError(f"device {requested!r} was asked for but MPS is not available.", fix="pass --device cpu or auto.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_workers() -> int:
    """Image-loading processes: CPU count - 1, at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n - 1))


def metric_precision(device: torch.device) -> str:
    """Precision of the large CKA products on ``device``: ``float32`` on GPUs (float64 reductions; error
    <= 1e-5, tested) where float64 products are far slower, exact ``float64`` on CPU (2x, and the metrics
    phase is not the cost there)."""
    return "float32" if device.type in ("cuda", "mps") else "float64"


def resolve_precision(asked: str | None, device: torch.device) -> str:
    """The CKA products' precision for a setting (``auto``/None: :func:`metric_precision` on ``device``). ``tf32`` exists
    on CUDA tensor cores only: elsewhere the products are plain float32, and that is what is used and recorded."""
    if asked in (None, "auto"):
        return metric_precision(device)
    return "float32" if asked == "tf32" and device.type != "cuda" else asked
