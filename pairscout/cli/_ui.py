"""What the CLI shows: consoles, one-line errors, logging, progress and number formatting.

Everything meant for a human goes to stderr, so stdout stays machine-readable (``--json``). Text from
users, files and errors is printed literally: rich markup never sees it (``[brackets]`` stay).

Progress: on a terminal, rich progress bars; otherwise (a log file, a cluster job, a pipe) plain
timestamped lines: one when a phase starts, one when it ends, and one at most every
``PAIRSCOUT_PROGRESS_EVERY`` seconds (default 10) in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.segment import Segment
from rich.table import Table as _RichTable
from rich.text import Text

from pairscout.errors import PairscoutError, printable


class SafeConsole(Console):
    """A rich console that never writes a control character it did not make itself: the text of every segment
    (messages, table cells, titles, progress descriptions) goes through :func:`pairscout.errors.printable`;
    rich's own styling (colours, cursor moves of the progress bars) is left as is."""

    def _render_buffer(self, buffer):  # noqa: ANN001 - rich's signature
        return super()._render_buffer(s if s.control else Segment(printable(s.text), s.style, s.control) for s in buffer)


err = SafeConsole(stderr=True, highlight=False)
out = SafeConsole(highlight=False)
WIDE_PIPE = 160
"""Console width when output is not a terminal (files, CI logs) and COLUMNS is not set: tables keep full ids."""


class Table(_RichTable):
    """Every table of the CLI: its caption (the footnote) reads left to right under it, never centred into a block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("caption_justify", "left")
        super().__init__(*args, **kwargs)


def say(message: str, style: str | None = None) -> None:
    """A message for the user on stderr (no markup, no highlighting): word-wrapped at a terminal's width, one
    literal line in a file or pipe (where a log is grepped and read at any width)."""
    err.print(Text(message, style=style or ""), soft_wrap=not err.is_terminal)


def error(message: str) -> None:
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def warn(message: str) -> None:
    err.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`PairscoutError` as one red line (literally) and exit with its code; no traceback."""
    for console in (err, out):
        if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():  # an explicit COLUMNS is obeyed
            console.width = max(console.width, WIDE_PIPE)
    try:
        yield
    except PairscoutError as e:
        error(str(e))
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # a write or read the system refused (full disk, read-only folder, a file where a folder goes)
        error(os_error_line(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        error(f"interrupted. {INTERRUPT_KEPT}")
        raise typer.Exit(130) from None


INTERRUPT_KEPT = ("Kept: every embedding encoded so far (in the cache), align's last checkpoint, and the results written "
                  "before the interrupt (a result file is written whole or not at all); rerunning the same command resumes from them.")


def os_error_line(e: OSError) -> str:
    """One line for an error of the operating system: which file, what went wrong, and what to do."""
    import errno

    name = e.filename if e.filename is not None else "a file"
    what = e.strerror or str(e) or type(e).__name__
    fix = {errno.ENOSPC: "free some space there (or pass --out/--cache-dir on another disk) and rerun the same command.",
           errno.EDQUOT: "free some space there (or pass --out/--cache-dir on another disk) and rerun the same command.",
           errno.EACCES: "choose a folder you can write to (--out / --cache-dir), or change its permissions.",
           errno.EPERM: "choose a folder you can write to (--out / --cache-dir), or change its permissions.",
           errno.EROFS: "choose a folder on a writable disk (--out / --cache-dir).",
           errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path.",
           errno.EEXIST: "a file is in the way: remove it or choose another path.",
           errno.EISDIR: "that path is a folder: pass a file name.",
           errno.ENAMETOOLONG: "choose a shorter path."}.get(e.errno or 0, "check the path and the disk, then rerun the same command.")  # fmt: skip
    return " ".join(f"{name}: {what}. Fix: {fix}".split())


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return printable(f"{stamp} {level}{record.getMessage()}")


def setup_logging(verbose: bool) -> None:
    """INFO with ``--verbose``, else WARNING; rich on a terminal, timestamped plain lines elsewhere."""
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(_ErrStream())
        handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


class _ErrStream:
    """A file-like view of the stderr console (so CliRunner and redirected stderr both see the lines)."""

    def write(self, s: str) -> int:
        err.file.write(s)
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            err.file.flush()


# --- progress -------------------------------------------------------------------------------------
class Reporter:
    """One progress display for every long phase: ``update(name, done, total, note="")``."""

    def update(self, name: str, done: int, total: int | None, note: str = "") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # adapters for the core's callback signatures
    def phases(self):
        """``progress(name, done, total)`` (encoding, ranking phases, probes)."""
        return self.update

    def training(self, label: str):
        """``progress(step, total, info)`` of :func:`pairscout.align.train.train`."""

        def cb(step: int, total: int, info: dict[str, float]) -> None:
            self.update(label, step, total, f"loss {info.get('loss', float('nan')):.3f}, {info.get('samples_per_s', 0):.0f} img/s")

        return cb


class _RichReporter(Reporter):
    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}", markup=False),
                                 console=err, transient=False)  # fmt: skip
        self.tasks: dict[str, Any] = {}

    def update(self, name: str, done: int, total: int | None, note: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name[:48], total=total, note=note)
        self.progress.update(self.tasks[name], completed=done, total=total, note=note)


