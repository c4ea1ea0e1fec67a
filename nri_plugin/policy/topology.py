"""Where this host's CPUs are: packages, dies, cores, SMT threads, L3 caches and NUMA nodes.

The CPU allocator needs three facts about every CPU: which other CPUs share its physical core
(so a latency-critical container does not share execution units with a neighbour), which share
its L3 cache (so its working set stays in one cache), and which NUMA node it sits on (so its
memory is local). The kernel publishes all of that under /sys/devices/system; this module reads
it once, at start-up, into one immutable `Topology`, and everything downstream works from that
value. Keeping the reading (`discover_topology`) apart from the value keeps the policy pure and
lets tests build topologies from recorded or hand-made sysfs trees.

Only online CPUs appear in a `Topology`: an offline CPU cannot run anything, and the kernel
drops it from every sibling, cache and node mask while it is down. Such CPUs are listed in
`Topology.offline_cpus` for reporting only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from nri_plugin.cpuset import CpuListError, format_cpu_list, parse_cpu_list

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

    Build it with `discover_topology` in production; tests may construct it directly from
    `Cpu`, `NumaNode` and `CacheDomain` values and get the same consistency checks.
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


# --- discovery from sysfs ----------------------------------------------------------------

_CPU_DIR = re.compile(r"cpu(\d+)")
_NODE_DIR = re.compile(r"node(\d+)")
_CACHE_DIR = re.compile(r"index(\d+)")
_MEMTOTAL = re.compile(r"Node\s+(\d+)\s+MemTotal:\s+(\d+)\s+kB")


def discover_topology(root: Path = Path("/")) -> Topology:
    """Read `root`/sys/devices/system/{cpu,node} into a `Topology`.

    `root` is "/" in production; tests point it at an extracted or hand-made tree. Files that
    some kernels or architectures lack fall back to the plainest reading: no `die_id` means
    die 0, no cache directory means no L3 information, no `node` directory means a single
    node 0 holding every CPU. A file that exists but cannot be parsed raises TopologyError
    naming the file.
    """
    system = root / "sys" / "devices" / "system"
    cpu_dir = system / "cpu"
    if not cpu_dir.is_dir():
        raise TopologyError(f"{cpu_dir} does not exist: is sysfs mounted under {root}?")

    present = _numbered_dirs(cpu_dir, _CPU_DIR)
    online = _online_cpus(cpu_dir, present)
    if not online:
        raise TopologyError(f"{cpu_dir} lists no online CPU")
    offline = frozenset(present) - online
    isolated = _read_optional_cpu_list(cpu_dir / "isolated") & online

    cores = _read_cores(cpu_dir, online)
    l3_of, l3_domains = _read_l3(cpu_dir, online)
    node_of, nodes = _read_nodes(system / "node", cpu_dir, online)

    cpus = tuple(Cpu(cpu, cores[cpu], node_of[cpu], l3_of.get(cpu)) for cpu in sorted(online))
    return Topology(
        cpus=cpus,
        nodes=nodes,
        l3_domains=l3_domains,
        isolated_cpus=isolated,
        offline_cpus=offline,
    )


def _online_cpus(cpu_dir: Path, present: Mapping[int, Path]) -> frozenset[int]:
    """cpu/online when it exists, narrowed by each cpuN/online (cpu0 usually has none)."""
    listed = _read_optional_cpu_list(cpu_dir / "online", default=frozenset(present))
    online: set[int] = set()
    for cpu in sorted(listed & frozenset(present)):
        flag = present[cpu] / "online"
        if flag.exists() and _read_int(flag) == 0:
            continue
        online.add(cpu)
    return frozenset(online)


def _read_cores(cpu_dir: Path, online: frozenset[int]) -> dict[int, CoreId]:
    """Map each online CPU to its physical core, checking ids against the sibling lists."""
    core_of: dict[int, CoreId] = {}
    siblings_of: dict[int, tuple[frozenset[int], Path | None]] = {}
    for cpu in sorted(online):
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        if not topo.is_dir():
            # Some minimal VMs and containers' sysfs views carry no topology: treat every CPU
            # as its own core in package 0, which is what the scheduler would assume too.
            core_of[cpu] = CoreId(0, 0, cpu)
            siblings_of[cpu] = (frozenset({cpu}), None)
            continue
        package = max(_read_int(topo / "physical_package_id", default=0), 0)
        die = max(_read_int(topo / "die_id", default=0), 0)
        core = _read_int(topo / "core_id", default=cpu)
        core_of[cpu] = CoreId(package, die, core)
        for name in ("core_cpus_list", "thread_siblings_list"):
            path = topo / name
            if path.exists():
                siblings_of[cpu] = ((_read_cpu_list(path) & online) | {cpu}, path)
                break
        else:
            siblings_of[cpu] = (frozenset({cpu}), None)

    # The sibling lists are what the scheduler uses; the ids must agree with them, or
    # grouping by id would silently merge or split cores.
    by_id: dict[CoreId, frozenset[int]] = {}
    for cpu in sorted(online):
        by_id[core_of[cpu]] = by_id.get(core_of[cpu], frozenset()) | {cpu}
    for cpu in sorted(online):
        siblings, source = siblings_of[cpu]
        if source is None:
            continue
        same_id = by_id[core_of[cpu]]
        if siblings != same_id:
            raise TopologyError(
                f"{source} says cpu{cpu}'s core holds CPUs {format_cpu_list(siblings)}, but the "
                f"CPUs reporting {core_of[cpu]} are {format_cpu_list(same_id)}"
            )
    return core_of


def _read_l3(
    cpu_dir: Path, online: frozenset[int]
) -> tuple[dict[int, int], tuple[CacheDomain, ...]]:
    """Find each CPU's unified L3 cache; ids when the kernel gives them, else shared lists."""
    reported_id: dict[int, int | None] = {}
    shared: dict[int, frozenset[int]] = {}
    for cpu in sorted(online):
        cache_dir = cpu_dir / f"cpu{cpu}" / "cache"
        if not cache_dir.is_dir():
            continue
        for index in _numbered_dirs(cache_dir, _CACHE_DIR).values():
            level_file, type_file = index / "level", index / "type"
            if not (level_file.exists() and type_file.exists()):
                continue
            if _read_int(level_file) != 3 or _read_text(type_file) != "Unified":
                continue
            id_file = index / "id"
            reported_id[cpu] = _read_int(id_file) if id_file.exists() else None
            shared_file = index / "shared_cpu_list"
            if shared_file.exists():
                shared[cpu] = (_read_cpu_list(shared_file) & online) | {cpu}
            else:
                shared[cpu] = frozenset({cpu})
            break

    if not reported_id:
        return {}, ()
    l3_of: dict[int, int] = {}
    if all(domain is not None for domain in reported_id.values()):
        for cpu, domain in reported_id.items():
            assert domain is not None
            l3_of[cpu] = domain
    else:
        # Without ids, number the distinct shared lists by their lowest CPU so the result
        # does not depend on directory order.
        groups = sorted(set(shared.values()), key=min)
        number = {group: index for index, group in enumerate(groups)}
        for cpu in reported_id:
            l3_of[cpu] = number[shared[cpu]]

    members: dict[int, set[int]] = {}
    for cpu, domain in l3_of.items():
        members.setdefault(domain, set()).add(cpu)
    domains = tuple(
        CacheDomain(3, domain, frozenset(cpus)) for domain, cpus in sorted(members.items())
    )
    return l3_of, domains


