"""Exclusive CPU sets for dedicated_cores containers, chosen from the host's topology.

A dedicated container is promised CPUs nobody else runs on. Which CPUs matters almost as much
as how many: threads of one core compete for its execution units, CPUs behind one L3 share a
working set, and memory on another NUMA node is slower. So the allocator works from coarse to
fine: it picks a NUMA node (or, if it must, the fewest and closest nodes), then the L3 domains
inside it, then whole physical cores, and only last single hardware threads. At every level it
prefers the candidate the request fits most tightly, so large free blocks stay intact for the
large requests that need them, and it breaks ties by the lowest id, so that the same inputs
always give the same answer.

Everything here is a pure function of (topology, free CPUs, request): no files, no clocks, no
state. The caller keeps the books (what is reserved, what each container holds) and feeds the
free set back in; `free_cpus` and `release` do that set arithmetic.

Rules a request can rely on (see `CpuRequest` for the fields):

* `cpus` always has exactly `count` CPUs, except for `numa_exclusive`, which hands over every
  free CPU of the chosen node(s), so `count` is a minimum there.
* full_pcpus: every core the container touches is taken whole (all its online threads), except
  at most one "remainder" core when `count` is not a multiple of the core size. The remainder
  comes, in order of preference, from a core whose other threads are already taken (so no
  fresh core gets split), else from splitting a whole core. With `round_up_to_whole_cores` the
  remainder core's other free threads are held back as `idle_siblings`: nobody else gets them,
  the container does not see them either, and `count` stays exact. If the free CPUs cannot be
  arranged like that, the request fails rather than silently sharing cores.
* one_thread_per_core: the container gets the lowest thread of `count` whole free cores; the
  other threads of those cores become `idle_siblings`, so no noisy neighbour can use the
  execution units the container relies on. Takes precedence over full_pcpus.
* numa_binding: all CPUs from one NUMA node; `mems` is that node.
* numa_exclusive: only nodes none of whose allocatable CPUs (all but `reserved`) is taken
  qualify, and the container gets all free CPUs of its node(s). With numa_binding, one such
  node; without, the fewest whole nodes that together satisfy `count` (closest first). This
  follows Katalyst, where an exclusive pod owns its NUMA node(s) outright.
* avoid_nodes (Katalyst's `numa_share: false`) are never used; preferred_nodes win ties among
  equally local placements but never make a placement span more nodes than necessary.
* Isolated CPUs (isolcpus) get no special treatment: a caller that wants to keep them out puts
  them in `reserved`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from qos_model.cpulist import format_cpu_list
from qos_model.topology import Topology

_MAX_NODE_COMBINATIONS = 20_000
"""Beyond this many node sets to compare, pick nodes greedily instead (hosts with dozens of
nodes); the exhaustive search is only there to find the closest set on ordinary machines."""


class AllocationError(Exception):
    """The request cannot be met from the free CPUs; the caller falls back to shared cores."""


@dataclass(frozen=True, slots=True)
class CpuRequest:
    count: int
    """Number of CPUs (hardware threads) the container gets, at least 1."""
    numa_binding: bool = False
    numa_exclusive: bool = False
    full_pcpus: bool = True
    round_up_to_whole_cores: bool = False
    one_thread_per_core: bool = False
    avoid_nodes: frozenset[int] = frozenset()
    preferred_nodes: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a CPU request needs a count of at least 1, got {self.count!r}")
        both = self.avoid_nodes & self.preferred_nodes
        if both:
            raise ValueError(f"NUMA nodes {sorted(both)} are both preferred and avoided")

    def describe(self) -> str:
        traits = []
        if self.numa_exclusive:
            traits.append("exclusive NUMA node")
        elif self.numa_binding:
            traits.append("one NUMA node")
        if self.one_thread_per_core:
            traits.append("one thread per core")
        elif self.full_pcpus:
            traits.append("whole cores")
        if self.avoid_nodes:
            traits.append(f"avoiding node(s) {format_cpu_list(self.avoid_nodes)}")
        suffix = f" ({', '.join(traits)})" if traits else ""
        return f"{self.count} CPU{'s' if self.count != 1 else ''}{suffix}"


@dataclass(frozen=True, slots=True)
class CpuAllocation:
    cpus: frozenset[int]
    """The container's cpuset."""
    mems: frozenset[int]
    """NUMA nodes of `cpus`: the container's cpuset.mems when memory is bound."""
    idle_siblings: frozenset[int]
    """Threads taken out of the free pool for the container's sake but not given to it."""
    reason: str

    @property
    def taken(self) -> frozenset[int]:
        """What leaves the free pool, and what `release` must give back."""
        return self.cpus | self.idle_siblings


