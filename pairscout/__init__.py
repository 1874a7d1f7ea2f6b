"""pairscout: pick the frozen vision and text encoders to pair before aligning them.

The Python API mirrors the CLI::

    import pairscout
    result = pairscout.rank("offline", "offline", "generated", n=500)
    result.pairs.head()          # a DataFrame, best pair first
    result = pairscout.RankResult.load("runs/demo")   # what `pairscout rank --out runs/demo` saved
"""

from __future__ import annotations

from pairscout.version import __version__

__all__ = ["RankResult", "RankSettings", "rank", "__version__"]


def __getattr__(name: str):
    # Lazy: `import pairscout` stays cheap (the CLI's --help does not import torch models).
    if name in ("RankResult", "RankSettings", "rank"):
        from pairscout import ranking

        return getattr(ranking, name)
    raise AttributeError(f"module 'pairscout' has no attribute {name!r}")
