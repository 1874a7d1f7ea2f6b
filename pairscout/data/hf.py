"""Hugging Face datasets as paired data, read through the ``datasets`` library.

What ``--data`` accepts here:

* a ``save_to_disk`` folder (``state.json`` + ``dataset_info.json``); a saved ``DatasetDict``
  (``dataset_dict.json``) with one split, or ``FOLDER/<split>`` for one of several;
* ``.parquet`` files (one, or a glob such as ``data/test-*.parquet``) and ``.arrow`` files (the stream
  format ``save_to_disk`` writes, or the Arrow IPC file format);
* ``hf:ORG/NAME[:SPLIT]``: a dataset on the Hugging Face hub (``datasets.load_dataset``). Without a split, the
  dataset's only split; several splits are an error that names them. Offline (``HF_HUB_OFFLINE=1`` or no
  route to the hub) a dataset that is not in the ``datasets`` cache fails at once with one line.

The ``imagefolder`` layout (images + ``metadata.jsonl`` / ``metadata.csv``) is a manifest
(:mod:`pairscout.data.manifest`), read without ``datasets``.

Columns (matched case-insensitively, the first present wins; ``image_column=`` / ``caption_column=`` /
``label_column=`` override):

* image: ``image``, ``jpg``, ``img``, ``png``, ``jpeg``, ``webp``, then path columns (``image_path``,
  ``file_name``, ``filename``, ``filepath``, ``path``), else the first column of the ``Image`` feature type.
  A cell holds encoded bytes (an ``Image`` feature, or a binary column) or a path (relative to
  ``images_root``, else to the dataset's folder).
* caption: ``caption``, ``captions``, ``text``, ``sentences``, ``sentence``, ``raw``, ``txt``. A cell holds a
  string, a list of strings, or a list of records with a ``raw`` / ``caption`` / ``text`` field (the
  Karpathy-split layout: ``sentences = [{"raw": ...}, ...]``).
* label (optional): ``label``, ``class``, ``class_name``, ``category``, ``cls``. A ``ClassLabel`` feature
  gives the class names; other integers are ids, strings are names (sorted).

Rows showing the same image (equal bytes, or the same path) are one row with all their captions, in
order, as manifests group lines: datasets with one row per caption (Flickr30k-style) become one row per
image. Loading reads every image's bytes once to hash them; those hashes are the fingerprint's image part,
so the embedding cache is keyed by content as for every other format (a ``save_to_disk`` folder and its
parquet export share cache entries).

``.parquet`` files are converted once into the ``datasets`` cache (``HF_DATASETS_CACHE``, default
``~/.cache/huggingface/datasets``), as ``datasets.load_dataset("parquet", ...)`` does; the images are then
read by memory-mapping, in any DataLoader worker.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import MAX_IMAGE_BYTES, decode_image
from pairscout.data.rows import Record, group_records, map_labels
from pairscout.errors import DataError, ImageReadError

HUB_PREFIX = "hf:"
IMAGE_COLUMNS = ("image", "jpg", "img", "png", "jpeg", "webp", "image_path", "file_name", "filename", "filepath", "path")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence", "raw", "txt")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "cls")
_CAPTION_FIELDS = ("raw", "caption", "text", "sentence")
_HUB_ID = re.compile(r"^hf:([\w.-]+(?:/[\w.-]+)?)(?::([\w.\-\[\]%:]+))?$")
_DATASETS_PIP = "pip install datasets"


def is_hub_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(HUB_PREFIX)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())  # fmt: skip


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("Reading Hugging Face datasets needs the 'datasets' package, which is not installed.", fix=_DATASETS_PIP) from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No ``datasets`` progress bars while pairscout reads (the CLI draws its own)."""
    was = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.utils.enable_progress_bars()


