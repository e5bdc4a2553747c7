"""Where edge-mtp keeps what it can rebuild: synthetic pairs, the demo bundle, converted layer templates."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$EDGE_MTP_CACHE, else ~/.cache/edge-mtp."""
    return Path(os.environ.get("EDGE_MTP_CACHE", Path.home() / ".cache" / "edge-mtp"))
