"""Shared test fixtures and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# shared/ lives beside the project's root (CI has it too)
SHARED = REPO.parent / "shared"
CAPTURES = SHARED / "nri-captures"
SYSFS_TOPOLOGIES = SHARED / "sysfs-topologies"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the shared test data must sit beside the repository")
    return SHARED
