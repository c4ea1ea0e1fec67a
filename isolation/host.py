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
from collections import Counter
from pathlib import Path, PurePosixPath

from isolation.cgroups import CgroupError, CgroupFs, CgroupNotFound, CgroupUnsupported
from isolation.errors import HostError
from isolation.oom import OomAdjOutcome, OomAdjResult, ProcessControls, ProcfsError
from isolation.ownership import ForeignCgroup, in_group, own_group

log = logging.getLogger("nri_qos.host")


class LinuxHost:
    def __init__(
        self,
        cgroupfs: CgroupFs | None = None,
        procs: ProcessControls | None = None,
    ) -> None:
        self.cgroupfs = cgroupfs if cgroupfs is not None else CgroupFs()
        self.procs = procs if procs is not None else ProcessControls()
        self.outcomes: Counter[str] = Counter()  # for metrics: outcome name -> count

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
