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

Placement is history-dependent (a container keeps what it holds), so "the plan" is a
function of the workloads *and* the previous dedicated allocations. Two rules make that
function a fixpoint, which is what lets `nri_plugin.policy.incremental.Planner` recompute
only what an event can change and still equal `plan_node` after every step:
* a held allocation is kept as long as its container still asks for the same size and its
  CPUs are still free — later arrivals never re-judge it (they avoid it instead);
* the dedicated pass is repeated with its own result as `previous` until it no longer
  changes (at most a few rounds), so a refused container's reason is the one it would get
  again on the next event.

This module holds the reference `plan_node` and the building blocks both planners share:
`layout_pools`, `pool_of`, `pool_cpus_decision`, `bound_picks`, `bound_placed`,
`container_plan`; the dedicated pass is `dedicated.place_dedicated`, the inputs are in
`workload`, core cutting in `cores`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nri_plugin.policy.class_isolation import class_levels
from nri_plugin.policy.cores import bottom_cores, top_cores
from nri_plugin.policy.cpuallocator import CpuAllocation
from nri_plugin.policy.dedicated import (
    DedicatedPlacement,
    NumaState,
    place_dedicated,
    reported_claims,
)
from nri_plugin.policy.kube_qos import MILLI_PER_CPU, KubeQos
from nri_plugin.policy.oom import OomBands, decide_oom_score_adj
from nri_plugin.policy.plan import ContainerPlan, Decision
from nri_plugin.policy.qos import Classification, QosClass
from nri_plugin.policy.workload import (
    DEDICATED,
    RECLAIMED,
    RECLAIMED_SHARES,
    SHARED,
    SYSTEM,
    PlannerConfig,
    PlanWarning,
    UsageSample,
    Workload,
    allocatable_cpus,
    binds_numa,
    demand_of,
    is_dedicated,
)
from qos_model.cpulist import format_cpu_list
from qos_model.topology import Topology


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


def pool_of(w: Workload, allocated: bool, reserved: frozenset[int]) -> str:
    """The pool a container runs in; `allocated`: it holds an exclusive set."""
    c = w.classification
    if allocated:
        return DEDICATED
    if c.qos_class is QosClass.RECLAIMED_CORES:
        return RECLAIMED
    if c.qos_class is QosClass.SYSTEM_CORES and reserved:
        return SYSTEM
    if c.cpuset_pool and c.qos_class is not QosClass.SYSTEM_CORES:
        return f"{SHARED}:{c.cpuset_pool}"
    return SHARED


def layout_pools(
    topology: Topology,
    config: PlannerConfig,
    placement: DedicatedPlacement,
    online_demand: int,
    usage: UsageSample | None,
    has_reclaimed: bool,
    named_demands: Mapping[str, tuple[int, int]],
) -> tuple[Pools, int]:
    """Every pool but the dedicated sets, from aggregates only: the online containers'
    summed demand (millicores), whether any container runs reclaimed, and each named
    pool's summed demand. Returns the pools and the demand used to size them."""
    allocatable = allocatable_cpus(topology, config)
    reserved = config.reserved_cpus & allocatable
    rest = allocatable - reserved - placement.taken
    measured = round(usage.online_cores * MILLI_PER_CPU) if usage is not None else 0
    demand = math.ceil(max(online_demand, measured) * (1 + config.shared_headroom))
    reasons: dict[str, str] = {}
    shared, reclaimed = _split_shared_reclaimed(topology, config, rest, demand, reasons)
    if shared != rest and not has_reclaimed:
        # Nobody runs in the reclaimed pool yet: keep its CPUs in the shared pool too, so
        # online containers are not confined for nothing. It is still reported as
        # reclaimable, and separated the moment a reclaimed container arrives.
        shared = rest
        reasons[SHARED] = "every CPU outside system and dedicated (no reclaimed containers yet)"
    named: dict[str, frozenset[int]] = {}
    for pool_name in sorted(named_demands):
        named_demand, count = named_demands[pool_name]
        size = max(1, math.ceil(named_demand / MILLI_PER_CPU))
        members = f"{SHARED}:{pool_name}"
        if len(shared) - size >= config.min_shared_cpus:
            carved = bottom_cores(topology, shared, size)
            named[pool_name] = carved
            shared = shared - carved
            reasons[members] = f"{size} CPU(s) for the requests of {count} container(s)"
        else:
            named[pool_name] = shared
            reasons[members] = (
                f"needs {size} CPU(s) but the default shared pool must keep "
                f"{config.min_shared_cpus}: shares the default pool"
            )
    if not reclaimed and has_reclaimed:
        reclaimed = shared
        reasons[RECLAIMED] = "no idle CPUs to reclaim: reclaimed containers share the shared pool"
    if usage is not None and usage.avoid_cpus and has_reclaimed:
        shared, reclaimed = _avoid(topology, config, shared, reclaimed, usage, reasons)
    pools = Pools(
        system=reserved,
        shared=shared,
        named=named,
        reclaimed=reclaimed,
        dedicated=placement.allocations,
        reasons=reasons,
    )
    return pools, demand


