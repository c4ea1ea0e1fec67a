"""Where this host's CPUs are: packages, dies, cores, SMT threads, L3 caches and NUMA nodes.

The CPU allocator needs three facts about every CPU: which other CPUs share its physical core
(so a latency-critical container does not share execution units with a neighbour), which share
its L3 cache (so its working set stays in one cache), and which NUMA node it sits on (so its
memory is local). The kernel publishes all of that under /sys/devices/system; this module reads
it once, at start-up, into one immutable `Topology`, and everything downstream works from that
value. The reading is `isolation.sysfs.discover_topology`; keeping it apart from the value
keeps the engine pure and lets tests build topologies from recorded or hand-made sysfs trees.

Only online CPUs appear in a `Topology`: an offline CPU cannot run anything, and the kernel
drops it from every sibling, cache and node mask while it is down. Such CPUs are listed in
`Topology.offline_cpus` for reporting only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from qos_model.cpulist import format_cpu_list

_T = TypeVar("_T")


class TopologyError(ValueError):
    """sysfs (or a hand-built topology) describes a machine that cannot exist."""


@dataclass(frozen=True, slots=True, order=True)
class CoreId:
    """Names one physical core.

    The kernel numbers cores per package (and, on multi-die parts, per die), so `core` alone
    repeats on every socket: two CPUs are SMT siblings only if all three numbers match.
    """

    package: int
    die: int
    core: int

    def __str__(self) -> str:
        return f"package {self.package} die {self.die} core {self.core}"


@dataclass(frozen=True, slots=True)
class Cpu:
    """One online logical CPU (a hardware thread) and where it sits."""

    id: int
    core: CoreId
    node: int
    l3: int | None = None
    """Id of the L3 cache domain, None when the kernel reports no L3 for this CPU."""

    @property
    def package(self) -> int:
        return self.core.package

    @property
    def die(self) -> int:
        return self.core.die


@dataclass(frozen=True, slots=True)
class Core:
    """A physical core with its online threads; the unit that full-core allocation hands out."""

    id: CoreId
    cpus: frozenset[int]
    node: int
    l3: int | None

    @property
    def first_cpu(self) -> int:
        """Lowest thread id: the stable, human-recognisable name for ordering cores."""
        return min(self.cpus)


@dataclass(frozen=True, slots=True)
class CacheDomain:
    """The online CPUs that share one cache instance.

    Cache ids are only unique among caches of the same level, hence the level is part of
    the value.
    """

    level: int
    id: int
    cpus: frozenset[int]


@dataclass(frozen=True, slots=True)
class NumaNode:
    """A NUMA node: its online CPUs (empty for memory-only nodes such as PMEM or CXL) and memory."""

    id: int
    cpus: frozenset[int]
    memory_bytes: int | None = None
    """MemTotal of the node; None when the kernel exposes no per-node meminfo."""
    distances: tuple[tuple[int, int], ...] = ()
    """(other node, distance) pairs from the node's distance row; empty when unknown."""

    @property
    def is_memory_only(self) -> bool:
        return not self.cpus

    def distance_to(self, other: int) -> int | None:
        for node, distance in self.distances:
            if node == other:
                return distance
        return None


