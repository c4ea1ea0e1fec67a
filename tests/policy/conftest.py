"""Fixtures for policy tests: the recorded sysfs snapshots, extracted on first use."""

from __future__ import annotations

import pytest

from tests.snapshots import SNAPSHOTS, SnapshotLibrary

__all__ = ["SNAPSHOTS", "SnapshotLibrary", "snapshots"]


@pytest.fixture(scope="session")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> SnapshotLibrary:
    return SnapshotLibrary(tmp_path_factory.mktemp("sysfs-snapshots"))
