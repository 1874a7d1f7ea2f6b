"""COCO caption JSON (``captions_val2017.json``): ``images`` + ``annotations`` + an image folder.

``{"images": [{"id": 1, "file_name": "a.jpg"}, ...], "annotations": [{"image_id": 1, "caption": "..."}, ...]}``.
Rows follow the order of ``images``; each image's captions follow the order of ``annotations``.
Image folder: ``images_root`` if given; else the JSON's folder when the first image is there; else a
folder named after the split (``val2017`` for ``captions_val2017.json``) next to the JSON or next to
its folder (the COCO layout ``annotations/`` + ``val2017/``); else the JSON's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import FileImages
from pairscout.data.rows import Record, group_records
from pairscout.errors import DataError


def is_coco(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


def _image_folder(path: Path, first_file: str | None) -> Path:
    if first_file is None or (path.parent / first_file).exists():
        return path.parent
    split = path.stem.split("_", 1)[1] if path.stem.startswith("captions_") else path.stem
    for cand in (path.parent / split, path.parent.parent / split):
        if (cand / first_file).exists():
            return cand
    for cand in (path.parent / split, path.parent.parent / split):
        if cand.is_dir():
            return cand
    return path.parent


def read_coco(path: Path, data: dict[str, Any], *, images_root: Path | None = None, name: str | None = None) -> PairedDataset:
    """Build a dataset from a parsed COCO caption JSON at ``path``."""
    images, anns = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise DataError(f"COCO file {path}: 'images' and 'annotations' must be lists.", fix="use the COCO caption format.")
    files: dict[Any, str] = {}
    order: list[Any] = []
    for k, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or not str(im.get("file_name", "")).strip():
            raise DataError(f"Entry {k} of 'images' in {path} lacks 'id' or 'file_name'.", fix="give every image an id and a file_name.")
        if not isinstance(im["id"], int | str) or isinstance(im["id"], bool):
            raise DataError(f"Entry {k} of 'images' in {path} has id {json.dumps(im['id'], default=str)[:60]}, not an integer or a string.",
                            fix="give every image a scalar id (COCO uses integers).")
        if im["id"] in files:
            raise DataError(f"Image id {im['id']} appears twice in 'images' of {path}.", fix="make image ids unique.")
        files[im["id"]] = str(im["file_name"]).strip()
        order.append(im["id"])
    folder = images_root if images_root is not None else _image_folder(path, files[order[0]] if order else None)
    caps: dict[Any, list[str]] = {i: [] for i in order}
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DataError(f"Annotation {k} in {path} lacks 'image_id'.", fix="give every annotation an image_id and a caption.")
        if not isinstance(a["image_id"], int | str) or isinstance(a["image_id"], bool):
            raise DataError(f"Annotation {k} in {path} has image_id {json.dumps(a['image_id'], default=str)[:60]}, not an integer or a string.",
                            fix="use the id of an entry of 'images'.")
        if a["image_id"] not in caps:
            raise DataError(f"Annotation {k} in {path} refers to image id {a['image_id']}, which is not in 'images'.", fix="add that image or drop the annotation.")
        cap = a.get("caption")
        if cap is not None and not isinstance(cap, str):
            raise DataError(f"Annotation {k} in {path} has a caption that is a {type(cap).__name__}, not text.", fix="write captions as strings.")
        if cap is not None:
            caps[a["image_id"]].append(cap)
    records = [
        Record(os.path.normpath(folder / files[i]), caps[i], None, f"image id {i} ({files[i]})")
        for i in order
    ]
    rows = group_records(records, path)
    if not rows.keys:
        raise DataError(f"COCO file {path} lists no images.", fix="point to a caption file with images and annotations.")
    return PairedDataset(
        name=name or path.stem, source=str(path), fmt="coco", images=FileImages([Path(k) for k in rows.keys]),
        captions=rows.captions, meta={"images_root": str(folder)},
    )  # fmt: skip


def load_json(path: Path) -> Any:
    from pairscout.files import read_regular_text

    try:
        return json.loads(read_regular_text(path, "utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"JSON file {path} does not parse ({e}).", fix="fix the JSON.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read {path}: {e}.", fix="check the path and that it is UTF-8 text.") from None
