"""Helpers shared by the encoder sources: hub access, packages, pooling, padding, image transforms.

Nothing here is a source of its own; each ``*_source.py`` / ``packs.py`` / ``baselines.py`` module
builds encoders with these pieces.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pairscout.encoders.base import EncoderOutput
from pairscout.errors import ModelLoadError, ZooError
from pairscout.hub import hub_reachable
from pairscout.tensors import masked_mean  # noqa: F401 - re-exported for the sources
from pairscout.zoo.spec import EncoderSpec

DEFAULT_TEXT_TOKENS = 64
"""Fixed T of text token outputs when ``spec.max_length`` is not set."""


def hub_error(spec: EncoderSpec, what: str | None = None) -> ModelLoadError:
    target = what or spec.target
    example = "<dir>" if spec.source in ("hf", "st") else "<weights file>"
    return ModelLoadError(
        f"{spec.id}: cannot load {target} from the hub (offline?).",
        fix=f'download it on a connected machine and point `weights = "{example}"` at it in the zoo, '
        "or set HF_HOME to a cache that holds it.",
    )


def _hub_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from huggingface_hub import errors as hf_errors

        for name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError", "HfHubHTTPError"):
            t = getattr(hf_errors, name, None)
            if isinstance(t, type):
                types.append(t)
    return tuple(types)


@contextlib.contextmanager
def hub_guard(spec: EncoderSpec, *, local: bool = False, what: str | None = None) -> Iterator[bool]:
    """Run a hub load; unreachable weights become one :class:`ModelLoadError` that says the fix.

    When the hub cannot be reached (or ``local``: the target is on disk), the hub client is switched
    to offline mode for the duration, so cached files still load and missing ones fail at once.
    Yields whether the load runs offline (pass it on as ``local_files_only``).
    """
    offline = local or not hub_reachable()
    consts = None
    old = None
    if offline:
        with contextlib.suppress(ImportError):
            from huggingface_hub import constants as consts

            old = consts.HF_HUB_OFFLINE
            consts.HF_HUB_OFFLINE = True
    try:
        yield offline
    except ModelLoadError:
        raise
    except _hub_error_types() as e:
        if not offline and ("valid model identifier" in str(e) or type(e).__name__ == "RepositoryNotFoundError"):
            raise ModelLoadError(f"{spec.id}: {what or spec.target} is not a model repository on the hub, or it is gated/private.",
                                 fix="check the id, or log in (`hf auth login`) for a gated model.") from e
        if local:
            raise ModelLoadError(
                f"{spec.id}: cannot load {what or spec.target} ({type(e).__name__}: {_first_line(e)}).",
                fix="check that the path holds the model's files (config, weights, tokenizer).",
            ) from e
        raise hub_error(spec, what) from e
    except RuntimeError as e:  # timm wraps some download failures in RuntimeError
        msg = str(e).lower()
        if offline and any(k in msg for k in ("download", "hub", "connection", "offline", "url")):
            raise hub_error(spec, what) from e
        raise
    finally:
        if consts is not None:
            consts.HF_HUB_OFFLINE = old


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def is_local_path(target: str) -> bool:
    """A target naming something on disk (absolute, ./relative, ~ or an existing path)."""
    return target.startswith(("/", "./", "../", "~")) or Path(target).expanduser().exists()


# --- weights files -----------------------------------------------------------------------------------
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx", ".h5", ".msgpack")


def _text_head(path: Path) -> str | None:
    """The first bytes of ``path`` when they are plain text (weights are binary), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head or any(b < 32 and b not in (9, 10, 13) for b in head):
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return None if len(head) < 512 else head[:-4].decode("utf-8", "ignore")  # cut inside a character