# --- opening -------------------------------------------------------------------------------------------
def _load_hub(spec: str, datasets: Any) -> tuple[Any, str]:
    m = _HUB_ID.match(spec.strip())
    if m is None:
        raise DataError(f"'{spec}' is not a hub dataset id.", fix="write it as hf:ORG/NAME or hf:ORG/NAME:SPLIT (e.g. hf:nlphuji/flickr30k:test).")
    name, split = m.group(1), m.group(2)
    from pairscout.hub import hub_reachable

    offline = not hub_reachable()
    cfg = datasets.config
    old = (getattr(cfg, "HF_HUB_OFFLINE", None), getattr(cfg, "HF_DATASETS_OFFLINE", None))
    if offline:  # fail at once (the cache still serves what it holds), never after a minute of retries
        cfg.HF_HUB_OFFLINE = True
        if old[1] is not None:
            cfg.HF_DATASETS_OFFLINE = True
    where = f"hf:{name}" + (f":{split}" if split else "")
    try:
        if split is None:
            splits = list(datasets.get_dataset_split_names(name))
            if len(splits) != 1:
                raise DataError(f"The hub dataset {name} has splits {', '.join(splits)}; --data names one dataset.",
                                fix=f"name a split: hf:{name}:{splits[0] if splits else 'test'}.")
            split = splits[0]
            where = f"hf:{name}:{split}"
        ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except (ConnectionError, OSError, TimeoutError) as e:
        why = "offline: HF_HUB_OFFLINE is set or the hub cannot be reached" if offline else f"{type(e).__name__}: {_first_line(e)}"
        raise DataError(f"Cannot load {where} from the Hugging Face hub ({why}), and the datasets cache does not hold it.",
                        fix=f"on a connected machine run datasets.load_dataset('{name}', split='{split or 'test'}').save_to_disk(DIR) and pass --data DIR, "
                            "or set HF_DATASETS_CACHE to a cache that holds it.") from None  # fmt: skip
    except ValueError as e:  # an unknown split
        raise DataError(f"Cannot load {where}: {_first_line(e)}.", fix=f"name one of the dataset's splits: hf:{name}:<split>.") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types (DatasetNotFoundError, ...)
        raise DataError(f"Cannot load {where} from the Hugging Face hub ({type(e).__name__}: {_first_line(e)}).",
                        fix="check the dataset id (hf:ORG/NAME), or log in (`hf auth login`) for a gated dataset.") from None
    finally:
        if offline:
            cfg.HF_HUB_OFFLINE = old[0]
            if old[1] is not None:
                cfg.HF_DATASETS_OFFLINE = old[1]
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split is always given above
        raise DataError(f"{where} is a dataset dictionary.", fix=f"name a split: hf:{name}:<split>.")
    return ds, where


def _load_disk(path: Path, datasets: Any) -> Any:
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        if len(splits) != 1:
            raise DataError(f"{path} is a saved DatasetDict with splits {', '.join(splits) or '(none listed)'}; --data names one dataset.",
                            fix=f"point --data at one split's folder, e.g. {path / (splits[0] if splits else 'test')}.")
        path = path / splits[0]
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - FileNotFoundError, json errors, arrow errors
        raise DataError(f"Cannot read the saved dataset {path} ({type(e).__name__}: {_first_line(e)}).",
                        fix="re-save it with Dataset.save_to_disk, or check that the folder is complete.") from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - handled above
        raise DataError(f"{path} is a saved DatasetDict.", fix="point --data at one split's folder.")
    return ds


def parquet_files(spec: str | Path) -> list[Path]:
    """The parquet files a path or glob names, sorted."""
    s = str(spec)
    if any(ch in s for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(s) if p.endswith(".parquet"))
        if not files:
            raise DataError(f"Pattern {s} matches no .parquet files.", fix="check the pattern and the folder.")
        return files
    return [Path(s)]


def _load_file(spec: str | Path, fmt: str, datasets: Any) -> Any:
    if fmt == "parquet":
        files = parquet_files(spec)
        try:
            return datasets.Dataset.from_parquet([str(f) for f in files])
        except Exception as e:  # noqa: BLE001 - arrow raises ArrowInvalid, OSError, ...
            raise DataError(f"Cannot read parquet {spec} ({type(e).__name__}: {_first_line(e)}).", fix="pass a complete, readable .parquet file.") from None
    path = Path(spec)
    try:
        return datasets.Dataset.from_file(str(path))  # the stream format save_to_disk writes, memory-mapped
    except Exception:  # noqa: BLE001 - not the stream format: try the Arrow IPC file format
        pass
    try:
        import pyarrow as pa

        with pa.memory_map(str(path)) as src:
            table = pa.ipc.open_file(src).read_all()
        return datasets.Dataset(table)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"Cannot read {path} as Arrow ({type(e).__name__}: {_first_line(e)}).",
                        fix="pass an .arrow file written by datasets (save_to_disk) or pyarrow (IPC stream or file).") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


