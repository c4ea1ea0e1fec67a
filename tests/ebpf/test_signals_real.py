"""The signal sampler against this host's real cgroups, with real CPU burners.

Groups are made as /sys/fs/cgroup/unified/nri-qos-sig-<random> (usage, PSI) and
/sys/fs/cgroup/cpu/nri-qos-sig-<random> (CFS quota) and removed in `finally` after the
burners are killed and reaped; the memory hierarchy (where the sandbox keeps
process_api) is never touched. Windows are ~0.6 s, so the file runs in a few seconds.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ebpf.signals.cpi import (
    PERF_COUNT_SW_CONTEXT_SWITCHES,
    PERF_COUNT_SW_TASK_CLOCK,
    PERF_TYPE_SOFTWARE,
    CountersUnavailable,
    Event,
    PerfCounters,
)
from ebpf.signals.sampler import SignalSampler
from ebpf.watched import WatchedContainer
from qos_model.signals import SignalSnapshot
from tests.processes import start_process, stop

UNIFIED = Path("/sys/fs/cgroup/unified")
CPU_V1 = Path("/sys/fs/cgroup/cpu")
WINDOW_S = 0.6
BURN = (sys.executable, "-c", "while True: pass")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups"),
    pytest.mark.skipif(
        not (UNIFIED / "cgroup.procs").exists() or not (CPU_V1 / "cpu.cfs_quota_us").exists(),
        reason="needs the hybrid layout: cgroup2 at /sys/fs/cgroup/unified and v1 cpu",
    ),
]


@dataclass
class Groups:
    v2: Path
    cpu: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def burner(self, cpu: int | None) -> int:
        """A busy loop (pinned to `cpu`, if given) in both groups."""
        process = start_process(*BURN)
        self.processes.append(process)
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        (self.v2 / "cgroup.procs").write_text(str(process.pid))
        (self.cpu / "cgroup.procs").write_text(str(process.pid))
        return process.pid

    def container(self) -> WatchedContainer:
        return WatchedContainer(id="real", name="test/real/burner", cgroup2_dir=self.v2,
                                cpu_dir=self.cpu)  # fmt: skip


def _rmdir(path: Path) -> None:
    """rmdir, retried briefly: a group is busy until its last killed task is released."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    path.rmdir()


@pytest.fixture
def groups() -> Iterator[Groups]:
    name = f"nri-qos-sig-{secrets.token_hex(4)}"
    state = Groups(UNIFIED / name, CPU_V1 / name)
    try:
        state.v2.mkdir()
        state.cpu.mkdir()
        yield state
    finally:
        for process in state.processes:
            stop(process)
        try:
            _rmdir(state.cpu)
        finally:
            _rmdir(state.v2)


def _two_windows(sampler: SignalSampler, container: WatchedContainer) -> SignalSnapshot:
    sampler.sample([container], now_s=time.monotonic())
    time.sleep(WINDOW_S)
    return sampler.sample([container], now_s=time.monotonic())


def test_usage_and_cpu_pressure_rise_when_two_burners_share_a_cpu(groups: Groups) -> None:
    cpu = min(os.sched_getaffinity(0))
    groups.burner(cpu)
    groups.burner(cpu)
    time.sleep(0.1)  # both are in the groups and running
    sampler = SignalSampler()
    try:
        snap = _two_windows(sampler, groups.container())
    finally:
        sampler.close()
    one = snap.containers["real"]
    window_ns = snap.window_s * 1e9
    # up to one CPU's worth between them; other work on this shared host takes its part
    assert one.cpu_usage_ns is not None and one.cpu_usage_ns > 0.1 * window_ns
    # one of the two always waits while the other runs
    assert one.cpu_pressure is not None and one.cpu_pressure.some > 0.5, one.cpu_pressure
    assert snap.sources["cpu_pressure"].source == "psi"
    assert snap.node_memory is not None and snap.node_memory.available_bytes > 0


def test_a_cfs_quota_throttles_a_burner(groups: Groups) -> None:
    (groups.cpu / "cpu.cfs_period_us").write_text("100000")
    (groups.cpu / "cpu.cfs_quota_us").write_text("20000")  # 20 ms per 100 ms
    # two unpinned burners ask for up to two CPUs: they exhaust 20 ms quickly even when
    # other work on this host competes for the CPUs
    for _ in range(2):
        groups.burner(None)
    time.sleep(0.1)
    sampler = SignalSampler()
    try:
        snap = _two_windows(sampler, groups.container())
    finally:
        sampler.close()
    one = snap.containers["real"]
    assert one.throttling is not None and one.throttling.periods >= 3, one.throttling
    assert one.throttling.ratio > 0.5, one.throttling
    assert one.throttling.throttled_ns > 0
    # 20 % of one CPU, whatever the two burners wanted (plus a period's slack)
    assert one.cpu_usage_ns is not None and one.cpu_usage_ns < 0.4 * snap.window_s * 1e9
    assert snap.sources["throttling"].source == "cgroup1"


@pytest.mark.skipif(
    Path("/sys/bus/event_source/devices/cpu").exists(),
    reason="this host has a CPU PMU: hardware counters are expected to work here",
)
def test_the_real_cpi_source_says_there_are_no_hardware_counters(groups: Groups) -> None:
    with pytest.raises(
        CountersUnavailable, match=r"^no hardware counters: perf_event_open cycles: E"
    ):
        PerfCounters().open(groups.v2)
    sampler = SignalSampler()
    try:
        snap = sampler.sample([groups.container()], now_s=time.monotonic())
    finally:
        sampler.close()
    assert snap.containers["real"].cpi is None
    assert snap.sources["cpi"].source == "none"
    assert snap.sources["cpi"].reason.startswith("no hardware counters: perf_event_open cycles:")


def test_the_perf_plumbing_counts_software_events_for_the_group(groups: Groups) -> None:
    """Where there is no PMU, software events prove that the ctypes attr, the cgroup-mode
    flags and the per-CPU reads are right."""
    source = PerfCounters(
        events=(
            Event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK, "task-clock"),
            Event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES, "context-switches"),
        )
    )
    groups.burner(min(os.sched_getaffinity(0)))
    handle = source.open(groups.v2)
    try:
        usage_before, (before, _) = _usage_ns(groups.v2), source.read(handle)
        time.sleep(0.4)
        after, _ = source.read(handle)
        usage_after = _usage_ns(groups.v2)
    finally:
        source.close(handle)
    # task-clock (ns) counts the group's CPU time, as its cpu.stat does (how much the
    # burner got depends on what else runs on this shared host)
    counted, used = after - before, usage_after - usage_before
    assert counted > 0.02e9 and 0.5 * used < counted < 2 * used, (counted, used)


def _usage_ns(group: Path) -> int:
    for line in (group / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value) * 1000
    raise AssertionError(f"no usage_usec in {group}/cpu.stat")
