"""An image folder with sidecar captions: ``cat1.jpg`` + ``cat1.txt`` (one caption per non-empty line).

If every image sits in a first-level sub-folder (``root/<class>/.../img.jpg``), the sub-folder names
are the class names (sorted, ids in that order) and each image's label is its sub-folder. Images
directly in ``root`` mean no labels (with sub-folders too, all images are read, unlabelled).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import IMAGE_EXTENSIONS, FileImages
from pairscout.data.rows import Record, group_records
from pairscout.errors import DataError

log = logging.getLogger(__name__)


OWN_FILES = ("rank.json", "probe.json", "train_log.json", "heads.safetensors", "file-digests.json")
"""Files only pairscout writes (a rank / probe run's record, an align run's log and heads, an embedding cache's
digests): a folder that holds one is pairscout's own output, never data."""


def _own_folder(d: Path, memo: dict[Path, bool]) -> bool:
    if d not in memo:
        memo[d] = any((d / f).is_file() for f in OWN_FILES)
    return memo[d]


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by relative path.

    A sub-folder that pairscout wrote (a run folder ``--out root/run``, an embedding cache, see :data:`OWN_FILES`)
    is left out, and said: its plots are no data rows. An image name that is no readable file (a symlink loop, a
    broken link, a FIFO) is left out, counted and reported in one warning, never dropped silently."""
    out, unreadable, own, memo = [], [], set(), {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel.parts):
            mine = next((root.joinpath(*rel.parts[:k]) for k in range(1, len(rel.parts)) if _own_folder(root.joinpath(*rel.parts[:k]), memo)), None)
            if mine is not None:
                own.add(mine.relative_to(root).as_posix())
                continue
            try:
                (out if p.is_file() else unreadable if not p.is_dir() else []).append(p)
            except OSError:  # ELOOP and friends on some systems
                unreadable.append(p)
    if own:
        log.warning("%s: left out %d folder(s) of pairscout's own output (a run or cache inside the data folder): %s",
                    root, len(own), ", ".join(sorted(own)[:3]))
    if unreadable:
        unreadable.sort()
        log.warning("%s: left out %d image name(s) that are not readable files (symlink loops, broken links or special files), e.g. %s",
                    root, len(unreadable), unreadable[0].relative_to(root).as_posix())
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def read_folder(root: Path, *, images: list[Path] | None = None, name: str | None = None) -> PairedDataset:
    """Build a dataset from an image folder with sidecar ``.txt`` captions."""
    images = find_images(root) if images is None else images
    if not images:
        raise DataError(f"Folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).", fix="point to a folder of images with .txt captions, a manifest, or .tar shards.")
    depth = {len(p.relative_to(root).parts) for p in images}
    labelled = 1 not in depth
    if not labelled and len(depth) > 1:
        log.warning("%s: images both in the folder and in sub-folders; reading all of them without labels", root)
    records = []
    for p in images:
        txt = p.with_suffix(".txt")
        try:
            caps = txt.read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise DataError(f"Image {p} in {root} has no caption file {txt.name}.", fix=f"write its captions (one per line) to {txt}, or remove the image.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"Cannot read caption file {txt}: {e}.", fix="make it a readable UTF-8 text file.") from None
        label = p.relative_to(root).parts[0] if labelled else None
        records.append(Record(str(p), caps, label, f"caption file {txt.name}"))
    rows = group_records(records, root)
    labels, names = None, None
    if labelled:  # by folder name, even when names look like integers
        names = sorted({str(v) for v in rows.labels})
        ids = {c: i for i, c in enumerate(names)}
        labels = np.array([ids[str(v)] for v in rows.labels], dtype=np.int64)
    return PairedDataset(
        name=name or root.name, source=str(root), fmt="folder", images=FileImages([Path(k) for k in rows.keys]),
        captions=rows.captions, labels=labels, classnames=names,
    )  # fmt: skip
