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
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import FileImages
from pairscout.data.rows import Record, group_records, map_labels
from pairscout.errors import DataError
from pairscout.files import read_regular_text

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence")
LABEL_COLUMNS = ("label", "class", "class_name", "category")
MAX_MANIFEST_BYTES = 4 * 2**30
"""Largest manifest read into memory (4 GiB)."""

log = logging.getLogger(__name__)


def match_column(found: Sequence[str], wanted: Sequence[str], override: str | None, *, required: bool, missing: str,
                 fix: str) -> str | None:
    """The column of ``found`` that ``override`` names (exactly, else case-insensitively), or without one the first of
    ``wanted`` present (case-insensitively); None when there is none, or when ``override`` is ``""`` on an optional
    column (no labels). A named column that is absent raises ``DataError(missing, fix=fix)``. Manifests and Hugging
    Face datasets both find their columns here."""
    lower = {c.strip().lower(): c for c in found}
    if override == "" and not required:
        return None
    if override is not None:
        if override in found:
            return override
        if override.strip().lower() in lower:
            return lower[override.strip().lower()]
        raise DataError(missing, fix=fix)
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def _find_column(found: Sequence[str], wanted: Sequence[str], override: str | None, what: str, path: Path, required: bool) -> str | None:
    col = match_column(found, wanted, override, required=required, fix=f"pass one of those as the {what} column.",
                       missing=f"Manifest {path} has no {what} column '{override}'; columns found: {', '.join(found) or 'none'}.")
    if col is not None or (override == "" and not required):
        return col
    if required:
        raise DataError(
            f"Manifest {path} has columns ({', '.join(found) or 'none'}) but needs an image column (one of {', '.join(IMAGE_COLUMNS)}) "
            f"and a caption column (one of {', '.join(CAPTION_COLUMNS)}); {what} column missing.",
            fix="rename the columns in the file to one of those names.",
        )
    return None


class _Bad:
    """Malformed lines: an error naming the first one, or (``skip_bad``) skipped and counted."""

    def __init__(self, path: Path, skip: bool) -> None:
        self.path, self.skip = path, skip
        self.skipped: list[str] = []

    def __call__(self, where: str, problem: str, fix: str) -> None:
        if not self.skip:
            raise DataError(f"{where[:1].upper()}{where[1:]} of {self.path} {problem}.", fix=f"{fix}, or pass --skip-bad to skip such lines.")
        self.skipped.append(f"{where}: {problem}")


def _read_text(path: Path) -> str:
    try:
        return read_regular_text(path, "utf-8-sig", MAX_MANIFEST_BYTES)
    except UnicodeDecodeError as e:
        raise DataError(f"Manifest {path} is not UTF-8 text (byte {e.start}: {e.reason}).", fix="save it as UTF-8.") from None
    except OSError as e:
        raise DataError(f"Cannot read manifest {path}: {e}.", fix="pass a regular, readable manifest file.") from None


