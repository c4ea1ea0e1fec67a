"""PolicyThread (one worker, an Executor, with a socket it serves while idle) and Alarm
(the timerfd the loop watches)."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from nri_plugin.alarm import Alarm
from nri_plugin.policy_thread import PolicyThread


def test_the_alarm_goes_off_once_after_its_time() -> None:
    alarm = Alarm()
    try:
        armed = time.monotonic()
        alarm.arm_at(armed + 0.05)
        assert not alarm.fired()
        readable, _, _ = select.select([alarm.fileno()], [], [], 1.0)
        assert readable
        assert time.monotonic() - armed >= 0.049
        assert alarm.fired()
        assert not alarm.fired()  # read once
    finally:
        alarm.close()


def test_the_alarm_goes_off_at_a_monotonic_time_or_at_once_if_it_passed() -> None:
    alarm = Alarm()
    try:
        when = time.monotonic() + 0.05
        alarm.arm_at(when)
        readable, _, _ = select.select([alarm.fileno()], [], [], 1.0)
        assert readable and time.monotonic() >= when
        assert alarm.fired()
        alarm.arm_at(time.monotonic() - 1.0)
        readable, _, _ = select.select([alarm.fileno()], [], [], 0.5)
        assert readable and alarm.fired()
    finally:
        alarm.close()


def test_disarming_or_rearming_clears_an_expiry_nobody_read() -> None:
    alarm = Alarm()
    try:
        alarm.arm_at(time.monotonic() + 0.001)
        time.sleep(0.02)
        alarm.disarm()
        assert not alarm.fired()
        alarm.arm_at(time.monotonic() + 0.001)
        time.sleep(0.02)
        # a woken reader must not take this new arm for the old arm's expiry
        alarm.arm_at(time.monotonic() + 10)
        assert not alarm.fired()
    finally:
        alarm.close()


def test_tasks_run_in_order_in_one_named_thread() -> None:
    pool = PolicyThread()
    seen: list[tuple[int, str]] = []
    futures = [
        pool.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        for i in range(50)
    ]
    for future in futures:
        future.result(2)
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"nri-policy"}
    pool.shutdown()


def test_a_failing_task_fails_its_future_only() -> None:
    pool = PolicyThread()

    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        pool.submit(boom).result(2)
    assert pool.submit(lambda: 7).result(2) == 7
    pool.shutdown()


def test_shutdown_cancels_what_waits_and_refuses_new_work() -> None:
    pool = PolicyThread()
    gate, running = threading.Event(), threading.Event()

    def first_task() -> bool:
        running.set()
        return gate.wait(5)

    first = pool.submit(first_task)
    assert running.wait(2)  # what runs is not cancelled; only what waits
    waiting = pool.submit(lambda: 1)
    pool.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    gate.set()
    assert first.result(2) is True
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 1)


class _Server:
    """A SocketServer that echoes what it reads, and records what it was told."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = True
        self.calls: list[str] = []
        self.got = threading.Event()

    def reading_fd(self) -> int | None:
        return self.sock.fileno() if self.reads else None

    def readable(self) -> None:
        data = self.sock.recv(100)
        self.calls.append(f"read {data.decode()} in {threading.current_thread().name}")
        self.got.set()

    def idle(self) -> None:
        self.calls.append("idle")

    def task_begins(self) -> None:
        self.calls.append("begins")

    def task_ended(self) -> None:
        self.calls.append("ended")


def test_an_attached_socket_is_served_by_the_thread_while_idle() -> None:
    ours, theirs = socket.socketpair()
    pool = PolicyThread()
    server = _Server(ours)
    pool.attach(server)
    theirs.send(b"x")
    assert server.got.wait(2)
    time.sleep(0.05)
    assert server.calls == ["read x in nri-policy", "idle"]  # idle again after serving
    pool.submit(lambda: None).result(2)
    time.sleep(0.05)
    assert server.calls[2:] == ["begins", "ended", "idle"]
    # not read while the server says so; read again once it wants it and the thread wakes
    server.reads, server.got = False, threading.Event()
    pool.wake()
    time.sleep(0.05)
    theirs.send(b"y")
    assert not server.got.wait(0.2)
    server.reads = True
    pool.wake()
    assert server.got.wait(2)
    assert "read y in nri-policy" in server.calls
    pool.attach(None)
    pool.shutdown()
    ours.close()
    theirs.close()


def test_the_thread_sleeps_when_idle() -> None:
    """No polling: an idle thread with a socket attached uses no CPU."""
    ours, theirs = socket.socketpair()
    pool = PolicyThread()
    pool.attach(_Server(ours))
    pool.submit(lambda: None).result(2)
    assert pool.ident is not None
    stat = f"/proc/self/task/{_native_id(pool)}/stat"
    cpu_before = _cpu_ticks(stat)
    time.sleep(0.5)
    assert _cpu_ticks(stat) - cpu_before <= 1
    pool.attach(None)
    pool.shutdown()
    ours.close()
    theirs.close()


def _native_id(pool: PolicyThread) -> int:
    for thread in threading.enumerate():
        if thread.ident == pool.ident and thread.native_id is not None:
            return thread.native_id
    raise AssertionError("no policy thread")


def _cpu_ticks(stat: str) -> int:
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
