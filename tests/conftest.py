"""Shared test fixtures and paths."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
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
HANG_LIMIT_S = float(os.environ.get("NRI_QOS_TEST_HANG_LIMIT_S", "240"))


def _hung(nodeid: str, config: pytest.Config) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the dump must reach the real stderr, not a capture file
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n{nodeid} still running after {HANG_LIMIT_S} s; every thread:\n")
    faulthandler.dump_traceback(all_threads=True)
    # and what each unfinished asyncio task awaits (the loop's thread is idle in select
    # when a coroutine waits for something that never comes)
    for task in [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]:
        sys.stderr.write(f"\n{task!r}\n")
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()
    os._exit(70)


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest) -> Iterator[None]:
    timer = threading.Timer(HANG_LIMIT_S, _hung, (request.node.nodeid, request.config))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
