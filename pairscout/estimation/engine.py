"""Where and how ``rank`` computes its metrics: the device, the CKA products' precision and, under ``torchrun``,
this process's shard of the rows.

One process: the embeddings live on :func:`pairscout.runtime.pick_device` of the user's ``--device`` and every
metric, jackknife replicate, null and the verdict run there (results come back as small CPU arrays).

``torchrun --nproc_per_node W ... rank`` (world W > 1): rank r keeps the contiguous rows
``[r n // W, (r + 1) n // W)`` of every model (the encoding is divided by chunks as in ``encode``; each process
still reads every cached entry whole once, then drops all but its rows). Sharded (each rank touches only its rows plus one received chunk
of another rank's block at a time, sums all-reduced; :mod:`pairscout.metrics.sharded`,
:mod:`pairscout.metrics.sharded_rows`):

* the value of every CKA metric (linear, RBF, biased, debiased) and of mutual k-NN / CKNNA;
* the delete-a-group jackknife replicates behind the intervals and the verdict's paired test (each replicate is
  the same sharded computation on the kept rows of every shard);
* the nulls of mutual k-NN (closed form) and CKNNA (permutations): they need only the neighbour lists, found
  sharded and gathered (O(n k) per model);
* the closed-form null moments of every CKA metric (per-model sums over rows, all-reduced; RBF shares the n row
  means of its Gram matrix between two passes over the blocks: O(n) numbers, no features);
* the verdict's near-duplicate check (screen on at most 512 gathered rows, then sharded linear CKA);
* a layer sweep (``--layers``): its selection rows (at most ``layer_rows`` per view) are gathered and every
  process runs the same sweep; the metrics then run sharded over the estimation rows, each process keeping its
  own (:func:`pairscout.ranking.layered.choose`).

Gathered, one model at a time (that model's rows on every rank, O(n d_k) memory, the single-process code and
numbers, the work repeated on every rank rather than divided): the unimodal scores (k-NN accuracy, k-means).
Measures other than the CKA family and the neighbour metrics (SVCCA, ...) gather every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Engine:
    """The metrics' device and precision, and the rows ``[lo, hi)`` of ``n`` this process holds: the ``engine`` that
    :func:`pairscout.metrics.pair_metric` takes (sharded: it runs each measure's sharded form)."""

    device: torch.device
    precision: str = "float64"
    n: int = 0
    lo: int = 0
    hi: int = 0
    world: int = 1

    @classmethod
    def for_run(cls, device: str | torch.device | None, precision: str | None, n: int) -> Engine:
        """This process's engine, resolved once: the device the user asked for (:func:`pairscout.runtime.pick_device`),
        the products' precision for it (``auto``: :func:`pairscout.runtime.metric_precision`), and the rows split in
        contiguous shards when torch.distributed runs > 1 process."""
        from pairscout import distributed, runtime

        dev = runtime.pick_device(device)
        rank, world = distributed.rank_world()
        return cls(dev, runtime.resolve_precision(precision, dev), n, rank * n // world, (rank + 1) * n // world, world)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def local(self, z: torch.Tensor) -> torch.Tensor:
        """This process's rows of a full (n, d) matrix, on the device."""
        return z[self.lo:self.hi].to(self.device) if self.sharded else z.to(self.device)

    def full(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every row of each (sharded) matrix, on every rank (the parts that are not sharded read these)."""
        if not self.sharded:
            return list(zs)
        from pairscout.metrics.sharded_rows import gather_all, shard_counts

        counts = shard_counts(zs[0].shape[0], self.device)
        return [gather_all(z, counts) for z in zs]


def plain(device: torch.device | None = None, n: int = 0) -> Engine:
    """One process, the given device (CPU by default): what the API functions use when given no engine."""
    return Engine(device or torch.device("cpu"), "float64", n, 0, n, 1)
