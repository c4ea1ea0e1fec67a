"""IdleCollection: collections happen when the policy thread is idle, not mid-request."""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from nri_plugin.gc_pacing import IdleCollection
from nri_plugin.policy_thread import PolicyThread


@pytest.fixture
def pacing() -> Iterator[IdleCollection]:
    collection = IdleCollection(thresholds=(700, 10, 10))
    collection.install()
    try:
        yield collection
    finally:
        collection.uninstall()


class _Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_install_freezes_start_up_and_raises_the_automatic_threshold(
    pacing: IdleCollection,
) -> None:
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (700 * pacing.backstop, 10, 10)


def test_nothing_is_collected_until_the_young_generation_passes_its_threshold(
    pacing: IdleCollection,
) -> None:
    gc.collect(0)
    assert pacing.collect_if_due() is None
    garbage = [_Cycle() for _ in range(2000)]
    del garbage
    assert gc.get_count()[0] > 700
    assert pacing.collect_if_due() == 0
    assert gc.get_count()[0] < 700


def test_an_older_generation_is_collected_when_its_count_is_due(
    pacing: IdleCollection,
) -> None:
    for _ in range(11):
        gc.collect(0)  # each young collection counts one toward generation 1
    assert gc.get_count()[1] > 10
    assert pacing.collect_if_due() == 1


def test_the_automatic_collector_stays_out_of_the_way_below_the_backstop(
    pacing: IdleCollection,
) -> None:
    collected: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.collect(0)
    gc.callbacks.append(record)
    try:
        cycles = [_Cycle() for _ in range(5000)]  # 7x CPython's threshold
        del cycles
    finally:
        gc.callbacks.remove(record)
    assert collected == []


def test_uninstall_restores_cpython_s_collection() -> None:
    before = gc.get_threshold()
    collection = IdleCollection()
    collection.install()
    collection.uninstall()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_policy_thread_collects_when_it_runs_out_of_work(pacing: IdleCollection) -> None:
    ran = threading.Event()

    def idle() -> None:
        pacing.collect_if_due()
        ran.set()

    pool = PolicyThread(on_idle=idle)
    ours, theirs = socket.socketpair()
    try:
        pool.submit(lambda: [_Cycle() for _ in range(2000)] and None).result(2)
        assert ran.wait(2)
        time.sleep(0.05)
        assert pacing.collections[0] >= 1
    finally:
        pool.shutdown()
        ours.close()
        theirs.close()
