"""What a container really got, read from the host rather than from the runtime's memory.

The runtime's view of a container is what was *asked*; a plugin decision only counts if
the kernel enforces it. This reads both places the truth lives: the cgroup files
(``cpuset.cpus``, ``cpu.shares``/``cpu.weight``, CFS bandwidth, the memory limit) and the
main process's own view in procfs (``Cpus_allowed_list``, ``Mems_allowed_list``,
``oom_score_adj``), which also reflects affinity and a parent's narrower cpuset.

A report must survive a container that exited or was never started: every field is read
on its own, and a failed read leaves the field None and adds a line to ``errors``
instead of raising. `nri-qos lab` prints these values and puts `HostView.as_dict` in its
JSON, so the field names are plain words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

from isolation.cgroups import CgroupError, CgroupFs, resolve_cgroups_path
from isolation.oom import ProcessControls, ProcfsError
from qos_model.containers import Container
from qos_model.cpulist import format_cpu_list

UNLIMITED = -1  # cpu_quota / memory_limit without a limit, as OCI and NRI write it

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HostView:
    """One container as the host enforces it. None = could not be read (see errors)."""

    id: str
    cgroup: str  # the group path, e.g. "/kubepods/pod1/abc"
    pid: int | None  # the main process the per-process fields were read from
    pids: tuple[int, ...]  # processes in the container's cgroup
    cpus: str | None  # Cpus_allowed_list of the main process (kernel list format)
    mems: str | None  # Mems_allowed_list of the main process
    cgroup_cpus: str | None  # cpuset.cpus ("" on cgroup v2 means: the parent's)
    cgroup_mems: str | None
    cpu_shares: int | None  # cgroup v2: cpu.weight converted back to shares
    cpu_quota: int | None  # microseconds per period, UNLIMITED when none
    cpu_period: int | None
    memory_limit: int | None  # bytes, UNLIMITED when none
    oom_score_adj: int | None
    errors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (lists instead of tuples)."""
        return {
            "id": self.id,
            "cgroup": self.cgroup,
            "pid": self.pid,
            "pids": list(self.pids),
            "cpus": self.cpus,
            "mems": self.mems,
            "cgroup_cpus": self.cgroup_cpus,
            "cgroup_mems": self.cgroup_mems,
            "cpu_shares": self.cpu_shares,
            "cpu_quota": self.cpu_quota,
            "cpu_period": self.cpu_period,
            "memory_limit": self.memory_limit,
            "oom_score_adj": self.oom_score_adj,
            "errors": list(self.errors),
        }


_READ_ERRORS = (CgroupError, ProcfsError, ValueError, OSError)


def read_back(cgroupfs: CgroupFs, procs: ProcessControls, container: Container) -> HostView:
    """Read the container's cgroup and main process; never raises for a vanished one.

    The main process is ``container.pid``, or, when the runtime reports none yet (e.g.
    containerd before StartContainer), the first process in the cgroup.
    """
    errors: list[str] = []

    def attempt(name: str, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except _READ_ERRORS as exc:
            errors.append(f"{name}: {exc}")
            return None

    group = attempt("cgroup", lambda: resolve_cgroups_path(container.cgroups_path))
    pids: list[int] | None = None
    cgroup_cpus = cgroup_mems = None
    shares = quota = period = memory = None
    if group is not None:
        where: PurePosixPath = group
        pids = attempt("pids", lambda: cgroupfs.list_pids(where))
        cgroup_cpus = attempt(
            "cgroup_cpus", lambda: format_cpu_list(cgroupfs.get_cpuset_cpus(where))
        )
        cgroup_mems = attempt(
            "cgroup_mems", lambda: format_cpu_list(cgroupfs.get_cpuset_mems(where))
        )
        shares = attempt("cpu_shares", lambda: cgroupfs.get_cpu_shares(where))
        bandwidth = attempt("cpu_quota", lambda: cgroupfs.get_cpu_quota(where))
        if bandwidth is not None:
            quota = UNLIMITED if bandwidth.quota_us is None else bandwidth.quota_us
            period = bandwidth.period_us
        memory = attempt("memory_limit", lambda: _limit(cgroupfs.get_memory_limit(where)))

    pid = container.pid or (pids[0] if pids else None)
    cpus = mems = None
    oom = None
    if pid is None:
        errors.append("pid: the container has no process (not started, or it exited)")
    else:
        main = pid
        placement = attempt("cpus", lambda: procs.allowed_placement(main))
        if placement is not None:
            cpus, mems = format_cpu_list(placement.cpus), format_cpu_list(placement.mems)
        oom = attempt("oom_score_adj", lambda: procs.get_oom_score_adj(main))

    return HostView(
        id=container.id,
        cgroup=str(group) if group is not None else container.cgroups_path,
        pid=pid,
        pids=tuple(pids or ()),
        cpus=cpus,
        mems=mems,
        cgroup_cpus=cgroup_cpus,
        cgroup_mems=cgroup_mems,
        cpu_shares=shares,
        cpu_quota=quota,
        cpu_period=period,
        memory_limit=memory,
        oom_score_adj=oom,
        errors=tuple(errors),
    )


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value
