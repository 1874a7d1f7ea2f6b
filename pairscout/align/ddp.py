"""Data-parallel head training under ``torchrun`` (torch.distributed): what :func:`~pairscout.align.train.train`
does differently when the process group has W > 1 ranks.

- The batch is the GLOBAL batch: every rank draws the same global batch ``s`` (a pure function of the seed and
  ``s``, :class:`~pairscout.align.batches.Batches`) and takes its contiguous slice of ``B / W`` images (and their
  captions); a batch not divisible by W is refused.
- The heads and the loss's scale and bias are wrapped in one :class:`torch.nn.parallel.DistributedDataParallel`
  module (gradients averaged over ranks during backward); the loss is computed across ranks
  (:mod:`pairscout.align.dist_loss`: the sigmoid loss by passing caption features round a ring, InfoNCE by an
  all-gather with gradient), on a process group of its own so its point-to-point traffic never interleaves with
  DDP's gradient all-reduce.
- A W-process step therefore equals a one-process step on the same global batch, up to float rounding
  (``tests/test_ddp.py``: loss and weights to 1e-6 after several AdamW steps).
- Head dropout (``head_options={"dropout": p}``, API only) draws its masks from one generator per rank, so with
  p > 0 the masks are independent between ranks and the run is not the 1-process run's draw.
- Rank 0 alone writes checkpoints and the log and runs the evaluation; its metrics are broadcast, so every
  rank returns the same :class:`~pairscout.align.train_config.TrainResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pairscout import distributed
from pairscout.align.dist_loss import infonce_across_ranks, sigmoid_across_ranks
from pairscout.align.losses import SigmoidLoss
from pairscout.errors import PairscoutError, TrainError

T = TypeVar("T")


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its :class:`PairscoutError`) to every rank, so all ranks
    go on, or all raise, together. Without a process group it is just ``fn()``."""
    if not distributed.is_distributed():
        return fn()
    box: list[Any] = [None]
    if distributed.is_main():
        try:
            box[0] = ("ok", fn())
        except PairscoutError as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


_GROUPS: dict[tuple[int, str, str | None], Any] = {}


def _group(purpose: str, backend: str | None = None):
    """A process group of all ranks (made once per default group and backend: every probe of a ``probe`` run
    reuses it). The loss's traffic gets one of its own, apart from DDP's all-reduce; ``backend="gloo"`` serves
    CPU tensors where the default group is NCCL (``--device cpu`` on a GPU machine)."""
    key = (id(dist.group.WORLD), purpose, backend)
    if key not in _GROUPS:
        if any(k[0] != key[0] for k in _GROUPS):
            _GROUPS.clear()
        _GROUPS[key] = dist.new_group(backend=backend)
    return _GROUPS[key]


class _Heads(nn.Module):
    """The trained modules as one module for DDP: forward runs both heads, the loss holds scale and bias."""

    def __init__(self, vision: nn.Module, text: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.vision, self.text, self.loss = vision, text, loss

    def forward(self, xb, xt, xm, yb, yt, ym):  # noqa: D102
        return self.vision(xb, xt, xm), self.text(yb, yt, ym)


class DataParallel:
    """Rank ``rank`` of ``world``: slices global batches, runs the DDP-wrapped heads and the cross-rank loss.

    Args:
        batch: the global batch (images per step, after clipping to the images there are).
        asked: the batch the user asked for (named in the error when it was clipped).
        vision_head, text_head, loss_fn: the modules (already on ``device``).
        key_of, key_inc: caption -> key and image x key incidence when identical captions are positives
            (None: a caption's positive is its own image only).
        seed, start: the run's seed and first step (seed this rank's dropout stream).
    """

    def __init__(self, batch: int, asked: int, vision_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module,
                 device: torch.device, key_of: Tensor | None = None, key_inc: Tensor | None = None, seed: int = 0,
                 start: int = 0) -> None:  # fmt: skip
        self.rank, self.world = distributed.rank_world()
        if batch % self.world:
            clipped = f" (--batch-size {asked} clipped to the {batch} images there are)" if batch != asked else ""
            raise TrainError(f"the batch of {batch} images{clipped} does not split over the {self.world} processes of this torchrun "
                             "(--batch-size is the global batch; each process takes batch / processes).",
                             fix=f"pass --batch-size a multiple of {self.world}, e.g. {max(self.world, batch - batch % self.world)}.")  # fmt: skip
        self.local = batch // self.world
        self.device = device
        self.key_of, self.key_inc = key_of, key_inc
        cpu_on_nccl = device.type != "cuda" and dist.get_backend() != "gloo"
        self.group = _group("loss", "gloo" if cpu_on_nccl else None)
        grads = _group("grads", "gloo") if cpu_on_nccl else None  # None: the default group
        ids = [device.index] if device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(_Heads(vision_head, text_head, loss_fn), device_ids=ids, process_group=grads)
        self.loss_fn = loss_fn
        # the only draws of the global generator in a step are head dropout masks: one stream per rank, so the
        # ranks' masks are independent (with dropout > 0 a W-process run is not the 1-process run's draw)
        torch.manual_seed(seed * 1_000_003 + start * 1_009 + self.rank)

    def slice(self, img_idx: Tensor, cap_idx: Tensor, cap_row: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """This rank's images of the global batch (a contiguous slice) and their captions (rows renumbered)."""
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        if cap_row is None:
            return img_idx[lo:hi], cap_idx[lo:hi], None
        keep = (cap_row >= lo) & (cap_row < hi)
        return img_idx[lo:hi], cap_idx[keep], cap_row[keep] - lo

    def positives(self, img_ids: Tensor, cap_ids: Tensor) -> Tensor:
        """Positive mask of global image rows x caption ids (caption keys, or the caption's image row)."""
        if self.key_inc is None:
            return img_ids[:, None] == cap_ids[None, :]
        return self.key_inc[img_ids.cpu()][:, cap_ids.cpu()].to(img_ids.device)

    def loss(self, zi: Tensor, zt: Tensor, img_idx: Tensor, cap_idx: Tensor, cap_row: Tensor | None) -> Tensor:
        """This rank's share of the global loss (``W x`` its blocks / the global normaliser)."""
        img_ids = img_idx.to(self.device)
        if self.key_of is not None:
            cap_ids = self.key_of[cap_idx].to(self.device)
        else:
            cap_ids = img_ids if cap_row is None else img_ids[cap_row.to(self.device)]
        fn = sigmoid_across_ranks if isinstance(self.loss_fn, SigmoidLoss) else infonce_across_ranks
        return fn(self.loss_fn, zi, zt, img_ids, cap_ids, self.positives, self.group)

    def mean(self, x: Tensor) -> Tensor:
        """Mean over ranks (the global loss from the ranks' shares)."""
        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x / self.world
