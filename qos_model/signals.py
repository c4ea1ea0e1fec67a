"""What the node measured about its containers over one sampling window: the values the
collectors (`ebpf/`) produce and the engine's detector reads.

Plain values, no I/O: a collector turns kernel counters into per-window deltas keyed by
container id (it knows which cgroup is whose); the engine never sees a cgroup id, a file
or a clock. Every signal is optional: a host without it (no PSI, no BPF, no hardware
counters) leaves it None, and `Availability` says why, so the detector and the status
views can tell "zero" from "unknown".

Units are base units: nanoseconds, bytes, seconds (window), ratios in 0..1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Run-queue latency histogram: bucket i counts waits in [2^i, 2^(i+1)) microseconds
# (bucket 0 also holds waits under 1 us); the last bucket is open-ended.
RUNQ_BUCKETS = 27


@dataclass(frozen=True, slots=True)
class RunqLatency:
    """Wakeup -> run waits of a container's tasks during the window."""

    count: int  # waits that ended in the window
    total_ns: int  # their summed length
    buckets: tuple[int, ...] = ()  # log2 histogram (RUNQ_BUCKETS), empty when not known

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def quantile_ns(self, q: float) -> float:
        """The q-quantile, interpolated linearly inside its log2 bucket (the mean when
        there is no histogram: schedstat gives sums only)."""
        if not self.buckets:
            return self.mean_ns
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                low = 0.0 if i == 0 else float(2**i)
                high = float(2 ** (i + 1))
                return (low + (high - low) * (rank - seen) / n) * 1000.0
            seen += n
        return float(2 ** len(self.buckets)) * 1000.0


@dataclass(frozen=True, slots=True)
class Pressure:
    """PSI over the window: the share of wall time some (or all) tasks were stalled."""

    some: float  # 0..1
    full: float | None = None  # cpu "full" is absent on older kernels


@dataclass(frozen=True, slots=True)
class CpuThrottling:
    """CFS bandwidth control over the window (cpu.stat)."""

    periods: int
    throttled_periods: int
    throttled_ns: int

    @property
    def ratio(self) -> float:
        return self.throttled_periods / self.periods if self.periods else 0.0


@dataclass(frozen=True, slots=True)
class MemoryUse:
    usage_bytes: int
    limit_bytes: int | None = None
    oom_kills: int = 0  # memory.events oom_kill during the window
    high_events: int = 0  # memory.events high during the window


@dataclass(frozen=True, slots=True)
class ContainerSignals:
    cpu_usage_ns: int | None = None  # CPU time used in the window
    runq: RunqLatency | None = None
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
    io_pressure: Pressure | None = None
    throttling: CpuThrottling | None = None
    memory: MemoryUse | None = None
    mbm_total_bytes: int | None = None  # memory bandwidth used in the window (RDT MBM)
    mbm_local_bytes: int | None = None
    llc_occupancy_bytes: int | None = None  # at the end of the window
    cpi: float | None = None  # cycles per instruction, where hardware counters exist


@dataclass(frozen=True, slots=True)
class NodeMemory:
    """Node-wide (or per NUMA node) memory state for pressure-driven eviction."""

    available_bytes: int
    total_bytes: int
    pressure: Pressure | None = None


@dataclass(frozen=True, slots=True)
class Availability:
    """Which source produced a signal kind, and why better ones did not."""

    source: str  # e.g. "core" (libbpf CO-RE), "bcc", "schedstat", "psi", "none"
    reason: str = ""  # why this one (what the better ones lacked)


@dataclass(frozen=True, slots=True)
class SignalSnapshot:
    """One window's measurements. `end_s` is the collector's monotonic clock at the end
    of the window (the engine has no clock; it orders and spaces windows by it)."""

    end_s: float
    window_s: float
    containers: Mapping[str, ContainerSignals] = field(default_factory=dict)
    # (victim container, container that ran on the victim's CPU while it waited) -> ns;
    # "" as the runner means a process outside every known container
    blame: Mapping[tuple[str, str], int] = field(default_factory=dict)
    node_memory: NodeMemory | None = None
    numa_memory: Mapping[int, NodeMemory] = field(default_factory=dict)
    sources: Mapping[str, Availability] = field(default_factory=dict)  # signal kind -> source
