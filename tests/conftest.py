"""Shared fixtures. Data-backed tests read BLOCK_DATA_DIR and are skipped, with the reason, without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("BLOCK_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("BLOCK_DATA_DIR is not set to the shared data folder")
    return Path(value)
