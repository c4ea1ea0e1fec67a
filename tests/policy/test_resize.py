"""In-place resize: a CRI update that changes a container's CPU size or the kubelet's values.

A dedicated container grows or shrinks its exclusive set keeping the CPUs it has (its own
NUMA node first); when the topology does not allow it, it keeps its old set and the plan
and a note say why. Shared and reclaimed containers keep the kubelet's weight and quota,
and our reply to the update carries only the cpuset and memory nodes, so what the kubelet
reads back is what it asked for (kubernetes#130598).
"""

from __future__ import annotations

from dataclasses import replace

from nri_plugin.policy.dedicated import place_dedicated
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import Intents, Severity
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
)
from qos_model.cpulist import parse_cpu_list
from tests.builders import MiB, container, kubelet_cpu, pod
from tests.policy.sysfs_builder import MachineShape

# 2 NUMA nodes x 4 cores x 2 threads: node 0 = 0-3,8-11, node 1 = 4-7,12-15
TWO_NODES = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)
NODE0 = frozenset({0, 1, 2, 3, 8, 9, 10, 11})


def engine(shape: MachineShape = TWO_NODES, **planner: object) -> Engine:
    e = Engine(shape.expected_topology(), EngineConfig(planner=PlannerConfig(**planner)))  # type: ignore[arg-type]
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    e.synchronize([], [])
    return e


def resize_to(millicores: int) -> Resources:
    """What the kubelet sends for an in-place resize of a Guaranteed container."""
    return Resources(cpu=kubelet_cpu(millicores), memory=MemoryResources(limit=256 * MiB))


def cpus_of(e: Engine, cid: str) -> frozenset[int]:
    return e.plan.containers[cid].cpus.value


def test_growing_keeps_the_cpus_it_has_and_adds_on_its_own_numa_node() -> None:
    e = engine()
    db_pod, db = (
        pod("db", "dedicated_cores", memory={"numa_binding": "true"}),
        container("db", 2000),
    )
    e.container_created(db_pod, db)
    before = cpus_of(e, db.id)
    step = e.container_updated(db_pod, db, resize_to(4000))
    after = cpus_of(e, db.id)
    assert before < after and len(after) == 4 and after <= NODE0
    plan = e.plan.containers[db.id]
    assert "resized in place from 2 to 4 CPUs" in plan.cpus.reason
    assert plan.mems.value == frozenset({0})
    (reply,) = step.intents.reply_updates
    assert reply.resources.cpu is not None and parse_cpu_list(reply.resources.cpu.cpus) == after


def test_shrinking_keeps_a_subset_and_gives_the_rest_back_to_the_shared_pool() -> None:
    e = engine()
    web_pod, web = pod("web", "shared_cores"), container("web", 500)
    db_pod, db = pod("db", "dedicated_cores"), container("db", 6000)
    e.container_created(web_pod, web)
    e.container_created(db_pod, db)
    before = cpus_of(e, db.id)
    step = e.container_updated(db_pod, db, resize_to(2000))
    after = cpus_of(e, db.id)
    assert after < before and len(after) == 2
    assert "released" in e.plan.containers[db.id].cpus.reason
    # the released CPUs go to the shared container, after the reply
    (moved,) = [u for u in step.intents.all_updates() if u.container_id == web.id]
    assert moved.resources.cpu is not None
    assert before - after <= parse_cpu_list(moved.resources.cpu.cpus)


def test_growth_spills_to_another_node_only_when_not_numa_bound() -> None:
    e = engine()
    first_pod, first = pod("a", "dedicated_cores"), container("a", 6000)
    e.container_created(first_pod, first)
    b_pod, b = pod("b", "dedicated_cores"), container("b", 2000)
    e.container_created(b_pod, b)
    held = cpus_of(e, b.id)
    e.container_updated(b_pod, b, resize_to(6000))
    grown = cpus_of(e, b.id)
    assert held < grown and len(grown) == 6
    nodes = {e.topology.node_of(c) for c in grown}
    assert len(nodes) == 2  # its own node had no room for 4 more
    assert "beyond its NUMA node(s)" in e.plan.containers[b.id].cpus.reason


