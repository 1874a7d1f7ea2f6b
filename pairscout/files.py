"""Files: how pairscout writes and reads them. Atomic writes (a path holds either its old content or the complete
new file, never half of one), names made safe as one path component, regular files read with a size limit, result
folders (tables + a JSON record) saved and loaded, output folders checked before the work.

Every writer goes through :func:`atomic_path`: write to a temporary file in the same folder, give it
the permissions an ordinary new file would get, then ``os.replace`` it into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (None, tmp, str(tmp)):  # name the file the user knows, not our temporary one
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_out_folder(path: str | Path | None) -> None:
    """Before any work: ``path`` can become a folder we write in (its first existing ancestor is a folder we may write to).

    Raises the ``OSError`` the write would raise at the end (``NotADirectoryError`` for a path under a file,
    ``PermissionError`` for a read-only folder), so a long run is not thrown away for its output folder.
    """
    import errno

    if path is None:
        return
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe if probe != path else path))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(probe))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_frame(df: Any, path: str | Path) -> None:
    """A pandas frame as parquet (``.parquet``) or CSV (anything else), without the index."""
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_name(text: str, default: str = "x", max_len: int = 80) -> str:
    """``text`` as ONE harmless path component: the only place where a name (an encoder's, a zoo's, a pair's)
    becomes part of a file or folder name.

    Every character outside ``A-Z a-z 0-9 . _ -`` becomes ``_`` (so ``/``, ``\\``, ``:`` and control characters
    cannot make a path), leading dots become ``_`` (never ``..``, ``.`` or a hidden file), and the result is cut
    to ``max_len`` characters; an empty result is ``default``. ``emb:/abs/path`` and ``../../x`` stay inside the
    folder they are joined to.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)[:max_len]
    return name or default


class NotRegularFileError(OSError):
    """The path is a FIFO, a device, a socket or a folder: reading it could hang or never end."""


class FileTooLargeError(OSError):
    """The file is larger than the limit given for its kind."""


def open_regular(path: str | Path, max_bytes: int | None = None) -> Any:
    """Open ``path`` for binary reading only if it is a regular file (at most ``max_bytes``).

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a FIFO never blocks
    the open and a file swapped in between check and open is still caught. Raises ``FileNotFoundError``,
    :class:`NotRegularFileError` or :class:`FileTooLargeError` (all ``OSError``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
            raise NotRegularFileError(f"{path} is {kind}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLargeError(f"{path} is {st.st_size / 2**20:.0f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: str | Path, encoding: str = "utf-8", max_bytes: int | None = None) -> str:
    """The text of a regular file (see :func:`open_regular`); ``UnicodeDecodeError`` on bad bytes."""
    with open_regular(path, max_bytes) as f:
        return f.read().decode(encoding)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key (sorted) whose JSON value differs between two settings dicts, as
    ``"key: OLD there, NEW now"``; None when they agree. Values are compared as JSON (paths, tuples...)."""
    import json

    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
    return None


def save_result(out: str | Path, tables: dict[str, Any], meta_file: str, meta: dict[str, Any],
                formats: tuple[str, ...] = (".parquet", ".csv")) -> Path:
    """Write a result folder: each frame of ``tables`` as ``<name><ext>`` for every format, then the JSON
    ``meta_file`` (last, so a folder with it is complete). Every file atomically."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        for ext in formats:
            atomic_frame(df, out / f"{name}{ext}")
    atomic_write_text(out / meta_file, json.dumps(meta, indent=2, default=str) + "\n")
    return out


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a whole number", float: "a number", bool: "true or false",
               type(None): "null"}


_REWRITE = {
    "rank.json": "rerun `pairscout rank` into that folder with --force",
    "probe.json": "rerun `pairscout probe` on the run (it replaces probe.json)",
    "verdicts.json": "rerun `pairscout probe` on the run (it rewrites the verdicts)",
    "config.json": "run `pairscout align` again with --force",
}
"""Which command writes each result file, and how to make it write the file again (with an option it has)."""


def rewrite_fix(path: str | Path, restore: bool = True) -> str:
    """The "Fix:" for an unreadable result file: the command that writes it, with only options that command has."""
    how = _REWRITE.get(Path(str(path)).name, "rerun the command that wrote it")
    return f"restore it, or {how}." if restore else f"{how[0].upper()}{how[1:]}."


def check_shape(meta: Any, shape: dict[str, Any], where: str) -> None:
    """Refuse a hand-edited or foreign JSON file in one line: ``shape`` maps dotted keys ("settings.metrics") to the
    type(s) their values must have (a missing key passes: older runs lack some). ints pass for floats, never bools.

    Raises:
        PairscoutError: naming the file, the key, what it holds and what it should hold.
    """
    from pairscout.errors import PairscoutError

    def bad(key: str, got: Any, want: tuple[type, ...]) -> PairscoutError:
        words = " or ".join(dict.fromkeys(_JSON_TYPES.get(t, t.__name__) for t in want))
        return PairscoutError(f"{where}: {key or 'the file'} holds {_JSON_TYPES.get(type(got), type(got).__name__)} "
                              f"({json_repr(got)}), not {words}; the file was edited or is not pairscout's.",
                              fix=rewrite_fix(where))

    if not isinstance(meta, dict):
        raise bad("", meta, (dict,))
    for key, want in shape.items():
        want = want if isinstance(want, tuple) else (want,)
        node: Any = meta
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is _MISSING:
            continue
        ok = any(isinstance(node, t) and not (t in (int, float) and isinstance(node, bool)) for t in want)
        ok = ok or (float in want and isinstance(node, int) and not isinstance(node, bool))
        if not ok:
            raise bad(key, node, want)


_MISSING = object()


def json_repr(v: Any, limit: int = 40) -> str:
    import json

    text = json.dumps(v, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_result(out: str | Path, tables: tuple[str, ...], meta_file: str, *, what: str, fix: str,
                optional: tuple[str, ...] = (), shape: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_result` wrote: ``(meta, {name: frame})`` from ``<name>.parquet`` files.

    ``optional`` tables are read when their file exists and left out of the dict when not (folders written
    by an older version).

    Raises:
        PairscoutError: ``meta_file`` is missing (``fix`` says how to make it) or a file is unreadable.
    """
    import json

    import pandas as pd

    from pairscout.errors import PairscoutError

    out = Path(out)
    if not (out / meta_file).is_file():
        raise PairscoutError(f"{out} holds no {what} ({meta_file} is missing).", fix=fix)
    try:
        meta = json.loads((out / meta_file).read_text(encoding="utf-8"))
        frames = {name: pd.read_parquet(out / f"{name}.parquet") for name in tables}
        frames.update({name: pd.read_parquet(out / f"{name}.parquet") for name in optional if (out / f"{name}.parquet").is_file()})
    except (OSError, ValueError) as e:
        raise PairscoutError(f"the {what} in {out} is unreadable ({e}).", fix=rewrite_fix(meta_file, restore=False)) from None
    check_shape(meta, shape or {}, str(out / meta_file))
    return meta, frames


def records(df: Any) -> list[dict[str, Any]]:
    """A frame as JSON-ready records (NaN -> None)."""
    import math

    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in df.to_dict(orient="records")]
