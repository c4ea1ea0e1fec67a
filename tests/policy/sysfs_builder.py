"""Hand-made /sys/devices/system/{cpu,node} trees for shapes the recorded snapshots lack.

A `MachineShape` describes a machine as a hierarchy (packages > dies > NUMA nodes > L3
domains > cores > threads) plus the awkward bits real hosts have: offline and isolated CPUs,
memory-only nodes, missing die_id / cache / node directories. `write_sysfs` lays it out the way
the kernel does (file names, list formats, which files offline CPUs lose, cpu0 without an
`online` file), and `expected_topology` says, independently of the code under test, what
discovery must make of it. The allocator's property tests use `expected_topology` directly,
which keeps them fast; `test_topology.py` checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from qos_model.cpulist import format_cpu_list
from qos_model.topology import CacheDomain, CoreId, Cpu, NumaNode, Topology


@dataclass(frozen=True, slots=True)
class CoreLayout:
    """One physical core of a shape: where it sits and which CPU ids its threads got."""

    threads: tuple[int, ...]
    package: int
    die: int
    core_id: int
    node: int
    l3: int


@dataclass(frozen=True)
class MachineShape:
    packages: int = 1
    dies_per_package: int = 1
    nodes_per_die: int = 1
    l3_per_node: int = 1
    """L3 domains (AMD CCXs) per NUMA node; ignored when `l3_spans_die`."""
    l3_spans_die: bool = False
    """One L3 shared by all nodes of a die, as with Intel sub-NUMA clustering."""
    cores_per_l3: int = 2
    threads_per_core: int = 1
    sibling_layout: Literal["split", "adjacent"] = "split"
    """split: thread t of core k is CPU k + t*cores (x86 enumeration); adjacent: k*T + t."""
    core_id_stride: int = 1
    """Real core ids have gaps (0,1,2,3,4,8,9,...); a stride > 1 imitates that."""
    memory_only_nodes: int = 0
    node_memory_kib: int = 4_155_168
    memory_only_node_kib: int = 130_023_424
    offline: frozenset[int] = frozenset()
    isolated: frozenset[int] = frozenset()
    with_node_dir: bool = True
    with_die_id: bool = True
    with_cache: bool = True
    with_cache_id: bool = True
    with_distance: bool = True
    kernel_max: int = 255

    # --- layout ---------------------------------------------------------------------------

    @property
    def cpu_node_count(self) -> int:
        return self.packages * self.dies_per_package * self.nodes_per_die

    @property
    def core_count(self) -> int:
        return self.cpu_node_count * self.l3_per_node * self.cores_per_l3

    @property
    def cpu_count(self) -> int:
        return self.core_count * self.threads_per_core

    @cached_property
    def cores(self) -> tuple[CoreLayout, ...]:
        layouts = []
        index = 0
        for package in range(self.packages):
            core_in_die = 0  # kernels without die_id number cores per package
            for die in range(self.dies_per_package):
                die_index = package * self.dies_per_package + die
                if self.with_die_id:
                    core_in_die = 0
                for local_node in range(self.nodes_per_die):
                    node = die_index * self.nodes_per_die + local_node
                    for local_l3 in range(self.l3_per_node):
                        l3 = die_index if self.l3_spans_die else node * self.l3_per_node + local_l3
                        for _ in range(self.cores_per_l3):
                            layouts.append(
                                CoreLayout(
                                    threads=self._threads_of(index),
                                    package=package,
                                    die=die,
                                    core_id=core_in_die * self.core_id_stride,
                                    node=node,
                                    l3=l3,
                                )
                            )
                            index += 1
                            core_in_die += 1
        return tuple(layouts)

    def _threads_of(self, core_index: int) -> tuple[int, ...]:
        if self.sibling_layout == "split":
            return tuple(core_index + t * self.core_count for t in range(self.threads_per_core))
        return tuple(core_index * self.threads_per_core + t for t in range(self.threads_per_core))

    @property
    def all_cpus(self) -> frozenset[int]:
        return frozenset(cpu for core in self.cores for cpu in core.threads)

    @property
    def online(self) -> frozenset[int]:
        return self.all_cpus - self.offline

    def distance(self, a: int, b: int) -> int:
        if a == b:
            return 10
        cpu_nodes = self.cpu_node_count
        if a >= cpu_nodes or b >= cpu_nodes:
            memory, other = (a, b) if a >= cpu_nodes else (b, a)
            home = (memory - cpu_nodes) % cpu_nodes
            return 17 if other == home else 28
        nodes_per_package = self.dies_per_package * self.nodes_per_die
        if a // nodes_per_package == b // nodes_per_package:
            return 11 if a // self.nodes_per_die == b // self.nodes_per_die else 12
        return 21

    @property
    def node_ids(self) -> range:
        return range(self.cpu_node_count + self.memory_only_nodes)

    # --- the oracle -------------------------------------------------------------------------

    def expected_topology(self) -> Topology:
        online = self.online
        l3_of_core = {core: core.l3 for core in self.cores}
        if self.with_cache and not self.with_cache_id:
            # discovery numbers id-less domains by their lowest online CPU
            firsts: dict[int, int] = {}
            for core in self.cores:
                for cpu in core.threads:
                    if cpu in online:
                        firsts[core.l3] = min(firsts.get(core.l3, cpu), cpu)
            renumber = {l3: rank for rank, l3 in enumerate(sorted(firsts, key=firsts.__getitem__))}
            l3_of_core = {core: renumber.get(core.l3, -1) for core in self.cores}
        cpus: list[Cpu] = []
        for core in self.cores:
            for cpu in core.threads:
                if cpu in online:
                    cpus.append(
                        Cpu(
                            id=cpu,
                            core=CoreId(
                                core.package, core.die if self.with_die_id else 0, core.core_id
                            ),
                            node=core.node if self.with_node_dir else 0,
                            l3=l3_of_core[core] if self.with_cache else None,
                        )
                    )
        if self.with_node_dir:
            nodes = tuple(
                NumaNode(
                    id=node,
                    cpus=frozenset(cpu.id for cpu in cpus if cpu.node == node),
                    memory_bytes=1024 * self._memory_kib(node),
                    distances=tuple((other, self.distance(node, other)) for other in self.node_ids)
                    if self.with_distance
                    else (),
                )
                for node in self.node_ids
            )
        else:
            nodes = (NumaNode(0, online, None, ()),)
        l3_ids = sorted({cpu.l3 for cpu in cpus if cpu.l3 is not None})
        domains = tuple(
            CacheDomain(3, l3, frozenset(cpu.id for cpu in cpus if cpu.l3 == l3)) for l3 in l3_ids
        )
        return Topology(
            cpus=tuple(cpus),
            nodes=nodes,
            l3_domains=domains,
            isolated_cpus=self.isolated & online,
            offline_cpus=self.offline & self.all_cpus,
        )

    def _memory_kib(self, node: int) -> int:
        return self.node_memory_kib if node < self.cpu_node_count else self.memory_only_node_kib


def write_sysfs(shape: MachineShape, root: Path) -> Path:
    """Write the shape's sysfs tree under `root` (which becomes discover_topology's root)."""
    system = root / "sys" / "devices" / "system"
    cpu_dir = system / "cpu"
    node_dir = system / "node"
    online = shape.online
    everything = shape.all_cpus

    _write(cpu_dir / "online", format_cpu_list(online))
    _write(cpu_dir / "offline", format_cpu_list(shape.offline & everything))
    _write(cpu_dir / "possible", format_cpu_list(everything))
    _write(cpu_dir / "present", format_cpu_list(everything))
    _write(cpu_dir / "isolated", format_cpu_list(shape.isolated & online))
    _write(cpu_dir / "kernel_max", str(shape.kernel_max))

    package_cpus = _group(shape, lambda core: (core.package,), online)
    die_cpus = _group(shape, lambda core: (core.package, core.die), online)
    l3_cpus = _group(shape, lambda core: (core.l3,), online)
    for core in shape.cores:
        live_threads = [cpu for cpu in core.threads if cpu in online]
        for cpu in core.threads:
            base = cpu_dir / f"cpu{cpu}"
            base.mkdir(parents=True, exist_ok=True)
            if cpu != 0:  # cpu0 cannot be unplugged on most hosts, so it has no switch
                _write(base / "online", "1" if cpu in online else "0")
            if shape.with_node_dir:
                (base / f"node{core.node}").symlink_to(f"../../node/node{core.node}")
            if cpu not in online:
                continue  # the kernel removes topology/ and cache/ of an offline CPU
            topo = base / "topology"
            _write(topo / "physical_package_id", str(core.package))
            if shape.with_die_id:
                _write(topo / "die_id", str(core.die))
                _write(topo / "die_cpus_list", format_cpu_list(die_cpus[(core.package, core.die)]))
            _write(topo / "core_id", str(core.core_id))
            _write(topo / "core_cpus_list", format_cpu_list(live_threads))
            _write(topo / "thread_siblings_list", format_cpu_list(live_threads))
            _write(topo / "core_siblings_list", format_cpu_list(package_cpus[(core.package,)]))
            _write(topo / "package_cpus_list", format_cpu_list(package_cpus[(core.package,)]))
            _write(topo / "cluster_id", str(core.core_id))
            _write(topo / "cluster_cpus_list", format_cpu_list(live_threads))
            if shape.with_cache:
                first_thread = min(live_threads)
                caches = [
                    (1, "Data", first_thread, live_threads, "32K"),
                    (1, "Instruction", first_thread, live_threads, "32K"),
                    (2, "Unified", first_thread, live_threads, "512K"),
                    (3, "Unified", core.l3, sorted(l3_cpus[(core.l3,)]), "32768K"),
                ]
                for index, (level, kind, cache_id, shared, size) in enumerate(caches):
                    cache = base / "cache" / f"index{index}"
                    _write(cache / "level", str(level))
                    _write(cache / "type", kind)
                    if shape.with_cache_id:
                        _write(cache / "id", str(cache_id))
                    _write(cache / "shared_cpu_list", format_cpu_list(shared))
                    _write(cache / "size", size)
                    _write(cache / "coherency_line_size", "64")

    if shape.with_node_dir:
        node_ids = list(shape.node_ids)
        cpu_nodes = [node for node in node_ids if node < shape.cpu_node_count]
        _write(node_dir / "online", format_cpu_list(node_ids))
        _write(node_dir / "possible", format_cpu_list(node_ids))
        _write(node_dir / "has_cpu", format_cpu_list(cpu_nodes))
        _write(node_dir / "has_memory", format_cpu_list(node_ids))
        _write(node_dir / "has_normal_memory", format_cpu_list(node_ids))
        for node in node_ids:
            # x86 drops an offline CPU from its node's mask, so cpulist shows online CPUs only
            node_cpus = [cpu for core in shape.cores if core.node == node for cpu in core.threads]
            base = node_dir / f"node{node}"
            _write(base / "cpulist", format_cpu_list(set(node_cpus) & online))
            if shape.with_distance:
                row = " ".join(str(shape.distance(node, other)) for other in node_ids)
                _write(base / "distance", row)
            kib = shape._memory_kib(node)
            _write(
                base / "meminfo",
                f"Node {node} MemTotal:       {kib:>9} kB\n"
                f"Node {node} MemFree:        {kib // 2:>9} kB\n"
                f"Node {node} MemUsed:        {kib - kib // 2:>9} kB\n"
                f"Node {node} HugePages_Total:     0\n",
            )
    return root


def _group(
    shape: MachineShape, key: Callable[[CoreLayout], tuple[int, ...]], online: frozenset[int]
) -> dict[tuple[int, ...], frozenset[int]]:
    groups: dict[tuple[int, ...], set[int]] = {}
    for core in shape.cores:
        groups.setdefault(key(core), set()).update(set(core.threads) & online)
    return {group: frozenset(cpus) for group, cpus in groups.items()}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="ascii")