def test_a_resize_that_does_not_fit_keeps_the_old_set_and_says_why() -> None:
    e = engine()
    db_pod = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    db = container("db", 4000)
    e.container_created(db_pod, db)
    other_pod, other = pod("other", "dedicated_cores"), container("other", 4000)
    e.container_created(other_pod, other)
    held = cpus_of(e, db.id)
    step = e.container_updated(db_pod, db, resize_to(10000))
    assert cpus_of(e, db.id) == held  # not moved, not refused to the shared pool
    plan = e.plan.containers[db.id]
    assert plan.pool == "dedicated"
    assert plan.cpus.reason.startswith("dedicated_cores: asked for 10 CPU(s) but keeps its 4")
    warnings = [n for n in step.intents.notes if n.severity is Severity.WARNING]
    assert any("keeps its 4" in n.message for n in warnings)
    # the note is given once, the plan stays as it is on the next event
    again = e.container_updated(db_pod, db, resize_to(10000))
    assert not [n for n in again.intents.notes if "keeps its 4" in n.message]
    assert cpus_of(e, db.id) == held


def test_the_kept_set_grows_when_room_appears() -> None:
    e = engine(min_shared_cpus=2)
    db_pod, db = pod("db", "dedicated_cores"), container("db", 4000)
    big_pod, big = pod("big", "dedicated_cores"), container("big", 8000)
    e.container_created(db_pod, db)
    e.container_created(big_pod, big)
    held = cpus_of(e, db.id)
    e.container_updated(db_pod, db, resize_to(8000))
    assert cpus_of(e, db.id) == held  # 4 free CPUs minus min_shared_cpus: no room
    assert "min_shared_cpus" in e.plan.containers[db.id].cpus.reason
    assert "no room to add 4" in e.plan.containers[db.id].cpus.reason
    e.container_stopped(big_pod, big)
    grown = cpus_of(e, db.id)
    assert held < grown and len(grown) == 8


def test_a_numa_exclusive_container_is_not_moved_by_a_resize() -> None:
    e = engine()
    memory = {"numa_binding": "true", "numa_exclusive": "true"}
    db_pod, db = pod("db", "dedicated_cores", memory=memory), container("db", 2000)
    e.container_created(db_pod, db)
    held = cpus_of(e, db.id)
    assert len(held) == 8  # the whole node
    e.container_updated(db_pod, db, resize_to(6000))  # still fits its node: nothing to do
    assert cpus_of(e, db.id) == held
    e.container_updated(db_pod, db, resize_to(12000))
    assert cpus_of(e, db.id) == held
    assert "not resized in place" in e.plan.containers[db.id].cpus.reason


def test_the_dedicated_pass_is_a_fixpoint_after_a_resize_that_did_not_fit() -> None:
    e = engine()
    for name, size in (("a", 4000), ("b", 8000)):
        e.container_created(pod(name, "dedicated_cores"), container(name, size))
    e.container_updated(pod("a", "dedicated_cores"), container("a", 4000), resize_to(8000))
    dedicated = [
        w for w in e.planner.workloads() if w.classification.qos_class == "dedicated_cores"
    ]
    ordered = sorted(dedicated, key=lambda w: w.order)
    held = e.planner.dedicated_allocations
    again = place_dedicated(e.topology, e.config.planner, ordered, held)
    assert again.allocations == held


def test_a_shared_resize_keeps_the_kubelets_values_and_resizes_the_pool() -> None:
    e = engine()
    web_pod, web = pod("web", "shared_cores"), container("web", 1000)
    batch_pod = pod("batch", "reclaimed_cores")
    e.container_created(batch_pod, container("batch", 0, oom=1000))
    e.container_created(web_pod, web)
    shared_before = e.plan.pools.shared
    step = e.container_updated(web_pod, web, resize_to(6000))
    (reply,) = step.intents.reply_updates
    cpu = reply.resources.cpu
    assert cpu is not None and (cpu.shares, cpu.quota, cpu.period) == (None, None, None)
    assert reply.resources.memory is None  # the kubelet's memory limit stands
    assert len(e.plan.pools.shared) > len(shared_before)  # more online demand


def _reclaimed_batch(e: Engine) -> tuple[Pod, Container, Intents]:
    """A reclaimed_cores container requesting half a CPU (our weight for it: 2), created
    in `e`: its pod, itself, and what the create decided."""
    batch_pod = pod("batch", "reclaimed_cores")
    batch = container("batch", 500, oom=900)
    return batch_pod, batch, e.container_created(batch_pod, batch).intents