def free_cpus(
    topology: Topology, reserved: Iterable[int], allocated_sets: Iterable[Iterable[int]]
) -> frozenset[int]:
    """Online CPUs that are neither reserved (system_cores, housekeeping) nor held by anyone."""
    held: set[int] = set()
    for cpus in allocated_sets:
        held.update(cpus)
    return topology.online_cpus - frozenset(reserved) - held


def release(free: frozenset[int], allocation: CpuAllocation) -> frozenset[int]:
    """Return an allocation's CPUs to the free pool; releasing twice is a bookkeeping bug."""
    already = free & allocation.taken
    if already:
        raise ValueError(f"CPUs {format_cpu_list(already)} are released but already free")
    return free | allocation.taken


def allocate_cpus(
    topology: Topology,
    free: frozenset[int],
    request: CpuRequest,
    *,
    reserved: frozenset[int] = frozenset(),
) -> CpuAllocation:
    """Pick CPUs for `request` out of `free`; raise AllocationError when it cannot be done.

    `reserved` only matters for numa_exclusive: a node counts as unused when all its CPUs
    except the reserved ones are free. Pass the set given to `free_cpus`.
    """
    unknown = free - topology.online_cpus
    if unknown:
        raise ValueError(f"free CPUs {format_cpu_list(unknown)} are not online in the topology")
    if free & reserved:
        raise ValueError(f"CPUs {format_cpu_list(free & reserved)} are both free and reserved")
    for node in request.avoid_nodes | request.preferred_nodes:
        topology.node(node)  # a typo in a node id must not silently mean "no constraint"

    mode = _Mode.of(request)
    groups = _free_groups(topology, free)
    usable_nodes = sorted(
        node.id for node in topology.cpu_nodes if node.id not in request.avoid_nodes
    )
    if request.numa_exclusive:
        return _allocate_exclusive(topology, free, reserved, request, mode, groups, usable_nodes)
    return _allocate_shared_nodes(topology, free, request, mode, groups, usable_nodes)


# --- how a request counts CPUs ---------------------------------------------------------------


class _Mode(Enum):
    WHOLE_CORES = "whole cores"
    THREADS = "threads"
    ONE_PER_CORE = "one thread per core"

    @staticmethod
    def of(request: CpuRequest) -> _Mode:
        if request.one_thread_per_core:
            return _Mode.ONE_PER_CORE
        return _Mode.WHOLE_CORES if request.full_pcpus else _Mode.THREADS


@dataclass(frozen=True, slots=True)
class _Slot:
    """One core as this allocation sees it: its free threads, and whether none is taken."""

    free: tuple[int, ...]
    whole: bool

    @property
    def first(self) -> int:
        return self.free[0]


@dataclass(frozen=True, slots=True)
class _Group:
    """The free cores of one NUMA node that share one L3 (or the whole node without L3 info)."""

    node: int
    l3: int | None
    slots: tuple[_Slot, ...]

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.node, -1 if self.l3 is None else self.l3)


def _capacity(slots: Iterable[_Slot], mode: _Mode) -> int:
    """How many CPUs the request could get from these cores under its mode's rules."""
    slots = list(slots)
    if mode is _Mode.ONE_PER_CORE:
        return sum(1 for slot in slots if slot.whole)
    if mode is _Mode.THREADS:
        return sum(len(slot.free) for slot in slots)
    whole = sum(len(slot.free) for slot in slots if slot.whole)
    return whole + max((len(slot.free) for slot in slots if not slot.whole), default=0)


def _group_capacity(groups: Iterable[_Group], mode: _Mode) -> int:
    return _capacity((slot for group in groups for slot in group.slots), mode)


def _free_groups(topology: Topology, free: frozenset[int]) -> dict[int, list[_Group]]:
    """Free cores bucketed by NUMA node and L3, every list in ascending id order."""
    buckets: dict[tuple[int, int | None], list[_Slot]] = {}
    for core in sorted(topology.cores, key=lambda core: core.first_cpu):
        threads = tuple(sorted(core.cpus & free))
        if threads:
            slot = _Slot(threads, whole=len(threads) == len(core.cpus))
            buckets.setdefault((core.node, core.l3), []).append(slot)
    groups: dict[int, list[_Group]] = {}
    for (node, l3), slots in buckets.items():
        groups.setdefault(node, []).append(_Group(node, l3, tuple(slots)))
    for node_groups in groups.values():
        node_groups.sort(key=lambda group: group.sort_key)
    return groups


