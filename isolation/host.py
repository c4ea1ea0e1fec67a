"""The host as the QoS policy sees it: per-container writes and reads that the runtime
does not do for us, over `isolation.cgroups` and `isolation.oom`.

The policy speaks in containers; this adapter finds their cgroup (from NRI's
cgroups_path) and processes, and turns every outcome into a one-line report and a
counter, so a refused write (no CAP_SYS_RESOURCE, a container that just exited) is
visible but never fatal.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from isolation.cgroups import CgroupError, CgroupFs
from isolation.oom import OomAdjOutcome, ProcessControls, ProcfsError
from qos_model.containers import Container

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
    def at(cls, root: Path) -> LinuxHost:
        """Everything under one host root ("/" in production, a fake tree in tests)."""
        return cls(CgroupFs(root / "sys/fs/cgroup", root / "proc"), ProcessControls(root / "proc"))

    def set_oom_score_adj(self, container: Container, value: int) -> str:
        pids = self._pids(container)
        if not pids:
            self.outcomes["no_process"] += 1
            return f"oom_score_adj {value}: no process found for {container.id}"
        results = self.procs.apply_oom_score_adj(pids, value)
        counts = Counter(r.outcome for r in results)
        for outcome, n in counts.items():
            self.outcomes[outcome.value] += n
        if counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE]:
            log.warning(
                "%s: oom_score_adj %d refused for %d process(es): lowering it needs "
                "CAP_SYS_RESOURCE, which nri-qos does not have (run it as root with the "
                "capability, e.g. AmbientCapabilities=CAP_SYS_RESOURCE)",
                container.name or container.id,
                value,
                counts[OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE],
            )
        summary = ", ".join(f"{n} {o.value}" for o, n in sorted(counts.items(), key=str))
        return f"oom_score_adj {value} on {len(pids)} process(es): {summary}"

    def cpu_usage_ns(self, container: Container) -> int | None:
        """Total CPU time of the container's cgroup; None when it cannot be read."""
        if not container.cgroups_path:
            return None
        try:
            return self.cgroupfs.cpu_usage_ns(self.cgroupfs.resolve(container.cgroups_path))
        except (CgroupError, ValueError):
            return None

    def _pids(self, container: Container) -> list[int]:
        if container.cgroups_path:
            try:
                pids = self.cgroupfs.list_pids(self.cgroupfs.resolve(container.cgroups_path))
            except (CgroupError, ProcfsError):
                pids = []
            if pids:
                return pids
        return [container.pid] if container.pid else []
