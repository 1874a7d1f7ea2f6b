"""pairscout: pick the frozen vision and text encoders to pair before aligning them."""

from __future__ import annotations

__version__ = "0.1.0"