# --- columns -------------------------------------------------------------------------------------------
def _find_column(ds: Any, wanted: Sequence[str], override: str | None, what: str, source: str, required: bool) -> str | None:
    from pairscout.data.manifest import match_column

    names = list(ds.column_names)
    col = match_column(names, wanted, override, required=required, fix=f"pass one of those as --{what}-column.",
                       missing=f"Dataset {source} has no {what} column '{override}'; its columns: {', '.join(names) or 'none'}.")
    if col is not None or (override == "" and not required):
        return col
    if what == "image":
        datasets = _datasets()
        for c in names:
            if isinstance(ds.features.get(c), datasets.Image):
                return c
    if required:
        raise DataError(f"Dataset {source} has columns ({', '.join(names) or 'none'}) but no {what} column (one of {', '.join(wanted)}).",
                        fix=f"pass --{what}-column NAME (image_column= / caption_column= in the API).")
    return None


def _caption_list(value: Any, column: str, row: int, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for f in _CAPTION_FIELDS:
            if isinstance(value.get(f), str):
                return [value[f]]
    if isinstance(value, list | tuple):
        return [c for v in value for c in _caption_list(v, column, row, source)]
    raise DataError(f"The '{column}' value of row {row} of {source} is a {type(value).__name__} ({str(value)[:60]}), not text.",
                    fix="choose a caption column of strings, lists of strings, or records with a 'raw' field (--caption-column).")


# --- images --------------------------------------------------------------------------------------------
def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class HFImages:
    """Images in one column of a ``datasets.Dataset``: encoded bytes (read by memory-mapping) or file paths.

    Pickles as the dataset's file references (memory-mapped tables), so DataLoader workers get no copy.
    """

    kind = "hf"
    can_fail = True

    def __init__(self, ds: Any, column: str, rows: np.ndarray, base: Path | None, source: str) -> None:
        self.ds = ds
        self.column = column
        self.rows = np.asarray(rows, dtype=np.int64)
        self.base = None if base is None else str(base)
        self.source = source
        self.digests: np.ndarray | None = None
        """(n, 16) uint8 blake2b digests of the images held as bytes (filled while loading), zeros elsewhere."""

    def __len__(self) -> int:
        return len(self.rows)

    def _value(self, j: int) -> bytes | str | None:
        return cell_image(self.ds[int(self.rows[j])][self.column], self.base)

    def image_id(self, j: int) -> str:
        try:
            v = self._value(j)
        except (DataError, IndexError, OSError):
            v = None
        where = f"{self.source}[row {int(self.rows[j])}]"
        return f"{where} ({v})" if isinstance(v, str) else where

    def open(self, j: int) -> Image.Image:
        v = self._value(j)
        if v is None:
            raise ImageReadError("is empty (no bytes and no path)")
        return decode_image(io.BytesIO(v) if isinstance(v, bytes) else v)

    def digest(self, j: int) -> bytes:
        if self.digests is not None and self.digests[j].any():
            return self.digests[j].tobytes()
        from pairscout.data.images import FileImages

        v = self._value(j)
        if isinstance(v, bytes):
            return _digest(v)
        return FileImages([Path(v)]).digest(0) if v else b"pairscout:missing-image:hf"


def cell_image(value: Any, base: str | Path | None) -> bytes | str | None:
    """An image cell as bytes or an absolute path (``None``: empty). ``Image`` features give ``{bytes, path}``."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        value = path
    if value is None or isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) if value else None
    if isinstance(value, str):
        if not value.strip():
            return None
        p = Path(value.strip()).expanduser()
        return os.path.normpath(p if p.is_absolute() or base is None else Path(base) / p)
    raise DataError(f"An image cell holds a {type(value).__name__}, neither bytes nor a path.", fix="choose the image column with --image-column.")


def _image_keys(ds: Any, column: str, base: Path | None, digests: np.ndarray) -> list[str]:
    """Each row's image identity (the hex digest of its bytes, or its resolved path); fills ``digests``."""
    keys: list[str] = []
    i = 0
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=256):
        for value in batch.column(0).to_pylist():
            v = cell_image(value, base)
            if isinstance(v, bytes):
                if len(v) > MAX_IMAGE_BYTES:
                    v = v[:0]  # a bad image; it fails with its row when opened
                d = _digest(v)
                digests[i] = np.frombuffer(d, dtype=np.uint8)
                keys.append("sha:" + d.hex())
            else:
                keys.append("path:" + (v or f"row-{i}"))
            i += 1
    return keys