class _PlainReporter(Reporter):
    def __init__(self, every: float | None = None) -> None:
        self.every = float(os.environ.get("PAIRSCOUT_PROGRESS_EVERY", "10")) if every is None else every
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, name: str, done: int, total: int | None, note: str = "") -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"start": now, "last": now, "done": False}
            if not finished:
                self._line(name, done, total, 0.0, note, " started")
                return
        if st["done"]:
            return
        if finished or now - st["last"] >= self.every:
            st["last"], st["done"] = now, finished
            self._line(name, done, total, now - st["start"], note, " done" if finished else "")

    @staticmethod
    def _line(name: str, done: int, total: int | None, elapsed: float, note: str, tag: str) -> None:
        frac = f"{done}/{total} ({100 * done / total:.0f}%)" if total else str(done)
        say(f"{time.strftime('%H:%M:%S')} {name}: {frac}, {elapsed:.0f} s" + (f", {note}" if note else "") + tag)


@contextlib.contextmanager
def progress() -> Iterator[Reporter]:
    """The progress display for this output: rich bars on a terminal, timestamped lines otherwise."""
    if err.is_terminal:
        rep = _RichReporter()
        with rep.progress:
            yield rep
    else:
        yield _PlainReporter()


# --- JSON on stdout ---------------------------------------------------------------------------------
def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float as None (JSON has no NaN: a bare ``NaN`` breaks ``jq`` and
    ``json.loads`` in other languages); numpy scalars become Python numbers."""
    import math

    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    """The one way a command prints its ``--json`` result: valid JSON (no bare NaN), strings as they are."""
    import json

    out.print_json(json.dumps(finite_json(obj), default=str, allow_nan=False))


# --- numbers ---------------------------------------------------------------------------------------
def print_table(table: Any, wide: bool = False, max_width: int = 400) -> None:
    """A table on stderr; with ``wide`` (the user asked for every column) as wide as it needs, up to ``max_width``,
    even past the console's width, instead of squeezing every column to an ellipsis."""
    if not wide:
        err.print(table)
        return
    from rich.measure import Measurement

    need = Measurement.get(err, err.options.update(width=max_width), table).maximum
    if need <= err.width:
        err.print(table)
    else:  # Console.print never exceeds the console's width: a console of the width the table needs
        SafeConsole(stderr=True, highlight=False, width=min(need, max_width), force_terminal=err.is_terminal).print(table)


def num(x: Any, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def with_interval(row: Any, m: str) -> str:
    """``0.143 ± 0.011`` (value and half-width of its 95 % interval) or just the value."""
    v = row.get(m)
    if v is None or v != v:
        return "-"
    lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
    if lo is not None and hi is not None and lo == lo and hi == hi:
        return f"{v:.3f} ± {(hi - lo) / 2:.3f}"
    return f"{v:.3f}"


def literal(s: Any) -> Text:
    """A table cell or title that is printed as is (no markup)."""
    return s if isinstance(s, Text) else Text(str(s))


def command_line() -> str:
    return " ".join(["pairscout", *sys.argv[1:]])
