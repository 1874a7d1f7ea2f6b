"""``emb:`` -- embeddings computed elsewhere, read from a file aligned to the dataset's rows.

``id = "emb:/path/to/vectors.npy"`` (or ``.npz``, ``.safetensors``, ``.pt``/``.pth``). Row ``i`` of the
file is the embedding of row ``i`` of the dataset: image ``i`` for vision encoders, caption ``i``
of the dataset's flattened caption list for text encoders.

``options``: ``key`` -- the tensor to read from a ``.safetensors`` / ``.npz`` / dict ``.pt`` file (default:
the only one; a file with several is refused unless ``key`` names one); ``tokens_key`` / ``mask_key`` -- token features
``(N, T, d)`` and their ``(N, T)`` mask in the same file, for ``--tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairscout.encoders._common import finish
from pairscout.encoders.base import EncoderOutput, PrecomputedEncoder
from pairscout.errors import DataError, ZooError
from pairscout.tensors import from_numpy
from pairscout.zoo.spec import EncoderSpec

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


def _as_tensor(value: Any, path: Path, key: str) -> torch.Tensor:
    """A real-valued tensor from a numpy array / tensor; complex, string, object or bool data is refused."""
    where = f"embeddings file {path}" + (f" (tensor {key!r})" if key else "")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise DataError(f"{where} holds {value.dtype} data ({_KIND.get(value.dtype.kind, value.dtype.kind)}), not real numbers.",
                            fix="save the embeddings as a float array (e.g. numpy.float32).")
        value = from_numpy(value)
    if value.is_complex() or value.dtype == torch.bool:
        raise DataError(f"{where} holds {value.dtype} data, not real numbers (an imaginary part would be dropped silently).",
                        fix="save real-valued float embeddings (e.g. concatenate real and imaginary parts).")
    if value.is_meta:
        raise DataError(f"{where} holds a meta tensor without data.", fix="save the tensor's values, not a meta tensor.")
    return value


_KIND = {"c": "complex", "U": "text", "S": "bytes", "O": "Python objects", "b": "booleans", "V": "raw records", "M": "dates", "m": "time spans"}


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"": _as_tensor(np.load(path, allow_pickle=False), path, "")}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: _as_tensor(z[k], path, k) for k in z.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return {k: _as_tensor(v, path, k) for k, v in load_file(str(path)).items()}
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy, safetensors and torch.load (UnpicklingError for a pickle with code) raise many types
        reason = str(e).splitlines()[0][:160] if str(e) else ""
        blocked = " (it holds Python objects that torch.load refuses to unpickle for safety)" if "Weights only load failed" in str(e) else ""
        raise DataError(f"embeddings file {path} cannot be read{blocked} ({type(e).__name__}: {reason}).",
                        fix=f"write it with numpy.save, safetensors or torch.save of plain tensors ({', '.join(SUFFIXES)}).") from None
    if isinstance(obj, torch.Tensor | np.ndarray):
        return {"": _as_tensor(obj, path, "")}
    if isinstance(obj, dict):
        return {str(k): _as_tensor(v, path, str(k)) for k, v in obj.items() if isinstance(v, torch.Tensor | np.ndarray)}
    raise DataError(f"embeddings file {path} holds a {type(obj).__name__}, not a tensor or a dict of tensors.",
                    fix="save a (rows, dim) tensor or a dict of them.")


class EmbeddingFileEncoder(PrecomputedEncoder):
    """Reads a ``(rows, dim)`` matrix (and optionally token features) from one file."""

    def __init__(self, spec: EncoderSpec) -> None:
        check_spec(spec)
        super().__init__(spec)
        self.path = Path(spec.weights or spec.target).expanduser()
        if self.path.exists() and not self.path.is_file():
            raise DataError(f"embeddings path {self.path} (encoder {spec.id}) is not a regular file.",
                            fix="point the emb: id at a .npy/.npz/.safetensors/.pt file.")
        if not self.path.is_file():
            raise DataError(f"embeddings file {self.path} (encoder {spec.id}) does not exist.",
                            fix="export the embeddings to that path, or correct the id.")
        if self.path.suffix.lower() not in SUFFIXES:
            raise DataError(f"embeddings file {self.path} has an unknown format {self.path.suffix!r}.", fix=f"use one of {', '.join(SUFFIXES)}.")
        self.supports_tokens = "tokens_key" in spec.options

    def _pick(self, tensors: dict[str, torch.Tensor], key: str | None, what: str) -> torch.Tensor:
        if key is not None:
            if key not in tensors:
                raise DataError(f"embeddings file {self.path} has no tensor {key!r} (it has {', '.join(sorted(tensors)) or 'none'}).",
                                fix=f"set options.{what} to one of those.")
            return tensors[key]
        if not tensors:
            raise DataError(f"embeddings file {self.path} holds no tensors.", fix="re-export the embeddings.")
        if len(tensors) > 1:  # taking "the first" would silently compare whichever sorts first
            names = sorted(tensors)
            raise DataError(f"embeddings file {self.path} holds {len(names)} tensors ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}) "
                            f"and the encoder does not say which to read.",
                            fix=f"name it in a zoo entry: options = {{ {what} = \"{names[0]}\" }} (or save only that tensor).")  # fmt: skip
        return next(iter(tensors.values()))

    def _check_rows(self, have: int, n_rows: int, subset: int | None) -> None:
        """A file must hold exactly one row per dataset row: any other count is refused (never matched by --n)."""
        if have == n_rows:
            return
        what = "captions" if self.spec.modality == "text" else "images"
        if subset is not None and have == subset:
            raise DataError(f"embeddings file {self.path} has {have} rows, as many as the --n subset, but the dataset has {n_rows} {what}: "
                            f"the subset is a random draw, so the file's row i would be paired with the wrong row.",
                            fix=f"export one row per dataset row ({n_rows}, in the dataset's order), or point --data at a manifest of "
                                f"exactly the rows the file covers, without --n.")  # fmt: skip
        raise DataError(f"embeddings file {self.path} has {have} rows but the dataset has {n_rows} {what}; row i of the file must be "
                        f"row i of the dataset.",
                        fix=f"export one row per dataset row ({n_rows}, in the dataset's order), or point --data at a manifest of "
                            f"exactly the rows the file covers.")  # fmt: skip

    def load(self, n_rows: int, *, tokens: bool = False, subset: int | None = None) -> EncoderOutput:
        tensors = _read_all(self.path)
        raw = self._pick(tensors, self.spec.options.get("key"), "key")
        _check_float32_range(raw, self.path)
        pooled = raw.float()
        if pooled.ndim != 2:
            raise DataError(f"embeddings file {self.path} holds a tensor of shape {tuple(pooled.shape)}, not (rows, dim).",
                            fix="save one row per dataset item, or set options.key to the right tensor.")
        self._check_rows(pooled.shape[0], n_rows, subset)
        if not torch.isfinite(pooled).all():
            raise DataError(f"embeddings file {self.path} contains NaN or infinite values.", fix="re-export the embeddings.")
        tok = mask = None
        if tokens:
            if "tokens_key" not in self.spec.options:
                raise ZooError(f"{self.spec.id} has no token features.", fix="drop --tokens, or save them in the file and set options.tokens_key.")
            tok = self._pick(tensors, self.spec.options["tokens_key"], "tokens_key").float()
            if tok.ndim != 3 or tok.shape[0] != n_rows:
                raise DataError(f"token features in {self.path} have shape {tuple(tok.shape)}, not ({n_rows}, T, d).",
                                fix=f"export one (T, d) block per dataset row ({n_rows}, in the dataset's order).")
            if "mask_key" in self.spec.options:
                mask = self._pick(tensors, self.spec.options["mask_key"], "mask_key").bool()
        return finish(self.spec, EncoderOutput(pooled, tok, mask))


HONOURS = frozenset({"weights"})
"""An ``emb:`` file is read as it is: only ``weights`` (the file's path) applies; pooling, layers, sizes cannot."""


def check_spec(spec: EncoderSpec) -> None:
    """Refuse model settings an ``emb:`` file cannot honour (checked with the zoos, before anything is encoded)."""
    spec.refuse_settings(HONOURS, "an emb: file (precomputed embeddings)")


def build(spec: EncoderSpec) -> EmbeddingFileEncoder:
    return EmbeddingFileEncoder(spec)


def _check_float32_range(t: torch.Tensor, path: object) -> None:
    """Finite float64 values that float32 cannot hold would turn into inf on reading: say so, not "NaN or infinite"."""
    if not t.is_floating_point() or t.dtype != torch.float64 or not bool(torch.isfinite(t).all()):
        return
    big = float(t.abs().max()) if t.numel() else 0.0
    if big > torch.finfo(torch.float32).max:
        raise DataError(f"embeddings file {path} holds float64 values up to {big:.3g}, beyond float32's range (3.4e38), "
                        "in which pairscout reads embeddings.",
                        fix="divide them by one constant before saving (every measure is scale-invariant), e.g. by their largest value.")
