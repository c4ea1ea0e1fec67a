"""This host's CPU topology, read from sysfs under a configurable root.

`discover_topology` reads /sys/devices/system/{cpu,node} once, at start-up, into the
immutable `qos_model.topology.Topology` the engine plans with; nothing downstream touches
sysfs again. Tests point the root at recorded snapshots (tests/data/sysfs-topologies) or
hand-made trees.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from qos_model.cpulist import CpuListError, format_cpu_list, parse_cpu_list
from qos_model.topology import CacheDomain, CoreId, Cpu, NumaNode, Topology, TopologyError

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