def _csv_records(text: str, delimiter: str, first_line: int = 1) -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields); ``csv.Error`` on a malformed record (strict quoting)."""
    lines = iter(io.StringIO(text, newline=""))
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start = first_line
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise csv.Error(f"line {start}: {e}") from None
        yield start, fields
        start = first_line + reader.line_num


def _read_csv(path: Path, bad: _Bad) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Rows of a CSV/TSV manifest, strictly: a stray quote, a record with the wrong number of fields or
    a quoted field that never closes is an error naming its line (never a silent merge of lines)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = _read_text(path)
    try:
        records = list(_csv_records(text, delimiter))
    except csv.Error as e:
        where, _, reason = str(e).partition(": ")
        if not bad.skip:
            raise DataError(f"{where[:1].upper()}{where[1:]} of {path} is malformed CSV ({reason}; a stray '\"' opens a quoted field that swallows the lines after it).",
                            fix="fix the quoting on that line (write a literal quote as \"\"), or pass --skip-bad to skip such lines.") from None
        records = []  # parse line by line: every line that is not a complete record on its own is skipped
        for lineno, line in enumerate(text.splitlines(), start=1):
            try:
                records += list(_csv_records(line, delimiter, lineno))
            except csv.Error as e2:
                bad(f"line {lineno}", f"is malformed CSV ({str(e2).partition(': ')[2]})", "fix the quoting")
    if not records:
        return [], []
    header = records[0][1]
    rows: list[tuple[str, dict[str, Any]]] = []
    for lineno, fields in records[1:]:
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            bad(f"line {lineno}", f"has {len(fields)} fields but the header has {len(header)}", "quote fields that contain the delimiter")
            continue
        rec: dict[str, Any] = {}
        for name, value in zip(header, fields, strict=True):
            if header.count(name) > 1:  # a repeated column (image,caption,caption): every cell kept, in order
                rec.setdefault(name, _Repeated()).append(value)
            else:
                rec[name] = value
        rows.append((f"line {lineno}", rec))
    return header, rows


class _Repeated(list):
    """The cells of a column name the header repeats (several ``caption`` columns: several captions)."""


def _read_json_records(path: Path, bad: _Bad) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    records: list[tuple[str, dict[str, Any]]] = []
    text = _read_text(path)
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
                bad(f"line {lineno}", f"is not valid JSON ({e.msg})", "write one JSON object per line")
                continue
            if not isinstance(rec, dict):
                bad(f"line {lineno}", f"is a JSON {type(rec).__name__}, not an object", "write one JSON object per line")
                continue
            records.append((f"line {lineno}", rec))
    columns: dict[str, None] = {}
    for _, rec in records:
        columns.update(dict.fromkeys(rec))
    return list(columns), records


def _captions(value: Any, column: str, where: str, path: Path) -> list[str]:
    """A cell's captions; anything but text (or a list of text) is an error naming the line."""
    if value is None:
        return []
    if isinstance(value, _Repeated):  # several caption columns: each non-empty cell is a caption
        return [c for cell in value if cell.strip() for c in _captions(cell, column, where, path)]
    if isinstance(value, list):
        odd = [v for v in value if v is not None and not isinstance(v, str)]
        if odd:
            raise DataError(f"The '{column}' list at {where} of {path} holds a {type(odd[0]).__name__} ({json.dumps(odd[0], default=str)[:60]}), not text.",
                            fix="write captions as strings.")
        return [v for v in value if v is not None]
    if isinstance(value, str):
        s = value.strip()
        if column.strip().lower() == "captions" and s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                raise DataError(f"The captions cell at {where} of {path} looks like a JSON list but does not parse.", fix='write it as ["caption one", "caption two"].') from None
            if isinstance(parsed, list):
                return _captions(parsed, column, where, path)
        return [value]
    raise DataError(f"The '{column}' value at {where} of {path} is a {type(value).__name__} ({json.dumps(value, default=str)[:60]}), not text.",
                    fix="write captions as strings (a JSON string or a list of strings).")


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
    skip_bad: bool = False,
) -> PairedDataset:
    """Read a CSV/TSV (``.csv``, ``.tsv``), JSON-lines (``.jsonl``, ``.ndjson``) or JSON-array (``.json``) manifest.

    ``fmt`` (``csv`` or ``jsonl``) overrides the choice by suffix. A malformed line (bad quoting, wrong
    number of fields, invalid JSON, a caption that is not text) is an error naming it; with ``skip_bad``
    it is skipped, logged, and counted in ``describe()["skipped_lines"]``.
    """
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    bad = _Bad(path, skip_bad)
    columns, records = _read_csv(path, bad) if fmt == "csv" else _read_json_records(path, bad)
    img_col = _find_column(columns, IMAGE_COLUMNS, image_column, "image", path, True)
    cap_col = _find_column(columns, CAPTION_COLUMNS, caption_column, "caption", path, True)
    lab_col = _find_column(columns, LABEL_COLUMNS, label_column, "label", path, False)
    root = images_root if images_root is not None else path.parent
    for col, what in ((img_col, "image"), (lab_col, "label")):
        if col is not None and columns.count(col) > 1:
            raise DataError(f"Manifest {path} has the {what} column '{col}' {columns.count(col)} times; one {what} per line is allowed.",
                            fix=f"keep one '{col}' column (a repeated caption column is fine: each cell is a caption).")

    def gen() -> Iterator[Record]:
        for where, rec in records:
            try:
                value = rec.get(img_col)
                if value is None or not str(value).strip():
                    raise DataError(f"The row at {where} of {path} has an empty '{img_col}' (image path).", fix="fill in the image path or remove the row.")
                if not isinstance(value, str) or "\n" in value:
                    raise DataError(f"The '{img_col}' value at {where} of {path} is not a one-line path ({json.dumps(value, default=str)[:60]}).",
                                    fix="write the image path as a string.")
                p = Path(value.strip())
                key = os.path.normpath(p if p.is_absolute() else root / p)
                label = rec.get(lab_col) if lab_col else None
                if label is not None and not isinstance(label, int | str) or isinstance(label, bool):
                    raise DataError(f"The '{lab_col}' value at {where} of {path} is a {type(label).__name__}, not a class id or name.",
                                    fix="write labels as integers or strings.")
                caps = _captions(rec.get(cap_col), cap_col, where, path)
            except DataError as e:
                if not skip_bad:
                    raise
                bad.skipped.append(f"{where}: {e}")
                continue
            yield Record(key, caps, label, where)

    rows = group_records(gen(), path)
    if bad.skipped:
        log.warning("%s: skipped %d malformed line(s), e.g. %s", path, len(bad.skipped), bad.skipped[0])
    if not rows.keys:
        raise DataError(f"Manifest {path} has no rows.", fix="add at least one (image, caption) line.")
    labels, names = map_labels(rows.labels, path, rows.where, classnames)
    ds_name = name or (path.parent.name if path.stem.lower() == "metadata" else path.stem)
    return PairedDataset(
        name=ds_name, source=str(path), fmt=fmt, images=FileImages([Path(k) for k in rows.keys], where=rows.where),
        captions=rows.captions, labels=labels, classnames=names,
        meta={"columns": {"image": img_col, "caption": cap_col, "label": lab_col or ""},
              **({"skipped_lines": {"count": len(bad.skipped), "first": bad.skipped[:3]}} if bad.skipped else {})},
    )  # fmt: skip
