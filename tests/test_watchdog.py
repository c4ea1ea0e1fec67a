"""The systemd watchdog: pings go through a real AF_UNIX datagram socket (what systemd
listens on as NOTIFY_SOCKET), sent by `daemon.sd_notify` from a task on the event loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nri_plugin import watchdog
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor, HostLimits
from nri_plugin.control.oom import OomController
from nri_plugin.daemon import sd_notify
from nri_plugin.events import EventLog
from nri_plugin.policy.intents import ContainerRef, Intents, Phase, SetOomScoreAdj
from tests.faults.hostroot import HostRoot

INTERVAL = 0.05


@dataclass
class NotifyListener:
    """A bound datagram socket with a thread that timestamps every message on arrival."""

    sock: socket.socket
    messages: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed at teardown
                return
            with self.lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.messages)

    def pings(self) -> list[float]:
        return [t for t, m in self.received() if m == "WATCHDOG=1"]

    def statuses(self) -> list[str]:
        return [m for _, m in self.received() if m.startswith("STATUS=")]


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    # A short directory: unix socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="nriwd-", dir="/tmp"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    lst = NotifyListener(sock)
    thread = threading.Thread(target=lst.run, daemon=True)
    thread.start()
    try:
        yield lst
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(timeout=2)
        shutil.rmtree(directory, ignore_errors=True)


def _env(usec: int, pid: int | None = None) -> dict[str, str]:
    return {"WATCHDOG_USEC": str(usec), "WATCHDOG_PID": str(pid or os.getpid())}


async def _settle() -> None:
    """Let the listener thread pick up what was sent just before."""
    await asyncio.sleep(INTERVAL)


# --- watchdog_interval -------------------------------------------------------------------


def test_interval_is_half_the_period_systemd_announced() -> None:
    assert watchdog.watchdog_interval(_env(30_000_000)) == 15.0
    # WATCHDOG_PID is optional (systemd sets it, but sd_watchdog_enabled accepts without)
    assert watchdog.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0


def test_no_watchdog_without_usec_or_for_another_process(caplog: pytest.LogCaptureFixture) -> None:
    assert watchdog.watchdog_interval({}) is None
    assert watchdog.watchdog_interval(_env(30_000_000, pid=os.getpid() + 1)) is None
    assert watchdog.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert "WATCHDOG_USEC='soon'" in caplog.text


async def test_no_watchdog_usec_means_no_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog.start_watchdog(sd_notify, lambda: "") is None
    assert watchdog.start_watchdog(sd_notify, lambda: "", env={}) is None
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "systemd-watchdog" not in names


# --- pings through the socket ------------------------------------------------------------


async def test_pings_reach_the_notify_socket_every_interval(listener: NotifyListener) -> None:
    task = watchdog.start_watchdog(sd_notify, lambda: "", env=_env(int(INTERVAL * 2e6)))
    assert task is not None
    try:
        await asyncio.sleep(INTERVAL * 10)
    finally:
        task.cancel()
    await _settle()
    pings = listener.pings()
    assert 6 <= len(pings) <= 12, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < INTERVAL * 4  # well inside the period systemd would allow (2x)
    assert listener.statuses() == []  # healthy: nothing but pings


async def test_a_blocked_loop_sends_no_ping(listener: NotifyListener) -> None:
    task = watchdog.start_watchdog(sd_notify, lambda: "", env=_env(int(INTERVAL * 2e6)))
    assert task is not None
    block = INTERVAL * 10

    async def wedged_handler() -> None:
        time.sleep(block)  # a blocking call on the loop thread: nothing else runs

    try:
        await asyncio.sleep(INTERVAL * 4)
        start = time.monotonic()
        await wedged_handler()
        end = time.monotonic()
        await asyncio.sleep(INTERVAL * 4)
    finally:
        task.cancel()
    await _settle()
    pings = listener.pings()
    # The listener thread may stamp a ping sent just before the block a little late.
    inside = [t for t in pings if start + INTERVAL < t < end]
    assert inside == [], "a ping arrived while the loop was blocked"
    assert any(t < start for t in pings) and any(t > end for t in pings)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > block * 0.9 > 2 * INTERVAL  # longer than systemd's period: restart


async def test_unhealthy_stops_pings_and_reports_why(listener: NotifyListener) -> None:
    reason = ""
    task = watchdog.start_watchdog(sd_notify, lambda: reason, env=_env(int(INTERVAL * 2e6)))
    assert task is not None
    try:
        await asyncio.sleep(INTERVAL * 4)
        reason = "host I/O stalled: 4 thread(s) blocked (/sys/fs/cgroup/x/cpu.weight)"
        await asyncio.sleep(INTERVAL)  # the tick that notices
        await _settle()
        noticed = time.monotonic()
        await asyncio.sleep(INTERVAL * 8)
        await _settle()
        during = [t for t in listener.pings() if t > noticed]
        statuses = listener.statuses()
        reason = ""  # recovers before systemd acted: pings resume
        await asyncio.sleep(INTERVAL * 4)
    finally:
        task.cancel()
    await _settle()
    assert during == []
    assert statuses == [
        "STATUS=unhealthy, watchdog pings stopped: host I/O stalled: 4 thread(s) blocked "
        "(/sys/fs/cgroup/x/cpu.weight)"
    ]  # once, not once per tick
    assert listener.pings()[-1] > noticed + INTERVAL * 8
    assert listener.statuses()[-1] == "STATUS=healthy again; watchdog pings resumed"


async def test_pings_survive_a_notify_socket_that_is_gone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    calls: list[bool] = []

    def notify(state: str) -> bool:
        calls.append(sd_notify(state))
        return calls[-1]

    task = watchdog.start_watchdog(notify, lambda: "", env=_env(int(INTERVAL * 2e6)))
    assert task is not None
    await asyncio.sleep(INTERVAL * 3)
    assert not task.done()  # systemd restarting is no reason to stop trying
    task.cancel()
    assert calls and not any(calls)


async def test_executor_health_reports_a_real_stall(tmp_path: Path) -> None:
    """The check the daemon hands the watchdog: "" while host work runs, the blocked file
    once every allowed worker thread is stuck on one (a FIFO stands in for hung cgroupfs)."""
    tree = HostRoot(tmp_path / "host")
    limits = HostLimits(deadline=0.1, retries=0, quarantine=0.3, max_stuck=1)
    executor = HostExecutor(Controllers([OomController(tree.host())]), EventLog(), limits)
    executor.start()
    try:
        check = watchdog.executor_health(executor)
        assert check() == ""
        cgroup = tree.add_container("c-stuck", [101])
        fifo = tree.block(101)
        target = ContainerRef("c-stuck", "default/pod/c-stuck", "pod-a", cgroup, None)
        intent = SetOomScoreAdj(phase=Phase.POST_START, container=target, reason="t", value=5)
        executor.submit(Intents(host=(intent,)))
        deadline = time.monotonic() + 5
        while not check():
            assert time.monotonic() < deadline, "the executor never stalled"
            await asyncio.sleep(0.01)
        assert check() == f"host I/O stalled: 1 thread(s) blocked ({fifo})"
        tree.release_all()
        while check():
            assert time.monotonic() < deadline + 5, "the executor never recovered"
            await asyncio.sleep(0.01)
    finally:
        executor.close()
        tree.release_all()
