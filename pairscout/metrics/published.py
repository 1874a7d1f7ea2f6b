"""Published scores with their provenance: MTEB averages for text encoders, ImageNet k-NN / probe accuracy
for vision encoders. Tables ship in ``pairscout/metrics/tables/`` (see the README next to their source in
``shared/data``); every row names its source. Unknown model -> ``None`` ("no published score"), never a
made-up or borrowed number.

Id matching (case-insensitive), in order:

1. the id as given, or an HF id named in the row's notes ("HF id facebook/dinov2-small");
2. the same after dropping source prefixes such as ``st:``, ``hf:``, ``timm:`` (``st:org/name`` -> ``org/name``);
3. a bare name without organisation (``all-MiniLM-L6-v2``, or timm's hub form ``timm/<name>``) matches the
   one table id with that last path component; two candidates -> no match;
4. a timm architecture without tag (``vit_small_patch14_dinov2``) resolves to timm's DEFAULT pretrained tag
   (``.lvd142m``) and matches only that: ``vit_small_patch16_224`` (default tag augreg) does not borrow the
   ``.dino`` row.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import asdict, dataclass
from importlib import resources

MTEB_TABLE = "mteb_scores.csv"
VISION_TABLE = "vision_knn_scores.csv"

#: ``published_vision(metric=...)`` shorthands -> substring of the table's metric column.
VISION_METRICS = {
    "knn": "weighted k-NN",
    "linear": "linear probe",
    "attentive": "attentive probe",
    "frozen_trunk": "frozen trunk",
    "fewshot": "16-shot",
}


@dataclass(frozen=True)
class PublishedScore:
    """One published figure and where it comes from."""

    query: str
    """The id that was asked for."""
    model_id: str
    """The table's id that matched."""
    score: float
    metric: str
    """What the number is, in full (benchmark or metric column)."""
    source: str
    """repository@commit:path or paper/table."""
    notes: str
    table: str

    def to_dict(self) -> dict[str, str | float]:
        return asdict(self)


@functools.cache
def _rows(table: str) -> tuple[dict[str, str], ...]:
    text = resources.files("pairscout.metrics").joinpath("tables").joinpath(table).read_text(encoding="utf-8")
    return tuple(csv.DictReader(text.splitlines()))


def mteb_tasks() -> list[dict[str, str]]:
    """The 56 MTEB(eng, v1) datasets behind the MTEB averages (``tables/mteb_tasks.txt``): one dict per task with
    keys category, task, split, hf_subset, metric."""
    text = resources.files("pairscout.metrics").joinpath("tables").joinpath("mteb_tasks.txt").read_text(encoding="utf-8")
    keys = ("category", "task", "split", "hf_subset", "metric")
    return [dict(zip(keys, (f.strip() for f in ln.split("|")), strict=True))
            for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


_HF_ALIAS = re.compile(r"HF id ([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]*[A-Za-z0-9_-])")
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*:(?!//)(.+)$")


def _aliases(row: dict[str, str]) -> set[str]:
    out = {row["model_id"].lower()}
    out.update(a.lower() for a in _HF_ALIAS.findall(row.get("notes", "")))
    return out


def _strip_prefixes(q: str) -> list[str]:
    out = [q]
    m = _PREFIX.match(q)
    while m:
        q = m.group(1)
        out.append(q)
        m = _PREFIX.match(q)
    return out


def _timm_default(arch: str) -> str | None:
    """``arch.default_tag`` from timm's registry, or None (unknown arch, tag given, or timm missing)."""
    if "." in arch or "/" in arch:
        return None
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    try:
        cfg = get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - any lookup failure means "no default tag known"
        return None
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return f"{arch}.{tag}" if tag else None


def _match(query: str, rows: tuple[dict[str, str], ...]) -> str | None:
    """The table model_id that ``query`` names, or None."""
    by_alias: dict[str, str] = {}
    for r in rows:
        for a in _aliases(r):
            by_alias.setdefault(a, r["model_id"])
    cands = _strip_prefixes(query.strip())
    for c in cands:
        if c.lower() in by_alias:
            return by_alias[c.lower()]
    for c in cands:
        name = c.lower()
        if name.startswith("timm/"):
            name = name[len("timm/"):]
        if "/" in name:
            continue
        hits = {r["model_id"] for r in rows if r["model_id"].lower().rsplit("/", 1)[-1] == name}
        if len(hits) == 1:
            return hits.pop()
        full = _timm_default(name)
        if full is not None and full.lower() in by_alias:
            return by_alias[full.lower()]
    return None


def _record(query: str, row: dict[str, str], metric_col: str, table: str) -> PublishedScore:
    return PublishedScore(query=query, model_id=row["model_id"], score=float(row["score"]), metric=row[metric_col],
                          source=row["source"], notes=row.get("notes", ""), table=table)


def published_mteb(model_id: str, benchmark: str | None = "MTEB(eng, v1)") -> PublishedScore | None:
    """Published MTEB average of a text encoder, with its source; None if the table has none.

    Args:
        model_id: e.g. ``st:sentence-transformers/all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``
            or ``all-MiniLM-L6-v2``.
        benchmark: substring the row's benchmark must contain. The default keeps the 56-dataset MTEB(eng, v1)
            average only; ``None`` also accepts the few SBERT 14-dataset rows (NOT comparable with MTEB: the
            record's ``metric`` says which one you got).

    Example:
        >>> published_mteb("all-MiniLM-L6-v2").score
        56.26
    """
    rows = _rows(MTEB_TABLE)
    mid = _match(model_id, rows)
    if mid is None:
        return None
    for r in rows:
        if r["model_id"] == mid and (benchmark is None or benchmark.lower() in r["benchmark"].lower()):
            return _record(model_id, r, "benchmark", MTEB_TABLE)
    return None


def published_vision(model_id: str, metric: str = "knn") -> PublishedScore | None:
    """Published ImageNet-1k figure of a vision encoder, with its source; None if the table has none.

    Args:
        model_id: timm name with or without tag (``vit_small_patch14_dinov2[.lvd142m]``, ``timm:...``), a table id
            such as ``bytedance/ibot:vits_16``, or an HF id named in the table's notes (``facebook/dinov2-small``).
        metric: "knn" (weighted k-NN, DINO protocol), "linear", "attentive", "frozen_trunk", "fewshot"
            (16-shot logistic regression), or any substring of the metric column. The rows are NOT all on one
            definition: the record's ``metric`` says exactly what the number is.
    """
    rows = _rows(VISION_TABLE)
    mid = _match(model_id, rows)
    if mid is None:
        return None
    key = VISION_METRICS.get(metric, metric).lower()
    for r in rows:
        if r["model_id"] == mid and key in r["metric"].lower():
            return _record(model_id, r, "metric", VISION_TABLE)
    return None


def published_scores(model_id: str) -> list[PublishedScore]:
    """Every published row for ``model_id`` in both tables (all metrics / benchmarks), possibly empty."""
    out = []
    for table, col in ((MTEB_TABLE, "benchmark"), (VISION_TABLE, "metric")):
        rows = _rows(table)
        mid = _match(model_id, rows)
        out += [_record(model_id, r, col, table) for r in rows if mid is not None and r["model_id"] == mid]
    return out
