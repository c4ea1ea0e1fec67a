"""The node plan: every container's CPUs, memory nodes, CPU weight and OOM standing.

One pure function, `plan_node`, from (topology, config, the containers with their
classifications, the previous dedicated allocations, an optional usage sample) to a
`NodePlan`. Because it is pure and deterministic, the same inputs always give the same
plan, and rebuilding after a restart gives the plan that was in force before it.

How the CPUs are divided:

1. `reserved` CPUs (config) form the system pool for system_cores. Isolated CPUs
   (isolcpus) are left out of everything unless configured otherwise.
2. dedicated_cores containers get exclusive sets from the allocator, in creation order.
   A container keeps what it has: the previous plan's allocation, or after a restart
   the cpuset the runtime reports, when that is still a valid exclusive set. An
   allocation that would leave fewer than `min_shared_cpus` for everyone else, or that
   the allocator cannot satisfy, is refused and the container runs in the shared pool
   with a warning.
3. What is left is split between the shared pool and the reclaimed pool. The online
   demand is the larger of the online containers' CPU requests and their measured usage,
   plus headroom; the reclaimed pool gets the idle remainder (at least its floor), taken
   as whole cores from the top of the CPU range. Until a reclaimed container exists, the
   shared pool keeps those CPUs too (they are only reported as reclaimable). Without
   overlap the two pools are disjoint; with overlap (or when there is not enough room for
   both) reclaimed CPUs stay in the shared pool too, and reclaimed containers' lowest CFS
   weight keeps online work ahead of them.
4. Named shared pools (`cpuset_pool`) are carved from the bottom of the shared pool, sized
   by their members' requests, as long as the default pool keeps `min_shared_cpus`.
5. NUMA binding for shared and reclaimed containers narrows their pool to one node, the
   least loaded; `numa_share: false` keeps other pods' bound workloads off a node.

No container ever gets an empty cpuset: every pool that has members is non-empty.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from nri_plugin.policy.cpuallocator import AllocationError, CpuAllocation, CpuRequest, allocate_cpus
from nri_plugin.policy.kube_qos import MILLI_PER_CPU
from nri_plugin.policy.oom import DEFAULT_OOM_BANDS, OomBands, decide_oom_score_adj
from nri_plugin.policy.plan import ContainerPlan, Decision
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

    def check(self, topology: Topology) -> None:
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
        usable = _allocatable(topology, self) - self.reserved_cpus
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

    @property
    def order(self) -> tuple[int, str]:
        return (self.created_at, self.container_id)


@dataclass(frozen=True, slots=True)
class UsageSample:
    """Measured CPU use of the online (shared and system) containers, in cores."""

    online_cores: float


@dataclass(frozen=True, slots=True)
class PlanWarning:
    container_id: str
    message: str


@dataclass(frozen=True, slots=True)
class Pools:
    system: frozenset[int]
    shared: frozenset[int]
    named: Mapping[str, frozenset[int]]
    reclaimed: frozenset[int]
    dedicated: Mapping[str, CpuAllocation]
    reasons: Mapping[str, str]

    def pool_cpus(self, pool: str) -> frozenset[int]:
        if pool == SYSTEM:
            return self.system
        if pool == RECLAIMED:
            return self.reclaimed
        if pool.startswith(SHARED + ":"):
            return self.named[pool.partition(":")[2]]
        return self.shared


@dataclass(frozen=True, slots=True)
class NodePlan:
    pools: Pools
    containers: Mapping[str, ContainerPlan]
    warnings: tuple[PlanWarning, ...] = ()
    online_demand_millicores: int = 0


@dataclass(slots=True)
class _Numa:
    """Book-keeping for NUMA binding and numa_share: false, in creation order."""

    bound_load: dict[int, int] = field(default_factory=dict)  # node -> millicores bound
    bound_pods: dict[int, set[str]] = field(default_factory=dict)  # node -> pod ids bound
    owners: dict[int, str] = field(default_factory=dict)  # node -> pod that refused sharing

    def avoid_for(self, pod_id: str, numa_share: bool) -> frozenset[int]:
        owned = {n for n, owner in self.owners.items() if owner != pod_id}
        if numa_share:
            return frozenset(owned)
        used = {n for n, pods in self.bound_pods.items() if pods - {pod_id}}
        return frozenset(owned | used)

    def bind(self, node: int, pod_id: str, millicores: int, numa_share: bool) -> None:
        self.bound_load[node] = self.bound_load.get(node, 0) + millicores
        self.bound_pods.setdefault(node, set()).add(pod_id)
        if not numa_share:
            self.owners.setdefault(node, pod_id)


def _allocatable(topology: Topology, config: PlannerConfig) -> frozenset[int]:
    if config.include_isolated_cpus:
        return topology.online_cpus
    return topology.online_cpus - topology.isolated_cpus


def _cpu_count(c: Classification) -> int:
    return max(1, math.ceil((c.cpu_millicores or MILLI_PER_CPU) / MILLI_PER_CPU))


def _demand(c: Classification) -> int:
    """Millicores a container asks for: its request, else its limit, else nothing."""
    return c.cpu_request_millicores or c.cpu_limit_millicores or 0


def plan_node(
    topology: Topology,
    config: PlannerConfig,
    workloads: Sequence[Workload],
    previous: Mapping[str, CpuAllocation] | None = None,
    usage: UsageSample | None = None,
) -> NodePlan:
    """Plan every container. `previous` is the last plan's dedicated allocations (None
    after a restart: then each dedicated container's current cpuset is adopted when it
    is still a valid exclusive set)."""
    ordered = sorted(workloads, key=lambda w: w.order)
    allocatable = _allocatable(topology, config)
    reserved = config.reserved_cpus & allocatable
    numa = _Numa()
    warnings: list[PlanWarning] = []

    dedicated, refused = _place_dedicated(
        topology, config, ordered, allocatable - reserved, reserved, previous, numa, warnings
    )
    taken = frozenset().union(*(a.taken for a in dedicated.values()))
    rest = allocatable - reserved - taken

    def pool_of(w: Workload) -> str:
        c = w.classification
        if w.container_id in dedicated:
            return DEDICATED
        if c.qos_class is QosClass.RECLAIMED_CORES:
            return RECLAIMED
        if c.qos_class is QosClass.SYSTEM_CORES and reserved:
            return SYSTEM
        if c.cpuset_pool and c.qos_class is not QosClass.SYSTEM_CORES:
            return f"{SHARED}:{c.cpuset_pool}"
        return SHARED

    pools_of = {w.container_id: pool_of(w) for w in ordered}
    online = [w for w in ordered if pools_of[w.container_id] not in (DEDICATED, RECLAIMED)]
    requested = sum(_demand(w.classification) for w in online)
    measured = round(usage.online_cores * MILLI_PER_CPU) if usage is not None else 0
    demand = math.ceil(max(requested, measured) * (1 + config.shared_headroom))
    reasons: dict[str, str] = {}
    shared, reclaimed = _split_shared_reclaimed(topology, config, rest, demand, reasons)
    if shared != rest and RECLAIMED not in pools_of.values():
        # Nobody runs in the reclaimed pool yet: keep its CPUs in the shared pool too, so
        # online containers are not confined for nothing. It is still reported as
        # reclaimable, and separated the moment a reclaimed container arrives.
        shared = rest
        reasons[SHARED] = "every CPU outside system and dedicated (no reclaimed containers yet)"
    named: dict[str, frozenset[int]] = {}
    for pool_name in sorted({p.partition(":")[2] for p in pools_of.values() if ":" in p}):
        members = [w for w in online if pools_of[w.container_id] == f"{SHARED}:{pool_name}"]
        size = max(1, math.ceil(sum(_demand(w.classification) for w in members) / MILLI_PER_CPU))
        if len(shared) - size >= config.min_shared_cpus:
            carved = _bottom_cores(topology, shared, size)
            named[pool_name] = carved
            shared = shared - carved
            reasons[f"{SHARED}:{pool_name}"] = (
                f"{size} CPU(s) for the requests of {len(members)} container(s)"
            )
        else:
            named[pool_name] = shared
            reasons[f"{SHARED}:{pool_name}"] = (
                f"needs {size} CPU(s) but the default shared pool must keep "
                f"{config.min_shared_cpus}: shares the default pool"
            )
    if not reclaimed and any(p == RECLAIMED for p in pools_of.values()):
        reclaimed = shared
        reasons[RECLAIMED] = "no idle CPUs to reclaim: reclaimed containers share the shared pool"
    pools = Pools(
        system=reserved,
        shared=shared,
        named=named,
        reclaimed=reclaimed,
        dedicated=dedicated,
        reasons=reasons,
    )
    plans = {
        w.container_id: _container_plan(
            topology, config, w, pools_of[w.container_id], pools, numa, refused
        )
        for w in ordered
    }
    return NodePlan(pools, plans, tuple(warnings), demand)


def _place_dedicated(
    topology: Topology,
    config: PlannerConfig,
    ordered: Sequence[Workload],
    free: frozenset[int],
    reserved: frozenset[int],
    previous: Mapping[str, CpuAllocation] | None,
    numa: _Numa,
    warnings: list[PlanWarning],
) -> tuple[dict[str, CpuAllocation], dict[str, str]]:
    """Exclusive sets, in two passes: first every container keeps what it holds, then
    the rest are allocated in creation order, so a newcomer can never take CPUs from a
    running container, whatever the order of their ids or timestamps."""
    allocations: dict[str, CpuAllocation] = {}
    refused: dict[str, str] = {}
    dedicated = [w for w in ordered if w.classification.qos_class is QosClass.DEDICATED_CORES]
    # An exclusive set is reported by exactly one container; CPUs several containers
    # report belong to a pool, whatever their count (a refused dedicated container runs
    # in the shared pool and must not be mistaken for an exclusive one after a restart).
    claims = Counter(cpu for w in ordered for cpu in w.current_cpus)
    usable = free
    pending: list[Workload] = []
    for w in dedicated:
        request = _request(config, w, numa)
        kept = _keep(topology, w, request, free, previous)
        adopted = kept is not None and previous is None
        if (
            adopted
            and kept is not None
            and (
                any(claims[cpu] > 1 for cpu in kept.cpus)
                or not _shape_fits(topology, kept.cpus, request, usable)
            )
        ):
            kept = None
        if kept is None or len(free - kept.taken) < config.min_shared_cpus:
            pending.append(w)
            continue
        free = free - kept.taken
        allocations[w.container_id] = kept
        _record_numa(topology, numa, w, kept)
    for w in pending:
        request = _request(config, w, numa)
        try:
            allocation = allocate_cpus(topology, free, request, reserved=reserved)
        except AllocationError as exc:
            refused[w.container_id] = f"no exclusive CPUs: {exc}"
            warnings.append(PlanWarning(w.container_id, refused[w.container_id]))
            continue
        left = free - allocation.taken
        if len(left) < config.min_shared_cpus:
            refused[w.container_id] = (
                f"{request.describe()} would leave {len(left)} CPU(s) for all other "
                f"containers (min_shared_cpus is {config.min_shared_cpus})"
            )
            warnings.append(PlanWarning(w.container_id, refused[w.container_id]))
            continue
        free = left
        allocations[w.container_id] = allocation
        _record_numa(topology, numa, w, allocation)
    return allocations, refused


def _request(config: PlannerConfig, w: Workload, numa: _Numa) -> CpuRequest:
    c = w.classification
    return CpuRequest(
        count=_cpu_count(c),
        numa_binding=c.numa_binding,
        numa_exclusive=c.numa_exclusive,
        full_pcpus=config.dedicated_full_pcpus or c.full_pcpus_pairing,
        avoid_nodes=numa.avoid_for(w.pod_id, c.numa_share),
    )


def _record_numa(topology: Topology, numa: _Numa, w: Workload, allocation: CpuAllocation) -> None:
    c = w.classification
    if c.numa_binding:
        for node in allocation.mems:
            numa.bind(node, w.pod_id, c.cpu_millicores or 0, c.numa_share)
    elif not c.numa_share:
        for node in {topology.node_of(cpu) for cpu in allocation.cpus}:
            numa.owners.setdefault(node, w.pod_id)


def _keep(
    topology: Topology,
    w: Workload,
    request: CpuRequest,
    free: frozenset[int],
    previous: Mapping[str, CpuAllocation] | None,
) -> CpuAllocation | None:
    """The allocation a container already holds, if it still fits its request."""
    if previous is not None:
        held = previous.get(w.container_id)
        if held is None or not held.taken <= free or not _size_fits(len(held.cpus), request):
            return None
        if held.mems & request.avoid_nodes:
            return None
        return held
    cpus = w.current_cpus
    if not cpus or not cpus <= free or not _size_fits(len(cpus), request):
        return None
    nodes = frozenset(topology.node_of(cpu) for cpu in cpus)
    if (request.numa_binding and len(nodes) != 1) or nodes & request.avoid_nodes:
        return None
    idle: frozenset[int] = frozenset()
    if request.one_thread_per_core:
        idle = frozenset().union(*(topology.siblings(cpu) for cpu in cpus)) & free - cpus
    return CpuAllocation(
        cpus=cpus,
        mems=nodes,
        idle_siblings=idle,
        reason=f"kept CPUs {format_cpu_list(cpus)} it already had (exclusive, still free)",
    )


def _shape_fits(
    topology: Topology, cpus: frozenset[int], request: CpuRequest, usable: frozenset[int]
) -> bool:
    """Could the allocator have produced `cpus` for `request`? (Adoption after a restart.)"""
    if request.numa_exclusive:
        nodes = {topology.node_of(cpu) for cpu in cpus}
        return len(nodes) == 1 and cpus == topology.node(nodes.pop()).cpus & usable
    if request.full_pcpus and not request.one_thread_per_core:
        partial = {
            topology.core_of(cpu).first_cpu
            for cpu in cpus
            if not topology.core_of(cpu).cpus & topology.online_cpus <= cpus
        }
        return len(partial) <= 1
    return True


def _size_fits(size: int, request: CpuRequest) -> bool:
    # numa_exclusive hands over a whole node, so its count is a minimum
    return size >= request.count if request.numa_exclusive else size == request.count


def _cores_in(topology: Topology, cpus: frozenset[int]) -> list[frozenset[int]]:
    """`cpus` grouped by physical core, cores in ascending order of their first CPU."""
    groups: dict[int, set[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(topology.core_of(cpu).first_cpu, set()).add(cpu)
    return [frozenset(groups[k]) for k in sorted(groups)]


def _take_cores(cores: Iterable[frozenset[int]], count: int) -> frozenset[int]:
    taken: set[int] = set()
    for core in cores:
        if len(taken) >= count:
            break
        need = count - len(taken)
        taken.update(sorted(core)[:need])
    return frozenset(taken)


def _top_cores(topology: Topology, cpus: frozenset[int], count: int) -> frozenset[int]:
    """`count` CPUs from the highest-numbered whole cores (reclaimed pool)."""
    return _take_cores(reversed(_cores_in(topology, cpus)), count)


def _bottom_cores(topology: Topology, cpus: frozenset[int], count: int) -> frozenset[int]:
    return _take_cores(_cores_in(topology, cpus), count)


def _split_shared_reclaimed(
    topology: Topology,
    config: PlannerConfig,
    rest: frozenset[int],
    demand_millicores: int,
    reasons: dict[str, str],
) -> tuple[frozenset[int], frozenset[int]]:
    demand_cpus = math.ceil(demand_millicores / MILLI_PER_CPU)
    idle = len(rest) - demand_cpus
    want = min(len(rest), max(config.reclaimed_min_cpus, idle))
    because = (
        f"{len(rest)} CPUs outside system and dedicated, online demand "
        f"{demand_millicores}m ({demand_cpus} CPUs), floor {config.reclaimed_min_cpus}"
    )
    if config.reclaimed_overlap_shared:
        reclaimed = _top_cores(topology, rest, want)
        reasons[RECLAIMED] = f"{want} CPU(s), overlapping the shared pool: {because}"
        reasons[SHARED] = "every CPU outside system and dedicated (reclaimed overlaps it)"
        return rest, reclaimed
    room = len(rest) - config.min_shared_cpus
    if want <= room:
        reclaimed = _top_cores(topology, rest, want)
        reasons[RECLAIMED] = f"{want} idle CPU(s): {because}"
        reasons[SHARED] = f"{len(rest) - want} CPU(s) left after the reclaimed pool"
        return rest - reclaimed, reclaimed
    # Not enough room for a disjoint floor: keep the floor, overlapping the shared pool.
    floor = min(len(rest), config.reclaimed_min_cpus)
    reclaimed = _top_cores(topology, rest, floor)
    reasons[RECLAIMED] = (
        f"{floor} CPU(s), the floor, overlapping the shared pool because the shared pool "
        f"must keep {config.min_shared_cpus}: {because}"
    )
    reasons[SHARED] = "every CPU outside system and dedicated"
    return rest, reclaimed


def _container_plan(
    topology: Topology,
    config: PlannerConfig,
    w: Workload,
    pool: str,
    pools: Pools,
    numa: _Numa,
    refused: Mapping[str, str],
) -> ContainerPlan:
    c = w.classification
    mems: Decision[frozenset[int] | None] = Decision(None, "not NUMA-bound: every memory node")
    if pool == DEDICATED:
        allocation = pools.dedicated[w.container_id]
        cpus = Decision(allocation.cpus, f"dedicated_cores: {allocation.reason}")
        if c.numa_binding:
            mems = Decision(
                allocation.mems,
                f"numa_binding: memory from node(s) {format_cpu_list(allocation.mems)} only",
            )
    else:
        base = pools.pool_cpus(pool)
        why = _pool_reason(c, pool, pools, refused.get(w.container_id))
        cpus = Decision(base, why)
        if c.numa_binding and c.qos_class is not QosClass.SYSTEM_CORES:
            node = _pick_node(topology, base, numa, w)
            if node is not None:
                node_cpus = base & topology.node(node).cpus
                numa.bind(node, w.pod_id, _demand(c), c.numa_share)
                cpus = Decision(node_cpus, f"{why}; numa_binding: the part on node {node}")
                mems = Decision(frozenset({node}), f"numa_binding: memory from node {node} only")
            else:
                cpus = Decision(
                    base,
                    f"{why}; numa_binding asked, but no node of the pool "
                    "is free to bind to: not bound",
                )
    if c.qos_class is QosClass.RECLAIMED_CORES:
        shares: Decision[int | None] = Decision(
            RECLAIMED_SHARES,
            f"reclaimed_cores: the lowest CFS weight ({RECLAIMED_SHARES}), so online work "
            "wins every CPU it shares with batch",
        )
    else:
        shares = Decision(None, "kept the weight the kubelet set from the CPU request")
    oom = decide_oom_score_adj(c.qos_class, c.kube_qos, c.oom_priority, config.oom_bands)
    return ContainerPlan(
        container_id=w.container_id,
        pod_id=w.pod_id,
        name=w.name,
        qos_class=c.qos_class,
        pool=pool,
        cpus=cpus,
        mems=mems,
        cpu_shares=shares,
        cpu_quota=Decision(None, "kept the CFS quota the kubelet set from the CPU limit"),
        oom_score_adj=Decision(oom.oom_score_adj, oom.reason),
    )


def _pool_reason(c: Classification, pool: str, pools: Pools, refused: str | None) -> str:
    text = {
        SYSTEM: "system_cores: the reserved CPUs",
        RECLAIMED: "reclaimed_cores: the reclaimed pool",
        SHARED: "shared_cores: the shared pool",
    }.get(pool, f"shared_cores: the named pool {pool.partition(':')[2]!r}")
    if c.qos_class is QosClass.SYSTEM_CORES and pool != SYSTEM:
        text = "system_cores, but no CPUs are reserved: the shared pool"
    if refused:
        text = f"dedicated_cores refused ({refused}): the shared pool"
    detail = pools.reasons.get(pool)
    return f"{text} ({detail})" if detail else text


def _pick_node(
    topology: Topology, pool_cpus: frozenset[int], numa: _Numa, w: Workload
) -> int | None:
    avoid = numa.avoid_for(w.pod_id, w.classification.numa_share)
    candidates = sorted(
        {topology.node_of(cpu) for cpu in pool_cpus} - avoid,
        key=lambda n: (numa.bound_load.get(n, 0), n),
    )
    return candidates[0] if candidates else None
