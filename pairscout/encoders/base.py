"""The encoder interface every source implements.

An :class:`Encoder` is built from an :class:`~pairscout.zoo.spec.EncoderSpec` by
:func:`pairscout.encoders.build_encoder`. Vision encoders expose a picklable ``image_transform``
(PIL image -> float tensor, run in DataLoader workers) and ``encode_images``; text encoders expose
``encode_texts``. Both return :class:`EncoderOutput` with pooled features and, on request, token
features (the local+global projector needs them).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pairscout.zoo.spec import EncoderSpec


@dataclass
class EncoderOutput:
    pooled: torch.Tensor
    """(B, d) pooled features."""
    tokens: torch.Tensor | None = None
    """(B, T, d_tok) token features, when asked for and supported; text tokens padded to a fixed T."""
    token_mask: torch.Tensor | None = None
    """(B, T) bool, True for real tokens (text); ``None`` where every token is real (vision)."""
    layers: dict[str, torch.Tensor] | None = None
    """A layer sweep (``spec.layers``): block index (0-based, as a string) -> (B, d_l) pooled features."""


class Encoder(ABC):
    """A frozen encoder. Subclasses set ``modality`` and implement the methods of that modality."""

    spec: EncoderSpec
    supports_tokens: bool = False
    supports_layers: bool = False
    """Fills :attr:`EncoderOutput.layers` when its spec asks for a layer sweep (``spec.layers``)."""
    channels_last: bool = False
    """Convolutional models run faster on NHWC tensors (about 1.5x for EfficientNet-Lite on CPU)."""
    device: torch.device = torch.device("cpu")

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def name(self) -> str:
        return self.spec.name

    # --- lifecycle -------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Encoder:
        """Move the model to ``device`` (torch modules); sources that cannot move ignore it."""
        self.device = torch.device(device)
        module = getattr(self, "model", None)
        if isinstance(module, torch.nn.Module):
            module.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        return self

    def fit(self, texts: Sequence[str] | None = None) -> None:  # noqa: B027 - optional hook
        """Optional hook for encoders fitted on the corpus itself (TF-IDF); a no-op by default."""

    # --- vision ------------------------------------------------------------------------------
    def image_transform(self) -> Callable:
        """A picklable callable: PIL.Image (RGB) -> float tensor (C, H, W)."""
        raise NotImplementedError(f"{self.spec.id} is not a vision encoder")

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        raise NotImplementedError(f"{self.spec.id} is not a vision encoder")

    # --- text ---------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        raise NotImplementedError(f"{self.spec.id} is not a text encoder")


class PrecomputedEncoder(Encoder):
    """Embeddings computed elsewhere (``emb:`` source): rows are read, not encoded."""

    def load(self, n_rows: int, *, tokens: bool = False, subset: int | None = None) -> EncoderOutput:
        """Return all rows; must raise :class:`~pairscout.errors.DataError` if the count differs from ``n_rows``
        (the whole dataset's; ``subset``: the rows of the ``--n`` subset that will be kept, for the message)."""
        raise NotImplementedError