# --- placement ------------------------------------------------------------------------------


def _allocate_shared_nodes(
    topology: Topology,
    free: frozenset[int],
    request: CpuRequest,
    mode: _Mode,
    groups: dict[int, list[_Group]],
    usable_nodes: list[int],
) -> CpuAllocation:
    need = request.count
    node_capacity = {node: _group_capacity(groups.get(node, []), mode) for node in usable_nodes}

    fitting = [node for node in usable_nodes if node_capacity[node] >= need]
    if fitting:

        def node_rank(node: int) -> tuple[bool, bool, int, int]:
            spills_l3 = all(_capacity(g.slots, mode) < need for g in groups[node])
            # best fit: the node with the least room that still fits keeps big holes intact
            return (node not in request.preferred_nodes, spills_l3, node_capacity[node], node)

        best = min(fitting, key=node_rank)
        sequence = _group_sequence(groups[best], need, mode)
    elif request.numa_binding:
        raise AllocationError(
            _explain(topology, free, request, mode, groups, "no single NUMA node can hold it")
        )
    else:
        chosen = _choose_node_set(
            topology,
            [node for node in usable_nodes if node_capacity[node] > 0],
            need,
            request.preferred_nodes,
            lambda nodes: _group_capacity((g for n in nodes for g in groups[n]), mode),
        )
        if chosen is None:
            raise AllocationError(
                _explain(topology, free, request, mode, groups, "not enough room on any nodes")
            )
        sequence = _multi_node_sequence(chosen, groups, need, mode, request.preferred_nodes)

    picked = _fill(sequence, need, mode, request.round_up_to_whole_cores)
    if picked is None:  # the capacity checks above make this unreachable; fail loudly if not
        raise AllocationError(
            _explain(topology, free, request, mode, groups, "the chosen CPUs did not add up")
        )
    cpus, idle = picked
    return _result(topology, cpus, idle, request, mode, exclusive=False)


def _group_sequence(node_groups: Sequence[_Group], need: int, mode: _Mode) -> list[_Group]:
    """The L3 groups to draw from, in order: one tight group if any fits, else fewest groups."""
    fitting = [group for group in node_groups if _capacity(group.slots, mode) >= need]
    if fitting:
        return [min(fitting, key=lambda g: (_capacity(g.slots, mode), g.sort_key))]
    chosen: list[_Group] = []
    rest = sorted(node_groups, key=lambda g: (-_capacity(g.slots, mode), g.sort_key))
    while rest:
        closing = [g for g in rest if _group_capacity([*chosen, g], mode) >= need]
        if closing:
            # the last group only has to hold the remainder: take the tightest that does
            last = min(closing, key=lambda g: (_capacity(g.slots, mode), g.sort_key))
            return [*chosen, last]
        chosen.append(rest.pop(0))  # largest first minimises the number of L3s used
    return chosen


def _multi_node_sequence(
    nodes: Sequence[int],
    groups: dict[int, list[_Group]],
    need: int,
    mode: _Mode,
    preferred: frozenset[int],
) -> list[_Group]:
    """Groups across several nodes: fullest node first, the last node only for what is left."""
    ordered = sorted(
        nodes,
        key=lambda n: (n not in preferred, -_group_capacity(groups[n], mode), n),
    )
    sequence: list[_Group] = []
    remaining = need
    for node in ordered:
        capacity = _group_capacity(groups[node], mode)
        if capacity >= remaining:
            sequence += _group_sequence(groups[node], remaining, mode)
            break
        sequence += sorted(groups[node], key=lambda g: (-_capacity(g.slots, mode), g.sort_key))
        if mode is _Mode.WHOLE_CORES:
            # only the last node may contribute a split core, so count whole cores here
            capacity = sum(len(s.free) for g in groups[node] for s in g.slots if s.whole)
        remaining -= capacity
    if _group_capacity(sequence, mode) < need:
        sequence = [g for node in ordered for g in groups[node]]
    return sequence


