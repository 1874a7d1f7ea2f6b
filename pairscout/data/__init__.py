"""Paired image-caption datasets: readers for every format and the built-in generated data.

``load_dataset(spec)`` returns a :class:`PairedDataset` for a CSV/TSV/JSONL manifest, a COCO caption
JSON, an image folder with sidecar ``.txt`` captions (or an ``imagefolder`` ``metadata.jsonl``), WebDataset
``.tar`` shards, a Hugging Face dataset (``save_to_disk`` folder, ``.parquet`` / ``.arrow`` files,
``hf:ORG/NAME[:SPLIT]``; :mod:`pairscout.data.hf`), or ``generated[:n=..,seed=..,size=..]`` (rendered
scenes, the offline default).
"""

from __future__ import annotations

from pairscout.data.dataset import PairedDataset
from pairscout.data.load import FORMATS, load_dataset, load_generated

__all__ = ["FORMATS", "PairedDataset", "load_dataset", "load_generated"]
