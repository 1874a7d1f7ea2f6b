"""Encoder specs: an encoder is data.

A spec is one flat record read from a TOML zoo file (``[[encoder]]`` tables). The ``id`` carries
a source prefix (``timm:``, ``hf:``, ``st:``, ``onnx:``, ``emb:``, ``pack:``, ``baseline:``) that
selects the module building it (:func:`pairscout.encoders.build_encoder`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from pairscout.errors import ZooError

Modality = Literal["vision", "text"]

SOURCE_MODULES: dict[str, str] = {
    "timm": "pairscout.encoders.timm_source",
    "hf": "pairscout.encoders.hf_source",
    "st": "pairscout.encoders.st_source",
    "onnx": "pairscout.encoders.onnx_source",
    "emb": "pairscout.encoders.emb_source",
    "pack": "pairscout.encoders.packs",
    "baseline": "pairscout.encoders.baselines",
}
"""The one list of encoder sources: id prefix -> module exposing ``build(spec) -> Encoder``.
:func:`pairscout.encoders.register_source` adds to it (a prefix with a builder and no module: ``""``)."""


class _Sources:
    """A live, read-only view of the prefixes in :data:`SOURCE_MODULES` (``in``, iteration, ``len``)."""

    def __contains__(self, prefix: object) -> bool:
        return prefix in SOURCE_MODULES

    def __iter__(self):
        return iter(list(SOURCE_MODULES))

    def __len__(self) -> int:
        return len(SOURCE_MODULES)

    def __repr__(self) -> str:
        return repr(tuple(SOURCE_MODULES))


SOURCES = _Sources()
"""The known source prefixes (follows :data:`SOURCE_MODULES`, so registered sources are valid in zoos)."""


def add_source(prefix: str, module: str = "") -> None:
    """Make ``prefix`` a valid id prefix (``module``: where its ``build`` lives, "" when a builder is registered)."""
    if not prefix or ":" in prefix or not prefix.replace("_", "").replace("-", "").isalnum():
        raise ZooError(f"source prefix {prefix!r} is not a plain word.", fix="use letters, digits, '-' or '_' (no ':').")
    SOURCE_MODULES.setdefault(prefix, module)


MODEL_SETTINGS = ("pooling", "layer", "layers", "weights", "revision", "image_size", "preprocess", "max_length")
"""Fields that ask a source to compute something differently; a source that cannot honour one refuses it
(:meth:`EncoderSpec.refuse_settings`)."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build one frozen encoder and to key its cached embeddings."""

    id: str
    """Source-prefixed identifier, e.g. ``timm:vit_small_patch14_dinov2.lvd142m`` or ``st:/path/to/dir``."""
    modality: Modality
    """``vision`` (embeds images) or ``text`` (embeds captions)."""
    name: str = ""
    """Short display name used in tables and plots; defaults to the id without its prefix."""
    revision: str | None = None
    """Hub revision (git sha / tag) or timm pretrained tag; pinned for reproducibility."""
    pooling: str = "default"
    """How token features become one vector: ``cls``, ``mean``, ``cls+mean`` (SAIL), ``last``, ``default``."""
    layer: int | None = None
    """Hidden layer to read (negative counts from the end); ``None`` = the model's final features."""
    layers: list[int] | str | None = None
    """A layer sweep: blocks to read besides the final features (``[-1, -4, -8]``, negative counts from the
    end, or ``"all"``), each pooled as ``pooling`` says, all from one forward pass and kept in one cache
    entry (``timm:`` and ``hf:`` models; ``pairscout rank --layers`` sets it for every such encoder)."""
    image_size: int | None = None
    """Square input resolution for vision models; ``None`` = the model's own default."""
    preprocess: str = "default"
    """Preprocessing recipe name (``default`` = what the model was trained with)."""
    normalize: bool = False
    """L2-normalise the pooled output (sentence-transformers models that do so by design)."""
    max_length: int | None = None
    """Maximum tokens for text models; ``None`` = the model's own limit."""
    dim: int | None = None
    """Output dimension (informative; checked after the first batch when given)."""
    params_m: float | None = None
    """Parameter count in millions, where known."""
    license: str | None = None
    """Licence of the weights, where known."""
    weights: str | None = None
    """Local weights file or directory that overrides the hub (``timm:``/``hf:``/``st:``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras (e.g. ``onnx`` output name, ``emb`` key, baseline seed)."""
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ZooError(f"an encoder has id {self.id!r}, not a non-empty string.", fix='write id = "<source>:<name>" in quotes.')
        self._check_types()
        if ":" not in self.id:
            raise ZooError(
                f"encoder id {self.id!r} has no source prefix.",
                fix=f"write it as '<source>:<name>' with source one of {', '.join(SOURCES)}.",
            )
        if self.source not in SOURCES:
            raise ZooError(
                f"encoder id {self.id!r} has unknown source prefix {self.source!r}.",
                fix=f"use one of {', '.join(s + ':' for s in SOURCES)}.",
            )
        if self.modality not in ("vision", "text"):
            raise ZooError(f"encoder {self.id!r}: modality {self.modality!r} is neither 'vision' nor 'text'.")
        if not self.name:
            object.__setattr__(self, "name", self.id.split(":", 1)[1])

    def _check_types(self) -> None:
        """Every field has its declared type and a possible value; errors name the encoder and the field."""
        def bad(fname: str, want: str, fix: str | None = None) -> ZooError:
            value = getattr(self, fname)
            return ZooError(f"encoder {self.id!r}: {fname} = {value!r} ({type(value).__name__}) is not {want}.",
                            fix=fix or f"set {fname} to {want}, or remove it for the default.")

        for fname in ("modality", "name", "pooling", "preprocess", "notes"):
            if not isinstance(getattr(self, fname), str):
                raise bad(fname, "a string", f'write {fname} = "..." in quotes.')
        for fname in ("revision", "license", "weights"):
            if getattr(self, fname) is not None and not isinstance(getattr(self, fname), str):
                raise bad(fname, "a string", f'write {fname} = "..." in quotes.')
        for fname in ("image_size", "max_length", "dim"):
            v = getattr(self, fname)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(fname, "a positive integer")
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)):
            raise bad("layer", "an integer (negative counts from the last layer)")
        if self.layers is not None:
            ok = self.layers == "all" or (isinstance(self.layers, list | tuple) and len(self.layers) > 0
                                          and all(isinstance(k, int) and not isinstance(k, bool) for k in self.layers))
            if not ok:
                raise bad("layers", 'a non-empty list of block indices or "all"', 'write layers = [-1, -4, -8] or layers = "all".')
            if self.layer is not None:
                raise ZooError(f"encoder {self.id!r} sets both layer and layers.",
                               fix="use layers for a sweep (the final features are always included), or layer for one block.")
            if isinstance(self.layers, tuple):
                object.__setattr__(self, "layers", list(self.layers))
        if self.params_m is not None and (not isinstance(self.params_m, int | float) or isinstance(self.params_m, bool) or self.params_m < 0):
            raise bad("params_m", "a number >= 0")
        if not isinstance(self.normalize, bool):
            raise bad("normalize", "true or false")
        if not isinstance(self.options, dict):
            raise bad("options", "a table", 'write options as a table, e.g. options = { size = 16 }.')

    def refuse_settings(self, honoured: tuple[str, ...] | frozenset[str], what: str) -> None:
        """One line for the first of :data:`MODEL_SETTINGS` set away from its default that ``what`` (the source,
        e.g. ``"the pixels baseline"``) does not honour: a zoo entry never asks for something that is silently ignored.

        Raises:
            ZooError: naming the encoder, the field and what to do.
        """
        defaults = {f.name: f.default for f in fields(self)}
        for fname in MODEL_SETTINGS:
            if fname not in honoured and getattr(self, fname) != defaults[fname]:
                why = "cannot read hidden layers" if fname in ("layer", "layers") else "cannot honour"
                raise ZooError(f"encoder {self.id!r}: {what} {why} ({fname} = {getattr(self, fname)!r}); it would be ignored.",
                               fix=f"remove {fname} from its zoo entry" + (f" (it honours {', '.join(sorted(honoured))})." if honoured else "."))

    @property
    def source(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def target(self) -> str:
        """The id without its source prefix."""
        return self.id.split(":", 1)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def narrowed(self, layer: str | None) -> EncoderSpec:
        """This spec reading only what one view of a layer sweep needs: no sweep for ``final`` (or None), else
        the single block ``layers = [k]`` (its features are then ``EncoderOutput.layers[str(k)]``)."""
        if self.layers is None:
            return self
        return replace(self, layers=None if layer in (None, "final") else [int(layer)])

    def cache_identity(self) -> dict[str, Any]:
        """The fields that change the embeddings (display-only fields excluded)."""
        d = self.to_dict()
        for k in ("name", "dim", "params_m", "license", "notes"):
            d.pop(k)
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.cache_identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "zoo") -> EncoderSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZooError(
                f"{where}: encoder {d.get('id', '?')!r} has unknown field(s) {', '.join(unknown)}.",
                fix=f"allowed fields are {', '.join(sorted(known))}; put source-specific extras under 'options'.",
            )
        for req in ("id", "modality"):
            if req not in d:
                raise ZooError(f"{where}: an encoder entry lacks the required field {req!r}.", fix="add it.")
        try:
            return cls(**d)
        except ZooError as e:
            raise ZooError(f"{where}: {e}") from None