def check_weights_files(spec_id: str, path: str | Path) -> None:
    """One line naming a weights file that holds text (a Git LFS pointer, an HTML error page, a note), before a
    loader fails on it with a KeyError or "header too large" that names no file. ``path``: a weights file, or a
    model folder (its weights files, two levels deep, are checked)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in (*path.glob("*"), *path.glob("*/*")) if p.suffix.lower() in WEIGHTS_SUFFIXES)
    else:
        files = [path]
    for p in files:
        text = _text_head(p) if p.is_file() else None
        if text is None:
            continue
        lfs = text.startswith("version https://git-lfs")
        why = "a Git LFS pointer: the weights themselves were never downloaded" if lfs else f"it starts {text[:40].splitlines()[0]!r}"
        raise ModelLoadError(f"{spec_id}: the weights file {p} holds text, not weights ({why}).",
                             fix="fetch the real file (`git lfs pull` in its repository, or download it again), "
                                 "or point the zoo entry at a downloaded weights file.")  # fmt: skip


# --- packages -------------------------------------------------------------------------------------
def require_module(module: str, *, spec_id: str, pip: str) -> object:
    """Import ``module`` or raise a ModelLoadError naming the ``pip install`` that provides it."""
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{spec_id} needs the Python package {module!r}, which is not installed.", fix=f"pip install {pip}")
    return importlib.import_module(module)


# --- outputs --------------------------------------------------------------------------------------
def no_tokens(spec: EncoderSpec) -> ZooError:
    return ZooError(
        f"{spec.id} gives no token features.",
        fix="drop --tokens, or use an encoder with token features (timm:, hf:, st:, onnx:, most pack: ones).",
    )


def finish(spec: EncoderSpec, out: EncoderOutput) -> EncoderOutput:
    """Apply ``spec.normalize`` and check ``spec.dim`` against what the model gives."""
    pooled = out.pooled
    if pooled.ndim != 2:
        raise ModelLoadError(f"{spec.id} produced pooled features of shape {tuple(pooled.shape)}, not (batch, dim).",
                             fix="set pooling (cls, mean, ...) or options.output to a 2-D feature.")
    if spec.dim is not None and pooled.shape[1] != spec.dim:
        raise ZooError(f"{spec.id} gives {pooled.shape[1]}-d features but its zoo entry says dim = {spec.dim}.",
                       fix=f"set dim = {pooled.shape[1]} (or remove dim) in the zoo.")
    layers = out.layers
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        if layers is not None:
            layers = {k: torch.nn.functional.normalize(v.float(), dim=-1) for k, v in layers.items()}
    return EncoderOutput(pooled, out.tokens, out.token_mask, layers)


def sweep_blocks(spec: EncoderSpec, n_blocks: int) -> list[int]:
    """The 0-based block indices a layer sweep reads: ``spec.layers`` (negative counts from the end, ``"all"``:
    every block), ascending (the order intermediate-feature APIs return them in), without repeats. Indices
    beyond a shallower model's depth are left out with a warning (``--layers -1,-4,-8`` on a 6-block model
    reads -1 and -4).

    Raises:
        ZooError: no index within the model's ``n_blocks`` blocks.
    """
    if spec.layers == "all":
        return list(range(n_blocks))
    out: list[int] = []
    dropped = []
    for k in spec.layers or []:
        a = k + n_blocks if k < 0 else k
        if not 0 <= a < n_blocks:
            dropped.append(k)
        elif a not in out:
            out.append(a)
    if not out:
        raise ZooError(f"{spec.id}: layers {spec.layers} are all outside this model's {n_blocks} blocks.",
                       fix=f"use indices in -{n_blocks} .. {n_blocks - 1}, or layers = \"all\".")
    if dropped and (spec.id, n_blocks, tuple(dropped)) not in _WARNED:  # the blocks are asked for on every pass: say it once
        import logging

        _WARNED.add((spec.id, n_blocks, tuple(dropped)))
        logging.getLogger(__name__).warning("%s has %d blocks: layers %s left out of its sweep", spec.id, n_blocks, dropped)
    return sorted(out)


_WARNED: set[tuple[str, int, tuple[int, ...]]] = set()


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token of each row (works for right and left padding)."""
    T = mask.shape[1]
    idx = (T - 1) - mask.long().flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx.to(hidden.device)]


def pool_text(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, spec: EncoderSpec) -> torch.Tensor:
    if pooling in ("mean", "default"):
        return masked_mean(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return last_token(hidden, mask)
    raise ZooError(f"{spec.id}: pooling {pooling!r} is not supported for text.", fix="use mean, cls or last.")


def pad_tokens(hidden: torch.Tensor, mask: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d) + (B, L) -> (B, T, d) zero-padded or truncated, and its (B, T) bool mask."""
    B, L, d = hidden.shape
    mask = mask.bool()
    if L >= T:
        return hidden[:, :T], mask[:, :T]
    out = hidden.new_zeros(B, T, d)
    out[:, :L] = hidden
    m = torch.zeros(B, T, dtype=torch.bool, device=mask.device)
    m[:, :L] = mask
    return out * m.unsqueeze(-1).to(out.dtype), m


def pad_token_list(seqs: Sequence[torch.Tensor], T: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (L_i, d) tensors -> (B, T, d) and (B, T) bool mask."""
    out = torch.zeros(len(seqs), T, dim)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = min(T, s.shape[0])
        if n:
            out[i, :n] = s[:n].detach().float().cpu()
            mask[i, :n] = True
    return out, mask


def text_token_length(spec: EncoderSpec) -> int:
    return spec.max_length or DEFAULT_TEXT_TOKENS


def spatial_tokens(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return feat.flatten(2).transpose(1, 2)


# --- images ---------------------------------------------------------------------------------------
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


class ImageTransform:
    """A picklable PIL -> (3, size, size) float tensor transform (no torchvision needed).

    Resize the shorter side to ``round(size / crop_pct)``, centre-crop ``size`` x ``size``, scale to
    [0, 1], then ``(x - mean) / std`` per channel.
    """

    def __init__(self, size: int, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 crop_pct: float = 1.0, interpolation: str = "bicubic") -> None:
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        short = max(self.size, int(round(self.size / self.crop_pct)))
        scale = short / min(w, h)
        nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
        img = img.resize((nw, nh), _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, std={self.std})"
