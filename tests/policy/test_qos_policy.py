"""The stateful QoS policy: events in, adjustments and batched updates out."""

from __future__ import annotations

import json
from dataclasses import replace

from nri_plugin.policy.planner import PlannerConfig, UsageSample
from nri_plugin.policy.qos_policy import ORIGINAL_ANNOTATION, QosPolicy, QosPolicyConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
)
from qos_model.cpulist import format_cpu_list, parse_cpu_list
from tests.policy.sysfs_builder import MachineShape

QOS = "katalyst.kubewharf.io/qos_level"


def pod(name: str, qos: str | None = None, **ann: str) -> Pod:
    annotations = dict(ann)
    if qos:
        annotations[QOS] = qos
    return Pod(id=f"pod-{name}", name=name, namespace="default", uid=name, annotations=annotations)


def ctr(name: str, millicores: int = 1000, oom: int = 500, created: int = 0) -> Container:
    return Container(
        id=f"ctr-{name}",
        pod_id=f"pod-{name}",
        name=name,
        state=ContainerState.CREATED,
        resources=Resources(
            cpu=CpuResources(
                shares=max(2, millicores * 1024 // 1000), quota=millicores * 100, period=100_000
            ),
            memory=MemoryResources(limit=256 << 20),
        ),
        oom_score_adj=oom,
        cgroups_path=f"/kubepods/pod{name}/ctr-{name}",
        created_at=created,
    )


class FakeHost:
    def __init__(self) -> None:
        self.writes: list[tuple[str, int]] = []

    def set_oom_score_adj(self, container: Container, value: int) -> str:
        self.writes.append((container.id, value))
        return f"set {value}"


def policy(cpus: int = 8, runtime: str = "v2.3.4", **planner: object) -> tuple[QosPolicy, FakeHost]:
    topo = MachineShape(cores_per_l3=cpus).expected_topology()
    host = FakeHost()
    p = QosPolicy(topo, QosPolicyConfig(planner=PlannerConfig(**planner)), host)  # type: ignore[arg-type]
    nri = "v0.12.0" if runtime.startswith("v2") else ""
    p.configure(infer_runtime("containerd", runtime, nri, has_timeouts=bool(nri)), "")
    p.synchronize([], [])
    return p, host


def as_running(
    policy_: QosPolicy,
    container: Container,
    adjust_cpus: str,
    adjust_mems: str,
    oom: int | None,
    annotations: dict[str, str],
) -> Container:
    """The container as the runtime reports it after applying our adjustment."""
    res = container.resources
    assert res is not None and res.cpu is not None
    cpu = replace(res.cpu, cpus=adjust_cpus, mems=adjust_mems)
    return replace(
        container,
        state=ContainerState.RUNNING,
        resources=replace(res, cpu=cpu),
        oom_score_adj=oom if oom is not None else container.oom_score_adj,
        annotations={**container.annotations, **annotations},
    )


def test_create_returns_the_plan_as_adjustment_and_moves_the_shared_pool_later() -> None:
    p, _ = policy()
    web_pod, web = pod("web", "shared_cores"), ctr("web", 1000)
    result = p.create_container(web_pod, web)
    adj = result.adjustment
    assert adj.resources is not None and adj.resources.cpu is not None
    shared_before = parse_cpu_list(adj.resources.cpu.cpus)
    assert adj.oom_score_adj is not None  # containerd 2.x applies it
    assert json.loads(adj.annotations[ORIGINAL_ANNOTATION]) == {
        "cpu_shares": 1024,
        "oom_score_adj": 500,
    }
    assert not result.updates and not p.take_deferred_updates()  # first container

    db = p.create_container(pod("db", "dedicated_cores"), ctr("db", 2000))
    assert db.adjustment.resources is not None and db.adjustment.resources.cpu is not None
    db_cpus = parse_cpu_list(db.adjustment.resources.cpu.cpus)
    assert len(db_cpus) == 2 and db_cpus <= shared_before
    # the shared container must leave the dedicated CPUs: one batched deferred update
    deferred = p.take_deferred_updates()
    assert [u.container_id for u in deferred] == ["ctr-web"]
    cpu = deferred[0].resources.cpu
    assert cpu is not None and not parse_cpu_list(cpu.cpus) & db_cpus
    assert not db.updates  # never in the event reply itself

    # the dedicated container goes away: the shared pool grows back
    p.stop_container(pod("db", "dedicated_cores"), ctr("db", 2000))
    grown = p.take_deferred_updates()
    assert [u.container_id for u in grown] == ["ctr-web"]
    assert grown[0].resources.cpu is not None
    assert parse_cpu_list(grown[0].resources.cpu.cpus) == shared_before


def test_a_restart_that_finds_its_own_assignment_changes_nothing() -> None:
    p, _ = policy(reserved_cpus=frozenset({0}))
    made = [
        (pod("web", "shared_cores"), ctr("web", 1500, created=1)),
        (pod("db", "dedicated_cores"), ctr("db", 2000, created=2)),
        (pod("batch", "reclaimed_cores"), ctr("batch", 500, oom=1000, created=3)),
        (pod("agent", "system_cores"), ctr("agent", 100, created=4)),
        (pod("db2", "dedicated_cores"), ctr("db2", 1000, created=5)),
    ]
    for pd, c in made:
        p.create_container(pd, c)
    p.stop_container(made[1][0], made[1][1])  # db leaves: db2 keeps its CPUs, others move
    p.take_deferred_updates()
    running = []
    for _pd, c in made:
        if c.id == "ctr-db":
            continue
        plan = p.plan.containers[c.id] if p.plan else None
        assert plan is not None
        mems = plan.mems.value
        running.append(
            as_running(
                p,
                c,
                format_cpu_list(plan.cpus.value),
                format_cpu_list(mems) if mems else "",
                plan.oom_score_adj.value,
                {
                    ORIGINAL_ANNOTATION: json.dumps(
                        {"oom_score_adj": c.oom_score_adj, "cpu_shares": c.resources.cpu.shares}
                    )
                },  # type: ignore[union-attr]
            )
        )
    before = {
        cid: (pl.cpus.value, pl.mems.value, pl.oom_score_adj.value)
        for cid, pl in (p.plan.containers.items() if p.plan else [])
    }

    fresh, host = policy(reserved_cpus=frozenset({0}))
    updates = fresh.synchronize([pd for pd, _ in made], running)
    assert updates == []
    assert fresh.plan is not None
    after = {
        cid: (pl.cpus.value, pl.mems.value, pl.oom_score_adj.value)
        for cid, pl in fresh.plan.containers.items()
    }
    assert after == before
    fresh.after_reply()
    assert host.writes == []  # oom_score_adj already right everywhere


def test_old_runtime_gets_oom_score_adj_written_to_the_processes() -> None:
    p, host = policy(runtime="v1.7.13")
    # a Burstable pod (kubelet: 500) annotated reclaimed: its band wants a higher value
    batch_pod, batch = pod("batch", "reclaimed_cores"), ctr("batch", 500, oom=500)
    result = p.create_container(batch_pod, batch)
    assert result.adjustment.oom_score_adj is None  # NRI v0.4 would drop it
    p.after_reply()
    assert host.writes == []
    started = replace(batch, state=ContainerState.RUNNING, pid=4242)
    p.post_start_container(batch_pod, started)
    p.after_reply()
    planned = p.plan.containers[batch.id].oom_score_adj.value if p.plan else None
    assert planned is not None and planned > 500
    assert host.writes == [(batch.id, planned)]


def test_update_keeps_our_cpus_and_resizes_dedicated() -> None:
    p, _ = policy()
    db_pod, db = pod("db", "dedicated_cores"), ctr("db", 2000)
    p.create_container(db_pod, db)
    bigger = Resources(cpu=CpuResources(shares=4096, quota=400_000, period=100_000, cpus="0-7"))
    (update,) = p.update_container(db_pod, db, bigger)
    assert update.container_id == db.id and update.resources.cpu is not None
    assert len(parse_cpu_list(update.resources.cpu.cpus)) == 4  # not the kubelet's 0-7


def test_bad_annotation_is_recorded_once_and_the_container_still_runs() -> None:
    p, _ = policy()
    bad_pod = pod("x", "gold_cores")
    for _ in range(3):
        result = p.create_container(bad_pod, ctr("x"))
        assert result.adjustment.resources is not None
    events = [e for e in p.decisions.snapshot() if e.kind == "classification"]
    assert len(events) == 1 and "gold_cores" in events[0].message


def test_rising_online_usage_shrinks_the_reclaimed_pool_with_batched_updates() -> None:
    p, _ = policy()
    p.create_container(pod("web", "shared_cores"), ctr("web", 1000))
    p.create_container(pod("batch", "reclaimed_cores"), ctr("batch", 500, oom=1000))
    p.take_deferred_updates()
    assert p.plan is not None and len(p.plan.pools.reclaimed) == 6
    updates = p.rebalance(UsageSample(online_cores=5.0))
    assert {u.container_id for u in updates} == {"ctr-web", "ctr-batch"}
    assert len(p.plan.pools.reclaimed) == 2  # 5 cores + 20% -> 6 online CPUs
    assert p.rebalance(UsageSample(online_cores=5.0)) == []  # nothing moved: nothing sent


def test_numa_reclaim_report_follows_the_pools() -> None:
    p, _ = policy()
    p.create_container(pod("batch", "reclaimed_cores"), ctr("batch", 500, oom=1000))
    report = p.reclaimable()
    assert report[0].millicores == 1000 * len(p.plan.pools.reclaimed)  # type: ignore[union-attr]


def test_plan_diff_agrees_with_the_nri_rendering() -> None:
    """same_resources compares values; it must say "same" exactly when the resources sent
    to the runtime would be identical."""
    p, _ = policy()
    p.create_container(pod("web", "shared_cores"), ctr("web"))
    p.create_container(pod("b", "reclaimed_cores"), ctr("b", 500, oom=1000))
    assert p.plan is not None
    plans = list(p.plan.containers.values())
    for a in plans:
        for b in plans:
            assert a.same_resources(b) == (a.cpu_resources() == b.cpu_resources())
    web = p.plan.containers["ctr-web"]
    moved = replace(web, cpus=replace(web.cpus, value=frozenset({0})))
    assert not web.same_resources(moved)
