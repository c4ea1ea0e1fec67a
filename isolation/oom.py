"""Per-process knobs in procfs: oom_score_adj, and the CPUs/nodes a task may use.

The OOM band of a QoS class is enforced by writing ``/proc/<pid>/oom_score_adj`` for
every process of the container. Two outcomes are routine, not failures, and come back
as values the caller can count and log rather than as exceptions:

* the process exited meanwhile (ENOENT opening the file, ESRCH writing it);
* the kernel refuses to lower the value below the task's ``oom_score_adj_min`` (0
  unless a privileged writer set it lower) without CAP_SYS_RESOURCE: EACCES. Agents run
  without that capability in some sandboxes (this CI host among them), and a protected
  band then silently stays at 0 unless someone reports it.

``Cpus_allowed_list`` / ``Mems_allowed_list`` from ``/proc/<pid>/status`` are what the
kernel enforces after cpuset and affinity, so they are the proof the lab prints.

All paths hang off one procfs root (default ``/proc``) so tests can use a fake tree.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from isolation import inflight
from isolation.cgroups import CgroupFs, normalize_group
from isolation.errors import HostError
from isolation.ownership import in_group
from qos_model.cpulist import parse_cpu_list

DEFAULT_PROCFS_ROOT = Path("/proc")

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
CAP_SYS_RESOURCE = 24  # bit number in the Cap* masks of /proc/<pid>/status

_GONE_ERRNOS = frozenset({errno_codes.ENOENT, errno_codes.ESRCH})
_DENIED_ERRNOS = frozenset({errno_codes.EACCES, errno_codes.EPERM})


class ProcfsError(HostError):
    """Reading or writing a procfs file failed unexpectedly. Carries the errno."""


class ProcessGone(ProcfsError):
    """The process no longer exists (ENOENT/ESRCH): a normal race with its exit."""


class OomAdjOutcome(Enum):
    APPLIED = "applied"
    PLANNED = "planned"  # dry-run: nothing written
    PROCESS_GONE = "process_gone"
    NEEDS_CAP_SYS_RESOURCE = "needs_cap_sys_resource"
    PERMISSION_DENIED = "permission_denied"
    NOT_IN_GROUP = "not_in_group"  # the pid left the container's group (or was reused)


@dataclass(frozen=True, slots=True)
class OomAdjResult:
    """What happened to one oom_score_adj write."""

    pid: int
    value: int
    outcome: OomAdjOutcome
    errno: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (OomAdjOutcome.APPLIED, OomAdjOutcome.PLANNED)


@dataclass(frozen=True, slots=True)
class OomGroupReport:
    """oom_score_adj applied to every process of one cgroup, outcome by outcome."""

    group: PurePosixPath
    value: int
    results: tuple[OomAdjResult, ...]

    def count(self, outcome: OomAdjOutcome) -> int:
        return sum(1 for result in self.results if result.outcome is outcome)

    @property
    def failures(self) -> tuple[OomAdjResult, ...]:
        """Results that left a live process at a value other than the one asked for."""
        return tuple(
            r for r in self.results if not r.ok and r.outcome is not OomAdjOutcome.PROCESS_GONE
        )


@dataclass(frozen=True, slots=True)
class AllowedPlacement:
    """The CPUs and memory nodes the kernel lets a task run on / allocate from."""

    cpus: frozenset[int]
    mems: frozenset[int]


def _check_pid(pid: int | str) -> str:
    text = str(pid)
    if text != "self" and (not text.isdigit() or int(text) <= 0):
        raise ValueError(f"not a pid: {pid!r}")
    return text


def parse_status(text: str) -> dict[str, str]:
    """``/proc/<pid>/status`` as a mapping of field name to its (stripped) value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


