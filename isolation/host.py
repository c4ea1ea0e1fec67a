"""Per-container host operations the runtime does not do for us, over `isolation.cgroups`
and `isolation.oom`.

Callers (the controllers in `nri_plugin.control`, the usage sampler) speak in containers;
this adapter takes what identifies one on the host — its cgroups_path as the runtime
reports it and, as a fallback, its pid — finds its cgroup and processes, and turns every
outcome into a one-line report and a counter, so a refused write (no CAP_SYS_RESOURCE, a
container that just exited) is visible but never fatal. It knows nothing of NRI or the
engine: plain strings and ints in, plain values out.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from isolation import inflight
from isolation.cgroups import (
    CgroupError,
    CgroupFs,
    CgroupNotFound,
    CgroupUnsupported,
    CgroupVersion,
    HostLayout,
)
from isolation.errors import HostError
from isolation.oom import OomAdjOutcome, OomAdjResult, ProcessControls, ProcfsError
from isolation.ownership import ForeignCgroup, in_group, own_group
from qos_model.cpulist import CpuListError, parse_cpu_list

log = logging.getLogger("nri_qos.host")


@dataclass(frozen=True, slots=True)
class StateFiles:
    """The files one container's cpuset and processes are read from (`state_files`)."""

    cpus: str
    mems: str
    effective_cpus: str
    effective_mems: str
    procs: str
    procfs: str


# The most a container's weight file holds: io.weight (cgroup-v2.rst, 1..10000) and
# blkio.bfq.weight (1..1000, what isolation.blkio writes on v1).
IO_WEIGHT_MAX = 10000
BFQ_WEIGHT_MAX = 1000


@dataclass(frozen=True, slots=True)
class WeightFile:
    """Where one container's I/O weight is read (`weight_file`): cgroup v2 io.weight
    ("default N" then "MAJ:MIN N" overrides) or v1 blkio.bfq.weight (a bare number)."""

    path: str
    maximum: int
    unified: bool


