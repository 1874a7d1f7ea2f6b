"""Ranking every vision x text pair of two zoos (``pairscout rank``)."""

from __future__ import annotations

from pairscout.ranking.core import RankSettings, rank, write_plots
from pairscout.ranking.result import RankResult

__all__ = ["RankResult", "RankSettings", "rank", "write_plots"]
