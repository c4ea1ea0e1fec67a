"""Cycles per instruction of one container, from hardware performance counters.

CPI rising while a container's own work is unchanged is the classic sign that a
neighbour is thrashing the shared cache or memory bus. Counting needs a PMU: many VMs
(this CI host among them) expose none, and perf_event_open answers ENOENT (no such event
type), EOPNOTSUPP or ENODEV. The counters therefore come through `CounterSource`, so the
arithmetic is tested with injected counts and the real source (`PerfCounters`) only has
to open, read and fail cleanly.

`PerfCounters` opens, per online CPU, a cycles event leading an instructions event (one
group, so the two are always scheduled together and their ratio is unbiased even when
the PMU multiplexes), in cgroup mode: pid = an fd of the container's cgroup2 directory,
flag PERF_FLAG_PID_CGROUP (Documentation: perf_event_open(2)). The kernel then counts
only while the group's tasks run on that CPU; the container's totals are the sums.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from isolation import inflight
from qos_model.cpulist import CpuListError, parse_cpu_list

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_SW_TASK_CLOCK = 1
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
PERF_FLAG_PID_CGROUP = 1 << 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE_VER0 = 64  # the first published layout; every kernel accepts it

_SYSCALL = {"x86_64": 298, "aarch64": 241, "arm64": 241, "riscv64": 241, "ppc64le": 319}
# errnos meaning "this host has no such counters", as opposed to a problem with one group
_NO_COUNTERS = frozenset({errno_codes.ENOENT, errno_codes.EOPNOTSUPP, errno_codes.ENODEV})
_REFUSED = frozenset({errno_codes.EACCES, errno_codes.EPERM})


class CountersUnavailable(Exception):
    """The host cannot count these events at all; the message says why, in one line."""


class CounterSource(Protocol):
    """Cumulative (cycles, instructions) of a cgroup2 group. `open` raises
    CountersUnavailable when the host has no such counters (then nothing is retried), or
    OSError for a problem with this group only."""

    name: str

    def open(self, cgroup2_dir: Path) -> object: ...

    def read(self, handle: object) -> tuple[int, int]: ...

    def close(self, handle: object) -> None: ...


class _Attr(ctypes.Structure):
    """struct perf_event_attr up to config1 (PERF_ATTR_SIZE_VER0); the flag bits are one
    u64 (bit 0 = disabled: left 0, so counting starts at open)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    )


@dataclass(frozen=True, slots=True)
class Event:
    type: int
    config: int
    name: str


HARDWARE_EVENTS = (
    Event(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, "cycles"),
    Event(PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS, "instructions"),
)


@dataclass(slots=True)
class _Handle:
    fds: list[list[int]] = field(default_factory=list)  # per CPU: [leader, member]


def _online_cpus(root: Path) -> list[int]:
    path = root / "sys/devices/system/cpu/online"
    inflight.touching(path)
    try:
        return sorted(parse_cpu_list(path.read_text()))
    except (OSError, CpuListError):
        return list(range(os.cpu_count() or 1))


class PerfCounters:
    """The real `CounterSource`: perf_event_open(2) through ctypes. `events` is (the
    "cycles" event, the "instructions" event); tests pass software events to prove the
    plumbing where there is no PMU."""

    name = "perf"

    def __init__(self, root: Path = Path("/"), events: Sequence[Event] = HARDWARE_EVENTS) -> None:
        if len(events) != 2:
            raise ValueError("PerfCounters counts exactly two events (cycles, instructions)")
        self.events = tuple(events)
        self.cpus = _online_cpus(root)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._nr = _SYSCALL.get(platform.machine())

    def _perf_event_open(self, event: Event, cgroup_fd: int, cpu: int, group_fd: int) -> int:
        if self._nr is None:
            raise CountersUnavailable(
                f"no hardware counters: perf_event_open is not wired for {platform.machine()}"
            )
        attr = _Attr(type=event.type, size=PERF_ATTR_SIZE_VER0, config=event.config)
        flags = PERF_FLAG_PID_CGROUP | PERF_FLAG_FD_CLOEXEC
        fd = int(self._libc.syscall(self._nr, ctypes.byref(attr), cgroup_fd, cpu, group_fd, flags))
        if fd < 0:
            code = ctypes.get_errno() or errno_codes.EIO
            name = errno_codes.errorcode.get(code, str(code))
            if code in _NO_COUNTERS:
                raise CountersUnavailable(
                    f"no hardware counters: perf_event_open {event.name}: {name}"
                )
            if code in _REFUSED:
                raise CountersUnavailable(
                    f"perf_event_open {event.name} refused: {name} (kernel.perf_event_paranoid "
                    "or a missing CAP_PERFMON)"
                )
            raise OSError(code, f"perf_event_open {event.name} on CPU {cpu}: {os.strerror(code)}")
        return fd

    def open(self, cgroup2_dir: Path) -> object:
        inflight.touching(cgroup2_dir)
        dir_fd = os.open(cgroup2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        handle = _Handle()
        try:
            for cpu in self.cpus:
                fds: list[int] = []
                handle.fds.append(fds)
                leader = self._perf_event_open(self.events[0], dir_fd, cpu, -1)
                fds.append(leader)
                fds.append(self._perf_event_open(self.events[1], dir_fd, cpu, leader))
        except BaseException:
            self.close(handle)
            raise
        finally:
            os.close(dir_fd)
        return handle

    def read(self, handle: object) -> tuple[int, int]:
        if not isinstance(handle, _Handle):
            raise TypeError("not a PerfCounters handle")
        totals = [0, 0]
        for fds in handle.fds:
            for i, fd in enumerate(fds):
                totals[i] += int.from_bytes(os.read(fd, 8), "little")
        return totals[0], totals[1]

    def close(self, handle: object) -> None:
        if isinstance(handle, _Handle):
            for fds in handle.fds:
                for fd in fds:
                    os.close(fd)
            handle.fds.clear()


class CpiReader:
    """CPI per container over each window, keeping one open handle per container.

    `unavailable` is "" while counters may work, else why they cannot: after the first
    CountersUnavailable nothing is opened again (a PMU does not appear at run time)."""

    def __init__(self, source: CounterSource) -> None:
        self.source = source
        self.unavailable = ""
        self._handles: dict[str, object] = {}
        self._last: dict[str, tuple[int, int]] = {}

    def sample(self, container_id: str, cgroup2_dir: Path | None) -> float | None:
        """CPI since the previous call for this container (None on the first, without
        counters, or when a counter went backwards or no instruction retired). OSError
        for a problem with this container's group."""
        if self.unavailable:
            return None
        if cgroup2_dir is None:
            return None
        handle = self._handles.get(container_id)
        if handle is None:
            try:
                handle = self.source.open(cgroup2_dir)
            except CountersUnavailable as exc:
                self.unavailable = str(exc)
                return None
            self._handles[container_id] = handle
        try:
            cycles, instructions = self.source.read(handle)
        except BaseException:
            self.forget(container_id)  # reopened next window (the group may be new)
            raise
        before = self._last.get(container_id)
        self._last[container_id] = (cycles, instructions)
        if before is None:
            return None
        d_cycles, d_instructions = cycles - before[0], instructions - before[1]
        if d_cycles < 0 or d_instructions <= 0:
            return None
        return d_cycles / d_instructions

    def forget(self, container_id: str) -> None:
        handle = self._handles.pop(container_id, None)
        self._last.pop(container_id, None)
        if handle is not None:
            self.source.close(handle)

    def close(self) -> None:
        for container_id in list(self._handles):
            self.forget(container_id)
