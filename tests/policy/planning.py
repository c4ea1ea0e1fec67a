"""Machines and workloads for the allocator's and the planner's tests.

Shared by test_cpuallocator.py, test_planner.py and test_incremental.py: random machine
shapes (hypothesis), containers described the way a user annotates them (`Spec`) and
turned into the planner's `Workload` with the kubelet's values (tests.builders), random
pod sets, and the invariants every node plan must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import strategies as st

from nri_plugin.policy.planner import NodePlan
from nri_plugin.policy.qos import QosClass, QosConfig, classify
from nri_plugin.policy.workload import PlannerConfig, Workload
from qos_model.containers import Container, MemoryResources, Pod, Resources
from qos_model.cpulist import parse_cpu_list
from qos_model.topology import Topology
from tests.builders import GiB, kubelet_cpu
from tests.builders import annotations as katalyst_annotations
from tests.policy.sysfs_builder import MachineShape

# --- machines ----------------------------------------------------------------------------


@st.composite
def machines(draw: st.DrawFn) -> MachineShape:
    shape = draw(
        st.builds(
            MachineShape,
            packages=st.integers(1, 2),
            nodes_per_die=st.integers(1, 3),
            l3_per_node=st.integers(1, 3),
            l3_spans_die=st.booleans(),
            cores_per_l3=st.integers(1, 4),
            threads_per_core=st.integers(1, 2),
            sibling_layout=st.sampled_from(["split", "adjacent"]),
            memory_only_nodes=st.integers(0, 1),
        )
    )
    everything = sorted(shape.all_cpus)
    offline = (
        draw(st.sets(st.sampled_from(everything[1:]), max_size=4)) if everything[1:] else set()
    )
    return replace(shape, offline=frozenset(offline))


# --- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A container to plan, described the way a user would annotate it."""

    cid: str
    qos: str
    millicores: int = 1000
    pod: str = ""
    binding: bool = False
    exclusive: bool = False
    share: bool = True
    pool: str = ""
    memory: int = GiB


def workload(spec: Spec, created_at: int = 0, current: frozenset[int] = frozenset()) -> Workload:
    """The planner's view of a Guaranteed container (request = limit = `spec.millicores`)."""
    mem: dict[str, str] = {}
    cpu: dict[str, str] = {}
    if spec.binding:
        mem["numa_binding"] = "true"
    if spec.exclusive:
        mem["numa_exclusive"] = "true"
    if not spec.share:
        cpu["numa_share"] = "false"
    if spec.pool:
        cpu["cpuset_pool"] = spec.pool
    pod_id = spec.pod or f"pod-{spec.cid}"
    pod = Pod(
        id=pod_id,
        name=pod_id,
        namespace="default",
        annotations=katalyst_annotations(spec.qos, cpu=cpu, memory=mem),
    )
    ctr = Container(
        id=spec.cid,
        pod_id=pod_id,
        name=spec.cid,
        resources=Resources(
            cpu=kubelet_cpu(spec.millicores),
            memory=MemoryResources(limit=spec.memory),
        ),
        oom_score_adj=-997,
    )
    return Workload(
        container_id=spec.cid,
        pod_id=pod_id,
        name=f"default/{pod_id}/{spec.cid}",
        classification=classify(pod, ctr, QosConfig()),
        created_at=created_at,
        current_cpus=current,
        memory_limit=spec.memory,
    )


specs_strategy = st.lists(
    st.builds(
        Spec,
        cid=st.just(""),
        qos=st.sampled_from(["dedicated_cores", "shared_cores", "reclaimed_cores", "system_cores"]),
        millicores=st.sampled_from([100, 500, 1000, 1500, 2000, 4000]),
        pod=st.sampled_from(["", "p1", "p2"]),
        binding=st.booleans(),
        exclusive=st.integers(0, 4).map(lambda n: n == 0),
        share=st.integers(0, 3).map(lambda n: n != 0),
        pool=st.sampled_from(["", "", "batch"]),
    ),
    max_size=12,
)


# --- what every plan must hold -----------------------------------------------------------


def check_invariants(topo: Topology, config: PlannerConfig, plan: NodePlan) -> None:
    pools = plan.pools
    held = [a.taken for a in pools.dedicated.values()]
    seen: set[int] = set()
    for cpus in held:
        assert not cpus & seen, "a CPU in two exclusive sets"
        seen |= cpus
    assert not seen & pools.system
    others = pools.shared | pools.reclaimed | frozenset().union(*pools.named.values())
    assert not seen & others, "dedicated overlaps a shared or reclaimed pool"
    assert len(pools.shared) >= config.min_shared_cpus
    for cid, p in plan.containers.items():
        assert p.cpus.value, f"{cid} got an empty cpuset"
        assert p.cpus.value <= topo.online_cpus
        if p.pool == "dedicated":
            assert p.cpus.value == pools.dedicated[cid].cpus
        if p.mems.value is not None:
            nodes = {topo.node_of(cpu) for cpu in p.cpus.value}
            assert nodes <= p.mems.value, "memory not where the CPUs are"
            if p.pool != "dedicated" or p.qos_class is not QosClass.DEDICATED_CORES:
                assert len(p.mems.value) == 1
        assert parse_cpu_list(p.cpu_resources().cpus) == p.cpus.value
