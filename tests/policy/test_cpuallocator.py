"""The exclusive CPU allocator: worked examples on real and hand-made machines, and properties."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy.cpuallocator import (
    AllocationError,
    CpuAllocation,
    CpuRequest,
    allocate_cpus,
    free_cpus,
    release,
)
from qos_model.cpulist import parse_cpu_list
from qos_model.topology import Core, Topology

# re-exported ("as" name) for test_incremental.py, which imports it from here
from tests.policy.planning import machines
from tests.policy.sysfs_builder import MachineShape
from tests.snapshots import SnapshotLibrary

# 1 package, 2 NUMA nodes, 4 CCXs (L3s) of 4 cores per node, SMT siblings n and n+32:
# node 0 = CPUs 0-15,32-47 with L3 j = cores 4j..4j+3; node 1 = CPUs 16-31,48-63, L3s 4-7.
AMD = MachineShape(nodes_per_die=2, l3_per_node=4, cores_per_l3=4, threads_per_core=2)
HAND_MADE = {"amd": AMD}


def machine(name: str, snapshots: SnapshotLibrary) -> Topology:
    if name in HAND_MADE:
        return HAND_MADE[name].expected_topology()
    return snapshots.topology(name)


def cpus(text: str) -> frozenset[int]:
    return parse_cpu_list(text)


@dataclass(frozen=True)
class Case:
    description: str
    machine: str
    request: CpuRequest
    expect_cpus: str
    expect_mems: str = "0"
    expect_idle: str = ""
    busy: str = ""
    """CPUs other dedicated containers hold."""
    reserved: str = ""


CASES = [
    Case("8 CPUs fill exactly one CCX", "amd", CpuRequest(8), "0-3,32-35"),
    Case(
        "4 CPUs go to the half-used CCX they fit exactly, leaving full CCXs intact",
        "amd",
        CpuRequest(4),
        "2-3,34-35",
        busy="0-1,32-33",
    ),
    Case(
        "10 CPUs fill one CCX and spill into the next one of the same node",
        "amd",
        CpuRequest(10),
        "0-4,32-36",
    ),
    Case("3 CPUs = one whole core plus one thread", "amd", CpuRequest(3), "0-1,32"),
    Case(
        "the odd thread finishes a core someone else already split",
        "amd",
        CpuRequest(3),
        "0-1,33",
        busy="32",
    ),
    Case(
        "round_up_to_whole_cores holds the odd thread's sibling idle",
        "amd",
        CpuRequest(3, round_up_to_whole_cores=True),
        "0-1,32",
        expect_idle="33",
    ),
    Case(
        "one_thread_per_core takes four cores of one CCX and idles their siblings",
        "amd",
        CpuRequest(4, one_thread_per_core=True),
        "0-3",
        expect_idle="32-35",
    ),
    Case(
        "full_pcpus skips a CCX that only has loose threads left",
        "amd",
        CpuRequest(4),
        "4-5,36-37",
        busy="32-35",
    ),
    Case(
        "without full_pcpus the loose threads are packed first",
        "amd",
        CpuRequest(4, full_pcpus=False),
        "0-3",
        busy="32-35",
    ),
    Case(
        "a node where 6 CPUs fit in one CCX beats a tighter node where they straddle two",
        "amd",
        CpuRequest(6),
        "16-18,48-50",
        expect_mems="1",
        busy="0-1,4-5,8-9,12-13,32-33,36-37,40-41,44-45",
    ),
    Case(
        "avoid_nodes keeps the request off node 0",
        "amd",
        CpuRequest(4, avoid_nodes=frozenset({0})),
        "16-17,48-49",
        expect_mems="1",
    ),
    Case(
        "preferred_nodes picks node 1 when both nodes fit",
        "amd",
        CpuRequest(4, preferred_nodes=frozenset({1})),
        "16-17,48-49",
        expect_mems="1",
    ),
    Case(
        "without numa_binding 40 CPUs take node 0 and one CCX of node 1",
        "amd",
        CpuRequest(40),
        "0-19,32-51",
        expect_mems="0-1",
    ),
    Case(
        "numa_exclusive takes every CPU of the node nobody uses",
        "amd",
        CpuRequest(4, numa_binding=True, numa_exclusive=True),
        "16-31,48-63",
        expect_mems="1",
        busy="5",
    ),
    Case(
        "reserved CPUs do not make a node used: exclusive picks the tighter node 0",
        "amd",
        CpuRequest(4, numa_binding=True, numa_exclusive=True),
        "1-15,33-47",
        reserved="0,32",
    ),
    Case(
        "numa_exclusive without binding takes the fewest whole nodes",
        "amd",
        CpuRequest(40, numa_exclusive=True),
        "0-63",
        expect_mems="0-1",
    ),
    Case(
        "exclusive and one thread per core: a node's first threads, the rest idle",
        "amd",
        CpuRequest(4, numa_exclusive=True, one_thread_per_core=True),
        "0-15",
        expect_idle="32-47",
    ),
    Case("server: 2 CPUs are one core, SMT pair 0/56", "server", CpuRequest(2), "0,56"),
    Case(
        "server: with core 0 reserved, node 0 is the tightest fit",
        "server",
        CpuRequest(4),
        "4,8,60,64",
        reserved="0,56",
    ),
    Case(
        "server: numa_binding 28 CPUs fill node 0 exactly",
        "server",
        CpuRequest(28, numa_binding=True),
        ",".join(str(n) for n in range(0, 112, 4)),
    ),
    Case(
        "server: 56 CPUs take the two nodes of package 0, not the lowest-numbered pair",
        "server",
        CpuRequest(56),
        ",".join(str(n) for n in range(0, 112, 2)),
        expect_mems="0,2",
    ),
    Case(
        "SNC: 40 CPUs span the two nodes of socket 0, not two sockets",
        "2-socket-4-node-40-core",
        CpuRequest(40),
        "0-19,40-59",
        expect_mems="0-1",
    ),
    Case(
        "4 sockets: numa_binding 36 CPUs fill node 0",
        "4-socket-server-nosnc",
        CpuRequest(36, numa_binding=True),
        "0-17,72-89",
    ),
    Case(
        "hybrid: 1 CPU takes a whole single-thread core instead of splitting an SMT core",
        "sample1",
        CpuRequest(1),
        "8",
    ),
    Case("hybrid: 2 CPUs are the first SMT core", "sample1", CpuRequest(2), "0-1"),
    Case("hybrid: 3 CPUs = an SMT core + a single-thread core", "sample1", CpuRequest(3), "0-1,8"),
    Case(
        "desktop: one thread per core",
        "desktop",
        CpuRequest(3, one_thread_per_core=True),
        "0-2",
        expect_idle="10-12",
    ),
    Case(
        "sample2: isolated CPUs are ordinary unless reserved",
        "sample2",
        CpuRequest(2, preferred_nodes=frozenset({0})),
        "0,56",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.description)
def test_allocation_keeps_cores_and_cache_domains_whole_as_each_example_describes(
    case: Case, snapshots: SnapshotLibrary
) -> None:
    topology = machine(case.machine, snapshots)
    reserved = cpus(case.reserved)
    free = free_cpus(topology, reserved, [cpus(case.busy)])
    result = allocate_cpus(topology, free, case.request, reserved=reserved)
    assert result.cpus == cpus(case.expect_cpus), result.reason
    assert result.idle_siblings == cpus(case.expect_idle), result.reason
    assert result.mems == cpus(case.expect_mems), result.reason


@dataclass(frozen=True)
class Failure:
    description: str
    machine: str
    request: CpuRequest
    message: tuple[str, ...]
    busy: str = ""
    reserved: str = ""


FAILURES = [
    Failure(
        "40 CPUs bound to one node of 32",
        "amd",
        CpuRequest(40, numa_binding=True),
        (
            "cannot allocate 40 CPUs (one NUMA node, whole cores)",
            "no single NUMA node can hold it",
            "64 of 64 online CPUs are free",
            "node 0: 32 free, 16 whole cores",
        ),
    ),
    Failure(
        "exclusive with every node in use",
        "amd",
        CpuRequest(2, numa_binding=True, numa_exclusive=True),
        ("0 NUMA node(s) are wholly unused", "62 of 64 online CPUs are free"),
        busy="5,20",
    ),
    Failure(
        "exclusive and bound, larger than any node",
        "server",
        CpuRequest(29, numa_binding=True, numa_exclusive=True),
        (
            "4 NUMA node(s) are wholly unused (node 0: 28, node 1: 28, node 2: 28, node 3: 28)",
            "numa_binding allows only one",
        ),
    ),
    Failure(
        "whole cores wanted, only loose threads left",
        "amd",
        CpuRequest(2),
        ("32 of 64 online CPUs are free", "node 0: 16 free, 0 whole cores, 1 usable"),
        busy="32-63",
    ),
    Failure(
        "more CPUs than the machine has",
        "desktop",
        CpuRequest(21, full_pcpus=False),
        ("cannot allocate 21 CPUs", "20 of 20 online CPUs are free"),
    ),
    Failure(
        "one thread per core needs 11 cores, the desktop has 10",
        "desktop",
        CpuRequest(11, one_thread_per_core=True),
        ("one thread per core", "10 usable as one thread per core"),
    ),
    Failure(
        "every node avoided",
        "amd",
        CpuRequest(1, avoid_nodes=frozenset({0, 1})),
        ("avoiding node(s) 0-1", "node 1: 32 free, 16 whole cores, 32 usable as whole cores"),
    ),
]


@pytest.mark.parametrize("failure", FAILURES, ids=lambda failure: failure.description)
def test_allocation_failure_explains_the_numbers(
    failure: Failure, snapshots: SnapshotLibrary
) -> None:
    topology = machine(failure.machine, snapshots)
    reserved = cpus(failure.reserved)
    free = free_cpus(topology, reserved, [cpus(failure.busy)])
    with pytest.raises(AllocationError) as error:
        allocate_cpus(topology, free, failure.request, reserved=reserved)
    for fragment in failure.message:
        assert fragment in str(error.value)


def test_reason_reads_like_the_allocation() -> None:
    topology = AMD.expected_topology()
    result = allocate_cpus(topology, topology.online_cpus, CpuRequest(4))
    assert result.reason == "4 CPUs = 2 whole cores on NUMA node 0, L3 domain 0"
    result = allocate_cpus(topology, topology.online_cpus, CpuRequest(3))
    assert result.reason == (
        "3 CPUs = 1 whole core + 1 thread of 1 partial core on NUMA node 0, L3 domain 0"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CpuRequest(0), "at least 1, got 0"),
        (lambda: CpuRequest(True), "at least 1, got True"),
        (
            lambda: CpuRequest(1, avoid_nodes=frozenset({1}), preferred_nodes=frozenset({1})),
            "both preferred and avoided",
        ),
    ],
    ids=["zero CPUs", "a bool as the count", "a node both preferred and avoided"],
)
def test_bad_requests_are_rejected(make: Callable[[], CpuRequest], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_inconsistent_books_are_rejected() -> None:
    topology = AMD.expected_topology()
    with pytest.raises(ValueError, match="free CPUs 64-65 are not online"):
        allocate_cpus(topology, cpus("0-65"), CpuRequest(1))
    with pytest.raises(ValueError, match="CPUs 0 are both free and reserved"):
        allocate_cpus(topology, cpus("0-3"), CpuRequest(1), reserved=cpus("0"))
    with pytest.raises(KeyError, match="NUMA node 7"):
        allocate_cpus(topology, cpus("0-3"), CpuRequest(1, avoid_nodes=frozenset({7})))


def test_free_cpus_and_release(snapshots: SnapshotLibrary) -> None:
    server = snapshots.topology("server")
    free = free_cpus(server, {0, 56}, [cpus("1-3"), cpus("57")])
    assert free == frozenset(range(112)) - cpus("0-3,56-57")
    result = allocate_cpus(server, free, CpuRequest(3, round_up_to_whole_cores=True))
    assert len(result.taken) == 4
    assert release(free - result.taken, result) == free
    with pytest.raises(ValueError, match="already free"):
        release(free, result)


def test_filling_the_server_with_4_cpu_containers(snapshots: SnapshotLibrary) -> None:
    server = snapshots.topology("server")
    reserved = cpus("0,56")
    free = free_cpus(server, reserved, [])
    results: list[CpuAllocation] = []
    while True:
        try:
            result = allocate_cpus(server, free, CpuRequest(4, numa_binding=True))
        except AllocationError:
            break
        assert len(result.mems) == 1
        assert all(server.core_of(cpu).cpus <= result.cpus for cpu in result.cpus)
        free -= result.taken
        results.append(result)
    # 110 free CPUs = 55 cores; nodes hold 13, 14, 14, 14 cores: 6+7+7+7 pairs of cores
    assert len(results) == 27
    assert sum(len(result.cpus) for result in results) == 108
    assert len(free) == 2
    for result in reversed(results):
        free = release(free, result)
    assert free == free_cpus(server, reserved, [])


def test_same_inputs_give_the_same_answer(snapshots: SnapshotLibrary) -> None:
    topology = snapshots.topology("2-socket-4-node-40-core")
    free = frozenset(sorted(topology.online_cpus - cpus("3-9,44-49"), reverse=True))
    same_free = frozenset(sorted(free))
    request = CpuRequest(7, full_pcpus=False)
    first = allocate_cpus(topology, free, request)
    assert allocate_cpus(topology, same_free, replace(request)) == first


# --- properties ------------------------------------------------------------------------------


@st.composite
def requests(draw: st.DrawFn, node_ids: list[int]) -> CpuRequest:
    avoid = draw(st.frozensets(st.sampled_from(node_ids), max_size=1))
    preferred = draw(st.frozensets(st.sampled_from(node_ids), max_size=1)) - avoid
    return CpuRequest(
        count=draw(st.integers(1, 12)),
        numa_binding=draw(st.booleans()),
        numa_exclusive=draw(st.integers(0, 3)) == 0,
        full_pcpus=draw(st.booleans()),
        round_up_to_whole_cores=draw(st.booleans()),
        one_thread_per_core=draw(st.integers(0, 4)) == 0,
        avoid_nodes=avoid,
        preferred_nodes=preferred,
    )


def feasible(
    topology: Topology, free: frozenset[int], reserved: frozenset[int], request: CpuRequest
) -> bool:
    """Whether the documented rules admit any answer, computed the plain way."""
    nodes = [n for n in topology.cpu_nodes if n.id not in request.avoid_nodes]

    def room(node_ids: list[int]) -> int:
        cores = [c for c in topology.cores if c.node in node_ids and c.cpus & free]
        whole = [c for c in cores if c.cpus <= free]
        if request.numa_exclusive:
            return len(cores) if request.one_thread_per_core else len(free & _cpus_of(cores))
        if request.one_thread_per_core:
            return len(whole)
        if not request.full_pcpus:
            return len(free & _cpus_of(cores))
        loose = [len(c.cpus & free) for c in cores if c not in whole]
        return len(_cpus_of(whole)) + max(loose, default=0)

    if request.numa_exclusive:
        nodes = [n for n in nodes if n.cpus & free and n.cpus - reserved <= free]
    if request.numa_binding:
        return any(room([n.id]) >= request.count for n in nodes)
    return room([n.id for n in nodes]) >= request.count


def _cpus_of(cores: list[Core]) -> frozenset[int]:
    return frozenset(cpu for core in cores for cpu in core.cpus)


def check(
    topology: Topology,
    free: frozenset[int],
    reserved: frozenset[int],
    request: CpuRequest,
    result: CpuAllocation,
) -> None:
    assert result.cpus, "never an empty set"
    assert result.cpus <= free and result.idle_siblings <= free
    assert not result.cpus & result.idle_siblings
    assert result.mems == {topology.node_of(cpu) for cpu in result.cpus}
    assert not result.mems & request.avoid_nodes
    if request.numa_binding:
        assert len(result.mems) == 1
    touched = {topology.core_of(cpu).id for cpu in result.cpus}
    if request.numa_exclusive:
        assert len(result.cpus) >= request.count
        node_free = free & frozenset().union(*(topology.node(n).cpus for n in result.mems))
        assert result.taken == node_free, "exclusive takes all free CPUs of its nodes"
        for node in result.mems:
            assert topology.node(node).cpus - reserved <= free, "the node was in use"
    else:
        assert len(result.cpus) == request.count
    if request.one_thread_per_core:
        for core_id in touched:
            core = topology.core(core_id)
            assert len(core.cpus & result.cpus) == 1
            assert core.cpus & free <= result.taken
            if not request.numa_exclusive:
                assert core.cpus <= free, "the idle sibling must have been free"
    elif not request.numa_exclusive:
        if request.full_pcpus:
            split = [c for c in touched if not topology.core(c).cpus <= result.cpus]
            assert len(split) <= 1, f"more than one split core: {split}"
            uniform_smt = all(len(core.cpus) == 2 for core in topology.cores)
            if uniform_smt and request.count % 2 == 0:
                assert not split
        if not (request.full_pcpus and request.round_up_to_whole_cores):
            assert not result.idle_siblings


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=machines())
def test_random_request_sequences(data: st.DataObject, shape: MachineShape) -> None:
    topology = shape.expected_topology()
    online = sorted(topology.online_cpus)
    reserved = frozenset(data.draw(st.sets(st.sampled_from(online), max_size=3)))
    free = free_cpus(topology, reserved, [])
    start = free
    node_ids = [node.id for node in topology.nodes]
    held: list[CpuAllocation] = []
    for request in data.draw(st.lists(requests(node_ids), min_size=1, max_size=8)):
        expected_to_fit = feasible(topology, free, reserved, request)
        try:
            result = allocate_cpus(topology, free, request, reserved=reserved)
        except AllocationError as error:
            assert not expected_to_fit, f"{request} should fit: {error}"
            assert f"cannot allocate {request.count} CPU" in str(error)
            continue
        assert expected_to_fit, f"{request} should not fit but got {result}"
        check(topology, free, reserved, request, result)
        again = allocate_cpus(
            topology, frozenset(sorted(free, reverse=True)), request, reserved=reserved
        )
        assert again == result, "same inputs, same output"
        for other in held:
            assert not other.taken & result.taken, "a CPU was handed out twice"
        held.append(result)
        free -= result.taken
    for result in data.draw(st.permutations(held)):
        free = release(free, result)
    assert free == start


def test_hosts_with_many_nodes_choose_node_sets_greedily() -> None:
    # 32 single-CPU nodes: comparing every 4-node set would mean 35960 candidates
    many = MachineShape(packages=2, nodes_per_die=16, cores_per_l3=1).expected_topology()
    result = allocate_cpus(many, many.online_cpus, CpuRequest(4))
    assert result.cpus == {0, 1, 2, 3}
    assert result.mems == {0, 1, 2, 3}
    exclusive = allocate_cpus(many, many.online_cpus - {0}, CpuRequest(5, numa_exclusive=True))
    assert exclusive.mems == {1, 2, 3, 4, 5}
