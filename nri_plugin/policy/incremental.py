"""The node plan, kept up to date one event at a time.

`planner.plan_node` plans every container from scratch; at 1,000 containers that costs
milliseconds per event, and almost all of it is recomputing plans that cannot have
changed. `Planner` keeps the plan and, for each event, recomputes only what the event can
change:

* the dedicated pass, only when a dedicated container arrives, leaves or changes (the pass
  is a fixpoint, so repeating it for any other event would give the same result);
* the pools (shared, reclaimed, named, system) from aggregates it maintains — the online
  containers' summed demand, the number of reclaimed containers, each named pool's demand
  — so sizing them does not visit the containers;
* the NUMA picks of bound pool containers (they depend on each other, in creation order);
* the plans of the containers the event touched, of the members of every pool whose CPUs
  moved, and of the dedicated and bound containers whose placement moved.

Contract, checked by a property test over random topologies and histories
(tests/policy/test_incremental.py): after every step, `plan` equals
`plan_node(topology, config, workloads, previous=<the dedicated allocations before the
step>, usage)`, and the changes it reports are exactly the containers whose plan differs.
Pure: no I/O, no clock; one thread at a time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nri_plugin.policy.cpuallocator import CpuAllocation
from nri_plugin.policy.plan import ContainerPlan
from nri_plugin.policy.planner import (
    DEDICATED,
    RECLAIMED,
    SHARED,
    DedicatedPlacement,
    NodePlan,
    NumaState,
    Placed,
    PlannerConfig,
    Pools,
    UsageSample,
    Workload,
    allocatable_cpus,
    binds_numa,
    bound_decisions,
    container_plan,
    demand_of,
    is_dedicated,
    layout_pools,
    place_dedicated,
    pool_cpus_decision,
    pool_of,
)
from nri_plugin.policy.qos import QosClass
from qos_model.topology import Topology

PlanChanges = Mapping[str, tuple[ContainerPlan | None, ContainerPlan | None]]
"""Container id -> (plan before, plan after) for every container whose plan changed;
None before: it arrived; None after: it left."""

_EMPTY_PLACEMENT = DedicatedPlacement(MappingProxyType({}), MappingProxyType({}), NumaState(), ())


@dataclass(slots=True)
class _Aggregates:
    """What sizing the pools needs, maintained as containers come and go."""

    plain_online_demand: int = 0  # millicores of shared/system containers
    reclaimed: int = 0  # number of reclaimed containers
    refused_demand: int = 0  # millicores of refused dedicated containers (they run shared)
    named: dict[str, tuple[int, int]] = field(default_factory=dict)  # pool -> (m, members)

    def count(self, w: Workload, sign: int) -> None:
        c = w.classification
        if c.qos_class is QosClass.RECLAIMED_CORES:
            self.reclaimed += sign
        elif c.qos_class is not QosClass.DEDICATED_CORES:
            demand = demand_of(c)
            self.plain_online_demand += sign * demand
            if c.cpuset_pool and c.qos_class is QosClass.SHARED_CORES:
                total, members = self.named.get(c.cpuset_pool, (0, 0))
                if members + sign:
                    self.named[c.cpuset_pool] = (total + sign * demand, members + sign)
                else:
                    del self.named[c.cpuset_pool]


class Planner:
    def __init__(self, topology: Topology, config: PlannerConfig) -> None:
        self.topology = topology
        self.config = config
        self._reserved = config.reserved_cpus & allocatable_cpus(topology, config)
        self._reset()

    def _reset(self) -> None:
        self._workloads: dict[str, Workload] = {}
        self._dedicated: list[Workload] = []  # dedicated_cores, creation order
        self._bound: list[Workload] = []  # NUMA-bound when in a pool, creation order
        self._agg = _Aggregates()
        self._usage: UsageSample | None = None
        self._placement = _EMPTY_PLACEMENT
        self._pools: Pools | None = None
        self._demand = 0
        self._pool_of: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}  # pool -> unbound members
        self._picks: dict[str, Placed] = {}
        self._plans: dict[str, ContainerPlan] = {}

    # --- reading --------------------------------------------------------------------------

    @property
    def plan(self) -> NodePlan:
        pools = self._pools
        if pools is None:
            pools, self._demand = self._layout()
            self._pools = pools
        return NodePlan(
            pools, MappingProxyType(self._plans), self._placement.warnings, self._demand
        )

    @property
    def dedicated_allocations(self) -> Mapping[str, CpuAllocation]:
        return self._placement.allocations

    @property
    def usage(self) -> UsageSample | None:
        return self._usage

    def workloads(self) -> Iterable[Workload]:
        return self._workloads.values()

    def get(self, container_id: str) -> ContainerPlan | None:
        return self._plans.get(container_id)

    # --- events ---------------------------------------------------------------------------

    def rebuild(self, workloads: Iterable[Workload], usage: UsageSample | None) -> PlanChanges:
        """Start over from the runtime's view (Synchronize): each dedicated container
        keeps the cpuset it reports when that is still a valid exclusive set."""
        before = dict(self._plans)
        self._reset()
        self._usage = usage
        for w in workloads:
            self._insert(w)
        claims = Counter(cpu for w in self._workloads.values() for cpu in w.current_cpus)
        changes = self._step(set(self._workloads), dedicated_dirty=True, adopt=True, claims=claims)
        out = dict(changes)
        for cid, plan in before.items():
            now = self._plans.get(cid)
            if now is None:
                out[cid] = (plan, None)
            elif now == plan:
                out.pop(cid, None)
            else:
                out[cid] = (plan, now)
        return out

    def add(self, w: Workload) -> PlanChanges:
        """A new container, or a known one with new inputs (it keeps its place)."""
        old = self._workloads.get(w.container_id)
        removed: dict[str, tuple[ContainerPlan | None, ContainerPlan | None]] = {}
        if old is not None:
            self._discard(old.container_id, removed)
        self._insert(w)
        dirty = is_dedicated(w) or (old is not None and is_dedicated(old))
        changes = dict(self._step({w.container_id}, dedicated_dirty=dirty))
        for cid, (before, _after) in removed.items():
            after = self._plans.get(cid)
            if after == before:
                changes.pop(cid, None)
            else:
                changes[cid] = (before, after)
        return changes

    def remove(self, container_ids: Iterable[str]) -> PlanChanges:
        removed: dict[str, tuple[ContainerPlan | None, ContainerPlan | None]] = {}
        dirty = False
        for cid in container_ids:
            w = self._workloads.get(cid)
            if w is not None:
                dirty = dirty or is_dedicated(w)
                self._discard(cid, removed)
        if not removed:
            return {}
        return {**removed, **self._step(set(), dedicated_dirty=dirty)}

    def set_usage(self, usage: UsageSample | None) -> PlanChanges:
        self._usage = usage
        return self._step(set(), dedicated_dirty=False)

    # --- internals ------------------------------------------------------------------------

    def _insert(self, w: Workload) -> None:
        self._workloads[w.container_id] = w
        self._agg.count(w, +1)
        if is_dedicated(w):
            bisect.insort(self._dedicated, w, key=_order)
        if binds_numa(w):
            bisect.insort(self._bound, w, key=_order)

    def _discard(
        self, cid: str, removed: dict[str, tuple[ContainerPlan | None, ContainerPlan | None]]
    ) -> None:
        w = self._workloads.pop(cid)
        self._agg.count(w, -1)
        if is_dedicated(w):
            self._dedicated = [x for x in self._dedicated if x.container_id != cid]
        if binds_numa(w):
            self._bound = [x for x in self._bound if x.container_id != cid]
        pool = self._pool_of.pop(cid, None)
        if pool is not None:
            self._members.get(pool, set()).discard(cid)
        self._picks.pop(cid, None)
        plan = self._plans.pop(cid, None)
        removed[cid] = (plan, None)

    def _layout(self) -> tuple[Pools, int]:
        agg = self._agg
        return layout_pools(
            self.topology,
            self.config,
            self._placement,
            agg.plain_online_demand + agg.refused_demand,
            self._usage,
            agg.reclaimed > 0,
            agg.named,
        )

    def _step(
        self,
        touched: set[str],
        dedicated_dirty: bool,
        adopt: bool = False,
        claims: Counter[int] | None = None,
    ) -> dict[str, tuple[ContainerPlan | None, ContainerPlan | None]]:
        if dedicated_dirty:
            old = self._placement
            previous = None if adopt else old.allocations
            new = place_dedicated(self.topology, self.config, self._dedicated, previous, claims)
            for w in self._dedicated:
                cid = w.container_id
                if old.allocations.get(cid) != new.allocations.get(cid) or old.refused.get(
                    cid
                ) != new.refused.get(cid):
                    touched.add(cid)
            self._placement = new
            self._agg.refused_demand = sum(
                demand_of(w.classification)
                for w in self._dedicated
                if w.container_id not in new.allocations
            )
        old_pools = self._pools
        pools, self._demand = self._layout()
        self._pools = pools
        placement = self._placement
        for cid in touched:
            moved = self._workloads.get(cid)
            if moved is not None:
                allocated = cid in placement.allocations
                self._place_in_pool(moved, pool_of(moved, allocated, self._reserved))
        bound = [w for w in self._bound if self._pool_of[w.container_id] != DEDICATED]
        picks = bound_decisions(
            self.topology, pools, placement.numa, bound, self._pool_of, placement.refused
        )
        for cid, placed in picks.items():
            if self._picks.get(cid) != placed:
                touched.add(cid)
        self._picks = picks
        for pool in _moved_pools(old_pools, pools):
            touched |= self._members.get(pool, set())
        changes: dict[str, tuple[ContainerPlan | None, ContainerPlan | None]] = {}
        for cid in touched:
            workload = self._workloads.get(cid)
            if workload is None:
                continue
            pool = self._pool_of[cid]
            placed = self._picks.get(cid) or pool_cpus_decision(
                workload, pool, pools, placement.refused.get(cid)
            )
            plan = container_plan(self.config, workload, pool, *placed)
            before = self._plans.get(cid)
            if plan != before:
                self._plans[cid] = plan
                changes[cid] = (before, plan)
        return changes

    def _place_in_pool(self, w: Workload, pool: str) -> None:
        cid = w.container_id
        old = self._pool_of.get(cid)
        if old is not None:
            self._members.get(old, set()).discard(cid)
        self._pool_of[cid] = pool
        if pool != DEDICATED and not binds_numa(w):
            self._members.setdefault(pool, set()).add(cid)


def _order(w: Workload) -> tuple[int, str]:
    return w.order


def _moved_pools(old: Pools | None, new: Pools) -> list[str]:
    """Names of the pools whose CPUs differ (every pool when there was no plan)."""
    names = [SHARED, RECLAIMED, "system"] + [f"{SHARED}:{n}" for n in new.named]
    if old is None:
        return names
    names += [f"{SHARED}:{n}" for n in old.named if n not in new.named]
    return [n for n in names if _cpus(old, n) != _cpus(new, n)]


def _cpus(pools: Pools, pool: str) -> frozenset[int] | None:
    if pool.startswith(SHARED + ":"):
        return pools.named.get(pool.partition(":")[2])
    return pools.pool_cpus(pool)


__all__ = ["DEDICATED", "PlanChanges", "Planner"]
