"""One resolver for the words a user gives, used by the Python API and the CLI alike.

``pairscout.rank(..., "generated", n=500)`` and ``pairscout rank --n 500`` go through the same
:func:`resolve_data`, so they build the same dataset (same fingerprint, same cache entries, same results):

* ``data``: a dataset spec (:func:`pairscout.data.load_dataset`) or an already loaded dataset.
* ``n``: the generated dataset renders ``n`` rows; a file dataset takes a fixed-seed random subset of ``n`` rows.
* ``seed``: the generated dataset's seed unless the spec names one (``generated:seed=3`` wins); the subset seed
  for file datasets.

Zoos: :func:`resolve_zoos` takes names, TOML paths, comma lists of ids, lists of ids, or :class:`~pairscout.zoo.registry.Zoo` objects.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pairscout.zoo.registry import Zoo, resolve_zoo

log = logging.getLogger(__name__)

_GENERATED_SEED = re.compile(r"^\s*generated:.*\bseed\s*=")


def resolve_data(data: Any = "generated", *, n: int | None = None, seed: int | None = 0, skip_bad: bool = False,
                 skip_bad_rows: bool | None = None, columns: Mapping[str, str | None] | None = None) -> Any:
    """The :class:`~pairscout.data.PairedDataset` that ``data`` (+ ``n``, ``seed``) names.

    Args:
        data: a spec string or path, or a loaded dataset (then ``n`` takes a subset of it).
        n: rows (generated) or a fixed-seed subset (files); None: all.
        seed: generation seed (generated, unless the spec sets one) or subset seed.
        skip_bad: drop rows whose image is missing or corrupt (:func:`drop_bad_images`), logging how many,
            and skip malformed manifest rows (counted in ``describe()["skipped_lines"]``).
        skip_bad_rows: skip malformed manifest rows only (default: as ``skip_bad``).
        columns: ``{"image": ..., "caption": ..., "label": ...}`` column names of a manifest or Hugging Face
            dataset (``--image-column`` / ``--caption-column`` / ``--label-column``); missing keys are detected.
    """
    from pairscout.bounds import check
    from pairscout.data import load_dataset

    check("--n", n)
    if seed is not None:
        check("--seed", seed)
    if isinstance(data, str | Path):
        if isinstance(data, str) and _GENERATED_SEED.match(data):
            seed = None  # the spec's own seed
        cols = dict(columns or {})
        ds = load_dataset(data, n=n, seed=seed, skip_bad=skip_bad if skip_bad_rows is None else skip_bad_rows,
                          image_column=cols.get("image"), caption_column=cols.get("caption"), label_column=cols.get("label"))
    else:
        ds = data if n is None else data.subset(n, seed=seed or 0)
    if n is not None and len(ds) < n:  # a file dataset holds fewer rows than asked: said, not silent
        log.warning("--n %d asks for more rows than the data has: using all %d", n, len(ds))
    if skip_bad:
        ds, bad = drop_bad_images(ds)
        if bad:
            log.warning("skipped %d bad image(s), e.g. %s", len(bad), bad[0][1])
    return ds


def drop_bad_images(ds: Any) -> tuple[Any, list[tuple[int, str]]]:
    """``(dataset without the rows whose image cannot be read, [(row, reason), ...])``."""
    bad = ds.find_bad_images()
    if not bad:
        return ds, []
    bad_rows = {i for i, _ in bad}
    view = ds.select([i for i in range(len(ds)) if i not in bad_rows])
    # recorded so that probe / align rebuild the same rows: the selection before the skip (if any), and the skip
    view._meta = {k: v for k, v in view._meta.items() if k != "selection"}
    if "selection" in ds._meta:
        view._meta["selection"] = ds._meta["selection"]
    view._meta["skip_bad"] = {"count": len(bad), "first": bad[0][1]}
    return view, bad


def resolve_zoos(vision_zoo: str | Path | list | tuple | Zoo, text_zoo: str | Path | list | tuple | Zoo) -> tuple[Zoo, Zoo]:
    """The vision and the text zoo (each restricted to its modality)."""
    vz = vision_zoo if isinstance(vision_zoo, Zoo) else resolve_zoo(vision_zoo, "vision")
    tz = text_zoo if isinstance(text_zoo, Zoo) else resolve_zoo(text_zoo, "text")
    _check_ids(vz, tz)
    return vz, tz


def _check_ids(*zoos: Zoo) -> None:
    """A ``pack:`` or ``baseline:`` id that names none of its modality is one line before anything is encoded."""
    from pairscout.encoders.baselines import check_baseline
    from pairscout.encoders.emb_source import check_spec as check_emb

    for s in (s for z in zoos for s in z.encoders if s.source == "baseline"):
        check_baseline(s)
    for s in (s for z in zoos for s in z.encoders if s.source == "emb"):
        check_emb(s)
    specs = [s for z in zoos for s in z.encoders if s.source == "pack"]
    if specs:
        from pairscout.encoders.packs import check_pack

        for s in specs:
            check_pack(s)
