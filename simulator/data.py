"""Where the optional public data lives (``BLOCK_DATA_DIR``); everything else runs on embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    value = os.environ.get("BLOCK_DATA_DIR")
    return Path(value) if value else None


def data_path(relative: str) -> Path:
    """Resolve a file under BLOCK_DATA_DIR, saying which variable to set when it is missing."""
    root = data_dir()
    if root is None:
        raise FileNotFoundError(f"{relative}: set BLOCK_DATA_DIR to the shared data folder to use it")
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (BLOCK_DATA_DIR={root})")
    return path
