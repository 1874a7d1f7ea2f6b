"""WebDataset tar shards with random access.

Accepts one ``.tar``, a brace pattern (``shards-{000..003}.tar``, ``{a,b}.tar``), a glob
(``shards-*.tar``) or a folder of ``.tar`` files (sorted by name). Members follow the WebDataset
convention: ``<key>.<ext>``, the key being the member path up to the first dot of its file name.
Per sample (= key within a shard): the image is the first of ``jpg``, ``jpeg``, ``png``, ``webp``;
captions come from ``txt`` (one per non-empty line), else from ``json`` (``"caption"``: a string, or
``"captions"``: a list); the label from ``cls`` (an integer). Samples without an image are skipped
(logged); a sample with an image but no caption is an error.

Why ``tarfile`` and not the ``webdataset`` package: ``webdataset`` streams samples in order, but the
dataset must serve ``load_image(i)`` for any ``i`` in any worker. One pass with ``tarfile`` over
the headers (image data is skipped, not read) records each image member's byte offset and size;
``load_image`` then opens the shard, seeks and reads those bytes. Only uncompressed tars allow
that.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import re
import tarfile
from pathlib import Path

from pairscout.data.dataset import PairedDataset
from pairscout.data.images import TarImages, TarMember
from pairscout.data.rows import Record, group_records, map_labels
from pairscout.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``[a-00.tar, a-01.tar, a-02.tar]``; ``{x,y}`` alternatives; nests left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        padded = (len(a) > 1 and a.startswith("0")) or (len(b) > 1 and b.startswith("0"))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(k).zfill(width) for k in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal {...}
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def resolve_shards(spec: str | Path) -> list[Path]:
    """The shard files a tar spec names, in order; DataError naming a missing one."""
    s = str(spec)
    if Path(s).is_dir():
        shards = sorted(p for p in Path(s).iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards:
            raise DataError(f"Folder {s} holds no .tar shards.", fix="point to a folder of WebDataset .tar files.")
        return shards
    if "{" in s:
        shards = [Path(p) for p in expand_braces(s)]
        for p in shards:
            if not p.is_file():
                raise DataError(f"Shard {p} of pattern {s} does not exist.", fix="fix the pattern's range or add the missing shard.")
        return shards
    if any(ch in s for ch in "*?["):
        shards = sorted(Path(p) for p in globlib.glob(s) if p.endswith(".tar"))
        if not shards:
            raise DataError(f"Pattern {s} matches no .tar files.", fix="check the pattern and the folder.")
        return shards
    return [Path(s)]


def _check_uncompressed(path: Path) -> None:
    if path.suffix.lower() in (".gz", ".tgz", ".bz2", ".xz", ".zst") or path.name.lower().endswith((".tar.gz", ".tar.zst")):
        raise DataError(f"Shard {path} is compressed; random access needs an uncompressed .tar.", fix=f"decompress it (e.g. gunzip {path.name}).")


def _text(tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> str:
    """A text member as UTF-8 (a BOM dropped); other bytes are one line naming the member, never replaced by '?'
    (the same rule as manifests and caption files)."""
    f = tf.extractfile(m)
    if f is None:
        return ""
    data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{m.name} in shard {path} is not UTF-8 text (byte {e.start}: {e.reason}; e.g. Latin-1 captions).",
                        fix=f"re-encode its text as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove {m.name}.") from None


def _index_shard(path: Path, shard: int, members: list[TarMember], records: list[Record]) -> None:
    _check_uncompressed(path)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                km = _KEY_EXT.match(m.name)
                if km is None:
                    continue
                key, ext = km.group(1), km.group(2).lower()
                samples.setdefault(key, {})[ext] = m
            n_skipped = 0
            for key, parts in samples.items():
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is None:
                    n_skipped += 1
                    continue
                where = f"sample {key}"
                caps: list[str] = []
                if "txt" in parts:
                    caps = _text(tf, parts["txt"], path).splitlines()
                elif "json" in parts:
                    try:
                        meta = json.loads(_text(tf, parts["json"], path))
                    except json.JSONDecodeError as e:
                        raise DataError(f"The json of {where} in shard {path} does not parse ({e.msg}).", fix="fix or remove that sample.") from None
                    if isinstance(meta, dict):
                        c = meta.get("captions", meta.get("caption"))
                        caps = [str(x) for x in c] if isinstance(c, list) else ([] if c is None else [str(c)])
                label = _text(tf, parts["cls"], path).strip() if "cls" in parts else None
                members.append(TarMember(shard, img.name, img.offset_data, img.size))
                records.append(Record(f"{path}:{key}", caps, label, where))
            if n_skipped:
                log.warning("%s: skipped %d sample(s) without an image (%s)", path, n_skipped, "/".join(IMAGE_EXTS))
    except FileNotFoundError:
        raise DataError(f"Shard {path} does not exist.", fix="check the path.") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"Shard {path} is not a readable tar file ({e}).", fix="re-create or remove the shard.") from None


def read_shards(spec: str | Path, *, classnames: list[str] | None = None, name: str | None = None) -> PairedDataset:
    """Index WebDataset tar shards once and build a random-access dataset over them."""
    shards = resolve_shards(spec)
    members: list[TarMember] = []
    records: list[Record] = []
    for k, path in enumerate(shards):
        _index_shard(path, k, members, records)
    if not records:
        raise DataError(f"WebDataset {spec} holds no samples with an image ({'/'.join(IMAGE_EXTS)}).", fix="check the shards' member names (<key>.jpg, <key>.txt).")
    rows = group_records(records, spec)  # keys are unique per shard: checks captions only
    labels, names = map_labels(rows.labels, spec, rows.where, classnames)
    s = str(spec)
    default_name = Path(s).name if Path(s).is_dir() else re.split(r"[{*?\[]", Path(s).name)[0].rstrip("-_.") or "shards"
    if default_name.endswith(".tar"):
        default_name = default_name[:-4]
    return PairedDataset(
        name=name or default_name, source=s, fmt="webdataset", images=TarImages(shards, members),
        captions=rows.captions, labels=labels, classnames=names, meta={"n_shards": len(shards)},
    )  # fmt: skip
