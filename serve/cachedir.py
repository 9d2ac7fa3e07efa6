"""Where mriseg keeps what it writes for itself: ``$MRISEG_CACHE``, else ``~/.cache/mriseg``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of imported weights (``models/local``), S3 model copies (``models``), demo models, ``mriseg up`` state.

    Set ``MRISEG_CACHE`` where the home directory is small, shared or read-only (containers, HPC nodes).
    """
    return Path(os.environ.get("MRISEG_CACHE") or Path.home() / ".cache" / "mriseg")