def _read(path: str) -> str | None:
    """A small kernel file in one read(2) (cgroupfs and procfs values are short)."""
    inflight.touching(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("ascii", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _cpu_list(path: str, effective: str) -> frozenset[int] | None:
    for each in (path, effective):
        text = _read(each)
        if text is None:
            return None
        try:
            values = parse_cpu_list(text)
        except CpuListError:
            return None
        if values:
            return values
    return None


class LinuxHost:
    def __init__(
        self,
        cgroupfs: CgroupFs | None = None,
        procs: ProcessControls | None = None,
    ) -> None:
        self.cgroupfs = cgroupfs if cgroupfs is not None else CgroupFs()
        self.procs = procs if procs is not None else ProcessControls()
        self.outcomes: Counter[str] = Counter()  # for metrics: outcome name -> count
        # container id -> the oom_score_adj the kernel refused at its latest write (no
        # CAP_SYS_RESOURCE); the reconcile loop reads it so it does not retry in vain
        self.oom_refused: dict[str, int] = {}

    @classmethod
    def at(cls, root: Path, *, dry_run: bool = False) -> LinuxHost:
        """Everything under one host root ("/" in production, a fake tree in tests)."""
        return cls(
            CgroupFs(root / "sys/fs/cgroup", root / "proc", dry_run=dry_run),
            ProcessControls(root / "proc", dry_run=dry_run),
        )

    def missing(self) -> str:
        """What this host lacks for per-process work ("" when nothing): procfs under the root."""
        procfs = self.procs.procfs
        if not procfs.is_dir():
            return (
                f"{procfs} does not exist: mount procfs there, or set [host] root to the "
                "directory that holds the host's /proc"
            )
        return ""

    def set_oom_score_adj(
        self, cgroups_path: str, container_id: str, pid: int | None, value: int, who: str
    ) -> str:
        """Apply `value` to every process of the container; a one-line outcome.

        Only processes that are in the container's own cgroup at the time of the write are
        touched (`isolation.ownership`): a cgroups_path that is not provably the
        container's raises `ForeignCgroup`. One process failing does not stop the others;
        if any failed for a reason that may pass (EIO, ENOSPC...), a HostError with that
        errno is raised after all were tried, so the caller can retry the whole (idempotent)
        operation. `who` names the container in the warning a person reads."""
        group = own_group(cgroups_path, container_id)
        pids = self._pids(group, pid)
        if not pids:
            self.outcomes["no_process"] += 1
            return f"oom_score_adj {value}: no process found for {who}"
        results: list[OomAdjResult] = []
        failed: list[ProcfsError] = []
        for each in pids:
            try:
                results.append(self.procs.set_oom_score_adj(each, value, group))
            except ProcfsError as exc:
                failed.append(exc)
        counts = Counter(r.outcome.value for r in results)
        if failed:
            counts["failed"] = len(failed)
        self.outcomes.update(counts)
        if counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE.value]:
            self.oom_refused[container_id] = value
        else:
            self.oom_refused.pop(container_id, None)
        if counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE.value]:
            log.warning(
                "%s: oom_score_adj %d refused for %d process(es): lowering it needs "
                "CAP_SYS_RESOURCE, which nri-qos does not have (run it as root with the "
                "capability, e.g. AmbientCapabilities=CAP_SYS_RESOURCE)",
                who,
                value,
                counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE.value],
            )
        summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        if failed:
            first = failed[0]
            raise HostError(
                first.path,
                first.errno,
                f"oom_score_adj {value} on {len(pids)} process(es) of {group}: {summary} "
                f"(first failure: {first.message})",
            )
        return f"oom_score_adj {value} on {len(pids)} process(es): {summary}"

    def cpu_usage_ns(self, cgroups_path: str, container_id: str) -> int | None:
        """Total CPU time of the container's own cgroup; None when it cannot be read (or
        the path is not the container's: host-wide usage must not count as its own)."""
        try:
            return self.cgroupfs.cpu_usage_ns(own_group(cgroups_path, container_id))
        except (CgroupError, ForeignCgroup):
            return None

    def member_pids(
        self, cgroups_path: str, container_id: str, pid: int | None
    ) -> tuple[PurePosixPath, list[int]]:
        """The container's own group and the processes that are in it now, each checked
        in its /proc/<pid>/cgroup (a listed pid may have exited and been reused). Raises
        ForeignCgroup when the path is not provably the container's."""
        group = own_group(cgroups_path, container_id)
        members = []
        for each in self._pids(group, pid):
            try:
                text = self.procs.read_cgroup(each)
            except ProcfsError:
                continue  # gone
            if in_group(text, group):
                members.append(each)
        return group, members

    def group_dir(self, cgroups_path: str, container_id: str, controller: str) -> Path:
        """The container's own directory in the hierarchy serving `controller` (v1 or
        v2; "" for the cgroup2 tree itself). Raises ForeignCgroup or CgroupUnsupported."""
        group = own_group(cgroups_path, container_id)
        if not controller:
            unified = self.cgroupfs.unified_dir(group)
            if unified is None:
                raise CgroupUnsupported(
                    self.cgroupfs.root, errno.EOPNOTSUPP, "no cgroup2 tree is mounted"
                )
            return unified
        return self.cgroupfs.group_dir(group, controller)

    def cpuset_of(
        self, cgroups_path: str, container_id: str
    ) -> tuple[frozenset[int] | None, frozenset[int] | None]:
        """The container's cpuset.cpus and cpuset.mems as its own group shows them (v1 or
        v2; on v2 an empty file means "the parent's", so the effective set is read then).
        None for a value that cannot be read: a gone group, no cpuset controller, a path
        that is not provably the container's. Raises nothing."""
        try:
            group = own_group(cgroups_path, container_id)
        except ForeignCgroup:
            return None, None
        return self._cpuset(group, "cpus"), self._cpuset(group, "mems")

    def _cpuset(self, group: PurePosixPath, what: str) -> frozenset[int] | None:
        fs = self.cgroupfs
        get, effective = (
            (fs.get_cpuset_cpus, fs.get_effective_cpus)
            if what == "cpus"
            else (fs.get_cpuset_mems, fs.get_effective_mems)
        )
        try:
            return get(group) or effective(group)
        except (CgroupError, ValueError):
            return None

    def oom_score_adjs(
        self, cgroups_path: str, container_id: str, pid: int | None, limit: int = 32
    ) -> tuple[tuple[int, int], ...]:
        """(pid, oom_score_adj) of the container's processes, at most `limit` of them
        (the first listed: the main process and its oldest children); processes that
        exit meanwhile are skipped. Read-only, so membership is not re-checked per pid:
        a repair it leads to goes through `set_oom_score_adj`, which checks. Empty when
        nothing can be read; raises nothing."""
        try:
            group = own_group(cgroups_path, container_id)
        except ForeignCgroup:
            return ()
        try:
            pids = self._pids(group, pid)[:limit]
        except CgroupError:
            return ()
        out = []
        for each in pids:
            try:
                out.append((each, self.procs.get_oom_score_adj(each)))
            except (ProcfsError, ValueError):
                continue
        return tuple(out)

    def state_files(self, cgroups_path: str, container_id: str) -> StateFiles | None:
        """Where the container's cpuset and processes are read, resolved once (the
        reconcile loop reads them every period: path handling would cost more than the
        reads). None when the path is not provably the container's or the host has no
        cpuset controller."""
        try:
            group = own_group(cgroups_path, container_id)
            cpuset = self.cgroupfs.group_dir(group, "cpuset")
            v1 = self.cgroupfs.version_of("cpuset") is CgroupVersion.V1
            procs_dir = (
                self.cgroupfs.group_dir(group, "cpu")
                if self.cgroupfs.layout is not HostLayout.UNIFIED
                else cpuset
            )
        except (ForeignCgroup, CgroupError):
            return None
        effective = ("cpuset.effective_cpus", "cpuset.effective_mems")
        if not v1:
            effective = ("cpuset.cpus.effective", "cpuset.mems.effective")
        return StateFiles(
            cpus=str(cpuset / "cpuset.cpus"),
            mems=str(cpuset / "cpuset.mems"),
            effective_cpus=str(cpuset / effective[0]),
            effective_mems=str(cpuset / effective[1]),
            procs=str(procs_dir / "cgroup.procs"),
            procfs=str(self.procs.procfs),
        )

    def read_state(
        self, files: StateFiles, pid: int | None, limit: int = 32
    ) -> tuple[frozenset[int] | None, frozenset[int] | None, tuple[tuple[int, int], ...]]:
        """cpuset.cpus, cpuset.mems (the effective sets where the file is empty: v2's
        "the parent's") and (pid, oom_score_adj) of up to `limit` processes, read through
        `files`; None / () for what cannot be read (a gone container). Raises nothing."""
        cpus = _cpu_list(files.cpus, files.effective_cpus)
        mems = _cpu_list(files.mems, files.effective_mems)
        text = _read(files.procs)
        pids = [int(p) for p in text.split()[:limit] if p.isdigit()] if text else []
        if not pids and pid and pid > 0 and text is not None:
            pids = [pid]
        ooms = []
        for each in pids:
            value = _read(f"{files.procfs}/{each}/oom_score_adj")
            if value is not None and value.strip().lstrip("-").isdigit():
                ooms.append((each, int(value)))
        return cpus, mems, tuple(ooms)

    def weight_file(self, cgroups_path: str, container_id: str) -> WeightFile | None:
        """Where the container's I/O weight is read, resolved once (the reconcile loop
        reads it every period). The hierarchy the io controller writes: v1 blkio when
        blkio is mounted there, else the cgroup2 tree. None when the path is not provably
        the container's or neither hierarchy is mounted."""
        try:
            group = own_group(cgroups_path, container_id)
        except ForeignCgroup:
            return None
        fs = self.cgroupfs
        if fs.mounts.v1_mount("blkio") is not None:
            try:
                blkio = fs.group_dir(group, "blkio")
            except CgroupError:
                return None
            return WeightFile(str(blkio / "blkio.bfq.weight"), BFQ_WEIGHT_MAX, unified=False)
        unified = fs.unified_dir(group)
        if unified is None:
            return None
        return WeightFile(str(unified / "io.weight"), IO_WEIGHT_MAX, unified=True)

    @staticmethod
    def read_weight(file: WeightFile) -> int | None:
        """The container's default I/O weight; None when it cannot be read (no such file:
        no iocost, no BFQ; a gone container; text in another format). Raises nothing."""
        text = _read(file.path)
        if text is None:
            return None
        if not file.unified:
            value = text.strip()
            return int(value) if value.isdigit() else None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "default":
                return int(value) if value.strip().isdigit() else None
        return None

    def _pids(self, group: PurePosixPath, pid: int | None) -> list[int]:
        """The group's processes; the runtime's pid when the group cannot be listed (it is
        checked to be in the group at the time of the write, like every other)."""
        try:
            pids = self.cgroupfs.list_pids(group)
        except CgroupNotFound:
            return []  # the container is gone: nothing to do
        except CgroupUnsupported:
            pids = []
        if pids:
            return pids
        return [pid] if pid and pid > 0 else []
