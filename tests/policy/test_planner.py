"""The node planner: pool rules by example, and its invariants over random hosts and pods."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nri_plugin.policy.numa_reclaim import reclaimable_by_numa
from nri_plugin.policy.planner import NodePlan, plan_node
from nri_plugin.policy.workload import (
    RECLAIMED_SHARES,
    SHARED,
    PlannerConfig,
    PlannerConfigError,
    UsageSample,
    Workload,
)
from qos_model.topology import Topology
from tests.builders import GiB
from tests.policy.planning import Spec, check_invariants, machines, specs_strategy, workload
from tests.policy.sysfs_builder import MachineShape


def host(cores: int = 8, threads: int = 1, nodes: int = 1) -> Topology:
    return MachineShape(
        nodes_per_die=nodes, cores_per_l3=cores // nodes, threads_per_core=threads
    ).expected_topology()


def plan_of(topology: Topology, specs: Sequence[Spec], **config: object) -> NodePlan:
    wl = [workload(s, i) for i, s in enumerate(specs)]
    return plan_node(topology, PlannerConfig(**config), wl)  # type: ignore[arg-type]


# --- the rules, by example ---------------------------------------------------------------


def test_dedicated_shared_reclaimed_and_system_on_an_8_cpu_host() -> None:
    topo = host(8)
    p = plan_of(
        topo,
        [
            Spec("web", "shared_cores", 1500),
            Spec("db", "dedicated_cores", 2000),
            Spec("batch", "reclaimed_cores", 500),
            Spec("agent", "system_cores", 100),
        ],
        reserved_cpus=frozenset({0}),
    )
    c = p.containers
    assert c["agent"].cpus.value == {0} and c["agent"].pool == "system"
    assert len(c["db"].cpus.value) == 2 and not c["db"].cpus.value & {0}
    rest = frozenset(range(8)) - {0} - c["db"].cpus.value
    # demand 1500m + 20% headroom -> 2 shared CPUs; the other 3 are reclaimed (from the top)
    assert p.pools.shared | p.pools.reclaimed == rest
    assert len(p.pools.shared) == 2 and len(p.pools.reclaimed) == 3
    assert min(p.pools.reclaimed) > max(p.pools.shared)
    assert c["batch"].cpu_shares.value == RECLAIMED_SHARES
    assert c["web"].cpu_shares.value is None
    assert c["batch"].oom_score_adj.value > c["web"].oom_score_adj.value
    assert c["web"].oom_score_adj.value > c["db"].oom_score_adj.value
    assert c["db"].oom_score_adj.value > c["agent"].oom_score_adj.value
    for plan in c.values():
        assert all(reason for reason in plan.reasons().values())


def test_usage_above_requests_shrinks_the_reclaimed_pool() -> None:
    topo = host(8)
    specs = [Spec("web", "shared_cores", 1000), Spec("batch", "reclaimed_cores", 100)]
    wl = [workload(s, i) for i, s in enumerate(specs)]
    quiet = plan_node(topo, PlannerConfig(), wl)
    busy = plan_node(topo, PlannerConfig(), wl, usage=UsageSample(online_cores=4.0))
    assert len(quiet.pools.reclaimed) == 6  # 1000m requested + 20% -> 2 CPUs online
    # 4 cores measured + 20% headroom = 4.8 -> 5 CPUs online, 3 reclaimed
    assert len(busy.pools.reclaimed) == 3 and len(busy.pools.shared) == 5
    overloaded = plan_node(topo, PlannerConfig(), wl, usage=UsageSample(online_cores=20.0))
    assert len(overloaded.pools.reclaimed) == 1  # the floor, still apart from shared
    assert len(overloaded.pools.shared) == 7
    # on a host too small for both, the floor overlaps the shared pool instead
    tiny = plan_node(host(1), PlannerConfig(), wl, usage=UsageSample(online_cores=20.0))
    assert tiny.pools.reclaimed == tiny.pools.shared == {0}


def test_overlap_mode_keeps_every_cpu_in_the_shared_pool() -> None:
    p = plan_of(
        host(8),
        [Spec("web", "shared_cores", 1000), Spec("b", "reclaimed_cores")],
        reclaimed_overlap_shared=True,
    )
    assert p.pools.shared == frozenset(range(8))
    assert p.pools.reclaimed < p.pools.shared and len(p.pools.reclaimed) == 6


def test_without_reclaimed_containers_the_shared_pool_keeps_the_idle_cpus() -> None:
    p = plan_of(host(8), [Spec("web", "shared_cores", 1000)])
    assert p.pools.shared == frozenset(range(8))
    assert len(p.pools.reclaimed) == 6  # still reported as reclaimable


def test_dedicated_that_would_starve_everyone_else_falls_back_to_shared() -> None:
    p = plan_of(host(4), [Spec("big", "dedicated_cores", 4000), Spec("web", "shared_cores")])
    assert p.containers["big"].pool == SHARED
    assert "would leave 0 CPU(s)" in p.containers["big"].cpus.reason
    assert [w.container_id for w in p.warnings] == ["big"]


def test_numa_binding_and_exclusive_on_a_two_node_host() -> None:
    topo = host(8, nodes=2)
    p = plan_of(
        topo,
        [
            Spec("ex", "dedicated_cores", 2000, binding=True, exclusive=True),
            Spec("bound", "shared_cores", 500, binding=True),
            Spec("free", "shared_cores", 500),
        ],
    )
    ex = p.containers["ex"]
    (node,) = ex.mems.value or (None,)
    assert ex.cpus.value == topo.node(node).cpus  # a whole node
    bound = p.containers["bound"]
    assert bound.mems.value is not None and len(bound.mems.value) == 1
    assert bound.cpus.value <= topo.node(next(iter(bound.mems.value))).cpus
    assert p.containers["free"].mems.value is None


def test_numa_share_false_keeps_other_pods_off_the_node() -> None:
    topo = host(8, nodes=2)
    p = plan_of(
        topo,
        [
            Spec("loner", "dedicated_cores", 1000, binding=True, share=False),
            Spec("other", "dedicated_cores", 1000, binding=True),
        ],
    )
    assert p.containers["loner"].mems.value != p.containers["other"].mems.value


def test_named_pool_is_carved_from_the_shared_pool() -> None:
    p = plan_of(host(8), [Spec("a", "shared_cores", 1500, pool="batch"), Spec("w", "shared_cores")])
    assert p.containers["a"].pool == "shared:batch"
    assert len(p.pools.named["batch"]) == 2
    assert not p.pools.named["batch"] & p.pools.shared


def test_reserved_cpus_must_exist() -> None:
    with pytest.raises(PlannerConfigError, match="reserved_cpus 9"):
        PlannerConfig(reserved_cpus=frozenset({9})).check(host(8))


def test_numa_reclaim_report() -> None:
    topo = host(8, nodes=2)
    specs = [Spec("web", "shared_cores", 1000, memory=GiB), Spec("b", "reclaimed_cores")]
    wl = [workload(s, i) for i, s in enumerate(specs)]
    plan = plan_node(topo, PlannerConfig(), wl)
    report = reclaimable_by_numa(topo, plan, wl)
    assert set(report) == {0, 1}
    assert sum(r.millicores for r in report.values()) == 1000 * len(plan.pools.reclaimed)
    for node, r in report.items():
        size = topo.node(node).memory_bytes or 0
        assert r.memory_bytes == size - GiB // 2  # the unbound 1 GiB limit spread evenly
        assert r.cpus == plan.pools.reclaimed & topo.node(node).cpus


# --- invariants over random hosts and pod sets -------------------------------------------


def _named(specs: list[Spec]) -> list[Spec]:
    return [replace(s, cid=f"c{i:02d}") for i, s in enumerate(specs)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=machines(), specs=specs_strategy, reserve=st.integers(0, 2), seed=st.integers(0, 9))
def test_invariants_determinism_and_restart(
    shape: MachineShape, specs: list[Spec], reserve: int, seed: int
) -> None:
    topo = shape.expected_topology()
    online = sorted(topo.online_cpus - topo.isolated_cpus)
    reserved = frozenset(online[:reserve]) if len(online) > reserve + 1 else frozenset()
    config = PlannerConfig(reserved_cpus=reserved)
    wl = [workload(s, i) for i, s in enumerate(_named(specs))]
    plan = plan_node(topo, config, wl)
    check_invariants(topo, config, plan)

    # same inputs, in any order -> the same plan
    shuffled = list(wl)
    random.Random(seed).shuffle(shuffled)
    assert plan_node(topo, config, shuffled) == plan

    # a restart rebuilds from what the runtime reports: nothing moves
    reported = [replace(w, current_cpus=plan.containers[w.container_id].cpus.value) for w in wl]
    rebuilt = plan_node(topo, config, reported, previous=None)
    for cid, p in plan.containers.items():
        assert rebuilt.containers[cid].cpus.value == p.cpus.value, cid
        assert rebuilt.containers[cid].mems.value == p.mems.value, cid


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=machines(), specs=specs_strategy)
def test_arrivals_never_move_a_running_dedicated_container(
    shape: MachineShape, specs: list[Spec]
) -> None:
    topo = shape.expected_topology()
    config = PlannerConfig()
    wl = [workload(s, i) for i, s in enumerate(_named(specs))]
    plan: NodePlan | None = None
    for n in range(1, len(wl) + 1):
        new = plan_node(topo, config, wl[:n], previous=plan.pools.dedicated if plan else None)
        check_invariants(topo, config, new)
        if plan is not None:
            for cid, allocation in plan.pools.dedicated.items():
                assert new.pools.dedicated[cid] == allocation, f"{cid} moved"
        plan = new


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=machines(),
    specs=specs_strategy,
    removals=st.lists(st.integers(0, 11), max_size=6),
)
def test_restart_after_a_history_of_arrivals_and_departures_moves_nothing(
    shape: MachineShape, specs: list[Spec], removals: list[int]
) -> None:
    """After containers come and go, the live assignment is no longer what a fresh
    allocation in creation order would give; a restart must still reproduce it."""
    topo = shape.expected_topology()
    config = PlannerConfig()
    named = _named(specs)
    live: list[Workload] = []
    plan: NodePlan | None = None
    queue = list(removals)
    for i, spec in enumerate(named):
        live.append(workload(spec, i))
        if queue and queue[0] < len(live) and len(live) > 1:
            live.pop(queue.pop(0) % len(live))
        plan = plan_node(topo, config, live, previous=plan.pools.dedicated if plan else None)
        check_invariants(topo, config, plan)
    if plan is None:
        return
    reported = [replace(w, current_cpus=plan.containers[w.container_id].cpus.value) for w in live]
    rebuilt = plan_node(topo, config, reported, previous=None)
    assert rebuilt.pools.dedicated.keys() == plan.pools.dedicated.keys()
    for cid, p in plan.containers.items():
        assert rebuilt.containers[cid].cpus.value == p.cpus.value, cid
