"""Where a dataset's images come from: files on disk or members of tar shards.

An image source maps a source index ``j`` to an image. It holds paths and byte offsets only, never an
open file, so it pickles into DataLoader workers (fork or spawn) and every read opens its own handle.
Read errors surface as :class:`ImageReadError` (a plain reason); :class:`~pairscout.data.PairedDataset`
turns them into a :class:`~pairscout.errors.DataError` naming the image and the row.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageOps

from pairscout.errors import ImageReadError
from pairscout.files import open_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MISSING = b"pairscout:missing-image:"
MAX_IMAGE_BYTES = int(float(os.environ.get("PAIRSCOUT_MAX_IMAGE_MB", "256")) * 2**20)
"""Largest image file read (``$PAIRSCOUT_MAX_IMAGE_MB``, default 256 MiB); larger ones are bad images."""


class ImageSource(Protocol):
    kind: str
    can_fail: bool  # False for sources that cannot hold a bad image (generated)

    def __len__(self) -> int: ...
    def image_id(self, j: int) -> str: ...
    def open(self, j: int) -> Image.Image: ...
    def digest(self, j: int) -> bytes: ...


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, or ``I`` with values over 255) greyscale scaled to 8 bits (``/257``), never clipped at 255.

    PNG and TIFF decode 16-bit greyscale as ``I;16`` or ``I`` (values 0..65535); ``convert("RGB")`` clips
    every value above 255 to white. ``F`` (float) images are scaled by their own maximum when it exceeds 1.
    """
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        top = float(np.nanmax(a)) if a.size else 0.0
        a = a * (255.0 if 0 < top <= 1.0 else 255.0 / top if top > 1.0 else 0.0)
    elif im.mode.startswith("I;16") or (a.size and int(a.max()) > 255):
        a = a.astype(np.float64) / 257.0
    else:  # 32-bit integer mode holding 8-bit values
        a = a.astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def decode_image(fp: str | Path | BinaryIO) -> Image.Image:
    """Decode fully into an RGB image (EXIF orientation applied, transparent pixels over white); raise ImageReadError.

    A path is opened only if it is a regular file of at most :data:`MAX_IMAGE_BYTES` (a FIFO or
    ``/dev/zero`` in a manifest is a bad image, not a hang).
    """
    try:
        if isinstance(fp, str | Path):
            fp = open_regular(fp, MAX_IMAGE_BYTES)
        with fp, Image.open(fp) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)  # a phone photo's EXIF orientation: the pixels as the camera meant them
            if im.mode.startswith("I") or im.mode == "F":
                return _high_depth_to_8bit(im).convert("RGB")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                out.alpha_composite(rgba)
                return out.convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError("does not exist") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("is not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        if type(e).__name__ in ("NotRegularFileError", "FileTooLargeError", "IsADirectoryError", "PermissionError"):
            raise ImageReadError(f"cannot be read ({' '.join(str(e).split())})") from None
        raise ImageReadError(f"cannot be decoded ({type(e).__name__}: {' '.join(str(e).split())})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageReadError(f"cannot be decoded ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _hash_stream(f: BinaryIO, size: int | None = None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    left = size
    while left is None or left > 0:
        chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
        if not chunk:
            break
        h.update(chunk)
        if left is not None:
            left -= len(chunk)
    return h.digest()


class FileImages:
    """One image file per row."""

    kind = "files"
    can_fail = True

    def __init__(self, paths: list[Path], where: list[str] | None = None) -> None:
        self.paths = [str(p) for p in paths]  # str: compact to pickle into workers
        self.where = list(where) if where is not None else None
        """Per image, where the file that listed it names it ("line 9"): messages point there, not at a row index."""

    def __len__(self) -> int:
        return len(self.paths)

    def image_id(self, j: int) -> str:
        return self.paths[j]

    def open(self, j: int) -> Image.Image:
        return decode_image(self.paths[j])

    def digest(self, j: int) -> bytes:
        """blake2b-128 of the file bytes; a marker naming the error when the file cannot be read."""
        try:
            with open_regular(self.paths[j], MAX_IMAGE_BYTES) as f:  # never a FIFO or /dev/zero
                return _hash_stream(f)
        except OSError as e:
            return _MISSING + type(e).__name__.encode()


@dataclass(frozen=True)
class TarMember:
    shard: int  # index into TarImages.shards
    name: str  # member name inside the tar
    offset: int  # byte offset of the member's data
    size: int  # bytes


class TarImages:
    """Images stored as members of (uncompressed) tar shards, read by byte offset.

    Every read opens the shard, seeks and reads ``size`` bytes: no handle is kept, so workers
    never share a file position.
    """

    kind = "tar"
    can_fail = True

    def __init__(self, shards: list[Path], members: list[TarMember]) -> None:
        self.shards = [str(s) for s in shards]
        self.members = members

    def __len__(self) -> int:
        return len(self.members)

    def image_id(self, j: int) -> str:
        m = self.members[j]
        return f"{self.shards[m.shard]}:{m.name}"

    def read_bytes(self, j: int) -> bytes:
        m = self.members[j]
        try:
            with open(self.shards[m.shard], "rb") as f:
                f.seek(m.offset)
                data = f.read(m.size)
        except OSError as e:
            raise ImageReadError(f"cannot be read from its shard ({type(e).__name__}: {e})") from None
        if len(data) != m.size:
            raise ImageReadError(f"is truncated in its shard ({len(data)} of {m.size} bytes)")
        return data

    def open(self, j: int) -> Image.Image:
        return decode_image(io.BytesIO(self.read_bytes(j)))

    def digest(self, j: int) -> bytes:
        try:
            return hashlib.blake2b(self.read_bytes(j), digest_size=16).digest()
        except ImageReadError:
            return _MISSING + b"tar"
