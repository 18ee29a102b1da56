"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with the real test data (``$GRADLEAK_DATA`` or ``<repo>/../shared/data``).

    Skips the test when the folder is absent, so the suite still runs on a bare checkout.
    """
    env = os.environ.get("GRADLEAK_DATA", "").strip()
    root = Path(env).expanduser() if env else _REPO.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root}; set GRADLEAK_DATA")
    return root
