"""torch.distributed helpers: pairscout runs under ``torchrun`` without code of its own for it.

``torchrun --nproc_per_node 4 -m pairscout.cli encode ...`` starts one process per GPU; each takes
every ``world``-th unfinished chunk of a model's rows and writes it to the shared cache, rank 0 merges
the chunks into the cache entry. ``torchrun ... -m pairscout rank`` then keeps a contiguous 1/world of the rows
per process and computes the metrics from all-reduced statistics (:mod:`pairscout.estimation.engine`,
:mod:`pairscout.metrics.sharded`, :mod:`pairscout.metrics.sharded_rows`). Outside torchrun every helper here is a
no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device() -> torch.device | None:
    """This process's GPU under torchrun (``cuda:LOCAL_RANK``), else None."""
    if is_distributed() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    return None


def shutdown(clean: bool = True) -> None:
    """Leave the process group: after a clean end every process first waits for the others (a barrier), so
    none tears down its connections while a peer still sends (gloo aborts a process whose peer vanished
    mid-transfer); after an error only the local group is destroyed. A no-op outside a process group."""
    if not is_distributed():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); NCCL on GPUs, gloo on CPUs."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
