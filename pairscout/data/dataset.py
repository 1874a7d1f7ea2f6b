"""A paired image-caption dataset: images, >= 1 caption per image, optional class labels.

Built by :func:`pairscout.data.load_dataset` (every reader returns one), consumed by the encoding
runner (``load_image`` in DataLoader workers, ``flat_captions`` for text encoders) and the metrics
(``labels``, ``classnames``, ``split``).

Fingerprint (the embedding-cache key), a choice made for correctness over speed:

* file datasets (manifests, COCO, folders, tar shards): blake2b-128 over the rows in order of
  (blake2b of the image's bytes, the captions, the label) plus the classnames. It depends on content
  only, not on paths, so a moved or copied dataset keeps its cache, and any changed image byte,
  caption or label changes it. It reads every image once (lazily, on first access of
  ``fingerprint``, then cached on the object); an unreadable image hashes as a marker, so a dataset
  with bad images still has a fingerprint and ``--skip-bad`` works.
* the generated dataset: a hash of (generator version, seed, n, image size, every param), since its
  content is a pure function of those (no rendering needed).
* views from :meth:`PairedDataset.select` / :meth:`~PairedDataset.subset`: hash of (parent
  fingerprint, selected indices).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pairscout.data.images import FileImages, ImageReadError, ImageSource
from pairscout.errors import DataError

SKIP_BAD_FIX = "fix or remove it, or pass --skip-bad to skip such rows."
_FP_VERSION = b"pairscout-dataset-fingerprint-v1"


class PairedDataset:
    """Images with one or more captions each, optional integer labels and class names.

    Rows are addressed ``0 .. len(ds) - 1``. Image files are opened only in :meth:`load_image` (no
    handle is kept), so the object is cheap to pickle into DataLoader workers.

    Example:
        >>> from pairscout.data import load_dataset
        >>> ds = load_dataset("generated:n=8,seed=0,size=32")
        >>> len(ds), ds.load_image(0).size, ds.classnames[ds.labels[0]] in ds.captions[0][0]
        (8, (32, 32), True)
    """

    def __init__(
        self,
        *,
        name: str,
        source: str,
        fmt: str,
        images: ImageSource,
        captions: Sequence[Sequence[str]],
        labels: np.ndarray | Sequence[int] | None = None,
        classnames: Sequence[str] | None = None,
        index: np.ndarray | None = None,
        fingerprint: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Low-level constructor; readers build datasets, users call :func:`load_dataset`.

        Args:
            name: short display name (tables, plots, cache listings).
            source: the path or spec it was read from (for messages and ``describe``).
            fmt: the reader: ``csv``, ``jsonl``, ``coco``, ``folder``, ``webdataset``, ``generated``.
            images: the image source; row ``i`` shows image ``index[i]`` of it.
            captions: per row, its captions (each row needs >= 1 non-empty caption).
            labels: per row, a class id >= 0, or ``None``.
            classnames: class id -> name, or ``None``.
            index: row -> image-source index (views); ``None`` = identity.
            fingerprint: a known fingerprint (generated data); ``None`` = hash the content lazily.
            meta: extra JSON-able facts for ``describe`` (generator params, ...).
        """
        self.name = name
        self.source = source
        self.format = fmt
        self._images = images
        self._index = None if index is None else np.asarray(index, dtype=np.int64)
        self.captions: list[list[str]] = [[c for c in (str(x).strip() for x in row) if c] for row in captions]
        self.labels: np.ndarray | None = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classnames: list[str] | None = None if classnames is None else [str(c) for c in classnames]
        self._fingerprint = fingerprint
        self._parent: PairedDataset | None = None
        self._selection: np.ndarray | None = None
        self._root: tuple[int, np.ndarray, np.ndarray] | None = None
        """(rows, caption offsets) of the dataset this view was selected from, and this view's rows in it."""
        self._meta = dict(meta or {})
        self._check()

    def _check(self) -> None:
        n = len(self._images) if self._index is None else len(self._index)
        if len(self.captions) != n:
            raise DataError(f"Dataset {self.source} has {n} images but {len(self.captions)} caption rows.", fix="give every image its captions.")
        for i, row in enumerate(self.captions):
            if not row:
                raise DataError(
                    f"Row {i} ({self._images.image_id(self._src(i))}) of {self.source} has no non-empty caption.",
                    fix="add a caption for that image or remove it.",
                )
        if self.labels is not None:
            if self.labels.shape != (n,):
                raise DataError(f"Dataset {self.source} has {n} rows but {self.labels.shape[0]} labels.", fix="give every row one label.")
            if n and self.labels.min() < 0:
                raise DataError(f"Dataset {self.source} has a negative label.", fix="use class ids >= 0 or class names.")
            if self.classnames is not None and n and self.labels.max() >= len(self.classnames):
                raise DataError(
                    f"Dataset {self.source} has label {int(self.labels.max())} but only {len(self.classnames)} class names.",
                    fix="pass one class name per class id.",
                )

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str | Path],
        captions: Sequence[Sequence[str]],
        labels: Sequence[int] | None = None,
        classnames: Sequence[str] | None = None,
        *,
        name: str = "files",
    ) -> PairedDataset:
        """A dataset from image paths and their captions (tests, programmatic use)."""
        return cls(name=name, source=name, fmt="files", images=FileImages([Path(p) for p in paths]),
                   captions=captions, labels=labels, classnames=classnames)  # fmt: skip

    # --- rows ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        lab = f", {len(self.classnames or [])} classes" if self.labels is not None else ""
        return f"PairedDataset({self.name!r}, n={len(self)}, format={self.format}{lab})"

    def _src(self, i: int) -> int:
        return int(i) if self._index is None else int(self._index[i])

    def _row(self, i: int) -> int:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} rows")
        return i % len(self)

    def image_id(self, i: int) -> str:
        """The image's path, ``shard.tar:member`` or ``generated:<seed>:<index>`` (for messages)."""
        return self._images.image_id(self._src(self._row(i)))

    def locate(self, i: int) -> str:
        """Where row ``i`` is, as the user can find it: ``line 9 of x.csv`` for a manifest, else ``row 7 of SOURCE``."""
        i = self._row(i)
        where = getattr(self._images, "where", None)
        if where:
            return f"{where[self._src(i)]} of {self.source}"
        return f"row {i} of {self.source}"

    def load_image(self, i: int) -> Image.Image:
        """Row ``i``'s image as RGB. A missing or corrupt image raises :class:`DataError`."""
        i = self._row(i)
        try:
            return self._images.open(self._src(i))
        except ImageReadError as e:
            raise DataError(f"Image {self.image_id(i)} ({self.locate(i)}) {e}.", fix=SKIP_BAD_FIX) from None

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """Every caption in row order, and each caption's row index (int64)."""
        texts = [c for row in self.captions for c in row]
        rows = np.repeat(np.arange(len(self), dtype=np.int64), [len(r) for r in self.captions])
        return texts, rows

    def find_bad_images(self, num_threads: int | None = None) -> list[tuple[int, str]]:
        """Rows whose image cannot be opened or decoded, with the reason, in row order.

        Decodes every image (threads: PIL releases the GIL while decoding).
        """
        if not getattr(self._images, "can_fail", True):
            return []

        def check(i: int) -> tuple[int, str] | None:
            try:
                self._images.open(self._src(i))
            except ImageReadError as e:
                return i, f"{self.image_id(i)} {e}"
            return None

        threads = num_threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(self) < 32:
            results = [check(i) for i in range(len(self))]
        else:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(check, range(len(self)), chunksize=16))
        return [r for r in results if r is not None]

    # --- fingerprint ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """32 hex chars identifying the content (see the module docstring for what is hashed)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
            self._parent = None  # only needed for the fingerprint
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(_FP_VERSION)
        if self._parent is not None and self._selection is not None:
            h.update(b"select")
            h.update(self._parent.fingerprint.encode())
            h.update(self._selection.astype("<i8").tobytes())
            return h.hexdigest()
        for i, caps in enumerate(self.captions):
            h.update(self._images.digest(self._src(i)))
            h.update(json.dumps(caps, ensure_ascii=False).encode())
            h.update(b"L" + (b"-" if self.labels is None else str(int(self.labels[i])).encode()))
        h.update(json.dumps(self.classnames, ensure_ascii=False).encode())
        return h.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if state["_fingerprint"] is not None:
            state["_parent"] = None
        return state

    # --- views ---------------------------------------------------------------------------------
    def select(self, indices: Sequence[int] | np.ndarray) -> PairedDataset:
        """A view on rows ``indices`` (in the given order); a boolean mask of length n also works."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"A row mask for {self.source} has shape {idx.shape}, expected ({len(self)},).", fix="pass one bool per row.")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1) if idx.size else np.zeros(0, dtype=np.int64)
        if idx.size == 0:
            raise DataError(f"Selecting no rows of {self.source} leaves an empty dataset.", fix="select at least one row.")
        if idx.min() < 0 or idx.max() >= len(self):
            raise DataError(f"Row indices for {self.source} must be in [0, {len(self)}), got {int(idx.min())}..{int(idx.max())}.", fix="pass valid row indices.")
        src = idx if self._index is None else self._index[idx]
        view = PairedDataset(
            name=self.name,
            source=self.source,
            fmt=self.format,
            images=self._images,
            captions=[self.captions[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            classnames=self.classnames,
            index=src,
            meta=self._meta,
        )
        view._parent, view._selection = self, idx
        root_n, root_offsets, root_rows = self.root_rows()
        view._root = (root_n, root_offsets, root_rows[idx])
        view._meta = {**self._meta, "selection": {"of_n": len(self), "n": int(idx.size)}}
        return view

    def root_rows(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(rows of the dataset this one was selected from, its caption offsets, this view's rows in it)``;
        a dataset that is no view is its own root."""
        root = getattr(self, "_root", None)
        if root is not None:
            return root
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.captions], dtype=np.int64)]).astype(np.int64)
        return len(self), offsets, np.arange(len(self), dtype=np.int64)

    def file_rows(self, modality: str) -> tuple[np.ndarray, int]:
        """Where this dataset's images (``vision``) or flattened captions (``text``) sit in a file exported for the
        whole dataset it was selected from (``emb:`` sources): ``(positions, rows such a file has)``."""
        root_n, offsets, rows = self.root_rows()
        if modality == "vision":
            return rows, root_n
        counts = offsets[rows + 1] - offsets[rows]
        starts = np.repeat(offsets[rows] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return (starts + np.arange(int(counts.sum()), dtype=np.int64)).astype(np.int64), int(offsets[-1])

    def subset(self, n: int, seed: int = 0) -> PairedDataset:
        """``n`` rows drawn at random with ``seed`` (kept in original order); ``self`` if n >= len."""
        if n < 1:
            raise DataError(f"Subset size must be >= 1, got {n}.", fix="pass --rows (or --n) 1 or more.")
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.select(np.sort(rng.choice(len(self), size=n, replace=False)))

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Reproducible (train, test) row indices: disjoint, sorted, covering every row.

        Stratified by label when labels exist: each class puts ``round(test_fraction * count)`` of
        its rows in test (at least one each side for classes with >= 2 rows).
        """
        from pairscout.bounds import check

        check("--test-fraction", test_fraction, DataError)
        check("--seed", seed, DataError)
        n = len(self)
        if n < 2:
            raise DataError(f"Dataset {self.source} has {n} row; a train/test split needs >= 2.", fix="use more rows.")
        rng = np.random.default_rng(seed)
        groups = [np.arange(n)] if self.labels is None else [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        test: list[np.ndarray] = []
        for rows in groups:
            rows = rng.permutation(rows)
            k = int(round(test_fraction * len(rows)))
            if len(rows) >= 2:
                k = min(max(k, 1), len(rows) - 1)
            test.append(rows[:k])
        test_idx = np.sort(np.concatenate(test)).astype(np.int64)
        mask = np.ones(n, dtype=bool)
        mask[test_idx] = False
        return np.flatnonzero(mask).astype(np.int64), test_idx

    # --- metadata ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able facts for result metadata."""
        counts = [len(r) for r in self.captions]
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "format": self.format,
            "n": len(self),
            "n_captions": int(sum(counts)),
            "captions_per_row": {"min": min(counts, default=0), "mean": float(np.mean(counts)) if counts else 0.0, "max": max(counts, default=0)},
            "has_labels": self.labels is not None,
            "n_classes": None if self.labels is None else (len(self.classnames) if self.classnames else int(len(np.unique(self.labels)))),
            "fingerprint": self.fingerprint,
        }
        out.update(self._meta)
        return out