def plan_node(
    topology: Topology,
    config: PlannerConfig,
    workloads: Sequence[Workload],
    previous: Mapping[str, CpuAllocation] | None = None,
    usage: UsageSample | None = None,
) -> NodePlan:
    """Plan every container from scratch. `previous` is the last plan's dedicated
    allocations (None after a restart: then each dedicated container's current cpuset is
    adopted when it is still a valid exclusive set)."""
    ordered = sorted(workloads, key=lambda w: w.order)
    claims = reported_claims(ordered)
    placement = place_dedicated(
        topology, config, [w for w in ordered if is_dedicated(w)], previous, claims
    )
    reserved = config.reserved_cpus & allocatable_cpus(topology, config)
    pools_of = {
        w.container_id: pool_of(w, w.container_id in placement.allocations, reserved)
        for w in ordered
    }
    online = [w for w in ordered if pools_of[w.container_id] not in (DEDICATED, RECLAIMED)]
    named_demands: dict[str, tuple[int, int]] = {}
    for w in online:
        pool = pools_of[w.container_id]
        if pool.startswith(SHARED + ":"):
            name = pool.partition(":")[2]
            total, count = named_demands.get(name, (0, 0))
            named_demands[name] = (total + demand_of(w.classification), count + 1)
    pools, demand = layout_pools(
        topology,
        config,
        placement,
        sum(demand_of(w.classification) for w in online),
        usage,
        RECLAIMED in pools_of.values(),
        named_demands,
    )
    bound = [w for w in ordered if binds_numa(w) and pools_of[w.container_id] != DEDICATED]
    picks = bound_picks(topology, pools, placement.numa, bound, pools_of)
    plans = {}
    for w in ordered:
        pool = pools_of[w.container_id]
        cid = w.container_id
        refused = placement.refused.get(cid)
        if cid in picks:
            cpus, mems = bound_placed(topology, w, pool, pools, picks[cid], refused)
        else:
            cpus, mems = pool_cpus_decision(w, pool, pools, refused)
        plans[cid] = container_plan(config, w, pool, cpus, mems)
    return NodePlan(pools, plans, placement.warnings, demand)


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
        reclaimed = top_cores(topology, rest, want)
        reasons[RECLAIMED] = f"{want} CPU(s), overlapping the shared pool: {because}"
        reasons[SHARED] = "every CPU outside system and dedicated (reclaimed overlaps it)"
        return rest, reclaimed
    room = len(rest) - config.min_shared_cpus
    if want <= room:
        reclaimed = top_cores(topology, rest, want)
        reasons[RECLAIMED] = f"{want} idle CPU(s): {because}"
        reasons[SHARED] = f"{len(rest) - want} CPU(s) left after the reclaimed pool"
        return rest - reclaimed, reclaimed
    # Not enough room for a disjoint floor: keep the floor, overlapping the shared pool.
    floor = min(len(rest), config.reclaimed_min_cpus)
    reclaimed = top_cores(topology, rest, floor)
    reasons[RECLAIMED] = (
        f"{floor} CPU(s), the floor, overlapping the shared pool because the shared pool "
        f"must keep {config.min_shared_cpus}: {because}"
    )
    reasons[SHARED] = "every CPU outside system and dedicated"
    return rest, reclaimed


