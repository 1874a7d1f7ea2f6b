"""The probe's settings (:class:`ProbeSettings`): every default of ``pairscout probe`` lives here (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from pairscout.align.train_config import TrainConfig


@dataclass
class ProbeSettings:
    """The probe's budget and split (the same for every pair)."""

    top_k: int = 5
    bottom_k: int = 2
    middle_k: int = 3
    """Pairs evenly spaced between the top and the bottom ones."""
    steps: int = 300
    """Optimiser steps per pair. About 25 s per pair at 1,000 rows x 1,280-d on 2 CPU cores."""
    batch_size: int = 256
    out_dim: int = 512
    """Probe output dimension (SAIL: 2048)."""
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

    def train_config(self) -> TrainConfig:
        return TrainConfig(head="linear", out_dim=self.out_dim, loss="sigmoid", loss_norm=self.loss_norm, optimizer=self.optimizer,
                           lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, steps=self.steps,
                           seed=self.seed, device=self.device, log_every=max(1, self.steps // 10))  # fmt: skip
