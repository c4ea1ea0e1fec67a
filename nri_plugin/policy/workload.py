"""What the planner plans: its config, the containers as it sees them, and usage.

Plain values and the small rules every part of the planner shares (which CPUs may be
handed out at all, how much CPU a container asks for, who is dedicated or NUMA-bound), so
the dedicated pass (`dedicated`), the pool cutting (`cores`) and the plan (`planner`)
agree on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nri_plugin.policy.class_isolation import DEFAULT_ISOLATION, IsolationConfig
from nri_plugin.policy.kube_qos import MILLI_PER_CPU
from nri_plugin.policy.oom import DEFAULT_OOM_BANDS, OomBands
from nri_plugin.policy.qos import Classification, QosClass
from qos_model.cpulist import format_cpu_list
from qos_model.topology import Topology

SHARED = "shared"
RECLAIMED = "reclaimed"
SYSTEM = "system"
DEDICATED = "dedicated"
RECLAIMED_SHARES = 2  # the kernel's minimum CFS weight (cgroup v1 cpu.shares)


class PlannerConfigError(ValueError):
    """A planner config that cannot work on this host; the message says why."""


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    reserved_cpus: frozenset[int] = frozenset()
    min_shared_cpus: int = 1
    reclaimed_min_cpus: int = 1
    reclaimed_overlap_shared: bool = False
    # Online demand (requests or measured usage) counts this much more when sizing the
    # reclaimed pool, so bursts have room before the pool is resized.
    shared_headroom: float = 0.2
    dedicated_full_pcpus: bool = True
    include_isolated_cpus: bool = False
    oom_bands: OomBands = DEFAULT_OOM_BANDS
    isolation: IsolationConfig = DEFAULT_ISOLATION  # RDT, I/O and network levels per class

    def check(self, topology: Topology) -> None:
        try:
            self.isolation.check()
        except ValueError as exc:
            raise PlannerConfigError(str(exc)) from None
        unknown = self.reserved_cpus - topology.online_cpus
        if unknown:
            raise PlannerConfigError(
                f"reserved_cpus {format_cpu_list(unknown)} are not online CPUs of this host "
                f"(online: {format_cpu_list(topology.online_cpus)})"
            )
        if self.min_shared_cpus < 1:
            raise PlannerConfigError("min_shared_cpus must be at least 1")
        if self.reclaimed_min_cpus < 0:
            raise PlannerConfigError("reclaimed_min_cpus must be 0 or more")
        if self.shared_headroom < 0:
            raise PlannerConfigError("shared_headroom must be 0 or more")
        usable = allocatable_cpus(topology, self) - self.reserved_cpus
        if len(usable) < self.min_shared_cpus:
            raise PlannerConfigError(
                f"only {len(usable)} CPUs are left after reserving "
                f"{format_cpu_list(self.reserved_cpus)}; min_shared_cpus is "
                f"{self.min_shared_cpus}"
            )


@dataclass(frozen=True, slots=True)
class Workload:
    """A container as the planner sees it."""

    container_id: str
    pod_id: str
    name: str
    classification: Classification
    created_at: int = 0  # ordering; ties broken by container id
    current_cpus: frozenset[int] = frozenset()  # what the runtime reports it has now
    memory_limit: int | None = None  # bytes, for the NUMA reclaim report
    kubelet_resized: bool = False  # its weight and quota are the kubelet's (state.py)

    @property
    def order(self) -> tuple[int, str]:
        return (self.created_at, self.container_id)


@dataclass(frozen=True, slots=True)
class UsageSample:
    """Measured CPU use of the online (shared and system) containers, in cores, and the
    CPUs the reclaimed pool must stay off while online containers there suffer from
    interference (the mitigation ladder's first rung), with why."""

    online_cores: float
    avoid_cpus: frozenset[int] = frozenset()
    avoid_reason: str = ""


@dataclass(frozen=True, slots=True)
class PlanWarning:
    container_id: str
    message: str


def allocatable_cpus(topology: Topology, config: PlannerConfig) -> frozenset[int]:
    if config.include_isolated_cpus:
        return topology.online_cpus
    return topology.online_cpus - topology.isolated_cpus


def cpu_count(c: Classification) -> int:
    return max(1, math.ceil((c.cpu_millicores or MILLI_PER_CPU) / MILLI_PER_CPU))


def demand_of(c: Classification) -> int:
    """Millicores a container asks for: its request, else its limit, else nothing."""
    return c.cpu_request_millicores or c.cpu_limit_millicores or 0


def is_dedicated(w: Workload) -> bool:
    return w.classification.qos_class is QosClass.DEDICATED_CORES


def binds_numa(w: Workload) -> bool:
    """Bound to one NUMA node when it runs in a pool (shared, named, reclaimed, or a
    refused dedicated container in the shared pool)."""
    c = w.classification
    return c.numa_binding and c.qos_class is not QosClass.SYSTEM_CORES
