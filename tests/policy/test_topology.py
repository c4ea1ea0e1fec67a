"""Topology discovery on recorded machines, hand-made trees and this host."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isolation.sysfs import discover_topology
from qos_model.cpulist import parse_cpu_list
from qos_model.topology import (
    CacheDomain,
    CoreId,
    Cpu,
    NumaNode,
    Topology,
    TopologyError,
)
from tests.policy.sysfs_builder import MachineShape, write_sysfs
from tests.snapshots import SnapshotLibrary

KIB = 1024

# --- recorded machines -------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotFacts:
    name: str
    cpus: int
    cores: int
    packages: int
    cpu_nodes: int
    memory_only_kib: dict[int, int]
    l3_domains: int
    isolated: str
    sibling_pairs: tuple[tuple[int, int], ...]


SNAPSHOT_FACTS = [
    SnapshotFacts("desktop", 20, 10, 1, 1, {}, 1, "", ((0, 10), (9, 19))),
    SnapshotFacts(
        "server", 112, 56, 2, 4, {4: 130023424, 5: 130023424}, 2, "4-7,60-63", ((0, 56), (55, 111))
    ),
    SnapshotFacts("4-socket-server-nosnc", 144, 72, 4, 4, {}, 4, "", ((0, 72), (71, 143))),
    SnapshotFacts("2-socket-4-node-40-core", 80, 40, 2, 4, {}, 2, "", ((0, 40), (39, 79))),
    SnapshotFacts("sample1", 16, 12, 1, 1, {}, 1, "", ((0, 1), (6, 7))),
    SnapshotFacts(
        "sample2",
        112,
        56,
        2,
        4,
        {4: 130023424, 5: 130023424, 6: 130023424, 7: 130023424},
        2,
        "4-7,60-63",
        ((0, 56), (3, 59)),
    ),
]


@pytest.mark.parametrize("facts", SNAPSHOT_FACTS, ids=lambda facts: facts.name)
def test_each_recorded_machine_is_discovered_with_its_known_counts(
    facts: SnapshotFacts, snapshots: SnapshotLibrary
) -> None:
    topology = snapshots.topology(facts.name)
    assert len(topology.online_cpus) == facts.cpus
    assert topology.online_cpus == frozenset(range(facts.cpus))
    assert len(topology.cores) == facts.cores
    assert len(topology.packages) == facts.packages
    assert len(topology.cpu_nodes) == facts.cpu_nodes
    assert {n.id: n.memory_bytes for n in topology.memory_only_nodes} == {
        node: kib * KIB for node, kib in facts.memory_only_kib.items()
    }
    assert len(topology.l3_domains) == facts.l3_domains
    assert topology.isolated_cpus == parse_cpu_list(facts.isolated)
    assert topology.offline_cpus == frozenset()
    for a, b in facts.sibling_pairs:
        assert topology.siblings(a) == {b}
        assert topology.core_of(a) == topology.core_of(b)


def test_desktop_is_one_node_with_smt_pairs_n_and_n_plus_10(
    snapshots: SnapshotLibrary,
) -> None:
    desktop = snapshots.topology("desktop")
    assert [node.id for node in desktop.nodes] == [0]
    assert desktop.node(0).cpus == frozenset(range(20))
    assert desktop.node(0).memory_bytes == 65621548 * KIB
    assert desktop.node(0).distances == ((0, 10),)
    assert {core.cpus for core in desktop.cores} == {frozenset({n, n + 10}) for n in range(10)}
    assert desktop.threads_per_core == 2


def test_server_interleaves_cpus_over_four_nodes_plus_two_memory_only(
    snapshots: SnapshotLibrary,
) -> None:
    server = snapshots.topology("server")
    for node in range(4):
        assert server.node(node).cpus == frozenset(range(node, 112, 4))
        assert len(server.cores_of_node(node)) == 14
    assert [node.id for node in server.memory_only_nodes] == [4, 5]
    assert all(node.is_memory_only for node in server.memory_only_nodes)
    assert server.node(0).memory_bytes == 32372996 * KIB
    # package 0 holds the even CPUs (nodes 0 and 2), package 1 the odd ones (nodes 1 and 3)
    assert server.cpus_of_package(0) == frozenset(range(0, 112, 2))
    assert server.distance(0, 2) == 11
    assert server.distance(0, 1) == 21
    assert server.distance(0, 4) == 17
    assert server.distance(2, 5) == 17
    assert server.distance(1, 4) == 28


def test_core_id_alone_does_not_identify_a_core(snapshots: SnapshotLibrary) -> None:
    server = snapshots.topology("server")
    # cpu0 and cpu1 both report core_id 0, in different packages
    assert server.cpu(0).core == CoreId(package=0, die=0, core=0)
    assert server.cpu(1).core == CoreId(package=1, die=0, core=0)
    assert server.core_of(0).cpus == {0, 56}
    assert server.core_of(1).cpus == {1, 57}


def test_snc_shares_one_l3_between_the_two_nodes_of_a_socket(
    snapshots: SnapshotLibrary,
) -> None:
    snc = snapshots.topology("2-socket-4-node-40-core")
    assert snc.node(0).cpus == parse_cpu_list("0-2,5-6,10-12,15-16,40-42,45-46,50-52,55-56")
    assert snc.node(3).cpus == parse_cpu_list("23-24,27-29,33-34,37-39,63-64,67-69,73-74,77-79")
    socket0_l3 = CacheDomain(3, 0, parse_cpu_list("0-19,40-59"))
    assert snc.l3_domains_of_node(0) == (socket0_l3,)
    assert snc.l3_domains_of_node(1) == (socket0_l3,)
    assert snc.l3_domains_of_node(2) == snc.l3_domains_of_node(3) != (socket0_l3,)
    assert snc.distance(0, 1) == 11
    assert snc.distance(1, 2) == 21


def test_four_sockets_give_four_nodes_and_four_l3s(
    snapshots: SnapshotLibrary,
) -> None:
    big = snapshots.topology("4-socket-server-nosnc")
    for node in range(4):
        expected = frozenset(range(18 * node, 18 * node + 18)) | frozenset(
            range(72 + 18 * node, 72 + 18 * node + 18)
        )
        assert big.node(node).cpus == expected
        (domain,) = big.l3_domains_of_node(node)
        assert domain.cpus == expected
        assert big.cpus_of_package(node) == expected


def test_sample1_mixes_smt_cores_with_single_thread_cores(
    snapshots: SnapshotLibrary,
) -> None:
    sample1 = snapshots.topology("sample1")
    assert sorted(sorted(core.cpus) for core in sample1.cores) == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        *[[n] for n in range(8, 16)],
    ]
    assert sample1.siblings(8) == frozenset()
    assert sample1.node(0).memory_bytes == 40645580 * KIB


def test_sample2_has_four_memory_only_nodes_near_one_cpu_node_each(
    snapshots: SnapshotLibrary,
) -> None:
    sample2 = snapshots.topology("sample2")
    assert [node.id for node in sample2.cpu_nodes] == [0, 1, 2, 3]
    assert [node.id for node in sample2.memory_only_nodes] == [4, 5, 6, 7]
    nearest = {
        memory.id: min(sample2.cpu_nodes, key=lambda n: memory.distance_to(n.id) or 99).id
        for memory in sample2.memory_only_nodes
    }
    assert nearest == {4: 0, 5: 2, 6: 1, 7: 3}
    assert sample2.node(1).cpus == frozenset(range(1, 112, 4))


# --- hand-made trees -----------------------------------------------------------------------

THIS_VM = MachineShape()  # 1 package, 1 node, 2 cores without SMT, one shared L3
AMD_STYLE = MachineShape(
    packages=2, nodes_per_die=2, l3_per_node=4, cores_per_l3=4, threads_per_core=2
)
WITH_OFFLINE = MachineShape(
    nodes_per_die=2,
    cores_per_l3=4,
    threads_per_core=2,
    offline=frozenset({3, 9}),
    isolated=frozenset({1, 2}),
)


def discover_shape(shape: MachineShape, tmp_path: Path) -> Topology:
    return discover_topology(write_sysfs(shape, tmp_path))


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(THIS_VM, id="this-vm"),
        pytest.param(AMD_STYLE, id="amd-ccx"),
        pytest.param(WITH_OFFLINE, id="offline-isolated"),
        pytest.param(MachineShape(packages=2, dies_per_package=2, cores_per_l3=3), id="multi-die"),
        pytest.param(MachineShape(threads_per_core=2, with_node_dir=False), id="no-numa"),
        pytest.param(MachineShape(cores_per_l3=3, with_die_id=False), id="no-die-id"),
        pytest.param(MachineShape(cores_per_l3=3, with_cache=False), id="no-cache"),
        pytest.param(
            MachineShape(packages=2, l3_per_node=2, with_cache_id=False), id="no-cache-id"
        ),
        pytest.param(MachineShape(packages=2, with_distance=False), id="no-distance"),
        pytest.param(
            MachineShape(threads_per_core=2, sibling_layout="adjacent", core_id_stride=4),
            id="adjacent-siblings",
        ),
    ],
)
def test_hand_made_tree_is_discovered_as_built(shape: MachineShape, tmp_path: Path) -> None:
    assert discover_shape(shape, tmp_path) == shape.expected_topology()


def test_this_vm_shape(tmp_path: Path) -> None:
    vm = discover_shape(THIS_VM, tmp_path)
    assert vm.online_cpus == {0, 1}
    assert [sorted(core.cpus) for core in vm.cores] == [[0], [1]]
    assert vm.threads_per_core == 1
    assert vm.siblings(0) == frozenset()
    assert vm.l3_domains == (CacheDomain(3, 0, frozenset({0, 1})),)
    assert vm.node(0).memory_bytes == 4155168 * KIB
    assert not (tmp_path / "sys/devices/system/cpu/cpu0/online").exists()


def test_amd_style_host_has_four_l3_domains_per_node(tmp_path: Path) -> None:
    amd = discover_shape(AMD_STYLE, tmp_path)
    assert len(amd.online_cpus) == 128
    assert len(amd.cpu_nodes) == 4
    for node in amd.cpu_nodes:
        domains = amd.l3_domains_of_node(node.id)
        assert len(domains) == 4
        assert all(len(domain.cpus) == 8 and domain.cpus <= node.cpus for domain in domains)
        assert frozenset().union(*(domain.cpus for domain in domains)) == node.cpus
    # CCX 0 = cores 0-3, threads n and n+64
    assert amd.l3_domain(0).cpus == {0, 1, 2, 3, 64, 65, 66, 67}
    assert amd.siblings(5) == {69}
    # the first core of package 1 reuses core_id 0
    assert amd.cpu(32).core == CoreId(1, 0, 0)
    assert amd.core_of(32) != amd.core_of(0)


def test_offline_cpus_are_not_usable_and_isolated_ones_are_reported(tmp_path: Path) -> None:
    host = discover_shape(WITH_OFFLINE, tmp_path)
    assert host.offline_cpus == {3, 9}
    assert host.online_cpus == frozenset(range(16)) - {3, 9}
    assert host.isolated_cpus == {1, 2}
    # core 3 = CPUs 3 and 11, core 1 = CPUs 1 and 9: each lost a thread
    assert host.core_of(11).cpus == {11}
    assert host.siblings(1) == frozenset()
    assert host.siblings(2) == {10}
    assert host.node(0).cpus == {0, 1, 2, 8, 10, 11}
    with pytest.raises(KeyError, match="cpu3 is not an online CPU"):
        host.cpu(3)


def test_per_cpu_online_files_suffice_without_the_global_list(tmp_path: Path) -> None:
    write_sysfs(WITH_OFFLINE, tmp_path)
    (tmp_path / "sys/devices/system/cpu/online").unlink()
    assert discover_topology(tmp_path) == WITH_OFFLINE.expected_topology()


def test_stale_sibling_list_naming_an_offline_cpu_is_ignored(tmp_path: Path) -> None:
    write_sysfs(WITH_OFFLINE, tmp_path)
    # cpu11's sibling cpu3 is offline; a kernel that left it in the mask must not revive it
    (tmp_path / "sys/devices/system/cpu/cpu11/topology/core_cpus_list").write_text("3,11\n")
    host = discover_topology(tmp_path)
    assert host.core_of(11).cpus == {11}
    assert 3 not in host.online_cpus


def test_cpu_missing_from_node_cpulist_is_placed_by_its_node_link(tmp_path: Path) -> None:
    shape = MachineShape(nodes_per_die=2, threads_per_core=2)
    write_sysfs(shape, tmp_path)
    (tmp_path / "sys/devices/system/node/node1/cpulist").write_text("\n")
    assert discover_topology(tmp_path) == shape.expected_topology()


def test_cpu_without_any_node_is_an_error(tmp_path: Path) -> None:
    write_sysfs(MachineShape(nodes_per_die=2), tmp_path)
    (tmp_path / "sys/devices/system/node/node1/cpulist").write_text("\n")
    (tmp_path / "sys/devices/system/cpu/cpu2/node1").unlink()
    with pytest.raises(TopologyError, match=r"cpu2 is online but no .*cpulist lists it"):
        discover_topology(tmp_path)


def test_without_a_node_directory_everything_is_node_0(tmp_path: Path) -> None:
    flat = discover_shape(
        MachineShape(packages=2, threads_per_core=2, with_node_dir=False), tmp_path
    )
    assert [node.id for node in flat.nodes] == [0]
    assert flat.node(0).cpus == frozenset(range(8))
    assert flat.node(0).memory_bytes is None
    assert flat.distance(0, 0) is None


def test_without_cache_information_there_are_no_l3_domains(tmp_path: Path) -> None:
    bare = discover_shape(MachineShape(cores_per_l3=4, with_cache=False), tmp_path)
    assert bare.l3_domains == ()
    assert bare.l3_domains_of_node(0) == ()
    assert bare.l3_of(0) is None


def test_cache_without_ids_groups_by_shared_cpu_list(tmp_path: Path) -> None:
    shape = MachineShape(l3_per_node=3, cores_per_l3=2, with_cache_id=False)
    host = discover_shape(shape, tmp_path)
    assert [sorted(domain.cpus) for domain in host.l3_domains] == [[0, 1], [2, 3], [4, 5]]
    assert not (tmp_path / "sys/devices/system/cpu/cpu0/cache/index3/id").exists()


def test_missing_die_id_means_die_0(tmp_path: Path) -> None:
    # older kernels have no die_id: discovery must fall back to die 0, not crash
    shape = MachineShape(packages=2, threads_per_core=2, cores_per_l3=3, with_die_id=False)
    host = discover_shape(shape, tmp_path)
    assert {cpu.die for cpu in host.cpus} == {0}
    assert host.core_of(0) != host.core_of(3)  # same core_id, other package


@pytest.mark.parametrize(
    ("relative_path", "content", "message"),
    [
        ("cpu/cpu1/topology/core_id", "one\n", "expected an integer, got 'one'"),
        ("cpu/online", "0-x\n", "bad CPU list element"),
        ("node/node0/cpulist", "3-1\n", "bad CPU range"),
        ("node/node0/distance", "10 20 30\n", "3 distances for 2 nodes"),
        ("node/node1/meminfo", "Node 1 MemFree: 5 kB\n", "no 'Node 1 MemTotal"),
        ("cpu/cpu0/cache/index3/level", "three\n", "expected an integer"),
    ],
    ids=[
        "cpu/cpu1/topology/core_id",
        "cpu/online",
        "node/node0/cpulist",
        "node/node0/distance",
        "node/node1/meminfo",
        "cpu/cpu0/cache/index3/level",
    ],
)
def test_malformed_file_is_named_in_the_error(
    tmp_path: Path, relative_path: str, content: str, message: str
) -> None:
    write_sysfs(MachineShape(packages=2, threads_per_core=2), tmp_path)
    broken = tmp_path / "sys/devices/system" / relative_path
    broken.write_text(content)
    with pytest.raises(TopologyError) as error:
        discover_topology(tmp_path)
    assert str(broken) in str(error.value)
    assert message in str(error.value)


def test_sibling_list_contradicting_core_ids_is_an_error(tmp_path: Path) -> None:
    write_sysfs(MachineShape(threads_per_core=2), tmp_path)
    core_id = tmp_path / "sys/devices/system/cpu/cpu2/topology/core_id"  # sibling of cpu0
    core_id.write_text("1\n")
    with pytest.raises(TopologyError, match=r"cpu0's core holds CPUs 0,2"):
        discover_topology(tmp_path)


def test_missing_sysfs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="is sysfs mounted"):
        discover_topology(tmp_path)


def test_topology_value_rejects_inconsistent_parts() -> None:
    cpu0 = Cpu(0, CoreId(0, 0, 0), node=0)
    cpu1 = Cpu(1, CoreId(0, 0, 1), node=0)
    with pytest.raises(TopologyError, match="NUMA node 0 lists CPUs '0' but the CPUs on it"):
        Topology(cpus=(cpu0, cpu1), nodes=(NumaNode(0, frozenset({0})),))
    with pytest.raises(TopologyError, match="CPU 0 is listed twice"):
        Topology(cpus=(cpu0, cpu0), nodes=(NumaNode(0, frozenset({0})),))
    with pytest.raises(TopologyError, match="NUMA node 1, which is not listed"):
        Topology(cpus=(replace(cpu0, node=1),), nodes=(NumaNode(0, frozenset()),))
    with pytest.raises(TopologyError, match="disagree on their NUMA node"):
        Topology(
            cpus=(cpu0, Cpu(1, CoreId(0, 0, 0), node=1)),
            nodes=(NumaNode(0, frozenset({0})), NumaNode(1, frozenset({1}))),
        )


shapes = st.builds(
    MachineShape,
    packages=st.integers(1, 2),
    dies_per_package=st.integers(1, 2),
    nodes_per_die=st.integers(1, 2),
    l3_per_node=st.integers(1, 2),
    l3_spans_die=st.booleans(),
    cores_per_l3=st.integers(1, 3),
    threads_per_core=st.integers(1, 2),
    sibling_layout=st.sampled_from(["split", "adjacent"]),
    memory_only_nodes=st.integers(0, 1),
    with_node_dir=st.booleans(),
    with_die_id=st.booleans(),
    with_cache=st.booleans(),
    with_cache_id=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, data=st.data())
def test_random_trees_are_discovered_as_built(shape: MachineShape, data: st.DataObject) -> None:
    cpus = sorted(shape.all_cpus)
    offline = data.draw(st.sets(st.sampled_from(cpus[1:]) if len(cpus) > 1 else st.nothing()))
    isolated = data.draw(st.sets(st.sampled_from(cpus)))
    shape = replace(shape, offline=frozenset(offline), isolated=frozenset(isolated))
    with tempfile.TemporaryDirectory() as scratch:
        assert discover_topology(write_sysfs(shape, Path(scratch))) == shape.expected_topology()


# --- this host -----------------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/sys/devices/system/cpu/online").exists(), reason="no sysfs on this host"
)
def test_this_host() -> None:
    host = discover_topology(Path("/"))
    assert len(host.online_cpus) == os.cpu_count()
    assert frozenset().union(*(core.cpus for core in host.cores)) == host.online_cpus
    assert frozenset().union(*(node.cpus for node in host.nodes)) == host.online_cpus
    assert host.online_cpus >= os.sched_getaffinity(0)
