"""The dedicated pass: exclusive CPU sets for dedicated_cores containers.

Rules:
* Creation order decides: every container first keeps what it holds, then the rest are
  allocated in creation order, so a newcomer never takes CPUs from a running container.
* A held set is kept as long as its container asks for the same size and its CPUs are
  free; it is not re-judged against NUMA constraints that arrived after it.
* After a restart (`previous` None) a container keeps the cpuset the runtime reports when
  exactly one container reports those CPUs and the allocator could have produced it.
* An allocation that would leave fewer than `min_shared_cpus` for everyone else, or that
  the allocator cannot satisfy, is refused with a warning; the container runs shared.
* The pass is repeated with its own result until it no longer changes (`place_dedicated`
  returns a fixpoint), so running it again on any later event changes nothing — which is
  what lets the incremental planner skip it for events that touch no dedicated container.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from nri_plugin.policy.cpuallocator import AllocationError, CpuAllocation, CpuRequest, allocate_cpus
from nri_plugin.policy.workload import (
    PlannerConfig,
    PlanWarning,
    Workload,
    allocatable_cpus,
    cpu_count,
    is_dedicated,
)
from qos_model.cpulist import format_cpu_list
from qos_model.topology import Topology


@dataclass(slots=True)
class NumaState:
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

    def copy(self) -> NumaState:
        return NumaState(
            dict(self.bound_load),
            {node: set(pods) for node, pods in self.bound_pods.items()},
            dict(self.owners),
        )


@dataclass(frozen=True, slots=True)
class DedicatedPlacement:
    """The outcome of the dedicated pass: who holds which exclusive set, who was refused
    and why, and the NUMA book-keeping that pool containers then bind against."""

    allocations: Mapping[str, CpuAllocation]
    refused: Mapping[str, str]
    numa: NumaState
    warnings: tuple[PlanWarning, ...]
    taken: frozenset[int] = frozenset()  # every CPU the allocations hold


def place_dedicated(
    topology: Topology,
    config: PlannerConfig,
    dedicated: Sequence[Workload],
    previous: Mapping[str, CpuAllocation] | None,
    claims: Counter[int] | None = None,
) -> DedicatedPlacement:
    """Exclusive sets for `dedicated` (creation order), settled to a fixpoint.

    `previous` None adopts what the runtime reports (`claims` counts, over every
    container, who reports each CPU: an exclusive set is reported by exactly one). The
    pass is then repeated with its own result as `previous` until it no longer changes,
    so repeating it on the next event changes nothing."""
    allocatable = allocatable_cpus(topology, config)
    reserved = config.reserved_cpus & allocatable
    free = allocatable - reserved
    placement = _place_once(topology, config, dedicated, free, reserved, previous, claims)
    if not placement.refused:
        # Nobody refused: a second round keeps every set as it is, so this is the fixpoint.
        return placement
    for _ in range(4):  # settles in one or two rounds; bounded all the same
        again = _place_once(
            topology, config, dedicated, free, reserved, placement.allocations, None
        )
        if again.allocations == placement.allocations and again.refused == placement.refused:
            return again
        placement = again
    return placement


def _place_once(
    topology: Topology,
    config: PlannerConfig,
    dedicated: Sequence[Workload],
    free: frozenset[int],
    reserved: frozenset[int],
    previous: Mapping[str, CpuAllocation] | None,
    claims: Counter[int] | None,
) -> DedicatedPlacement:
    """Exclusive sets, in two passes: first every container keeps what it holds, then
    the rest are allocated in creation order, so a newcomer can never take CPUs from a
    running container, whatever the order of their ids or timestamps."""
    numa = NumaState()
    warnings: list[PlanWarning] = []
    allocations: dict[str, CpuAllocation] = {}
    refused: dict[str, str] = {}
    usable = free
    pending: list[Workload] = []
    resizing: list[tuple[Workload, CpuAllocation]] = []
    for w in dedicated:
        request = _request(config, w, numa)
        held = _resized(w, request, free, previous)
        if held is not None:
            resizing.append((w, held))  # after every exact holder: growth takes free CPUs
            continue
        kept = _keep(topology, w, request, free, previous)
        if (
            kept is not None
            and previous is None
            and (
                (claims is not None and any(claims[cpu] > 1 for cpu in kept.cpus))
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
    # Every resizing container's held CPUs stay out of the others' reach until its turn:
    # a growth never takes a CPU that another resizing container holds.
    still_held = frozenset().union(*(held.taken for _, held in resizing))
    for w, held in resizing:
        still_held = still_held - held.taken
        request = _request(config, w, numa)
        resized, problem = resize_in_place(
            topology, config, held, request, free - still_held, reserved
        )
        if problem:
            warnings.append(PlanWarning(w.container_id, problem))
        free = free - resized.taken
        allocations[w.container_id] = resized
        _record_numa(topology, numa, w, resized)
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
    taken = frozenset().union(*(a.taken for a in allocations.values()))
    return DedicatedPlacement(allocations, refused, numa, tuple(warnings), taken)


def reported_claims(workloads: Iterable[Workload]) -> Counter[int]:
    """How many containers report each CPU that a dedicated container reports (what
    adoption after a restart checks: an exclusive set is reported by exactly one)."""
    workloads = list(workloads)
    held = frozenset().union(*(w.current_cpus for w in workloads if is_dedicated(w)))
    return Counter(cpu for w in workloads for cpu in w.current_cpus & held)


def _request(config: PlannerConfig, w: Workload, numa: NumaState) -> CpuRequest:
    c = w.classification
    return CpuRequest(
        count=cpu_count(c),
        numa_binding=c.numa_binding,
        numa_exclusive=c.numa_exclusive,
        full_pcpus=config.dedicated_full_pcpus or c.full_pcpus_pairing,
        avoid_nodes=numa.avoid_for(w.pod_id, c.numa_share),
    )


def _record_numa(
    topology: Topology, numa: NumaState, w: Workload, allocation: CpuAllocation
) -> None:
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
        # Held CPUs are not re-judged against NUMA constraints that arrived later: those
        # newcomers were placed around this container, not the other way round.
        held = previous.get(w.container_id)
        if held is None or not held.taken <= free or not _size_fits(len(held.cpus), request):
            return None
        return held
    cpus = w.current_cpus
    if not cpus or not cpus <= free or not _size_fits(len(cpus), request):
        return None
    nodes = frozenset(topology.node_of(cpu) for cpu in cpus)
    if (request.numa_binding and len(nodes) != 1) or nodes & request.avoid_nodes:
        return None
    return CpuAllocation(
        cpus=cpus,
        mems=nodes,
        idle_siblings=frozenset(),
        reason=f"kept CPUs {format_cpu_list(cpus)} it already had (exclusive, still free)",
    )


def _resized(
    w: Workload,
    request: CpuRequest,
    free: frozenset[int],
    previous: Mapping[str, CpuAllocation] | None,
) -> CpuAllocation | None:
    """The set a running container holds when its size changed (an in-place resize)."""
    held = None if previous is None else previous.get(w.container_id)
    if held is None or not held.taken <= free or _size_fits(len(held.cpus), request):
        return None
    return held


def resize_in_place(
    topology: Topology,
    config: PlannerConfig,
    held: CpuAllocation,
    request: CpuRequest,
    free: frozenset[int],
    reserved: frozenset[int],
) -> tuple[CpuAllocation, str]:
    """A held exclusive set resized to `request.count`, keeping the CPUs it has: a shrink
    keeps a subset (whole cores where it can), a growth adds CPUs on its own NUMA node(s)
    first, then elsewhere unless it is NUMA-bound. `free` includes `held`. When that is
    not possible the old set is kept, and the second value says why (else "").

    Deterministic in its inputs and never quoting `held.reason`, so that repeating the
    dedicated pass on its own result gives the same allocation (the pass is a fixpoint)."""
    old, want = len(held.cpus), request.count
    if request.numa_exclusive:
        why = (
            f"it owns NUMA node(s) {format_cpu_list(held.mems)} exclusively, and a "
            "numa_exclusive set is not resized in place"
        )
    else:
        try:
            if want < old:
                return _shrink(topology, held, request), ""
            return _grow(topology, config, held, request, free, reserved), ""
        except AllocationError:
            # Only facts that do not depend on which CPUs are free right now: the
            # incremental planner retries a resize when a dedicated container comes or
            # goes, not when the shared pool moves, and its plan must equal a full
            # replan's at every step (tests/policy/test_incremental.py). The free CPUs
            # are in the plan and the status for whoever wants the detail.
            nodes = format_cpu_list(frozenset(topology.node_of(cpu) for cpu in held.cpus))
            beyond = " (NUMA-bound: nowhere else)" if request.numa_binding else " nor beyond"
            why = (
                f"no room to add {want - old} next to them on its NUMA node(s) {nodes}"
                f"{beyond}, with whole cores where it needs them and min_shared_cpus "
                f"({config.min_shared_cpus}) left to the shared pool"
            )
    why = f"asked for {want} CPU(s) but keeps its {old} ({format_cpu_list(held.cpus)}): {why}"
    return CpuAllocation(held.cpus, held.mems, held.idle_siblings, why), why


def _shrink(topology: Topology, held: CpuAllocation, request: CpuRequest) -> CpuAllocation:
    within = replace(request, avoid_nodes=frozenset(), preferred_nodes=frozenset())
    kept = allocate_cpus(topology, held.cpus, within)
    released = held.taken - kept.cpus
    return CpuAllocation(
        kept.cpus,
        kept.mems,
        frozenset(),
        f"resized in place from {len(held.cpus)} to {len(kept.cpus)} CPUs: kept "
        f"{format_cpu_list(kept.cpus)}, released {format_cpu_list(released)}",
    )


def _grow(
    topology: Topology,
    config: PlannerConfig,
    held: CpuAllocation,
    request: CpuRequest,
    free: frozenset[int],
    reserved: frozenset[int],
) -> CpuAllocation:
    extra = replace(
        request,
        count=request.count - len(held.cpus),
        numa_binding=False,
        preferred_nodes=frozenset(),
    )
    others = free - held.taken
    own_nodes = frozenset(topology.node_of(cpu) for cpu in held.cpus)
    local = frozenset().union(*(topology.node(n).cpus for n in own_nodes)) & others
    tries = [(local, f"on its NUMA node(s) {format_cpu_list(own_nodes)}")]
    if not request.numa_binding:
        tries.append((others, "beyond its NUMA node(s), which had no room"))
    for candidates, where in tries:
        try:
            added = allocate_cpus(topology, candidates, extra)
        except AllocationError:
            continue
        cpus = held.cpus | added.cpus
        if not _shape_fits(topology, cpus, request, free):
            continue  # it would split a second core
        left = free - held.taken - added.taken
        if len(left) < config.min_shared_cpus:
            raise AllocationError(
                f"growing would leave {len(left)} CPU(s) for all other containers "
                f"(min_shared_cpus is {config.min_shared_cpus})"
            )
        mems = frozenset(topology.node_of(cpu) for cpu in cpus)
        return CpuAllocation(
            cpus,
            mems,
            held.idle_siblings | added.idle_siblings,
            f"resized in place from {len(held.cpus)} to {len(cpus)} CPUs: kept "
            f"{format_cpu_list(held.cpus)}, added {format_cpu_list(added.cpus)} {where}",
        )
    raise AllocationError("no room to grow in place")


def _shape_fits(
    topology: Topology, cpus: frozenset[int], request: CpuRequest, usable: frozenset[int]
) -> bool:
    """Could the allocator have produced `cpus` for `request`? (Adoption after a restart.)"""
    if request.numa_exclusive:
        nodes = {topology.node_of(cpu) for cpu in cpus}
        return len(nodes) == 1 and cpus == topology.node(nodes.pop()).cpus & usable
    if request.full_pcpus:
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
