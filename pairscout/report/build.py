"""One self-contained HTML page from saved run folders.

The page is rebuilt from the files alone (``rank.json`` + ``pairs.parquet`` + ``models.parquet`` of a
rank run, ``probe.json`` + ``probe.parquet`` of a probe, ``train_log.json`` + ``config.json`` of an alignment),
renders every plot as inline SVG (each also saved as PNG and SVG in the run's ``plots/`` folder), inlines its
CSS and its one small script, and references no URL of any kind, so it opens offline and can be mailed.
What each run contributes is in :mod:`pairscout.report.sections`; with several runs, each heading and plot
names its run (:func:`run_labels`).
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from pairscout.errors import PairscoutError
from pairscout.files import atomic_write_text
from pairscout.report.sections import RunFiles, align_section, probe_section, rank_section
from pairscout.version import __version__

log = logging.getLogger(__name__)

__all__ = ["RunFiles", "build_report", "collect", "run_labels"]

TEMPLATE = "report.html.j2"
GENERIC = {"run", "runs", "out", "align", "model", "train", "probe", "results"}
"""Folder names that say nothing about the run: its parent's name goes in front."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PairscoutError(f"{path} is unreadable ({e}).", fix="re-run the command that wrote it.") from None


def run_labels(paths: list[Path]) -> list[str]:
    """Names that tell the runs apart: the folder name, with its parent where the name is generic or shared."""
    def name(p: Path, depth: int) -> str:
        parts = p.resolve().parts
        return "/".join(parts[-depth:])

    labels = [name(p, 2 if p.resolve().name in GENERIC else 1) for p in paths]
    for depth in (2, 3):
        if len(set(labels)) == len(labels):
            break
        labels = [name(p, depth) if labels.count(lbl) > 1 else lbl for p, lbl in zip(paths, labels, strict=True)]
    return labels


ALIGN_FOLDERS = (".", "train", "model")
"""Where an alignment's ``train_log.json`` and ``config.json`` lie in its folder (``pairscout align --out`` writes
``train/`` and ``model/``; a bare training writes them in the folder itself), first found first."""
RESULT_FILES: dict[str, tuple[str, ...]] = {"rank.json": (".",), "probe.json": (".",), "train_log.json": ALIGN_FOLDERS}
"""The files that make a folder a run the report reads, and the subfolders each may lie in."""


def result_files(p: Path) -> dict[str, Path]:
    """The :data:`RESULT_FILES` folder ``p`` holds, by name (the first place each is found)."""
    found: dict[str, Path] = {}
    for name, subs in RESULT_FILES.items():
        hit = next((p / sub / name for sub in subs if (p / sub / name).is_file()), None)
        if hit is not None:
            found[name] = hit
    return found


def _model_folders(p: Path) -> list[Path]:
    """``p`` itself, or, for a folder of aligned models (``RUN/align``, where `pairscout align RUN` saves one folder per
    pair), each model folder in it."""
    if result_files(p):
        return [p]
    subs = sorted(q for q in p.iterdir() if q.is_dir() and result_files(q))
    return subs or [p]


def collect(paths: list[str | Path]) -> list[RunFiles]:
    """Find the result files in each folder (a folder may hold a rank run, a probe and an alignment)."""
    from pairscout.runs import STORE

    folders = [Path(p) for p in paths]
    for p in folders:
        if not p.is_dir():
            raise PairscoutError(f"{p} is not a folder.", fix="pass the folders that `pairscout rank/probe/align --out` wrote.")
    folders = [q for p in folders for q in _model_folders(p)]
    runs = []
    for p, lbl in zip(folders, run_labels(folders), strict=True):
        run = RunFiles(p, label=lbl)
        found = result_files(p)
        if "rank.json" in found:
            run.rank = STORE.rank(p)
        run.probe = STORE.probe(p)
        bound = run.probe.meta.get("rank_run_id") if run.probe is not None else None
        if bound and run.rank is not None and run.rank.run_id and bound != run.rank.run_id:
            log.warning("%s: its probe.json probed another rank run (%s, not %s); the report leaves it out. Fix: "
                        "`pairscout probe %s` again.", p, bound[:8], run.rank.run_id[:8], p)  # fmt: skip
            run.probe = None
        if "train_log.json" in found:
            run.train_log = _read_json(found["train_log.json"])
        config = next((p / sub / "config.json" for sub in ALIGN_FOLDERS if (p / sub / "config.json").is_file()), None)
        if config is not None:
            run.model_config = _read_json(config)
        if run.rank is None and run.probe is None and run.train_log is None:
            *first, last = RESULT_FILES
            raise PairscoutError(f"{p} holds no pairscout results (no {', '.join(first)} or {last}).",
                                 fix="pass a folder written by `pairscout rank/probe/align --out DIR`.")
        runs.append(run)
    return runs


GENERATOR = '<meta name="generator" content="pairscout">'
"""The line every report carries: a file with it (or the footer of reports before it) may be replaced."""


def is_report(path: Path) -> bool:
    """Whether ``path`` is an HTML report written by :func:`build_report` (and so may be written over): it starts
    with the doctype and carries :data:`GENERATOR` (or, before that marker, the "pairscout VERSION &middot; generated"
    line of the page's header)."""
    try:
        with Path(path).open("rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return False
    return text.startswith("<!DOCTYPE html>") and (GENERATOR in text or re.search(r"<p>pairscout \S+ &middot; generated ", text) is not None)


def prose(text: Any) -> Markup:
    """A sentence of the CLI's (verdict, read-out rule) as HTML: escaped, and its `commands` set as code, not backticks."""
    import re

    return Markup(re.sub(r"`([^`<>]+)`", r"<code>\1</code>", str(escape(str(text)))))


def generated_stamp() -> str:
    """When the page was made; ``$SOURCE_DATE_EPOCH`` (the reproducible-builds convention) fixes it, so the same runs
    give the same bytes."""
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(epoch)))
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def build_report(paths: list[str | Path], out: str | Path | None = None, *, title: str = "pairscout report") -> Path:
    """Write one HTML file for the given run folders; returns its path (default ``<first run>/report.html``)."""
    import jinja2

    runs = collect(paths)
    out = Path(out) if out is not None else runs[0].path / "report.html"
    if out.is_dir():  # `-o somefolder`: the page goes inside it, under the usual name
        out = out / "report.html"
    if not out.parent.is_dir():
        raise PairscoutError(f"the folder of the report file {out} does not exist.", fix="create it, or pass --out FILE in an existing folder.")
    if out.exists() and not is_report(out):  # rank.json, a plot, a cache entry, the user's own page: never replaced
        raise PairscoutError(f"{out} exists and is not a pairscout report; writing the report there would replace it.",
                             fix="pass --out a new file name (e.g. report.html), or the folder to write report.html into.")
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("pairscout").joinpath("templates", name).read_text(encoding="utf-8")),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["prose"] = prose
    several = len(runs) > 1
    ranks = [rank_section(r, several) for r in runs if r.rank is not None]
    probes = [probe_section(r, several) for r in runs if r.probe is not None]
    aligns = [align_section(r, several) for r in runs if r.train_log is not None]
    page = env.get_template(TEMPLATE).render(
        title=title,
        several=several,
        runs=[{"label": r.label, "path": str(r.path)} for r in runs],
        ranks=ranks,
        probes=probes,
        aligns=aligns,
        generated=generated_stamp(),
        version=__version__,
        sources=[str(r.path) for r in runs],
        json_dump=lambda v: html.escape(json.dumps(v, indent=1, default=str)),
    )
    atomic_write_text(out, page)
    return out
