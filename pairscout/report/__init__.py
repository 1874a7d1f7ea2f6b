"""Self-contained HTML reports rebuilt from saved result files (``pairscout report``)."""

from __future__ import annotations

from pairscout.report.build import build_report, collect

__all__ = ["build_report", "collect"]