@dataclass(frozen=True, slots=True)
class Topology:
    """The host's CPU and memory layout, validated so that consumers can trust every index.

    Build it with `isolation.sysfs.discover_topology` in production; tests may construct it
    directly from `Cpu`, `NumaNode` and `CacheDomain` values and get the same checks.
    """

    cpus: tuple[Cpu, ...]
    nodes: tuple[NumaNode, ...]
    l3_domains: tuple[CacheDomain, ...] = ()
    isolated_cpus: frozenset[int] = frozenset()
    """Online CPUs the kernel keeps out of load balancing (isolcpus / cpu/isolated)."""
    offline_cpus: frozenset[int] = frozenset()
    """CPUs that are present but offline; informational, never usable."""

    _cpu_by_id: dict[int, Cpu] = field(init=False, repr=False, compare=False)
    _cores: dict[CoreId, Core] = field(init=False, repr=False, compare=False)
    _node_by_id: dict[int, NumaNode] = field(init=False, repr=False, compare=False)
    _l3_by_id: dict[int, CacheDomain] = field(init=False, repr=False, compare=False)
    _derived: dict[Hashable, object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cpus = tuple(sorted(self.cpus, key=lambda cpu: cpu.id))
        nodes = tuple(sorted(self.nodes, key=lambda node: node.id))
        l3_domains = tuple(sorted(self.l3_domains, key=lambda domain: domain.id))
        object.__setattr__(self, "cpus", cpus)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "l3_domains", l3_domains)

        cpu_by_id = _unique_index(cpus, lambda cpu: cpu.id, "CPU")
        node_by_id = _unique_index(nodes, lambda node: node.id, "NUMA node")
        l3_by_id = _unique_index(l3_domains, lambda domain: domain.id, "L3 domain")
        if not cpus:
            raise TopologyError("a topology needs at least one online CPU")
        for domain in l3_domains:
            if domain.level != 3:
                raise TopologyError(f"L3 domain {domain.id} says it is level {domain.level}")

        online = frozenset(cpu_by_id)
        _check_subset(self.isolated_cpus, online, "isolated CPUs", "online")
        if self.offline_cpus & online:
            raise TopologyError(
                f"CPUs {format_cpu_list(self.offline_cpus & online)} are both online and offline"
            )
        for cpu in cpus:
            if cpu.node not in node_by_id:
                raise TopologyError(f"cpu{cpu.id} is on NUMA node {cpu.node}, which is not listed")
            if cpu.l3 is not None and cpu.l3 not in l3_by_id:
                raise TopologyError(f"cpu{cpu.id} is in L3 domain {cpu.l3}, which is not listed")
        for node in nodes:
            expected = frozenset(cpu.id for cpu in cpus if cpu.node == node.id)
            if node.cpus != expected:
                raise TopologyError(
                    f"NUMA node {node.id} lists CPUs {format_cpu_list(node.cpus)!r} "
                    f"but the CPUs on it are {format_cpu_list(expected)!r}"
                )
        for domain in l3_domains:
            expected = frozenset(cpu.id for cpu in cpus if cpu.l3 == domain.id)
            if domain.cpus != expected:
                raise TopologyError(
                    f"L3 domain {domain.id} lists CPUs {format_cpu_list(domain.cpus)!r} "
                    f"but the CPUs in it are {format_cpu_list(expected)!r}"
                )

        threads: dict[CoreId, list[Cpu]] = {}
        for cpu in cpus:
            threads.setdefault(cpu.core, []).append(cpu)
        cores: dict[CoreId, Core] = {}
        for core_id in sorted(threads):
            members = threads[core_id]
            homes = {(cpu.node, cpu.l3) for cpu in members}
            if len(homes) != 1:
                raise TopologyError(
                    f"the threads of {core_id} (CPUs {format_cpu_list(c.id for c in members)}) "
                    f"disagree on their NUMA node / L3 domain: {sorted(homes, key=str)}"
                )
            home_node, home_l3 = homes.pop()
            cores[core_id] = Core(core_id, frozenset(cpu.id for cpu in members), home_node, home_l3)

        object.__setattr__(self, "_cpu_by_id", cpu_by_id)
        object.__setattr__(self, "_cores", cores)
        object.__setattr__(self, "_node_by_id", node_by_id)
        object.__setattr__(self, "_l3_by_id", l3_by_id)
        object.__setattr__(self, "_derived", {})

    def derived(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """A value computed from this topology alone (and `key`), remembered with it: the
        topology never changes, so neither does the value. Consumers that cut the same CPU
        sets on every event (the planner's pools) use it; at most 4096 values are kept."""
        derived = self._derived
        if key in derived:
            return derived[key]  # type: ignore[return-value]
        value = make()
        if len(derived) >= 4096:
            derived.clear()
        derived[key] = value
        return value

    # --- CPUs -------------------------------------------------------------------------

    @property
    def online_cpus(self) -> frozenset[int]:
        return frozenset(self._cpu_by_id)

    def cpu(self, cpu_id: int) -> Cpu:
        try:
            return self._cpu_by_id[cpu_id]
        except KeyError:
            raise KeyError(f"cpu{cpu_id} is not an online CPU of this topology") from None

    def node_of(self, cpu_id: int) -> int:
        return self.cpu(cpu_id).node

    def siblings(self, cpu_id: int) -> frozenset[int]:
        """The other online hardware threads of this CPU's core (empty without SMT)."""
        return self.core_of(cpu_id).cpus - {cpu_id}

    # --- cores ------------------------------------------------------------------------

    @property
    def cores(self) -> tuple[Core, ...]:
        return tuple(self._cores.values())

    def core(self, core_id: CoreId) -> Core:
        return self._cores[core_id]

    def core_of(self, cpu_id: int) -> Core:
        return self._cores[self.cpu(cpu_id).core]

    def cores_of_node(self, node_id: int) -> tuple[Core, ...]:
        self.node(node_id)
        return tuple(core for core in self._cores.values() if core.node == node_id)

    @property
    def threads_per_core(self) -> int:
        """The largest number of online threads on one core (1 without SMT)."""
        return max(len(core.cpus) for core in self._cores.values())

    @property
    def packages(self) -> frozenset[int]:
        return frozenset(cpu.package for cpu in self.cpus)

    def cpus_of_package(self, package: int) -> frozenset[int]:
        return frozenset(cpu.id for cpu in self.cpus if cpu.package == package)

    # --- NUMA nodes -------------------------------------------------------------------

    def node(self, node_id: int) -> NumaNode:
        try:
            return self._node_by_id[node_id]
        except KeyError:
            raise KeyError(f"NUMA node {node_id} is not part of this topology") from None

    @property
    def cpu_nodes(self) -> tuple[NumaNode, ...]:
        """Nodes with at least one online CPU: the only ones a CPU allocation can land on."""
        return tuple(node for node in self.nodes if node.cpus)

    @property
    def memory_only_nodes(self) -> tuple[NumaNode, ...]:
        """Nodes without online CPUs (PMEM, CXL or HBM memory, or all CPUs offline)."""
        return tuple(node for node in self.nodes if not node.cpus)

    def distance(self, from_node: int, to_node: int) -> int | None:
        return self.node(from_node).distance_to(to_node)

    # --- caches -----------------------------------------------------------------------

    def l3_domain(self, domain_id: int) -> CacheDomain:
        return self._l3_by_id[domain_id]

    def l3_of(self, cpu_id: int) -> CacheDomain | None:
        l3 = self.cpu(cpu_id).l3
        return None if l3 is None else self._l3_by_id[l3]

    def l3_domains_of_node(self, node_id: int) -> tuple[CacheDomain, ...]:
        """L3 domains with CPUs on this node; with sub-NUMA clustering one L3 spans nodes."""
        node = self.node(node_id)
        return tuple(domain for domain in self.l3_domains if domain.cpus & node.cpus)


def _unique_index(items: Iterable[_T], key: Callable[[_T], int], what: str) -> dict[int, _T]:
    index: dict[int, _T] = {}
    for item in items:
        item_key = key(item)
        if item_key in index:
            raise TopologyError(f"{what} {item_key} is listed twice")
        index[item_key] = item
    return index


def _check_subset(part: frozenset[int], whole: frozenset[int], what: str, of: str) -> None:
    extra = part - whole
    if extra:
        raise TopologyError(f"{what} {format_cpu_list(extra)} are not {of}")
