"""CSV / TSV / JSON-lines / JSON-array manifests: one line per (image, caption[s][, label]).

Columns (matched case-insensitively; the first present wins; override with ``image_column=``,
``caption_column=``, ``label_column=``):

* image: ``image``, ``image_path``, ``filepath``, ``file_name``, ``filename``, ``path``, ``img``.
  Relative paths are relative to ``images_root`` if given, else to the manifest's folder.
* caption: ``caption``, ``captions``, ``text``, ``sentence``. A JSON-lines/JSON cell may hold a list
  of captions; a CSV ``captions`` cell may hold a JSON list (``["a dog", "a brown dog"]``).
  Several lines with the same image group their captions into one row, in file order.
* label (optional): ``label``, ``class``, ``class_name``, ``category``. Integers are class ids;
  any other string is a class name, mapped to ids in sorted-name order (``classnames`` sorted).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import FileImages
from pairscout.data.rows import Record, group_records, map_labels
from pairscout.errors import DataError

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence")
LABEL_COLUMNS = ("label", "class", "class_name", "category")


def _find_column(found: Sequence[str], wanted: Sequence[str], override: str | None, what: str, path: Path, required: bool) -> str | None:
    lower = {c.strip().lower(): c for c in found}
    if override is not None:
        if override in found:
            return override
        if override.strip().lower() in lower:
            return lower[override.strip().lower()]
        raise DataError(f"Manifest {path} has no {what} column '{override}'; columns found: {', '.join(found) or 'none'}.", fix=f"pass one of those as the {what} column.")
    for w in wanted:
        if w in lower:
            return lower[w]
    if required:
        raise DataError(
            f"Manifest {path} has columns [{', '.join(found) or 'none'}] but needs an image column (one of {', '.join(IMAGE_COLUMNS)}) "
            f"and a caption column (one of {', '.join(CAPTION_COLUMNS)}); {what} column missing.",
            fix="rename the columns, or pass image_column= / caption_column= to load_dataset.",
        )
    return None


def _read_csv(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed by the generator
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = [c for c in (reader.fieldnames or []) if c is not None]

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        with f:
            for rec in reader:
                if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                    continue  # blank line
                yield f"line {reader.line_num}", rec

    return columns, rows()


def _read_json_records(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    records: list[tuple[str, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read manifest {path}: {e}.", fix="check the path and that it is UTF-8 text.") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"Manifest {path} is not valid JSON ({e}).", fix="fix the JSON.") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise DataError(f"JSON file {path} is neither a COCO caption file nor a list of records.", fix="use COCO format ({images, annotations}) or a list of {image, caption} objects.")
        records = [(f"record {i}", d) for i, d in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"Line {lineno} of {path} is not valid JSON ({e.msg}).", fix="write one JSON object per line.") from None
            if not isinstance(rec, dict):
                raise DataError(f"Line {lineno} of {path} is not a JSON object.", fix="write one JSON object per line.")
            records.append((f"line {lineno}", rec))
    columns: dict[str, None] = {}
    for _, rec in records:
        columns.update(dict.fromkeys(rec))
    return list(columns), records


def _captions(value: Any, column: str, where: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    if isinstance(value, str):
        s = value.strip()
        if column.strip().lower() == "captions" and s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                raise DataError(f"The captions cell at {where} of {path} looks like a JSON list but does not parse.", fix='write it as ["caption one", "caption two"].') from None
            if isinstance(parsed, list):
                return [str(v) for v in parsed if v is not None]
        return [value]
    return [str(value)]


def read_manifest(
    path: Path,
    *,
    fmt: str | None = None,
    images_root: Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    classnames: Sequence[str] | None = None,
    name: str | None = None,
) -> PairedDataset:
    """Read a CSV/TSV (``.csv``, ``.tsv``), JSON-lines (``.jsonl``, ``.ndjson``) or JSON-array (``.json``) manifest.

    ``fmt`` (``csv`` or ``jsonl``) overrides the choice by suffix.
    """
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    try:
        columns, records = _read_csv(path) if fmt == "csv" else _read_json_records(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read manifest {path}: {e}.", fix="check the path and that it is UTF-8 text.") from None
    img_col = _find_column(columns, IMAGE_COLUMNS, image_column, "image", path, True)
    cap_col = _find_column(columns, CAPTION_COLUMNS, caption_column, "caption", path, True)
    lab_col = _find_column(columns, LABEL_COLUMNS, label_column, "label", path, False)
    root = images_root if images_root is not None else path.parent

    def gen() -> Iterator[Record]:
        for where, rec in records:
            value = rec.get(img_col)
            if value is None or not str(value).strip():
                raise DataError(f"The row at {where} of {path} has an empty '{img_col}' (image path).", fix="fill in the image path or remove the row.")
            p = Path(str(value).strip())
            key = os.path.normpath(p if p.is_absolute() else root / p)
            label = rec.get(lab_col) if lab_col else None
            if label is not None and not isinstance(label, int | str):
                label = str(label)
            yield Record(key, _captions(rec.get(cap_col), cap_col, where, path), label, where)

    try:
        rows = group_records(gen(), path)
    except csv.Error as e:
        raise DataError(f"Manifest {path} is not valid CSV ({e}).", fix="fix the quoting or the delimiter.") from None
    if not rows.keys:
        raise DataError(f"Manifest {path} has no rows.", fix="add at least one (image, caption) line.")
    labels, names = map_labels(rows.labels, path, rows.where, classnames)
    ds_name = name or (path.parent.name if path.stem.lower() == "metadata" else path.stem)
    return PairedDataset(
        name=ds_name, source=str(path), fmt=fmt, images=FileImages([Path(k) for k in rows.keys]),
        captions=rows.captions, labels=labels, classnames=names,
    )  # fmt: skip
