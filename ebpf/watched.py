"""What a collector needs to know about one container to measure it.

The daemon builds these from the engine's containers (ids, names) and the host adapter
(`isolation.host.LinuxHost.group_dir`, which refuses a cgroup that is not provably the
container's own), so collectors never resolve runtime-provided paths themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qos_model.signals import Availability, RunqLatency


@dataclass(frozen=True, slots=True)
class WatchedContainer:
    id: str
    name: str  # "<namespace>/<pod>/<container>", for people
    cgroup2_dir: Path | None = None  # its directory in the cgroup2 tree (PSI, BPF ids)
    cpu_dir: Path | None = None  # cgroup v1 cpu (cpu,cpuacct) dir on hybrid/v1 hosts
    memory_dir: Path | None = None  # cgroup v1 memory dir on hybrid/v1 hosts
    pids: tuple[int, ...] = ()  # its processes (for /proc/<pid>/schedstat), if listed
    rdt_group: str | None = None  # resctrl control group name, e.g. "nri-qos-reclaimed"
    rdt_mon: str | None = None  # its monitoring group under rdt_group
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunqWindow:
    """Run-queue waits per container over one window, and who ran meanwhile."""

    latency: Mapping[str, RunqLatency]
    # (victim container id, container id that ran on its CPU while it waited; "" for a
    # process in no watched container) -> ns
    blame: Mapping[tuple[str, str], int]
    availability: Availability


class RunqSource(Protocol):
    """A run-queue latency backend (CO-RE probe, bcc probe, /proc/<pid>/schedstat)."""

    name: str
    availability: Availability  # which backend this is, and why the better ones are not

    def collect(self, containers: Sequence[WatchedContainer]) -> RunqWindow:
        """Waits since the previous call (the first call starts the window)."""
        ...

    def close(self) -> None: ...