def _avoid(
    topology: Topology,
    config: PlannerConfig,
    shared: frozenset[int],
    reclaimed: frozenset[int],
    usage: UsageSample,
    reasons: dict[str, str],
) -> tuple[frozenset[int], frozenset[int]]:
    """Move the reclaimed pool off `usage.avoid_cpus` (where online containers suffer from
    interference), keeping its size where the other CPUs allow; the CPUs it leaves go to
    the shared pool when the two were disjoint. Nothing moves when no other CPU is left."""
    pool = shared | reclaimed  # named pools were carved out already: not ours to move into
    avoid = usage.avoid_cpus & pool
    if not avoid & reclaimed:
        return shared, reclaimed
    others = pool - avoid
    why = f"avoiding CPUs {format_cpu_list(avoid)}: {usage.avoid_reason or 'interference'}"
    if not others:
        reasons[RECLAIMED] = f"{reasons.get(RECLAIMED, '')}; cannot move off {why}"
        return shared, reclaimed
    disjoint = not shared & reclaimed
    moved = top_cores(topology, others, min(len(reclaimed), len(others)))
    if disjoint:
        left = pool - moved
        shared = left if len(left) >= config.min_shared_cpus else pool  # else overlap
    reasons[RECLAIMED] = f"{len(moved)} CPU(s), {why} (was {format_cpu_list(reclaimed)})"
    return shared, moved


Placed = tuple[Decision[frozenset[int]], Decision[frozenset[int] | None]]
NOT_BOUND: Decision[frozenset[int] | None] = Decision(None, "not NUMA-bound: every memory node")


DecisionMemo = dict[tuple[str, str], Decision[frozenset[int]]]


def pool_cpus_decision(
    w: Workload, pool: str, pools: Pools, refused: str | None, memo: DecisionMemo | None = None
) -> Placed:
    """CPUs and memory nodes of a container that is not bound to a NUMA node. `memo`
    shares one Decision object among the members of a pool (a pool of hundreds)."""
    c = w.classification
    if pool == DEDICATED:
        allocation = pools.dedicated[w.container_id]
        why = f"dedicated_cores: {allocation.reason}"
        cpus = Decision(allocation.cpus, why if c.role == "app" else f"{c.role} container, {why}")
        if c.numa_binding:
            nodes = format_cpu_list(allocation.mems)
            return cpus, Decision(
                allocation.mems, f"numa_binding: memory from node(s) {nodes} only"
            )
        return cpus, NOT_BOUND
    why = _pool_reason(c, pool, refused)
    if memo is None:
        return Decision(pools.pool_cpus(pool), why), NOT_BOUND
    decision = memo.get((pool, why))
    if decision is None:
        decision = memo[(pool, why)] = Decision(pools.pool_cpus(pool), why)
    return decision, NOT_BOUND


def bound_picks(
    topology: Topology,
    pools: Pools,
    numa_after_dedicated: NumaState,
    bound: Sequence[Workload],
    pools_of: Mapping[str, str],
) -> dict[str, int | None]:
    """The NUMA node of each bound pool container, in creation order: each takes the
    least-loaded node of its pool that it may use (None: none), and loads it for the ones
    after it."""
    numa = numa_after_dedicated.copy()
    nodes_of: dict[str, list[int]] = {}
    out: dict[str, int | None] = {}
    for w in bound:
        c = w.classification
        pool = pools_of[w.container_id]
        nodes = nodes_of.get(pool)
        if nodes is None:
            nodes = nodes_of[pool] = sorted(
                {topology.node_of(cpu) for cpu in pools.pool_cpus(pool)}
            )
        avoid = numa.avoid_for(w.pod_id, c.numa_share)
        candidates = [n for n in nodes if n not in avoid]
        if not candidates:
            out[w.container_id] = None
            continue
        node = min(candidates, key=lambda n: (numa.bound_load.get(n, 0), n))
        numa.bind(node, w.pod_id, demand_of(c), c.numa_share)
        out[w.container_id] = node
    return out


def bound_placed(
    topology: Topology,
    w: Workload,
    pool: str,
    pools: Pools,
    node: int | None,
    refused: str | None,
) -> Placed:
    """CPUs and memory nodes of a bound pool container given its pick."""
    base = pools.pool_cpus(pool)
    why = _pool_reason(w.classification, pool, refused)
    if node is None:
        why += "; numa_binding asked, but no node of the pool is free to bind to: not bound"
        return Decision(base, why), NOT_BOUND
    return (
        Decision(base & topology.node(node).cpus, f"{why}; numa_binding: the part on node {node}"),
        Decision(frozenset({node}), f"numa_binding: memory from node {node} only"),
    )


