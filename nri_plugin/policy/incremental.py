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
* the plans of the containers the event touched and of the dedicated and bound containers
  whose placement moved;
* for the plain members of a pool whose CPUs moved (hundreds, on a dense node), nothing
  per member: the move is reported once (`PoolMove`: the CPUs before and after, the
  members, the resources they all get), and a member's plan is rebuilt when it is read
  (its CPUs are its pool's, nothing else about it changed).

Contract, checked by a property test over random topologies and histories
(tests/policy/test_incremental.py): after every step, `plan` equals
`plan_node(topology, config, workloads, previous=<the dedicated allocations before the
step>, usage)`, and the containers it reports (changed plans and pool moves' members) are
exactly those whose plan differs.
Pure: no I/O, no clock; one thread at a time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nri_plugin.policy.cpuallocator import CpuAllocation
from nri_plugin.policy.dedicated import (
    DedicatedPlacement,
    NumaState,
    place_dedicated,
    reported_claims,
)
from nri_plugin.policy.plan import ContainerPlan
from nri_plugin.policy.planner import (
    DecisionMemo,
    NodePlan,
    Pools,
    bound_picks,
    bound_placed,
    container_plan,
    layout_pools,
    pool_cpus_decision,
    pool_of,
)
from nri_plugin.policy.qos import QosClass
from nri_plugin.policy.workload import (
    DEDICATED,
    RECLAIMED,
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
from qos_model.containers import Resources
from qos_model.topology import Topology

Change = tuple[ContainerPlan | None, ContainerPlan | None]


@dataclass(frozen=True, slots=True)
class PoolMove:
    """A pool's CPUs moved: each of `members` now runs on `after` (nothing else about
    them changed) and gets `resources` (the same for all of them)."""

    pool: str
    before: frozenset[int]
    after: frozenset[int]
    members: tuple[str, ...]
    resources: Resources


@dataclass(frozen=True, slots=True)
class PlanStep:
    """What one event changed. `changes`: container id -> (plan before, plan after), None
    before: it arrived, None after: it left. `moves`: pools whose CPUs moved, with their
    plain members (who are not in `changes`)."""

    changes: Mapping[str, Change]
    moves: tuple[PoolMove, ...] = ()

    def changed_ids(self) -> set[str]:
        return set(self.changes).union(*(m.members for m in self.moves))


class _LivePlans(Mapping[str, ContainerPlan]):
    """The plan of every container, rebuilt on read where a pool move made it stale."""

    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    def __getitem__(self, container_id: str) -> ContainerPlan:
        plan = self._planner.get(container_id)
        if plan is None:
            raise KeyError(container_id)
        return plan

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._planner._plans))

    def __len__(self) -> int:
        return len(self._planner._plans)


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
        self._picks: dict[str, int | None] = {}  # bound pool container -> its node
        self._bound_dirty = False  # a bound container came or went since the last picks
        self._plans: dict[str, ContainerPlan] = {}  # plain members' may be stale: see get()
        self._memo: DecisionMemo = {}  # the current pools' Decision objects
        # Layouts by their aggregates, for the placement and usage they were made with,
        # each with the Decision memo of its pools.
        self._layouts: dict[Hashable, tuple[Pools, int, DecisionMemo]] = {}
        self._layouts_basis: tuple[DedicatedPlacement, UsageSample | None] = (
            self._placement,
            self._usage,
        )
        self._node_plan: NodePlan | None = None  # `plan`, until the next step

    # --- reading --------------------------------------------------------------------------

    @property
    def plan(self) -> NodePlan:
        """The node plan; the same value until the next step (its containers are a live
        view either way)."""
        node_plan = self._node_plan
        if node_plan is None:
            pools = self._pools
            if pools is None:
                pools, self._demand, self._memo = self._layout()
                self._pools = pools
            node_plan = NodePlan(pools, _LivePlans(self), self._placement.warnings, self._demand)
            self._node_plan = node_plan
        return node_plan

    @property
    def warnings(self) -> tuple[PlanWarning, ...]:
        """`plan.warnings`, without building the plan."""
        return self._placement.warnings

    @property
    def dedicated_allocations(self) -> Mapping[str, CpuAllocation]:
        return self._placement.allocations

    @property
    def usage(self) -> UsageSample | None:
        return self._usage

    def workloads(self) -> Iterable[Workload]:
        return self._workloads.values()

    def get(self, container_id: str) -> ContainerPlan | None:
        """The container's plan; a plain pool member's is rebuilt if its pool moved."""
        plan = self._plans.get(container_id)
        if plan is None or self._pools is None:
            return plan
        pool = self._pool_of[container_id]
        if pool == DEDICATED or container_id in self._picks:
            return plan
        current = self._pools.pool_cpus(pool)
        if plan.cpus.value is current or plan.cpus.value == current:
            return plan
        plan = self._build(container_id, self._pools)
        self._plans[container_id] = plan
        return plan

    # --- events ---------------------------------------------------------------------------

    def rebuild(self, workloads: Iterable[Workload], usage: UsageSample | None) -> PlanStep:
        """Start over from the runtime's view (Synchronize): each dedicated container
        keeps the cpuset it reports when that is still a valid exclusive set."""
        before = {cid: self.get(cid) for cid in list(self._plans)}
        self._reset()
        self._usage = usage
        for w in workloads:
            self._insert(w)
        claims = reported_claims(self._workloads.values())
        step = self._step(set(self._workloads), dedicated_dirty=True, adopt=True, claims=claims)
        changes = dict(step.changes)
        for cid, plan in before.items():
            now = self._plans.get(cid)
            if now is None:
                changes[cid] = (plan, None)
            elif now == plan:
                changes.pop(cid, None)
            else:
                changes[cid] = (plan, now)
        return PlanStep(changes)

    def add(self, w: Workload) -> PlanStep:
        """A new container, or a known one with new inputs (it keeps its place)."""
        old = self._workloads.get(w.container_id)
        removed: dict[str, Change] = {}
        if old is not None:
            self._discard(old.container_id, removed)
        self._insert(w)
        dirty = is_dedicated(w) or (old is not None and is_dedicated(old))
        step = self._step({w.container_id}, dedicated_dirty=dirty)
        if not removed:
            return step
        changes = dict(step.changes)
        for cid, (before, _after) in removed.items():
            after = self._plans.get(cid)
            if after == before:
                changes.pop(cid, None)
            else:
                changes[cid] = (before, after)
        return PlanStep(changes, step.moves)

    def remove(self, container_ids: Iterable[str]) -> PlanStep:
        removed: dict[str, Change] = {}
        dirty = False
        for cid in container_ids:
            w = self._workloads.get(cid)
            if w is not None:
                dirty = dirty or is_dedicated(w)
                self._discard(cid, removed)
        if not removed:
            return PlanStep({})
        step = self._step(set(), dedicated_dirty=dirty)
        return PlanStep({**removed, **step.changes}, step.moves)

    def set_usage(self, usage: UsageSample | None) -> PlanStep:
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
            self._bound_dirty = True

    def _discard(self, cid: str, removed: dict[str, Change]) -> None:
        removed[cid] = (self.get(cid), None)  # read while its pool is still known
        w = self._workloads.pop(cid)
        self._agg.count(w, -1)
        if is_dedicated(w):
            self._dedicated = [x for x in self._dedicated if x.container_id != cid]
        if binds_numa(w):
            self._bound = [x for x in self._bound if x.container_id != cid]
            self._bound_dirty = True
        pool = self._pool_of.pop(cid, None)
        if pool is not None:
            self._members.get(pool, set()).discard(cid)
        self._picks.pop(cid, None)
        self._plans.pop(cid, None)

    def _layout(self) -> tuple[Pools, int, DecisionMemo]:
        """layout_pools, remembered by its inputs: a shared container that comes and goes
        (or is resized) moves the demand back and forth between a few values, and each of
        them lays out the same pools again. Kept for one placement and usage (the other
        inputs are the planner's own topology and config), bounded; with the Decision
        memo of those pools, which holds for them as long as they exist."""
        agg = self._agg
        demand = agg.plain_online_demand + agg.refused_demand
        has_reclaimed = agg.reclaimed > 0
        key = (demand, has_reclaimed, tuple(agg.named.items()) if agg.named else ())
        basis = self._layouts_basis
        if basis[0] is not self._placement or basis[1] is not self._usage:
            self._layouts.clear()
            self._layouts_basis = (self._placement, self._usage)
        found = self._layouts.get(key)
        if found is None:
            if len(self._layouts) >= _LAYOUTS_LIMIT:
                self._layouts.clear()
            pools, used = layout_pools(
                self.topology,
                self.config,
                self._placement,
                demand,
                self._usage,
                has_reclaimed,
                agg.named,
            )
            found = (pools, used, {})
            # named pools are named by annotations (input): a huge name is not kept
            if not agg.named or all(len(n) <= _POOL_NAME_MAX for n in agg.named):
                self._layouts[key] = found
        return found

    def _step(
        self,
        touched: set[str],
        dedicated_dirty: bool,
        adopt: bool = False,
        claims: Counter[int] | None = None,
    ) -> PlanStep:
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
        # Plans read after this point must be what they were before the step.
        before = {cid: self.get(cid) for cid in touched}
        old_pools = self._pools
        pools, self._demand, self._memo = self._layout()
        self._pools, self._node_plan = pools, None
        placement = self._placement
        for cid in touched:
            member = self._workloads.get(cid)
            if member is not None:
                allocated = cid in placement.allocations
                self._place_in_pool(member, pool_of(member, allocated, self._reserved))
        moved = _moved_pools(old_pools, pools)
        if dedicated_dirty or self._bound_dirty or moved:
            # Picks depend on the dedicated NUMA state, the bound containers (in order)
            # and the nodes of their pools: recomputed only when one of those changed.
            bound = [w for w in self._bound if self._pool_of[w.container_id] != DEDICATED]
            picks = bound_picks(self.topology, pools, placement.numa, bound, self._pool_of)
            for cid, node in picks.items():
                if cid not in touched and (
                    self._pool_of[cid] in moved or self._picks.get(cid, -1) != node
                ):
                    before[cid] = self._plans.get(cid)  # bound: never stale
                    touched.add(cid)
            self._picks, self._bound_dirty = picks, False
        changes: dict[str, Change] = {}
        for cid in touched:
            if cid in self._workloads:
                plan = self._build(cid, pools)
                if plan != before.get(cid):
                    self._plans[cid] = plan
                    changes[cid] = (before.get(cid), plan)
        return PlanStep(changes, self._moves(old_pools, pools, moved, touched))

    def _moves(
        self, old: Pools | None, new: Pools, moved: list[str], touched: set[str]
    ) -> tuple[PoolMove, ...]:
        """The pools whose CPUs moved, with their members the step did not re-plan (their
        plans are rebuilt when read: see get)."""
        out = []
        for pool in moved:
            members = tuple(sorted(self._members.get(pool, set()) - touched))
            if not members or old is None:
                continue
            representative = self.get(members[0])
            assert representative is not None, members[0]
            resources = representative.update().resources
            out.append(
                PoolMove(
                    pool, _cpus(old, pool) or frozenset(), new.pool_cpus(pool), members, resources
                )
            )
        return tuple(out)

    def _build(self, cid: str, pools: Pools) -> ContainerPlan:
        workload = self._workloads[cid]
        pool = self._pool_of[cid]
        refused = self._placement.refused.get(cid)
        if cid in self._picks:
            node = self._picks[cid]
            placed = bound_placed(self.topology, workload, pool, pools, node, refused)
        else:
            placed = pool_cpus_decision(workload, pool, pools, refused, self._memo)
        return container_plan(self.config, workload, pool, *placed)

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
    """Names of the pools whose CPUs differ (every pool when there was no plan), in the
    order shared, reclaimed, system, the named pools (new ones first)."""
    if old is new:
        return []
    if old is None:
        return [SHARED, RECLAIMED, SYSTEM] + [f"{SHARED}:{n}" for n in new.named]
    moved = []
    for name, before, after in (
        (SHARED, old.shared, new.shared),
        (RECLAIMED, old.reclaimed, new.reclaimed),
        (SYSTEM, old.system, new.system),
    ):
        if before is not after and before != after:
            moved.append(name)
    if old.named or new.named:
        names = [*new.named, *(n for n in old.named if n not in new.named)]
        moved += [f"{SHARED}:{n}" for n in names if old.named.get(n) != new.named.get(n)]
    return moved


_LAYOUTS_LIMIT = 64
_POOL_NAME_MAX = 253


def _cpus(pools: Pools, pool: str) -> frozenset[int] | None:
    if pool.startswith(SHARED + ":"):
        return pools.named.get(pool.partition(":")[2])
    return pools.pool_cpus(pool)


__all__ = ["Change", "PlanStep", "Planner", "PoolMove"]
