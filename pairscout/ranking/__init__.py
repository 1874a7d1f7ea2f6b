"""Ranking every vision x text pair of two zoos (``pairscout rank``).

Names are imported lazily (PEP 562): the CLI reads :class:`RankSettings` without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"RankResult": "result", "RankSettings": "settings", "rank": "core", "write_plots": "core"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairscout.ranking' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pairscout.ranking.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
