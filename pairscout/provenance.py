"""What every saved result records about how it was made: package versions, the command, the time.

One helper for rank, probe, training and aligned models, so their JSON files agree.
"""

from __future__ import annotations

import sys
import time
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "timm", "transformers", "sentence-transformers", "numpy", "scikit-learn", "pandas")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{"pairscout": ..., package: version}`` for the installed ``packages`` (missing ones left out)."""
    from pairscout.version import __version__

    out = {"pairscout": __version__}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """The command as the user typed it (``pairscout ...``)."""
    return " ".join(["pairscout", *sys.argv[1:]])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provenance(command: str | None = None, packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """``{"versions", "command", "created"}`` for a result's metadata."""
    return {"versions": versions(packages), "command": command, "created": now()}