_RECLAIMED_WEIGHT: Decision[int | None] = Decision(
    RECLAIMED_SHARES,
    f"reclaimed_cores: the lowest CFS weight ({RECLAIMED_SHARES}) for its cgroup (across "
    "pods, the pod cgroup's weight the kubelet derives from requests decides; the "
    "interference loop covers the rest)",
)
_KUBELET_WEIGHT: Decision[int | None] = Decision(
    None, "kept the weight the kubelet set from the CPU request"
)
_RESIZED_WEIGHT: Decision[int | None] = Decision(
    None,
    "reclaimed_cores, but the kubelet resized it in place: the weight is the kubelet's "
    "(a kubelet before 1.33 compares the resources it reads back with those it asked "
    "for, kubernetes#130598, and would retry the resize for ever)",
)


def _weight(reclaimed: bool, kubelet_resized: bool) -> Decision[int | None]:
    if not reclaimed:
        return _KUBELET_WEIGHT
    return _RESIZED_WEIGHT if kubelet_resized else _RECLAIMED_WEIGHT


_KUBELET_QUOTA: Decision[int | None] = Decision(
    None, "kept the CFS quota the kubelet set from the CPU limit"
)


def container_plan(
    config: PlannerConfig,
    w: Workload,
    pool: str,
    cpus: Decision[frozenset[int]],
    mems: Decision[frozenset[int] | None],
) -> ContainerPlan:
    c = w.classification
    reclaimed = c.qos_class is QosClass.RECLAIMED_CORES
    levels = class_levels(c.qos_class, config.isolation)
    return ContainerPlan(
        container_id=w.container_id,
        pod_id=w.pod_id,
        name=w.name,
        qos_class=c.qos_class,
        pool=pool,
        cpus=cpus,
        mems=mems,
        cpu_shares=_weight(reclaimed, w.kubelet_resized),
        cpu_quota=_KUBELET_QUOTA,
        oom_score_adj=_oom_decision(c.qos_class, c.kube_qos, c.oom_priority, config.oom_bands),
        rdt_class=levels.rdt_class,
        io_weight=levels.io_weight,
        net_class=levels.net_class,
        role=c.role,
    )


def _oom_decision(
    qos_class: QosClass, kube_qos: KubeQos | None, oom_priority: int | None, bands: OomBands
) -> Decision[int]:
    """decide_oom_score_adj as a Decision, remembered: few distinct inputs, many containers
    (keyed by the bands' identity, as hashing them costs more than deciding)."""
    key = (qos_class, kube_qos, oom_priority, id(bands))
    known = _OOM_DECISIONS.get(key)
    if known is not None and known[0] is bands:
        return known[1]
    oom = decide_oom_score_adj(qos_class, kube_qos, oom_priority, bands)
    decision = Decision(oom.oom_score_adj, oom.reason)
    if len(_OOM_DECISIONS) > 1024:
        _OOM_DECISIONS.clear()
    _OOM_DECISIONS[key] = (bands, decision)
    return decision


_OOM_DECISIONS: dict[tuple[object, ...], tuple[OomBands, Decision[int]]] = {}


def _pool_reason(c: Classification, pool: str, refused: str | None) -> str:
    """Why a container runs in its pool; why the pool is as big as it is lives in
    `Pools.reasons` (views join the two)."""
    if refused:
        return f"dedicated_cores refused ({refused}): the shared pool"
    if c.qos_class is QosClass.SYSTEM_CORES and pool != SYSTEM:
        why = "system_cores, but no CPUs are reserved: the shared pool"
    else:
        why = _POOL_REASONS.get(pool) or f"shared_cores: the named pool {pool.partition(':')[2]!r}"
    return why if c.role == "app" else f"{c.role} container, {why}"


_POOL_REASONS: Mapping[str, str] = {
    SYSTEM: "system_cores: the reserved CPUs",
    RECLAIMED: "reclaimed_cores: the reclaimed pool",
    SHARED: "shared_cores: the shared pool",
}