def test_a_reclaimed_container_keeps_the_kubelets_weight_once_the_kubelet_resized_it() -> None:
    e = engine()
    batch_pod, batch, _ = _reclaimed_batch(e)
    assert e.plan.containers[batch.id].cpu_shares.value == 2
    # a cpuset-only update (the kubelet's CPU manager) is no resize: our weight stays
    step = e.container_updated(batch_pod, batch, Resources(cpu=CpuResources(cpus="0-15")))
    (reply,) = step.intents.reply_updates
    assert reply.resources.cpu is not None and reply.resources.cpu.shares == 2
    # the kubelet resizes it: from now on the weight is the kubelet's
    step = e.container_updated(batch_pod, batch, resize_to(1000))
    (reply,) = step.intents.reply_updates
    assert reply.resources.cpu is not None and reply.resources.cpu.shares is None
    shares = e.plan.containers[batch.id].cpu_shares
    assert shares.value is None and "kubernetes#130598" in shares.reason
    again = e.container_updated(batch_pod, batch, Resources(cpu=CpuResources(cpus="1")))
    (reply,) = again.intents.reply_updates
    assert reply.resources.cpu is not None and reply.resources.cpu.shares is None


def test_repeating_the_kubelets_own_values_is_not_a_resize() -> None:
    e = engine()
    batch_pod, batch, _ = _reclaimed_batch(e)
    assert batch.resources is not None
    e.container_updated(batch_pod, batch, batch.resources)
    record = e.table.get(batch.id)
    assert record is not None and not record.resized
    assert e.plan.containers[batch.id].cpu_shares.value == 2


def test_a_growth_never_takes_a_cpu_another_resizing_container_holds() -> None:
    """Found by the kubelet-history property test: two 1-CPU containers on the two threads
    of one core, both waiting to grow; the first one's growth must not take the second
    one's thread (it would complete its core) while the second is being resized too."""
    e = engine()
    pods = {name: pod(name, "dedicated_cores") for name in ("a", "b")}
    for name, p in pods.items():
        e.container_created(p, container(name, 1000))
    assert cpus_of(e, "ctr-a") | cpus_of(e, "ctr-b") == frozenset({0, 8})  # one core
    e.container_updated(pods["a"], container("a", 1000), resize_to(2000))
    e.container_updated(pods["b"], container("b", 1000), resize_to(2000))
    assert not cpus_of(e, "ctr-a") & cpus_of(e, "ctr-b")
    for cid in ("ctr-a", "ctr-b"):
        assert "keeps its 1" in e.plan.containers[cid].cpus.reason  # whole cores only


def _after_restart(e: Engine, batch_pod: Pod, batch: Container, created: Intents) -> Engine:
    """A new engine synchronized with `batch` as the runtime reports it then: our
    annotation and oom_score_adj from the create, the CPU weight it has now."""
    assert created.adjustment is not None
    record = e.table.get(batch.id)
    assert record is not None and record.container.resources is not None
    now = record.container.resources
    weight = e.plan.containers[batch.id].cpu_shares.value
    assert now.cpu is not None
    reported = replace(
        batch,
        annotations={**batch.annotations, **created.adjustment.annotations},
        state=ContainerState.RUNNING,
        oom_score_adj=created.adjustment.oom_score_adj,
        resources=replace(now, cpu=replace(now.cpu, shares=weight or now.cpu.shares)),
    )
    restarted = engine()
    restarted.synchronize([batch_pod], [reported])
    return restarted


def test_a_restart_keeps_the_kubelets_weight_of_a_reclaimed_container_it_resized() -> None:
    """After a restart, all that is left of an in-place resize is the weight the kubelet
    set: neither ours nor the original we recorded. It stays the kubelet's, and the
    container's request is the resized one (kubernetes#130598)."""
    e = engine()
    batch_pod, batch, created = _reclaimed_batch(e)
    e.container_updated(batch_pod, batch, resize_to(1000))
    restarted = _after_restart(e, batch_pod, batch, created)
    shares = restarted.plan.containers[batch.id].cpu_shares
    assert shares.value is None and "kubernetes#130598" in shares.reason
    record = restarted.table.get(batch.id)
    assert record is not None and record.resized
    assert record.classification.cpu_request_millicores == 1000
    step = restarted.container_updated(batch_pod, batch, Resources(cpu=CpuResources(cpus="1")))
    (reply,) = step.intents.reply_updates
    assert reply.resources.cpu is not None and reply.resources.cpu.shares is None


def test_a_restart_keeps_our_weight_of_a_reclaimed_container_never_resized() -> None:
    e = engine()
    batch_pod, batch, created = _reclaimed_batch(e)
    restarted = _after_restart(e, batch_pod, batch, created)
    assert restarted.plan.containers[batch.id].cpu_shares.value == 2
    record = restarted.table.get(batch.id)
    assert record is not None and not record.resized
    assert record.classification.cpu_request_millicores == 500  # from the original weight
