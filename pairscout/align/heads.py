"""Alignment heads: small projectors trained on frozen, pre-encoded embeddings.

A head is described by a :class:`HeadConfig` (saved as JSON next to its weights with ``to_dict()``) and
built by :func:`build_head`. Every head has the same call::

    head(pooled (B, in_dim), tokens (B, T, token_dim) | None = None, token_mask (B, T) bool | None = None)
        -> (B, out_dim), NOT normalised (the loss normalises)

``token_mask`` is True for real tokens and False for padding (the Hugging Face ``attention_mask``
convention; 0/1 ints are accepted). Heads other than ``local_global`` ignore ``tokens``.

Kinds (science.md section 4):

- ``linear``: one Linear (SAIL's linear probe). Params: in*out + out.
- ``mlp``: LayerNorm -> Linear(in, mlp_hidden) -> GELU -> Dropout -> Linear(mlp_hidden, out).
  Params: 2*in + in*h + h + h*out + out, with h = mlp_hidden (default 4 * in_dim).
- ``glu``: SAIL's "star" layer, LayerNorm -> g(ReLU6(f1 x) * f2 x), f1, f2: in -> h, g: h -> out, with
  h = hidden_mult * in_dim (SAIL: 8). Params: 2*in + 2*(in*h + h) + h*out + out.
- ``local_global`` (freeze-align): a global projector (the ``mlp`` above) on the pooled feature plus a
  local projector on the token features (a token-wise LayerNorm -> Linear -> GELU -> Linear to out_dim,
  then a masked mean over tokens), combined residually: ``out = global(pooled) + local(tokens)``.
  Needs token features (``pairscout encode --tokens``).

Examples:
    >>> import torch
    >>> head = build_head(HeadConfig(kind="glu", in_dim=384, out_dim=512))
    >>> head(torch.randn(4, 384)).shape
    torch.Size([4, 512])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch.nn.functional as F
from torch import Tensor, nn

from pairscout.errors import HeadError
from pairscout.tensors import masked_mean

__all__ = [
    "HEAD_KINDS",
    "GLUHead",
    "HeadConfig",
    "HeadError",
    "LinearHead",
    "LocalGlobalHead",
    "MLPHead",
    "build_head",
    "masked_mean",
]

HEAD_KINDS = ("linear", "mlp", "glu", "local_global")


@dataclass
class HeadConfig:
    """Everything needed to rebuild a head; saved next to its weights.

    Attributes:
        kind: "linear" | "mlp" | "glu" | "local_global".
        in_dim: dimension of the pooled embedding the head reads.
        out_dim: dimension of the shared space (SAIL: 1024 for GLU, 2048 for probes).
        hidden_mult: GLU hidden width as a multiple of in_dim (SAIL: 8).
        mlp_hidden: hidden width of the MLP (mlp, and local_global's global and local branches);
            None means 4 * the branch's input dim.
        dropout: dropout before the last Linear (mlp, glu, local_global) or on the input (linear).
        token_dim: dimension of token features (local_global); None means in_dim.
    """

    kind: str = "linear"
    in_dim: int = 0
    out_dim: int = 1024
    hidden_mult: int = 8
    mlp_hidden: int | None = None
    dropout: float = 0.0
    token_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise HeadError(f"head kind {self.kind!r} is unknown", fix=f"use one of {', '.join(HEAD_KINDS)}")
        for name in ("in_dim", "out_dim", "hidden_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise HeadError(
                    f"head {name}={value!r} must be a positive int", fix=f"set {name} in the head config"
                )
        for name in ("mlp_hidden", "token_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise HeadError(
                    f"head {name}={value!r} must be a positive int or null", fix=f"set {name} or drop it"
                )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise HeadError(f"head dropout={self.dropout!r} must lie in [0, 1)", fix="use e.g. 0.0 or 0.1")

    @property
    def needs_tokens(self) -> bool:
        """True when the head reads token features (encode with ``--tokens``)."""
        return self.kind == "local_global"

    @property
    def resolved_token_dim(self) -> int:
        return self.token_dim if self.token_dim is not None else self.in_dim

    def hidden_for(self, dim: int) -> int:
        """MLP hidden width for a branch reading ``dim``-dimensional features."""
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HeadError(
                f"head config has unknown keys {unknown}", fix=f"keep only {', '.join(sorted(known))}"
            )
        return cls(**data)


class _Head(nn.Module):
    config: HeadConfig

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config

    def _check(self, pooled: Tensor) -> None:
        if pooled.ndim != 2 or pooled.shape[1] != self.config.in_dim:
            raise ValueError(
                f"{self.config.kind} head expects pooled (B, {self.config.in_dim}), got {tuple(pooled.shape)}"
            )


class LinearHead(_Head):
    """One Linear layer (linear probe)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        self.drop = nn.Dropout(config.dropout)
        self.proj = nn.Linear(config.in_dim, config.out_dim)

    def forward(
        self, pooled: Tensor, tokens: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Tensor:
        self._check(pooled)
        return self.proj(self.drop(pooled))


class _MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear, applied on the last axis."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))


class MLPHead(_Head):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        self.mlp = _MLP(config.in_dim, config.hidden_for(config.in_dim), config.out_dim, config.dropout)

    def forward(
        self, pooled: Tensor, tokens: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Tensor:
        self._check(pooled)
        return self.mlp(pooled)


class GLUHead(_Head):
    """SAIL's star layer: LayerNorm -> g(ReLU6(f1 x) * f2 x), hidden width hidden_mult * in_dim."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_mult * config.in_dim
        self.norm = nn.LayerNorm(config.in_dim)
        self.f1 = nn.Linear(config.in_dim, hidden)
        self.f2 = nn.Linear(config.in_dim, hidden)
        self.drop = nn.Dropout(config.dropout)
        self.g = nn.Linear(hidden, config.out_dim)

    def forward(
        self, pooled: Tensor, tokens: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Tensor:
        self._check(pooled)
        x = self.norm(pooled)
        return self.g(self.drop(F.relu6(self.f1(x)) * self.f2(x)))


class LocalGlobalHead(_Head):
    """freeze-align's projector: global MLP on the pooled feature + masked mean of a token-wise MLP."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        tok = config.resolved_token_dim
        self.global_proj = _MLP(
            config.in_dim, config.hidden_for(config.in_dim), config.out_dim, config.dropout
        )
        self.local_proj = _MLP(tok, config.hidden_for(tok), config.out_dim, config.dropout)

    def forward(
        self, pooled: Tensor, tokens: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Tensor:
        self._check(pooled)
        if tokens is None:
            raise HeadError(
                "head local_global needs token features", fix="encode with `pairscout encode --tokens`"
            )
        tok = self.config.resolved_token_dim
        if tokens.ndim != 3 or tokens.shape[0] != pooled.shape[0] or tokens.shape[2] != tok:
            raise ValueError(
                f"local_global head expects tokens (B={pooled.shape[0]}, T, {tok}), got {tuple(tokens.shape)}"
            )
        return self.global_proj(pooled) + masked_mean(self.local_proj(tokens), token_mask)


_KINDS: dict[str, type[_Head]] = {
    "linear": LinearHead,
    "mlp": MLPHead,
    "glu": GLUHead,
    "local_global": LocalGlobalHead,
}


def build_head(config: HeadConfig | dict) -> nn.Module:
    """Build the head a :class:`HeadConfig` (or its ``to_dict()``) describes; ``head.config`` holds it."""
    if isinstance(config, dict):
        config = HeadConfig.from_dict(config)
    return _KINDS[config.kind](config)
