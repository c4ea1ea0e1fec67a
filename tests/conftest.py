"""Shared test fixtures and paths."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Test data lives in the repository (tests/data/README.md says where each set comes from).
DATA = REPO / "tests" / "data"
CAPTURES = DATA / "nri-captures"
SYSFS_TOPOLOGIES = DATA / "sysfs-topologies"
