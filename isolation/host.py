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

import logging
from collections import Counter
from pathlib import Path

from isolation.cgroups import CgroupError, CgroupFs
from isolation.oom import OomAdjOutcome, ProcessControls, ProcfsError

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

    def set_oom_score_adj(self, cgroups_path: str, pid: int | None, value: int, who: str) -> str:
        """Apply `value` to every process of the container; a one-line outcome.

        `who` names the container in the warning a person reads."""
        pids = self._pids(cgroups_path, pid)
        if not pids:
            self.outcomes["no_process"] += 1
            return f"oom_score_adj {value}: no process found for {who}"
        results = self.procs.apply_oom_score_adj(pids, value)
        counts = Counter(r.outcome for r in results)
        for outcome, n in counts.items():
            self.outcomes[outcome.value] += n
        if counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE]:
            log.warning(
                "%s: oom_score_adj %d refused for %d process(es): lowering it needs "
                "CAP_SYS_RESOURCE, which nri-qos does not have (run it as root with the "
                "capability, e.g. AmbientCapabilities=CAP_SYS_RESOURCE)",
                who,
                value,
                counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE],
            )
        summary = ", ".join(f"{n} {o.value}" for o, n in sorted(counts.items(), key=str))
        return f"oom_score_adj {value} on {len(pids)} process(es): {summary}"

    def cpu_usage_ns(self, cgroups_path: str) -> int | None:
        """Total CPU time of the container's cgroup; None when it cannot be read."""
        if not cgroups_path:
            return None
        try:
            return self.cgroupfs.cpu_usage_ns(self.cgroupfs.resolve(cgroups_path))
        except (CgroupError, ValueError):
            return None

    def _pids(self, cgroups_path: str, pid: int | None) -> list[int]:
        if cgroups_path:
            try:
                pids = self.cgroupfs.list_pids(self.cgroupfs.resolve(cgroups_path))
            except (CgroupError, ProcfsError):
                pids = []
            if pids:
                return pids
        return [pid] if pid else []