def _choose_node_set(
    topology: Topology,
    candidates: Sequence[int],
    need: int,
    preferred: frozenset[int],
    capacity: Callable[[Sequence[int]], int],
) -> tuple[int, ...] | None:
    """The fewest nodes that together fit; among those the closest, then the tightest."""

    def rank(nodes: tuple[int, ...]) -> tuple[int, int, int, int, tuple[int, ...]]:
        packages = {topology.cpu(min(topology.node(n).cpus)).package for n in nodes}
        distance = sum(topology.distance(a, b) or 0 for a, b in itertools.combinations(nodes, 2))
        not_preferred = sum(1 for n in nodes if n not in preferred)
        return (not_preferred, len(packages), distance, capacity(nodes) - need, nodes)

    for size in range(1, len(candidates) + 1):
        if math.comb(len(candidates), size) > _MAX_NODE_COMBINATIONS:
            return _greedy_node_set(candidates, need, capacity)
        fitting = [
            nodes for nodes in itertools.combinations(candidates, size) if capacity(nodes) >= need
        ]
        if fitting:
            return min(fitting, key=rank)
    return None


def _greedy_node_set(
    candidates: Sequence[int], need: int, capacity: Callable[[Sequence[int]], int]
) -> tuple[int, ...] | None:
    chosen: list[int] = []
    for node in sorted(candidates, key=lambda n: (-capacity([n]), n)):
        chosen.append(node)
        if capacity(chosen) >= need:
            return tuple(sorted(chosen))
    return None


def _fill(
    sequence: Sequence[_Group], need: int, mode: _Mode, round_up: bool
) -> tuple[list[int], list[int]] | None:
    """Take CPUs from the groups in order; returns (cpus, idle siblings) or None if short."""
    cpus: list[int] = []
    idle: list[int] = []
    if mode is _Mode.ONE_PER_CORE:
        for group in sequence:
            for slot in group.slots:
                if len(cpus) == need:
                    return cpus, idle
                if slot.whole:
                    cpus.append(slot.first)
                    idle.extend(slot.free[1:])
        return (cpus, idle) if len(cpus) == need else None

    used: set[int] = set()  # indexes of groups that gave whole cores
    taken: set[_Slot] = set()
    remaining = need
    for index, group in enumerate(sequence):
        for slot in group.slots:
            if slot.whole and len(slot.free) <= remaining:
                cpus.extend(slot.free)
                taken.add(slot)
                used.add(index)
                remaining -= len(slot.free)
        if remaining == 0:
            return cpus, idle

    # The remainder: one core that can supply all of it, near the cores already taken,
    # preferring a core that is already split over splitting a whole one.
    candidates = [
        (index not in used, slot.whole, len(slot.free), index, slot.first, slot)
        for index, group in enumerate(sequence)
        for slot in group.slots
        if slot not in taken and len(slot.free) >= remaining
    ]
    if candidates:
        slot = min(candidates, key=lambda c: c[:5])[5]
        cpus.extend(slot.free[:remaining])
        if round_up and mode is _Mode.WHOLE_CORES:
            idle.extend(slot.free[remaining:])
        return cpus, idle
    if mode is _Mode.WHOLE_CORES:
        return None
    # Threads mode: gather the leftovers of already split cores, nearest groups first.
    leftovers = sorted(
        (index not in used, slot.whole, index, slot.first, slot)
        for index, group in enumerate(sequence)
        for slot in group.slots
        if slot not in taken
    )
    for *_, slot in leftovers:
        take = slot.free[:remaining]
        cpus.extend(take)
        remaining -= len(take)
        if remaining == 0:
            return cpus, idle
    return None


# --- numa_exclusive -------------------------------------------------------------------------