def _read_nodes(
    node_dir: Path, cpu_dir: Path, online: frozenset[int]
) -> tuple[dict[int, int], tuple[NumaNode, ...]]:
    node_dirs = _numbered_dirs(node_dir, _NODE_DIR) if node_dir.is_dir() else {}
    if not node_dirs:
        # A kernel built without NUMA support: everything is one node of unknown size.
        return {cpu: 0 for cpu in online}, (NumaNode(0, online),)

    node_of: dict[int, int] = {}
    for node, path in sorted(node_dirs.items()):
        cpulist = path / "cpulist"
        listed = _read_cpu_list(cpulist) & online if cpulist.exists() else frozenset()
        for cpu in sorted(listed):
            if cpu in node_of:
                raise TopologyError(
                    f"{cpulist} claims cpu{cpu}, which node{node_of[cpu]}/cpulist claims too"
                )
            node_of[cpu] = node
    for cpu in sorted(online - frozenset(node_of)):
        linked = [node for node in node_dirs if (cpu_dir / f"cpu{cpu}" / f"node{node}").exists()]
        if len(linked) != 1:
            raise TopologyError(
                f"cpu{cpu} is online but no {node_dir}/nodeN/cpulist lists it and it has "
                f"{len(linked)} nodeN links in {cpu_dir / f'cpu{cpu}'} (expected one)"
            )
        node_of[cpu] = linked[0]

    node_ids = sorted(node_dirs)
    nodes = []
    for node, path in sorted(node_dirs.items()):
        cpus = frozenset(cpu for cpu, home in node_of.items() if home == node)
        nodes.append(
            NumaNode(
                id=node,
                cpus=cpus,
                memory_bytes=_read_memtotal(path / "meminfo", node),
                distances=_read_distances(path / "distance", node_ids),
            )
        )
    return node_of, tuple(nodes)


def _read_memtotal(path: Path, node: int) -> int | None:
    if not path.exists():
        return None
    for line in _read_text(path).splitlines():
        match = _MEMTOTAL.fullmatch(line.strip())
        if match:
            if int(match.group(1)) != node:
                raise TopologyError(f"{path}: MemTotal line is for node {match.group(1)}")
            return int(match.group(2)) * 1024
    raise TopologyError(f"{path}: no 'Node {node} MemTotal: <n> kB' line")


def _read_distances(path: Path, node_ids: list[int]) -> tuple[tuple[int, int], ...]:
    """The row lists distances to every node that has a directory, in ascending node order."""
    if not path.exists():
        return ()
    fields = _read_text(path).split()
    if len(fields) != len(node_ids):
        raise TopologyError(
            f"{path}: {len(fields)} distances for {len(node_ids)} nodes "
            f"({', '.join(map(str, node_ids))})"
        )
    try:
        return tuple(zip(node_ids, (int(value) for value in fields), strict=True))
    except ValueError:
        raise TopologyError(f"{path}: expected integers, got {' '.join(fields)!r}") from None


# --- small file readers --------------------------------------------------------------------


def _numbered_dirs(parent: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    found: dict[int, Path] = {}
    with os.scandir(parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = Path(entry.path)
    return dict(sorted(found.items()))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except UnicodeDecodeError:
        raise TopologyError(f"{path}: not ASCII text") from None


def _read_int(path: Path, default: int | None = None) -> int:
    if default is not None and not path.exists():
        return default
    text = _read_text(path)
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"{path}: expected an integer, got {text!r}") from None


def _read_cpu_list(path: Path) -> frozenset[int]:
    try:
        return parse_cpu_list(_read_text(path))
    except CpuListError as error:
        raise TopologyError(f"{path}: {error}") from None


def _read_optional_cpu_list(path: Path, default: frozenset[int] = frozenset()) -> frozenset[int]:
    return _read_cpu_list(path) if path.exists() else default
