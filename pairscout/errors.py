"""User-facing errors.

Every error a user can cause (bad file, unknown model, missing package, ...) is raised as a
:class:`PairscoutError` whose message is ONE line that names the thing at fault and the fix.
The CLI prints that line and exits with ``exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations

import re

_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0/C1 control characters (ESC starts a terminal escape sequence), DEL and the bidirectional overrides;
newline and tab are kept."""


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``), never sent raw.

    The one function through which names, paths and file contents reach a terminal (error messages, the
    CLI's consoles and log lines): an encoder name or an image path that holds ``ESC [2J`` cannot clear the
    screen, retitle the window or hide text; it is printed so the user sees what is there.
    """
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", str(text))


class PairscoutError(Exception):
    """An error caused by input the user can fix. ``str(err)`` is a single line."""

    exit_code: int = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        message = " ".join(printable(message).split())
        if fix:
            message = f"{message} Fix: {' '.join(printable(fix).split())}"
        super().__init__(message)


class ImageReadError(Exception):
    """An image could not be read or decoded; ``str(err)`` is the reason (internal: readers turn it into a :class:`DataError`)."""


class DataError(PairscoutError):
    """A dataset, manifest, image or caption is missing, corrupt or malformed."""


class ZooError(PairscoutError):
    """A zoo file or an encoder spec is malformed or names an unknown source."""


class ModelLoadError(PairscoutError):
    """An encoder could not be built: a package is missing, weights are unreachable, ..."""


class CacheError(PairscoutError):
    """The embedding cache is missing an entry or holds one from other settings."""


class MetricError(PairscoutError):
    """Inputs to a metric are degenerate (NaN/inf, mismatched rows, too few rows, ...)."""


class EmbeddingError(PairscoutError):
    """An encoder produced embeddings that cannot be compared (0-dimensional, constant, all-zero, NaN/inf).

    A model failure, not bad input: the run leaves that model out and carries on with the others.
    """

    exit_code = 1


class TrainError(PairscoutError):
    """A training run cannot start or continue (bad config, checkpoint from other settings, ...)."""


class DivergenceError(TrainError):
    """The loss or a gradient became NaN/inf."""


class HeadError(PairscoutError):
    """A head config is malformed, or a head was called without the inputs it needs."""


class LossError(PairscoutError):
    """A loss was named or configured wrongly (unknown name, norm or chunk size)."""
