"""Where fp4serve keeps what it builds once and reuses: converted models, compiled CPU kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FP4SERVE_CACHE, or ~/.cache/fp4serve."""
    configured = os.environ.get("FP4SERVE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fp4serve"
