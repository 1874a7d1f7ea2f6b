"""``onnx:`` -- a local ONNX encoder run with onnxruntime.

``id = "onnx:/path/to/model.onnx"``; ``options``:

* ``output``: the graph output giving the features, by name or index (default 0). A 2-D output
  ``(B, d)`` is taken as is; a 3-D one ``(B, T, d)`` is pooled (``pooling``: ``mean`` over real tokens
  = ``default``, ``cls``, ``last``); a 4-D one ``(B, C, H, W)`` is averaged over space.
* ``token_output``: the output giving token features (default: ``output`` if it is 3-D/4-D, else the
  first 3-D output of the graph).
* text: ``tokenizer`` (required): a directory holding a Hugging Face tokenizer, or the name of a pack
  whose tokenizer to reuse (``all-MiniLM-L6-v2``); ``max_length`` caps the tokens. Inputs named
  ``input_ids`` / ``attention_mask`` / ``token_type_ids`` are fed (int64).
* vision: ``size`` (default ``image_size`` or 224), ``mean`` / ``std`` (default ImageNet's),
  ``crop_pct`` (default 0.875), ``interpolation`` (default ``bicubic``), ``input`` (the pixel input's
  name, default the first). Inputs are NCHW float32.

Runs on the CPU (``CPUExecutionProvider``) unless the encoder is moved to a CUDA device and
onnxruntime has the ``CUDAExecutionProvider``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairscout.encoders._common import (
    ImageTransform,
    check_weights_files,
    finish,
    pad_tokens,
    pool_text,
    spatial_tokens,
    text_token_length,
)
from pairscout.encoders.base import Encoder, EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.spec import EncoderSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer(spec: EncoderSpec, ref: str | None) -> Any:
    """A Hugging Face tokenizer from a directory, or the one of a pack (``all-MiniLM-L6-v2``)."""
    if not ref:
        raise ZooError(f"{spec.id}: an ONNX text encoder needs options.tokenizer.",
                       fix='set options.tokenizer to a tokenizer directory or a pack name such as "all-MiniLM-L6-v2".')
    from transformers import AutoTokenizer

    from pairscout.encoders._common import hub_guard, is_local_path

    if is_local_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{spec.id}: tokenizer directory {path} does not exist.", fix="point options.tokenizer at a directory with tokenizer.json / vocab files.")
    else:
        from pairscout.encoders.pack_assets import pack_tokenizer_dir

        path = pack_tokenizer_dir(ref, spec_id=spec.id)
    with hub_guard(spec, local=True, what=f"the tokenizer in {path}"):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class OnnxEncoder(Encoder):
    """An ONNX graph as a frozen encoder (text with a tokenizer, or vision with simple preprocessing)."""

    supports_tokens = True

    def __init__(self, spec: EncoderSpec, path: str | Path, *, tokenizer: Any = None) -> None:
        super().__init__(spec)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelLoadError(f"{spec.id}: ONNX file {self.path} does not exist.", fix="point the id at an existing .onnx file.")
        check_weights_files(spec.id, self.path)
        if spec.layer is not None:
            raise ZooError(f"{spec.id}: ONNX encoders cannot read a hidden layer.", fix="remove layer, or expose that layer as a graph output and name it in options.output.")
        self.options = dict(spec.options)
        self._providers = ["CPUExecutionProvider"]
        self.session = self._make_session()
        self.outputs = self.session.get_outputs()
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.out_name = self._output_name(self.options.get("output", 0), "output")
        tok_opt = self.options.get("token_output")
        if tok_opt is not None:
            self.tok_name: str | None = self._output_name(tok_opt, "token_output")
        elif self._rank(self.out_name) in (3, 4):
            self.tok_name = self.out_name
        else:
            self.tok_name = next((o.name for o in self.outputs if len(o.shape or ()) == 3), None)
        if spec.modality == "text":
            missing = [n for n in self.inputs if n not in _TEXT_INPUTS]
            if missing:
                raise ZooError(f"{spec.id}: the ONNX graph has inputs {missing} that a text encoder cannot feed.",
                               fix=f"export it with inputs among {', '.join(_TEXT_INPUTS)}.")
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, self.options.get("tokenizer"))
            limit = getattr(self.tokenizer, "model_max_length", 512) or 512
            self.max_length = int(spec.max_length or self.options.get("max_length") or min(limit, 512))
        else:
            size = int(self.options.get("size") or spec.image_size or 224)
            self._transform = ImageTransform(
                size,
                mean=self.options.get("mean", IMAGENET_MEAN),
                std=self.options.get("std", IMAGENET_STD),
                crop_pct=float(self.options.get("crop_pct", 0.875)),
                interpolation=str(self.options.get("interpolation", "bicubic")),
            )
            self.input_name = str(self.options.get("input", self.inputs[0]))
            if self.input_name not in self.inputs:
                raise ZooError(f"{spec.id}: the ONNX graph has no input {self.input_name!r} (it has {', '.join(self.inputs)}).", fix="correct options.input.")

    # --- session -----------------------------------------------------------------------------
    def _make_session(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.path), sess_options=so, providers=self._providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.spec.id}: onnxruntime cannot load {self.path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}).",
                                 fix="check that the file is a complete ONNX model.") from e

    def to(self, device: torch.device | str) -> OnnxEncoder:
        import onnxruntime as ort

        self.device = torch.device(device)
        want = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            want = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        if want != self._providers:
            self._providers = want
            self.session = self._make_session()
        return self

    def _output_name(self, ref: Any, what: str) -> str:
        names = [o.name for o in self.outputs]
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            i = int(ref)
            if not 0 <= i < len(names):
                raise ZooError(f"{self.spec.id}: options.{what} = {i} but the graph has {len(names)} outputs.", fix=f"use an index below {len(names)} or a name among {names}.")
            return names[i]
        if ref not in names:
            raise ZooError(f"{self.spec.id}: the ONNX graph has no output {ref!r}.", fix=f"set options.{what} to one of {names} or an index.")
        return str(ref)

    def _rank(self, name: str) -> int:
        return next(len(o.shape or ()) for o in self.outputs if o.name == name)

    # --- encoding ----------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
        res = self.session.run(names, feeds)
        return {n: torch.from_numpy(np.asarray(r, dtype=np.float32)) for n, r in zip(names, res, strict=True)}

    def _wanted(self, tokens: bool) -> list[str]:
        names = [self.out_name]
        if tokens:
            if self.tok_name is None:
                raise ZooError(f"{self.spec.id}: the ONNX graph has no 3-D output to take token features from.",
                               fix="drop --tokens, or set options.token_output.")
            if self.tok_name not in names:
                names.append(self.tok_name)
        return names

    def encode_texts(self, texts: list[str], *, tokens: bool = False) -> EncoderOutput:
        if self.spec.modality != "text":
            return super().encode_texts(texts, tokens=tokens)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        mask = enc["attention_mask"].astype(np.int64)
        avail = {"input_ids": ids, "attention_mask": mask,
                 "token_type_ids": enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)}
        out = self._run({n: avail[n] for n in self.inputs}, self._wanted(tokens))
        mask_t = torch.from_numpy(mask)
        main = out[self.out_name]
        if main.ndim == 3:
            pooled = pool_text(main, mask_t, self.spec.pooling, self.spec)
        elif main.ndim == 2:
            if self.spec.pooling not in ("default", "mean"):
                raise ZooError(f"{self.spec.id}: output {self.out_name!r} is already pooled, so pooling {self.spec.pooling!r} cannot apply.",
                               fix="remove pooling, or choose a 3-D output in options.output.")
            pooled = main
        else:
            raise ZooError(f"{self.spec.id}: output {self.out_name!r} has {main.ndim} dimensions.", fix="choose a 2-D or 3-D output in options.output.")
        tok = tmask = None
        if tokens:
            tok, tmask = pad_tokens(out[self.tok_name], mask_t, text_token_length(self.spec))
        return finish(self.spec, EncoderOutput(pooled, tok, tmask))

    def image_transform(self) -> Callable:
        if self.spec.modality != "vision":
            return super().image_transform()
        return self._transform

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> EncoderOutput:
        if self.spec.modality != "vision":
            return super().encode_images(pixels, tokens=tokens)
        x = pixels.detach().float().cpu().numpy()
        out = self._run({self.input_name: x}, self._wanted(tokens))
        main = out[self.out_name]
        if main.ndim == 4:
            pooled = main.mean((2, 3))
        elif main.ndim == 3:
            pooled = main[:, 0] if self.spec.pooling == "cls" else main.mean(1)
        else:
            pooled = main.flatten(1)
        tok = None
        if tokens:
            t = out[self.tok_name]
            tok = spatial_tokens(t) if t.ndim == 4 else t
        return finish(self.spec, EncoderOutput(pooled, tok, None))


def build(spec: EncoderSpec) -> OnnxEncoder:
    return OnnxEncoder(spec, spec.weights or spec.target)