# --- the reader ----------------------------------------------------------------------------------------
def read_hf(
    spec: str | Path,
    *,
    fmt: str,
    images_root: Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    classnames: Sequence[str] | None = None,
    name: str | None = None,
) -> PairedDataset:
    """A Hugging Face dataset as a :class:`PairedDataset` (``fmt``: ``hf`` (a saved folder), ``hub``,
    ``parquet`` or ``arrow``). See the module docstring for the layouts and columns."""
    datasets = _datasets()
    with _quiet(datasets):
        if fmt == "hub":
            ds, source = _load_hub(str(spec), datasets)
            base, default_name = None, source.split("/")[-1].split(":")[0]
        elif fmt == "hf":
            path = Path(spec)
            ds, source = _load_disk(path, datasets), str(path)
            base, default_name = path, path.name
        else:
            ds, source = _load_file(spec, fmt, datasets), str(spec)
            first = parquet_files(spec)[0] if fmt == "parquet" else Path(spec)
            saved = fmt == "arrow" and is_saved_dataset(first.parent)  # an .arrow file of a save_to_disk folder
            fname = str(spec).rsplit("/", 1)[-1]
            stem = re.split(r"[-_.]?[*?\[]", fname)[0] if any(ch in fname for ch in "*?[") else Path(fname).stem
            base, default_name = first.parent, first.parent.name if saved else (stem or first.stem)
        if len(ds) == 0:
            raise DataError(f"Dataset {source} has no rows.", fix="pass a dataset with at least one (image, caption) row.")
        img_col = _find_column(ds, IMAGE_COLUMNS, image_column, "image", source, True)
        cap_col = _find_column(ds, CAPTION_COLUMNS, caption_column, "caption", source, True)
        lab_col = _find_column(ds, LABEL_COLUMNS, label_column, "label", source, False)
        feature = ds.features.get(img_col)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(img_col, datasets.Image(decode=False))
        root = images_root if images_root is not None else base
        digests = np.zeros((len(ds), 16), dtype=np.uint8)
        keys = _image_keys(ds, img_col, root, digests)
        captions = ds.data.column(cap_col).to_pylist()
        raw_labels = ds.data.column(lab_col).to_pylist() if lab_col else [None] * len(ds)
    lab_feature = ds.features.get(lab_col) if lab_col else None
    names = list(classnames) if classnames is not None else (list(lab_feature.names) if isinstance(lab_feature, datasets.ClassLabel) else None)
    if lab_col and any(isinstance(v, list | dict) for v in raw_labels[:64]):
        raise DataError(f"The label column '{lab_col}' of {source} holds lists or records, not one class per row.",
                        fix="pass --label-column with a single-label column, or --label-column '' for none.")

    def records() -> Iterator[Record]:
        for i, (key, cap, lab) in enumerate(zip(keys, captions, raw_labels, strict=True)):
            yield Record(key, _caption_list(cap, cap_col, i, source), lab, f"row {i}")

    rows = group_records(records(), source)
    first_row = {k: i for i, k in reversed(list(enumerate(keys)))}
    src_rows = np.array([first_row[k] for k in rows.keys], dtype=np.int64)
    labels, classes = map_labels(rows.labels, source, rows.where, names)
    images = HFImages(ds.select_columns([img_col]), img_col, src_rows, root, source)
    images.digests = digests[src_rows]
    columns = {"image": img_col, "caption": cap_col, "label": lab_col or ""}  # "": none (a reload reads the same rows)
    return PairedDataset(
        name=name or default_name, source=source, fmt=fmt, images=images, captions=rows.captions, labels=labels,
        classnames=classes, meta={"columns": columns, "hf_rows": len(ds)},
    )  # fmt: skip
