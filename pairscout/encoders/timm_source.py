"""``timm:`` -- any timm image model, by ``arch.tag`` name, from the hub or a local weights file.

* ``id = "timm:vit_small_patch14_dinov2.lvd142m"``: the tag pins the weights the way timm does;
  ``revision`` (optional) pins the git revision of the weights repo on the hub.
* ``weights = "path/to/model.safetensors"`` (or ``.pth`` / ``.bin``): load that file instead of the hub.
* Preprocessing is timm's own (``resolve_model_data_config`` + ``create_transform``);
  ``image_size`` overrides the input resolution (ViTs get their position embeddings resampled).
* Pooling: ``default`` = ``forward_head(forward_features(x), pre_logits=True)`` (the model's own pooled
  feature), ``cls`` = the class token, ``mean`` = mean of the patch tokens, ``cls+mean`` = both
  concatenated. Tokens: patch tokens without prefix (class/register) tokens for ViTs, the flattened
  final feature map for CNNs.
* ``layer = k``: the output of block ``k`` (negative counts from the end) via
  ``forward_intermediates``; ``default`` pooling is then ``cls`` for ViTs and ``mean`` otherwise.
* ``layers = [-1, -4, -8]`` or ``"all"`` (a layer sweep): the final features as above plus those blocks
  (the entries of ``model.feature_info``: transformer blocks for ViTs, stages for CNNs), pooled like
  ``layer``, from one ``forward_intermediates`` pass.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pairscout.encoders._common import check_weights_files, finish, hub_guard, spatial_tokens, sweep_blocks
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec

POOLINGS = ("default", "cls", "mean", "cls+mean")


def check_spec(spec: EncoderSpec) -> None:
    """Spec errors found before any weights are loaded."""
    if spec.modality != "vision":
        raise ZooError(f"{spec.id} is a timm image model but its zoo entry says modality = {spec.modality!r}.",
                       fix='set modality = "vision".')
    if spec.pooling not in POOLINGS:
        raise ZooError(f"{spec.id}: pooling {spec.pooling!r} is not supported by timm models.", fix=f"use one of {', '.join(POOLINGS)}.")


class TimmEncoder(Encoder):
    """A timm model used as a frozen image encoder (also used by ``baseline:random-net``)."""

    supports_layers = True
    supports_tokens = True

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module) -> None:
        super().__init__(spec)
        check_spec(spec)
        self.model = model.eval().requires_grad_(False)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.has_cls = bool(getattr(model, "cls_token", None) is not None) and self.num_prefix > 0
        self.channels_last = not hasattr(model, "patch_embed")  # CNNs: NHWC is faster; ViTs: no effect
        if spec.pooling in ("cls", "cls+mean") and not self.has_cls:
            raise ZooError(f"{spec.id} has no class token, so pooling {spec.pooling!r} is undefined.", fix="use pooling = \"mean\" or \"default\".")
        if (spec.layer is not None or spec.layers is not None) and not hasattr(model, "forward_intermediates"):
            what = f"layer = {spec.layer}" if spec.layer is not None else "a layer sweep (layers)"
            raise ZooError(f"{spec.id}: this timm model has no forward_intermediates, so {what} cannot be read.",
                           fix="remove layer/layers from its zoo entry.")
        self.blocks = sweep_blocks(spec, len(getattr(model, "feature_info", []) or [])) if spec.layers is not None else []
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        if spec.image_size:
            cfg["input_size"] = (3, spec.image_size, spec.image_size)
        self.data_config = cfg
        self._transform = timm.data.create_transform(**cfg, is_training=False)

    def image_transform(self) -> Callable:
        return self._transform

    def _split(self, feats: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Final features -> (class token or None, (B, N, d) patch tokens)."""
        if feats.ndim == 3:
            cls = feats[:, 0] if self.has_cls else None
            return cls, feats[:, self.num_prefix:]
        if feats.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            return None, spatial_tokens(feats)
        raise ModelLoadError(f"{self.spec.id}: forward_features gave shape {tuple(feats.shape)}, which is neither tokens nor a feature map.")

    def _intermediates(self, x: torch.Tensor, indices: list[int], final: bool):
        """``forward_intermediates`` at ``indices``: the list of (class token or None, tokens) per index, and
        the final features when ``final``."""
        kw = {"indices": indices, "intermediates_only": not final}
        if "return_prefix_tokens" in inspect.signature(self.model.forward_intermediates).parameters and self.num_prefix:
            kw["return_prefix_tokens"] = True
        try:
            out = self.model.forward_intermediates(x, **kw)
        except (AssertionError, IndexError) as e:
            raise ZooError(f"{self.spec.id}: layer(s) {indices} out of range for this model ({e}).",
                           fix="pick block indices within the model's depth (negative counts from the end).") from None
        feats, inter = (out[0], out[1]) if final else (None, out)
        got = []
        for feat in inter:
            prefix = None
            if isinstance(feat, tuple):
                feat, prefix = feat
            tokens = spatial_tokens(feat) if feat.ndim == 4 else feat
            got.append((prefix[:, 0] if (prefix is not None and self.has_cls) else None, tokens))
        return got, feats

    def _layer(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self._intermediates(x, [self.spec.layer], final=False)[0][0]

    def _pool_block(self, cls: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
        pooling = self.spec.pooling
        if pooling == "default":
            pooling = "cls" if cls is not None else "mean"
        return _pool(pooling, cls, patches)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        x = pixels.to(self.device)
        layers = None
        if self.spec.layer is None:
            if self.blocks:
                got, feats = self._intermediates(x, self.blocks, final=True)
                layers = {str(b): self._pool_block(c, p) for b, (c, p) in zip(self.blocks, got, strict=True)}
            else:
                feats = self.model.forward_features(x)
            cls, patches = self._split(feats)
            if self.spec.pooling == "default":
                pooled = self.model.forward_head(feats, pre_logits=True)
                if pooled.ndim == 3:  # a model built without global pooling returns the tokens
                    pooled = _pool("cls" if cls is not None else "mean", cls, patches)
            else:
                pooled = _pool(self.spec.pooling, cls, patches)
        else:
            cls, patches = self._layer(x)
            pooled = self._pool_block(cls, patches)
        return finish(self.spec, EncoderOutput(pooled, patches if tokens else None, None, layers))


def _pool(pooling: str, cls: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
    if pooling == "mean":
        return patches.mean(1)
    assert cls is not None  # checked at construction
    if pooling == "cls":
        return cls
    return torch.cat([cls, patches.mean(1)], dim=-1)


def create_timm_model(spec: EncoderSpec, name: str, *, pretrained: bool, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with the spec's weights/revision/image size, and errors that say the fix."""
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ZooError(f"{spec.id}: timm {timm.__version__} has no model architecture {arch!r}.",
                       fix="check the name with timm.list_models() or timm.list_pretrained(), or upgrade timm.")
    kwargs.setdefault("num_classes", 0)
    overlay: dict = {}
    if pretrained and spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{spec.id}: weights file {path} does not exist.", fix="point `weights` at a .safetensors/.pth file of this architecture.")
        check_weights_files(spec.id, path)
        overlay["file"] = str(path)
    if spec.image_size:
        try:
            fixed = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
        except TypeError:  # older timm
            fixed = timm.models.get_pretrained_cfg(name)
        if fixed is not None and getattr(fixed, "fixed_input_size", False):
            kwargs["img_size"] = spec.image_size
    if pretrained and not spec.weights and spec.revision:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if hub_id:
            overlay["hf_hub_id"] = f"{hub_id.split('@')[0]}@{spec.revision}"
    known = name in timm.list_pretrained(name) if "." in name else bool(timm.list_pretrained(f"{name}.*"))
    if pretrained and not spec.weights and not known:
        raise ZooError(f"{spec.id}: timm has no pretrained weights named {name!r}.",
                       fix=f"pick a tag from timm.list_pretrained('{arch}*'), or point `weights` at a local file.")
    local = bool(spec.weights) or not pretrained
    src = f"the weights file {spec.weights}" if local else f"the pretrained weights of {name}"
    try:
        with hub_guard(spec, local=local, what=name), _missing_keys_log() as missing:
            try:
                model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs)
            except TypeError as e:
                if "img_size" not in kwargs or "img_size" not in str(e):
                    raise
                kwargs.pop("img_size")
                model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as e:
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise ModelLoadError(f"{spec.id}: {src} does not fit the architecture {arch} ({str(e).splitlines()[0][:160]}).",
                                 fix="use weights saved from this exact model name.") from e
        raise
    if missing:
        # timm loads non-strictly once the classifier is dropped: a file of another architecture
        # would leave the model randomly initialised, which must never pass for a pretrained encoder.
        raise ModelLoadError(f"{spec.id}: {len(missing)} parameter(s) of {arch} are missing from {src} (e.g. {missing[0]}).",
                             fix="use weights saved from this exact model name.")
    return model


class _MissingKeys(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Missing keys ("):
            self.keys.extend(k.strip() for k in msg[len("Missing keys ("): msg.index(")")].split(","))


@contextlib.contextmanager
def _missing_keys_log() -> Iterator[list[str]]:
    """Collect the keys timm reports missing while loading pretrained weights (an INFO log line)."""
    logger = logging.getLogger("timm.models._builder")
    handler = _MissingKeys()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler.keys
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def build(spec: EncoderSpec) -> TimmEncoder:
    check_spec(spec)
    return TimmEncoder(spec, create_timm_model(spec, spec.target, pretrained=True))
