"""Whether the Hugging Face hub can be reached: checked once per process (one TCP connect), so a machine without
internet (or with ``HF_HUB_OFFLINE=1``) fails a hub id in about a second, not after the hub client's minute of retries.
Encoders (model ids) and datasets (``hf:`` data ids) both ask here.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _probe_hub(endpoint: str, timeout: float) -> bool:
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when offline mode is on or the hub's host cannot be reached within ``timeout`` s.

    Checked once per process (one TCP connect), so a machine without internet fails in about a
    second instead of going through the hub client's minute of retries.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        endpoint = "https://huggingface.co"
    return _probe_hub(endpoint, timeout)
