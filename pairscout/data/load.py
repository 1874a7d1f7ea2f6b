"""One entry point for every dataset format: :func:`load_dataset` detects the format from the spec."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pairscout.data import generated as gen
from pairscout.data import hf
from pairscout.data.dataset import PairedDataset
from pairscout.errors import DataError

FORMATS = ("auto", "generated", "csv", "jsonl", "coco", "folder", "webdataset", "hf", "hub", "parquet", "arrow")
_GENERATED = re.compile(r"^generated(:.*)?$")
_HINT = ("pass a CSV/TSV/JSONL manifest, a COCO caption JSON, an image folder with .txt captions or metadata.jsonl, .tar shard(s), "
         "a Hugging Face dataset (save_to_disk folder, .parquet, .arrow, hf:ORG/NAME[:SPLIT]), or 'generated[:n=..,seed=..]'.")


def load_generated(spec: str = "generated", *, n: int | None = None, seed: int | None = None) -> PairedDataset:
    """The built-in generated dataset (see :mod:`pairscout.data.generated`); ``n`` / ``seed`` override the spec."""
    params = gen.parse_spec(spec)
    if n is not None:
        params["n"] = int(n)
    if seed is not None:
        params["seed"] = int(seed)
    params = gen.check_params(params, spec)
    captions, labels = gen.generated_rows(params)
    return PairedDataset(
        name="generated",
        source="generated:" + ",".join(f"{k}={v}" for k, v in params.items()),
        fmt="generated",
        images=gen.GeneratedImages(params),
        captions=captions,
        labels=labels,
        classnames=list(gen.CLASSES[: params["classes"]]),
        fingerprint=gen.fingerprint(params),
        meta={"generator_version": gen.GENERATOR_VERSION, "params": params},
    )


def _read_classnames(classnames: Sequence[str] | str | Path | None) -> list[str] | None:
    if classnames is None:
        return None
    if isinstance(classnames, str | Path):
        p = Path(classnames)
        try:
            return [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except OSError as e:
            raise DataError(f"Cannot read class-names file {p}: {e}.", fix="pass a text file with one class name per line.") from None
    return [str(c) for c in classnames]


def _detect(path: Path) -> str:
    from pairscout.data.folder import find_images

    if path.is_dir():
        if hf.is_saved_dataset(path):
            return "hf"
        for meta in ("metadata.jsonl", "metadata.csv"):  # the Hugging Face imagefolder layout
            if (path / meta).is_file():
                return "manifest:" + meta
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and any((p / m).is_file() for m in ("metadata.jsonl", "metadata.csv")))
        if splits:
            raise DataError(f"Folder {path} is an imagefolder with splits {', '.join(splits)} (each with its own metadata file); --data names one.",
                            fix=f"pass one split's folder, e.g. --data {path / splits[0]}.")
        if find_images(path):
            return "folder"
        if any(p.suffix == ".tar" for p in path.iterdir()):
            return "webdataset"
        raise DataError(f"Folder {path} holds no images, .tar shards or metadata.jsonl/metadata.csv.", fix=_HINT)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"  # COCO or a list of records: decided after parsing
    if suffix in (".parquet", ".arrow"):
        return suffix[1:]
    if suffix in (".tar", ".tgz") or path.name.lower().endswith((".tar.gz", ".tar.zst")):
        return "webdataset"  # compressed ones get a clear error from the shard reader
    raise DataError(f"Cannot tell the format of {path} (suffix '{path.suffix}').", fix=_HINT)


def _no_columns(given: list[str], what: str) -> None:
    if given:
        raise DataError(f"{' and '.join(given)} name columns of a table, but {what} has no columns to choose.",
                        fix="drop them, or pass a manifest / Hugging Face dataset.")


def load_dataset(
    spec: str | Path,
    *,
    format: str = "auto",  # noqa: A002 - the natural name for the user-facing option
    images_root: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    classnames: Sequence[str] | str | Path | None = None,
    name: str | None = None,
    n: int | None = None,
    seed: int | None = None,
    skip_bad: bool = False,
) -> PairedDataset:
    """Load a paired image-caption dataset; the format is detected from ``spec``.

    Formats (``format="auto"`` picks by the spec):

    * ``generated`` / ``generated:n=2000,seed=0,size=128``: the built-in rendered scenes
      (:mod:`pairscout.data.generated`). A ``str`` of that form always means this; pass a ``Path``
      to read a folder called ``generated``.
    * ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.ndjson`` / ``.json`` (a list of records): a manifest
      (:mod:`pairscout.data.manifest`: image column ``image``, ``image_path``, ``filepath``,
      ``file_name``, ``filename``, ``path``, ``img``; caption column ``caption``, ``captions``,
      ``text``, ``sentence``; optional label column ``label``, ``class``, ``class_name``,
      ``category``).
    * ``.json`` with ``images`` and ``annotations``: COCO captions (:mod:`pairscout.data.coco`).
    * a folder: ``metadata.jsonl`` / ``metadata.csv`` in it -> that manifest; images -> sidecar
      ``.txt`` captions, class sub-folders as labels (:mod:`pairscout.data.folder`); else ``.tar``
      files -> WebDataset shards.
    * ``x.tar``, ``x-{000..009}.tar``, ``x-*.tar``: WebDataset shards (:mod:`pairscout.data.shards`).
    * Hugging Face datasets (:mod:`pairscout.data.hf`, through the ``datasets`` library): a ``save_to_disk``
      folder, ``.parquet`` file(s) (a glob works), an ``.arrow`` file, or ``hf:ORG/NAME[:SPLIT]`` on the hub
      (columns: image ``image``/``jpg``/``img``, caption ``caption``/``captions``/``text``/``sentences``, label
      ``label``; or the ``*_column`` arguments).

    Args:
        spec: path, shard pattern or generated spec.
        format: force a reader: one of :data:`FORMATS`.
        images_root: folder that relative image paths (manifests) / file names (COCO) live in.
        image_column, caption_column, label_column: manifest / Hugging Face column names (default: detected;
            ``label_column=""``: no labels).
        classnames: class id -> name for integer labels (a list, or a text file with one per line);
            for string labels it fixes the id order.
        name: display name (default: from the file or folder name).
        n: generated data: number of rows; other formats: a fixed-seed random subset of ``n`` rows.
        seed: generated data: the generation seed; other formats: the subset seed (default 0).
        skip_bad: skip malformed manifest lines (counted in ``describe()["skipped_lines"]``) instead
            of raising. Bad images are found separately (:meth:`PairedDataset.find_bad_images`).

    Raises:
        DataError: the spec does not exist, its format is unknown, or its content is malformed.

    Example:
        >>> ds = load_dataset("generated:n=4,size=32")
        >>> len(ds), ds.classnames[:3]
        (4, ['circle', 'square', 'triangle'])
    """
    if format not in FORMATS:
        raise DataError(f"Unknown dataset format '{format}'.", fix=f"use one of {', '.join(FORMATS)}.")
    names = _read_classnames(classnames)
    root = None if images_root is None else Path(images_root)
    if root is not None and not root.is_dir():
        raise DataError(f"Images root {root} is not a folder.", fix="pass the folder the images live in.")

    given = [f"--{k}-column" for k, v in (("image", image_column), ("caption", caption_column), ("label", label_column)) if v is not None]
    if format == "generated" or (format == "auto" and isinstance(spec, str) and _GENERATED.match(spec.strip())):
        _no_columns(given, "the generated dataset")
        return load_generated(str(spec).strip(), n=n, seed=seed)

    s = str(spec)
    fmt = format
    if fmt == "auto" and isinstance(spec, str) and re.search(r"\.tar\b", s) and any(ch in s for ch in "{*?["):
        fmt = "webdataset"
    if fmt == "auto" and isinstance(spec, str) and s.endswith(".parquet") and any(ch in s for ch in "*?["):
        fmt = "parquet"
    if fmt in ("auto", "hub") and hf.is_hub_spec(spec):
        fmt = "hub"
    path = Path(s).expanduser()
    if fmt not in ("webdataset", "hub") and not (fmt == "parquet" and any(ch in s for ch in "*?[")) and not path.exists():
        raise DataError(f"Dataset {s} does not exist.", fix=_HINT)
    if fmt == "auto":
        fmt = _detect(path)
    if fmt.startswith("manifest:"):
        path, fmt = path / fmt.split(":", 1)[1], "jsonl" if fmt.endswith(".jsonl") else "csv"

    if fmt in ("coco", "folder", "webdataset"):
        _no_columns(given, f"{s} (format {fmt})")
    if fmt in ("json", "coco"):
        from pairscout.data.coco import is_coco, load_json, read_coco

        data = load_json(path)
        if is_coco(data):
            _no_columns(given, f"the COCO caption file {path}")
            ds = read_coco(path, data, images_root=root, name=name)
        elif fmt == "coco":
            raise DataError(f"{path} is not a COCO caption file (needs 'images' and 'annotations').", fix="point to captions_*.json or use format='auto'.")
        else:
            fmt = "jsonl"  # a JSON list of records
    if fmt in ("csv", "jsonl"):
        from pairscout.data.manifest import read_manifest

        ds = read_manifest(path, fmt=fmt, images_root=root, image_column=image_column, caption_column=caption_column,
                           label_column=label_column, classnames=names, name=name, skip_bad=skip_bad)  # fmt: skip
    elif fmt == "folder":
        from pairscout.data.folder import read_folder

        ds = read_folder(path, name=name)
    elif fmt == "webdataset":
        from pairscout.data.shards import read_shards

        ds = read_shards(path if path.exists() else s, classnames=names, name=name)
    elif fmt in ("hf", "hub", "parquet", "arrow"):
        ds = hf.read_hf(s.strip() if fmt == "hub" else (s if fmt == "parquet" and not path.exists() else path), fmt=fmt,
                        images_root=root, image_column=image_column, caption_column=caption_column,
                        label_column=label_column, classnames=names, name=name)  # fmt: skip
    if n is not None:
        ds = ds.subset(n, seed=0 if seed is None else seed)
    return ds
