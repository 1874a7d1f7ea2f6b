"""``baseline:`` -- weight-free reference encoders that a good metric must rank below real models.

* ``baseline:pixels`` (vision): the image resized (shorter side) and centre-cropped to
  ``options.size`` x ``options.size`` (default 16), flattened: ``3 * size^2``-d (768 for 16).
  Tokens: one per pixel, its RGB value.
* ``baseline:random-net`` (vision): a randomly initialised timm network (``options.arch``, default
  ``resnet18``) at seed ``options.seed`` (default 0), ``pretrained=False``; ImageNet preprocessing
  at ``image_size`` (default 224). Pooled and tokens as for ``timm:``.
* ``baseline:tfidf`` (text): TF-IDF (word 1-2 grams, sublinear tf) fitted on the corpus by
  :meth:`~pairscout.encoders.base.Encoder.fit`, reduced to ``options.dim`` (default 256, fewer when
  the corpus is small: at most ``min(n_texts, n_terms) - 1``) dimensions with TruncatedSVD
  (seed ``options.seed``).
* ``baseline:random`` (either modality): a Gaussian vector per input, seeded by a hash of the content
  (caption text, or the image's pixels after an 8-bit 64 x 64 resize) and ``options.seed``: the same
  input always gets the same vector, different inputs independent ones. ``options.dim`` (default 384).
  ``baseline:random-vision`` / ``baseline:random-text`` are the same baseline with the modality in the
  id, for zoos that list both (ids are unique within a zoo).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pairscout.encoders._common import ImageTransform, finish, no_tokens
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec


def _opt_int(spec: EncoderSpec, key: str, default: int, *, low: int = 0) -> int:
    value = spec.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ZooError(f"{spec.id}: options.{key} = {value!r} is not an integer >= {low}.", fix=f"set options.{key} to an integer (default {default}).")
    return value


class PixelsEncoder(Encoder):
    supports_tokens = True

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        self.size = _opt_int(spec, "size", 16, low=1)
        self._transform = ImageTransform(self.size, crop_pct=1.0, interpolation="bilinear")

    def image_transform(self) -> Callable:
        return self._transform

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        x = pixels.float()
        tok = x.flatten(2).transpose(1, 2) if tokens else None
        return finish(self.spec, EncoderOutput(x.flatten(1), tok, None))


def build_random_net(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.timm_source import TimmEncoder, check_spec, create_timm_model

    check_spec(spec)
    arch = str(spec.options.get("arch", "resnet18"))
    seed = _opt_int(spec, "seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_timm_model(spec, arch, pretrained=False)
    return TimmEncoder(spec, model)


class TfidfEncoder(Encoder):
    """TF-IDF + TruncatedSVD (latent semantic analysis) fitted on the captions being ranked."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        self.dim = _opt_int(spec, "dim", 256, low=1)
        self.seed = _opt_int(spec, "seed", 0)
        self.vectorizer = None
        self.svd = None

    def fit(self, texts: Sequence[str] | None = None) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = list(texts or [])
        if len(texts) < 3:
            raise ZooError(f"{self.spec.id} needs at least 3 captions to fit on, got {len(texts)}.", fix="use a larger dataset.")
        self.vectorizer = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        try:
            X = self.vectorizer.fit_transform(texts)
        except ValueError as e:  # empty vocabulary
            raise ZooError(f"{self.spec.id}: the captions hold no words to fit TF-IDF on ({e}).", fix="check the captions.") from None
        k = max(1, min(self.dim, X.shape[0] - 1, X.shape[1] - 1))
        self.svd = TruncatedSVD(n_components=k, random_state=self.seed, algorithm="randomized", n_iter=7)
        self.svd.fit(X)

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        if tokens:
            raise no_tokens(self.spec)
        if self.vectorizer is None or self.svd is None:
            raise ModelLoadError(f"{self.spec.id} has not been fitted on the captions.", fix="call fit(all_captions) before encode_texts.")
        Z = self.svd.transform(self.vectorizer.transform(list(texts)))
        return finish(self.spec, EncoderOutput(torch.from_numpy(np.asarray(Z, dtype=np.float32)), None, None))


class RandomEncoder(Encoder):
    """Content-keyed random vectors: a hash of the input (and the seed) seeds each row's generator."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        self.dim = _opt_int(spec, "dim", 384, low=1)
        self.seed = _opt_int(spec, "seed", 0)
        self._transform = ImageTransform(64, crop_pct=1.0, interpolation="bilinear")

    def _vector(self, content: bytes) -> np.ndarray:
        digest = hashlib.sha256(self.seed.to_bytes(8, "little", signed=False) + content).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
        return rng.standard_normal(self.dim).astype(np.float32)

    def _stack(self, rows: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._vector(r) for r in rows])) if rows else torch.zeros(0, self.dim)

    def image_transform(self) -> Callable:
        if self.modality != "vision":
            return super().image_transform()
        return self._transform

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        if self.modality != "vision":
            return super().encode_images(pixels, tokens=tokens)
        if tokens:
            raise no_tokens(self.spec)
        q = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return finish(self.spec, EncoderOutput(self._stack([r.tobytes() for r in q]), None, None))

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        if self.modality != "text":
            return super().encode_texts(texts, tokens=tokens)
        if tokens:
            raise no_tokens(self.spec)
        return finish(self.spec, EncoderOutput(self._stack([t.encode("utf-8") for t in texts]), None, None))


BASELINES: dict[str, tuple[tuple[str, ...], Callable[[EncoderSpec], Encoder]]] = {
    "pixels": (("vision",), PixelsEncoder),
    "random-net": (("vision",), build_random_net),
    "tfidf": (("text",), TfidfEncoder),
    "random": (("vision", "text"), RandomEncoder),
    "random-vision": (("vision",), RandomEncoder),
    "random-text": (("text",), RandomEncoder),
}
"""Baseline name -> (modalities it supports, builder)."""

HONOURS = {"random-net": frozenset({"pooling", "layer", "layers", "image_size", "preprocess"})}
"""The model settings (:data:`pairscout.zoo.spec.MODEL_SETTINGS`) each baseline honours; the others honour none
(they have no weights, layers or pooling: their knobs are ``options``)."""


def check_baseline(spec: EncoderSpec) -> Callable[[EncoderSpec], Encoder]:
    """The builder of a ``baseline:`` spec, or one line naming the baselines of its modality (checked before any
    encoding, like a misspelled pack)."""
    entry = BASELINES.get(spec.target)
    if entry is None:
        mine = [b for b, (mods, _) in BASELINES.items() if spec.modality in mods]
        raise ZooError(f"{spec.id}: there is no {spec.modality} baseline named {spec.target!r}.",
                       fix=f"use one of {', '.join('baseline:' + b for b in mine)}.")
    modalities, builder = entry
    if spec.modality not in modalities:
        raise ZooError(f"{spec.id} is a {' or '.join(modalities)} baseline, not a {spec.modality} one.", fix=f'set modality = "{modalities[0]}".')
    spec.refuse_settings(HONOURS.get(spec.target, frozenset()), f"the {spec.target} baseline")
    return builder


def build(spec: EncoderSpec) -> Encoder:
    return check_baseline(spec)(spec)


