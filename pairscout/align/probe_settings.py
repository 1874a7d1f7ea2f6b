"""The probe's settings (:class:`ProbeSettings`): every default of ``pairscout probe`` lives here (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from pairscout.align.train_config import TrainConfig


@dataclass
class ProbeSettings:
    """The probe's budget and split (the same for every pair)."""

    top_k: int | None = None
    """Probe the K best-ranked pairs (with ``bottom_k`` / ``middle_k``); None: as many pairs as ``budget`` allows."""
    bottom_k: int | None = None
    middle_k: int | None = None
    """Pairs evenly spaced between the top and the bottom ones."""
    all_pairs: bool = False
    """Probe every pair of the run (``--pairs all``), whatever the budget."""
    budget: int = 12_600
    """Pair-steps (pairs x ``steps``) the default selection may spend: 12,600 = 42 pairs x 300 steps (every pair of a 7 x 6
    zoo). The pairs train fused (:mod:`pairscout.align.fused`) at ``out_dim`` 128, so this costs less wall time than 10 pairs
    one by one at 512 did (``benchmarks/results/probe_fused.md``)."""
    steps: int = 300
    """Optimiser steps per pair (the same for every pair)."""
    curve: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    """Fractions of ``steps`` after which the held-out loss is read (the learning curve and its area)."""
    bootstrap: int = 400
    """Paired bootstrap resamplings of the held-out images (separation of the read-outs, regret intervals)."""
    batch_size: int = 256
    out_dim: int = 128
    """Probe output dimension (SAIL: 2048). 128 (was 512) makes a pair-step about 4x cheaper, so that every pair of the demo
    trains fused in less time than 10 pairs did one by one (``benchmarks/results/probe_fused.md``)."""
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-7
    """SAIL's probing weight decay."""
    loss_norm: str = "batch"
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    target: str | None = None
    """Read-out the metrics are correlated with; None: chosen from the data (``pairscout.align.probe.choose_readout``)."""
    class_level: bool = False
    """Train with every caption of the same class as a positive (identical captions always are)."""

    def __post_init__(self) -> None:
        from pairscout.bounds import check_fields

        check_fields(self)  # every numeric setting against its declared range (pairscout.bounds)

    def curve_steps(self) -> list[int]:
        """The steps (1..steps) the held-out loss is read at."""
        return sorted({max(1, min(self.steps, round(f * self.steps))) for f in self.curve})

    def train_config(self) -> TrainConfig:
        return TrainConfig(head="linear", out_dim=self.out_dim, loss="sigmoid", loss_norm=self.loss_norm, optimizer=self.optimizer,
                           lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, steps=self.steps,
                           seed=self.seed, device=self.device, log_every=max(1, self.steps // 10))  # fmt: skip
