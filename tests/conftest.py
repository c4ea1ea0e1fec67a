"""Shared test fixtures and paths."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Test data lives in the repository (tests/data/README.md says where each set comes from).
DATA = REPO / "tests" / "data"
CAPTURES = DATA / "nri-captures"
SYSFS_TOPOLOGIES = DATA / "sysfs-topologies"

# A test that hangs must not hold CI until its overall limit: past this, every thread's
# stack is written to stderr (which test, waiting on what) and the run ends. A timer
# thread, not faulthandler.dump_traceback_later: the fuzz oracle forks and uses
# faulthandler in its children, and a child forked while faulthandler's own watchdog
# thread waits would deadlock on that thread's lock.
HANG_LIMIT_S = 240


def _hung(nodeid: str) -> None:
    sys.stderr.write(f"\n{nodeid} still running after {HANG_LIMIT_S} s; every thread:\n")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(70)


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest) -> Iterator[None]:
    timer = threading.Timer(HANG_LIMIT_S, _hung, (request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
