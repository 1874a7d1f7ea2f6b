"""Shared by the readers: group raw (image, caption, label) records into rows and map labels to ids."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pairscout.errors import DataError

_INT = re.compile(r"^[+-]?\d+(\.0*)?$")  # "3" and "3.0" (pandas writes ints with NaNs as floats)


@dataclass
class Record:
    """One manifest line / annotation / sample before grouping."""

    key: str
    """The image's identity (resolved path, tar member key); records with equal keys are one row."""
    captions: list[str]
    label: int | str | None = None
    where: str = ""
    """Where it came from, for messages: ``line 7``, ``annotation 12``, ``sample 000123``."""


@dataclass
class Rows:
    keys: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    labels: list[int | str | None] = field(default_factory=list)
    where: list[str] = field(default_factory=list)


def clean_captions(values: Iterable[object]) -> list[str]:
    return [s for s in (" ".join(str(v).split()) for v in values if v is not None) if s]


def group_records(records: Iterable[Record], source: str | Path) -> Rows:
    """Group records by image key, in order of first appearance; captions concatenate.

    Raises DataError for an image whose records hold no non-empty caption, or whose records
    disagree on the label.
    """
    rows = Rows()
    pos: dict[str, int] = {}
    for r in records:
        caps = clean_captions(r.captions)
        k = pos.get(r.key)
        if k is None:
            pos[r.key] = len(rows.keys)
            rows.keys.append(r.key)
            rows.captions.append(caps)
            rows.labels.append(r.label)
            rows.where.append(r.where)
            continue
        rows.captions[k].extend(caps)
        if r.label is not None and rows.labels[k] is not None and str(r.label) != str(rows.labels[k]):
            raise DataError(
                f"Image {r.key} has label '{rows.labels[k]}' ({rows.where[k]}) and '{r.label}' ({r.where}) in {source}.",
                fix="give every row of one image the same label.",
            )
        if rows.labels[k] is None:
            rows.labels[k] = r.label
    for key, caps, where in zip(rows.keys, rows.captions, rows.where, strict=True):
        if not caps:
            raise DataError(
                f"Image {key} ({where} of {source}) has no non-empty caption.",
                fix="add a caption for that image or remove its row.",
            )
    return rows


MISSING_LABELS = frozenset({"nan", "null", "<na>", "n/a"})
"""Label cells that mean "no label" (pandas writes a missing value as ``nan`` or ``<NA>``): never a class."""


def map_labels(
    raw: Sequence[int | str | None],
    source: str | Path,
    where: Sequence[str],
    classnames: Sequence[str] | None = None,
) -> tuple[np.ndarray | None, list[str] | None]:
    """Raw per-row labels -> (int64 ids, classnames).

    All ``None``: no labels. Integers (or integer strings): used as ids; ``classnames`` as given.
    Any other string: class names, ids in sorted-name order (or the order of ``classnames``).
    """
    raw = [None if isinstance(v, str) and v.strip().lower() in MISSING_LABELS else v for v in raw]
    if all(v is None or (isinstance(v, str) and not v.strip()) for v in raw):
        return None, list(classnames) if classnames is not None else None
    for v, w in zip(raw, where, strict=True):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"The row at {w} of {source} has no label while others do.", fix="give every row a label or none.")
    values = [v.strip() if isinstance(v, str) else v for v in raw]
    if all(isinstance(v, int) or (isinstance(v, str) and _INT.match(v)) for v in values):
        ids = np.array([int(float(v)) for v in values], dtype=np.int64)  # type: ignore[arg-type]
        if ids.min() < 0:
            w = where[int(np.argmin(ids))]
            raise DataError(f"The row at {w} of {source} has negative label {int(ids.min())}.", fix="use class ids >= 0 or class names.")
        names = list(classnames) if classnames is not None else None
        if names is not None and ids.max() >= len(names):
            w = where[int(np.argmax(ids))]
            raise DataError(
                f"The row at {w} of {source} has label {int(ids.max())} but only {len(names)} class names were given.",
                fix="pass one class name per class id.",
            )
        return ids, names
    strs = [str(v) for v in values]
    names = list(classnames) if classnames is not None else sorted(set(strs))
    lookup = {c: i for i, c in enumerate(names)}
    ids = np.empty(len(strs), dtype=np.int64)
    for i, (s, w) in enumerate(zip(strs, where, strict=True)):
        if s not in lookup:
            raise DataError(f"The row at {w} of {source} has label '{s}', which is not among the class names given.", fix="add it to the class names or fix the label.")
        ids[i] = lookup[s]
    return ids, names