class ProcessControls:
    """oom_score_adj and placement of processes, read and written under a procfs root."""

    def __init__(self, procfs: Path = DEFAULT_PROCFS_ROOT, *, dry_run: bool = False) -> None:
        self.procfs = procfs
        self.dry_run = dry_run

    def _path(self, pid: int | str, name: str) -> Path:
        return self.procfs / _check_pid(pid) / name

    def _read(self, pid: int | str, name: str) -> str:
        path = self._path(pid, name)
        inflight.touching(path)
        try:
            return path.read_text()
        except OSError as exc:
            code = exc.errno or errno_codes.EIO
            if code in _GONE_ERRNOS:
                raise ProcessGone(path, code, f"process {pid} no longer exists") from exc
            raise ProcfsError(path, code, f"reading {path} failed: {os.strerror(code)}") from exc

    def read_cgroup(self, pid: int | str) -> str:
        """/proc/<pid>/cgroup: which group the process is in, per hierarchy."""
        return self._read(pid, "cgroup")

    # ----------------------------------------------------------------- OOM

    def get_oom_score_adj(self, pid: int | str) -> int:
        return int(self._read(pid, "oom_score_adj"))

    def get_oom_score(self, pid: int | str) -> int:
        """The kernel's current badness score (0..2000) that the OOM killer ranks by."""
        return int(self._read(pid, "oom_score"))

    def set_oom_score_adj(
        self, pid: int, value: int, group: PurePosixPath | None = None
    ) -> OomAdjResult:
        """Write ``value`` (-1000..1000); expected refusals come back as the outcome.

        With ``group``, the write happens only if the process is in that cgroup at the
        time of the write: ``/proc/<pid>`` is opened first and both its ``cgroup`` and
        ``oom_score_adj`` are reached through that directory, so a pid that exits and is
        reused by another process in between fails with ESRCH instead of being written.
        """
        if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
            raise ValueError(
                f"oom_score_adj {value} is outside {OOM_SCORE_ADJ_MIN}..{OOM_SCORE_ADJ_MAX}"
            )
        path = self._path(pid, "oom_score_adj")
        if self.dry_run:
            return OomAdjResult(pid, value, OomAdjOutcome.PLANNED)
        try:
            proc = os.open(self.procfs / _check_pid(pid), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            return self._refused(pid, value, path, exc, opened=False)
        try:
            if group is not None:
                moved = self._left_group(proc, pid, value, group)
                if moved is not None:
                    return moved
            inflight.touching(path)
            try:
                fd = os.open("oom_score_adj", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=proc)
            except OSError as exc:
                return self._refused(pid, value, path, exc, opened=False)
            try:
                os.write(fd, str(value).encode())
            except OSError as exc:
                return self._refused(pid, value, path, exc, opened=True)
            finally:
                os.close(fd)
        finally:
            os.close(proc)
        return OomAdjResult(pid, value, OomAdjOutcome.APPLIED)

    def _left_group(
        self, proc: int, pid: int, value: int, group: PurePosixPath
    ) -> OomAdjResult | None:
        """None when the process (through its open /proc dir) is in ``group``."""
        path = self._path(pid, "cgroup")
        inflight.touching(path)
        try:
            fd = os.open("cgroup", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                text = os.read(fd, 1 << 16).decode(errors="replace")
            finally:
                os.close(fd)
        except OSError as exc:
            return self._refused(pid, value, path, exc, opened=False)
        if in_group(text, group):
            return None
        return OomAdjResult(
            pid,
            value,
            OomAdjOutcome.NOT_IN_GROUP,
            None,
            f"process {pid} is no longer in {group}; left alone",
        )

    def _refused(
        self, pid: int, value: int, path: Path, exc: OSError, *, opened: bool
    ) -> OomAdjResult:
        code = exc.errno or errno_codes.EIO
        if code in _GONE_ERRNOS:
            return OomAdjResult(
                pid, value, OomAdjOutcome.PROCESS_GONE, code, f"process {pid} no longer exists"
            )
        if code in _DENIED_ERRNOS and opened:
            # __set_oom_adj: below signal->oom_score_adj_min without CAP_SYS_RESOURCE.
            return OomAdjResult(
                pid,
                value,
                OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE,
                code,
                f"lowering oom_score_adj of process {pid} to {value} needs CAP_SYS_RESOURCE; "
                "the agent runs without it, so the process keeps its current value",
            )
        if code in _DENIED_ERRNOS:
            return OomAdjResult(
                pid,
                value,
                OomAdjOutcome.PERMISSION_DENIED,
                code,
                f"permission denied opening {path}; the agent must run as root",
            )
        raise ProcfsError(
            path, code, f"writing {value} to {path} failed: {os.strerror(code)}"
        ) from exc

    def apply_oom_score_adj(
        self, pids: Iterable[int], value: int, group: PurePosixPath | None = None
    ) -> tuple[OomAdjResult, ...]:
        return tuple(self.set_oom_score_adj(pid, value, group) for pid in pids)

    def apply_oom_score_adj_to_group(
        self, cgroups: CgroupFs, group: str | PurePosixPath, value: int
    ) -> OomGroupReport:
        """Set ``value`` on every process now in the cgroup.

        Children forked later inherit the value from their parent, so covering the
        current processes covers the container. A missing group raises
        `isolation.cgroups.CgroupNotFound` (the container is gone, not a process).
        """
        normalized = normalize_group(group)
        pids = cgroups.list_pids(normalized)
        return OomGroupReport(normalized, value, self.apply_oom_score_adj(pids, value, normalized))

    # ----------------------------------------------------------------- placement

    def allowed_placement(self, pid: int | str) -> AllowedPlacement:
        """``Cpus_allowed_list`` and ``Mems_allowed_list`` from /proc/<pid>/status."""
        status = parse_status(self._read(pid, "status"))
        try:
            return AllowedPlacement(
                cpus=parse_cpu_list(status["Cpus_allowed_list"]),
                mems=parse_cpu_list(status["Mems_allowed_list"]),
            )
        except KeyError as exc:
            path = self._path(pid, "status")
            raise ProcfsError(path, errno_codes.EIO, f"{path} has no {exc.args[0]} line") from exc

    def effective_capabilities(self, pid: int | str = "self") -> int:
        """The ``CapEff`` mask of a process."""
        return int(parse_status(self._read(pid, "status"))["CapEff"], 16)

    def has_cap_sys_resource(self, pid: int | str = "self") -> bool:
        """Whether negative oom_score_adj values (protection) can be written."""
        return bool(self.effective_capabilities(pid) >> CAP_SYS_RESOURCE & 1)