def _allocate_exclusive(
    topology: Topology,
    free: frozenset[int],
    reserved: frozenset[int],
    request: CpuRequest,
    mode: _Mode,
    groups: dict[int, list[_Group]],
    usable_nodes: list[int],
) -> CpuAllocation:
    def untouched(node: int) -> bool:
        cpus = topology.node(node).cpus
        return bool(cpus & free) and cpus - reserved <= free

    def node_take(node: int) -> tuple[list[int], list[int]]:
        slots = [slot for group in groups.get(node, []) for slot in group.slots]
        if mode is _Mode.ONE_PER_CORE:
            # the node is the container's alone, so a core with a reserved thread still counts
            return [s.first for s in slots], [cpu for s in slots for cpu in s.free[1:]]
        return sorted(cpu for s in slots for cpu in s.free), []

    candidates = [node for node in usable_nodes if untouched(node)]
    capacity = {node: len(node_take(node)[0]) for node in candidates}
    need = request.count

    fitting = [node for node in candidates if capacity[node] >= need]
    chosen: tuple[int, ...] | None
    if fitting:
        best = min(fitting, key=lambda n: (n not in request.preferred_nodes, capacity[n], n))
        chosen = (best,)
    elif request.numa_binding:
        chosen = None
    else:
        chosen = _choose_node_set(
            topology,
            candidates,
            need,
            request.preferred_nodes,
            lambda nodes: sum(capacity[n] for n in nodes),
        )
    if chosen is None:
        why = (
            f"{len(candidates)} NUMA node(s) are wholly unused"
            + (f" ({_node_list(candidates, capacity)})" if candidates else "")
            + (", and numa_binding allows only one" if request.numa_binding else "")
        )
        raise AllocationError(_explain(topology, free, request, mode, groups, why))

    cpus: list[int] = []
    idle: list[int] = []
    for node in chosen:
        node_cpus, node_idle = node_take(node)
        cpus += node_cpus
        idle += node_idle
    return _result(topology, cpus, idle, request, mode, exclusive=True)


def _node_list(nodes: Iterable[int], capacity: dict[int, int]) -> str:
    return ", ".join(f"node {n}: {capacity[n]}" for n in nodes)


# --- results and errors ---------------------------------------------------------------------


def _result(
    topology: Topology,
    cpus: Iterable[int],
    idle: Iterable[int],
    request: CpuRequest,
    mode: _Mode,
    *,
    exclusive: bool,
) -> CpuAllocation:
    cpu_set = frozenset(cpus)
    idle_set = frozenset(idle)
    mems = frozenset(topology.node_of(cpu) for cpu in cpu_set)
    l3s = sorted({l3 for cpu in cpu_set if (l3 := topology.cpu(cpu).l3) is not None})

    cores = {topology.cpu(cpu).core for cpu in cpu_set}
    count_text = _plural(len(cpu_set), "CPU")
    if mode is _Mode.ONE_PER_CORE:
        parts = [f"{count_text}, one thread of each of {_plural(len(cores), 'core')}"]
    else:
        whole = [core for core in cores if topology.core(core).cpus <= cpu_set]
        pieces = [_plural(len(whole), "whole core")] if whole else []
        if len(cores) > len(whole):
            loose = len(cpu_set) - sum(len(topology.core(core).cpus) for core in whole)
            split = len(cores) - len(whole)
            pieces.append(f"{_plural(loose, 'thread')} of {_plural(split, 'partial core')}")
        parts = [f"{count_text} = {' + '.join(pieces)}"]
    parts.append(f" on NUMA {_plural(len(mems), 'node', bare=True)} {format_cpu_list(mems)}")
    if l3s:
        parts.append(f", L3 {_plural(len(l3s), 'domain', bare=True)} {format_cpu_list(l3s)}")
    if exclusive:
        parts.append(f" (all free CPUs of the node(s); {request.count} requested)")
    if idle_set:
        parts.append(f"; {_plural(len(idle_set), 'sibling thread')} held idle")
    return CpuAllocation(cpu_set, mems, idle_set, "".join(parts))


def _plural(count: int, noun: str, *, bare: bool = False) -> str:
    word = noun if count == 1 else f"{noun}s"
    return word if bare else f"{count} {word}"


def _explain(
    topology: Topology,
    free: frozenset[int],
    request: CpuRequest,
    mode: _Mode,
    groups: dict[int, list[_Group]],
    why: str,
) -> str:
    per_node = []
    for node in topology.cpu_nodes:
        node_free = len(node.cpus & free)
        usable = _group_capacity(groups.get(node.id, []), mode)
        whole = sum(1 for g in groups.get(node.id, []) for s in g.slots if s.whole)
        note = " (avoided)" if node.id in request.avoid_nodes else ""
        per_node.append(
            f"node {node.id}: {node_free} free, {whole} whole core{'s' if whole != 1 else ''}, "
            f"{usable} usable as {mode.value}{note}"
        )
    return (
        f"cannot allocate {request.describe()}: {why}; "
        f"{len(free)} of {len(topology.online_cpus)} online CPUs are free; " + "; ".join(per_node)
    )
