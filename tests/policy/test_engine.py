"""The engine: runtime events in, the plan, its diff and typed intents out."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import Phase, SetOomScoreAdj, Severity
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.state import ORIGINAL_ANNOTATION
from nri_plugin.policy.workload import PlannerConfig, UsageSample
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import BulkUpdate, Container, ContainerState, CpuResources, Resources
from qos_model.cpulist import format_cpu_list, parse_cpu_list
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape


def engine(cpus: int = 8, runtime: str = "v2.3.4", **planner: object) -> Engine:
    topo = MachineShape(cores_per_l3=cpus).expected_topology()
    e = Engine(topo, EngineConfig(planner=PlannerConfig(**planner)))  # type: ignore[arg-type]
    nri = "v0.12.0" if runtime.startswith("v2") else ""
    e.connect(infer_runtime("containerd", runtime, nri, has_timeouts=bool(nri)))
    e.synchronize([], [])
    return e


def as_running(e: Engine, ctr: Container, adjustment_annotations: dict[str, str]) -> Container:
    """The container as the runtime reports it after applying our plan."""
    plan = e.plan.containers[ctr.id]
    res = ctr.resources
    assert res is not None and res.cpu is not None
    mems = plan.mems.value
    cpu = replace(
        res.cpu, cpus=format_cpu_list(plan.cpus.value), mems=format_cpu_list(mems) if mems else ""
    )
    return replace(
        ctr,
        state=ContainerState.RUNNING,
        resources=replace(res, cpu=cpu),
        oom_score_adj=plan.oom_score_adj.value,
        annotations={**ctr.annotations, **adjustment_annotations},
    )


def test_a_new_container_gets_its_plan_in_the_adjustment_and_others_move_after_the_reply() -> None:
    e = engine()
    web = e.container_created(pod("web", "shared_cores"), container("web", 1000))
    adj = web.intents.adjustment
    assert adj is not None and adj.resources is not None and adj.resources.cpu is not None
    shared_before = parse_cpu_list(adj.resources.cpu.cpus)
    assert adj.oom_score_adj is not None  # containerd 2.x applies it
    assert json.loads(adj.annotations[ORIGINAL_ANNOTATION]) == {
        "cpu_shares": 1024,
        "oom_score_adj": 500,
    }
    assert not web.intents.updates and not web.intents.reply_updates  # first container

    db = e.container_created(pod("db", "dedicated_cores"), container("db", 2000))
    assert db.intents.adjustment is not None and db.intents.adjustment.resources is not None
    db_cpu = db.intents.adjustment.resources.cpu
    assert db_cpu is not None
    db_cpus = parse_cpu_list(db_cpu.cpus)
    assert len(db_cpus) == 2 and db_cpus <= shared_before
    # the shared container must leave the dedicated CPUs: an update after the reply,
    # never in the reply itself; the diff names the field that moved
    assert [u.container_id for u in db.intents.all_updates()] == ["ctr-web"]
    assert not db.intents.reply_updates
    moved = db.intents.all_updates()[0].resources.cpu
    assert moved is not None and not parse_cpu_list(moved.cpus) & db_cpus
    assert [c.field for c in db.diff["ctr-web"]] == ["cpus"]
    assert any(n.kind == "pool" for n in db.intents.notes)

    # the dedicated container goes away: the shared pool grows back
    gone = e.container_stopped(pod("db", "dedicated_cores"), container("db", 2000))
    assert [u.container_id for u in gone.intents.all_updates()] == ["ctr-web"]
    back = gone.intents.all_updates()[0].resources.cpu
    assert back is not None and parse_cpu_list(back.cpus) == shared_before
    assert "ctr-db" not in gone.plan.containers


def test_a_restart_that_finds_its_own_assignment_changes_nothing() -> None:
    e = engine(reserved_cpus=frozenset({0}))
    made = [
        (pod("web", "shared_cores"), container("web", 1500, created_at=1)),
        (pod("db", "dedicated_cores"), container("db", 2000, created_at=2)),
        (pod("batch", "reclaimed_cores"), container("batch", 500, oom=1000, created_at=3)),
        (pod("agent", "system_cores"), container("agent", 100, created_at=4)),
        (pod("db2", "dedicated_cores"), container("db2", 1000, created_at=5)),
    ]
    annotations = {}
    for pd, c in made:
        step = e.container_created(pd, c)
        assert step.intents.adjustment is not None
        annotations[c.id] = dict(step.intents.adjustment.annotations)
    e.container_stopped(made[1][0], made[1][1])  # db leaves: db2 keeps its CPUs, others move
    running = [as_running(e, c, annotations[c.id]) for _, c in made if c.id != "ctr-db"]
    before = {
        cid: (p.cpus.value, p.mems.value, p.oom_score_adj.value)
        for cid, p in e.plan.containers.items()
    }

    fresh = engine(reserved_cpus=frozenset({0}))
    step = fresh.synchronize([pd for pd, _ in made], running)
    assert step.intents.reply_updates == () and step.intents.updates == ()
    assert step.intents.host == ()  # oom_score_adj already right everywhere
    after = {
        cid: (p.cpus.value, p.mems.value, p.oom_score_adj.value)
        for cid, p in fresh.plan.containers.items()
    }
    assert after == before
    # classified from what the kubelet asked for, not from our adjustment
    batch = fresh.table.get("ctr-batch")
    assert batch is not None and batch.container.oom_score_adj == 1000


def test_synchronize_fixes_what_the_runtime_reports_wrong() -> None:
    e = engine()
    stale = replace(
        container("web", 1000, state=ContainerState.RUNNING, cpus="0", pid=77), oom_score_adj=999
    )
    step = e.synchronize([pod("web", "shared_cores")], [stale])
    assert [u.container_id for u in step.intents.reply_updates] == ["ctr-web"]
    (intent,) = step.intents.host
    assert isinstance(intent, SetOomScoreAdj) and intent.phase is Phase.POST_UPDATE
    assert intent.value == e.plan.containers["ctr-web"].oom_score_adj.value != 999
    assert intent.container.pid == 77 and intent.container.cgroups_path == stale.cgroups_path
    assert intent.reason == e.plan.containers["ctr-web"].oom_score_adj.reason


def test_old_runtime_gets_oom_score_adj_as_a_host_intent_once_the_processes_exist() -> None:
    e = engine(runtime="v1.7.13")
    # a Burstable pod (kubelet: 500) annotated reclaimed: its band wants a higher value
    batch_pod, batch = pod("batch", "reclaimed_cores"), container("batch", 500, oom=500)
    created = e.container_created(batch_pod, batch)
    assert created.intents.adjustment is not None
    assert created.intents.adjustment.oom_score_adj is None  # NRI v0.4 would drop it
    assert created.intents.host == ()
    started = replace(batch, state=ContainerState.RUNNING, pid=4242)
    (intent,) = e.container_started(batch_pod, started).intents.host
    planned = e.plan.containers[batch.id].oom_score_adj.value
    assert planned > 500
    assert isinstance(intent, SetOomScoreAdj)
    assert (intent.phase, intent.value, intent.container.pid) == (Phase.POST_START, planned, 4242)
    # a new runtime sets it itself: no host intent
    assert engine().container_started(batch_pod, started).intents.host == ()


def test_update_answers_with_our_cpus_and_resizes_dedicated() -> None:
    e = engine()
    db_pod, db = pod("db", "dedicated_cores"), container("db", 2000)
    e.container_created(db_pod, db)
    bigger = Resources(cpu=CpuResources(shares=4096, quota=400_000, period=100_000, cpus="0-7"))
    step = e.container_updated(db_pod, db, bigger)
    (update,) = step.intents.reply_updates
    assert update.container_id == db.id and update.resources.cpu is not None
    assert len(parse_cpu_list(update.resources.cpu.cpus)) == 4  # not the kubelet's 0-7
    assert db.id not in {u.container_id for u in step.intents.all_updates()}
    record = e.table.get(db.id)
    assert record is not None and record.classification.cpu_limit_millicores == 4000


def test_a_bad_annotation_is_noted_once_and_the_container_still_runs() -> None:
    e = engine()
    bad_pod = pod("x", "gold_cores")
    notes = []
    for _ in range(3):
        step = e.container_created(bad_pod, container("x"))
        assert step.intents.adjustment is not None and step.intents.adjustment.resources
        notes += [n for n in step.intents.notes if n.kind == "classification"]
    assert len(notes) == 1 and "gold_cores" in notes[0].message
    assert notes[0].severity is Severity.WARNING


def test_rising_online_usage_shrinks_the_reclaimed_pool_with_batched_updates() -> None:
    e = engine()
    e.container_created(pod("web", "shared_cores"), container("web", 1000))
    e.container_created(pod("batch", "reclaimed_cores"), container("batch", 500, oom=1000))
    assert len(e.plan.pools.reclaimed) == 6
    step = e.usage_sampled(UsageSample(online_cores=5.0))
    assert {u.container_id for u in step.intents.all_updates()} == {"ctr-web", "ctr-batch"}
    assert len(e.plan.pools.reclaimed) == 2  # 5 cores + 20% -> 6 online CPUs
    again = e.usage_sampled(UsageSample(online_cores=5.0))
    assert again.intents.updates == () and again.diff == {}  # nothing moved: nothing sent


def test_removing_a_pod_forgets_its_containers() -> None:
    e = engine()
    e.pod_started(pod("web", "shared_cores"))
    e.container_created(pod("web", "shared_cores"), container("web"))
    e.container_created(pod("web", "shared_cores"), container("side", pod_name="web"))
    e.container_created(pod("db", "dedicated_cores"), container("db", 2000))
    step = e.pod_removed(pod("db", "dedicated_cores"))
    assert set(step.plan.containers) == {"ctr-web", "ctr-side"}
    assert {u.container_id for u in step.intents.all_updates()} == {"ctr-web", "ctr-side"}
    assert len(e.table) == 2


def test_numa_reclaim_report_follows_the_pools() -> None:
    e = engine()
    e.container_created(pod("batch", "reclaimed_cores"), container("batch", 500, oom=1000))
    report = e.reclaimable()
    assert report[0].millicores == 1000 * len(e.plan.pools.reclaimed)


def test_online_containers_are_those_whose_use_counts_as_online_demand() -> None:
    e = engine()
    e.container_created(pod("web", "shared_cores"), container("web"))
    e.container_created(pod("db", "dedicated_cores"), container("db", 2000))
    e.container_created(pod("batch", "reclaimed_cores"), container("batch", 500))
    assert [r.id for r in e.online_containers()] == ["ctr-web"]


# --- the adapter behind the plugin's hooks ------------------------------------------------


def test_runtime_provided_config_is_applied_or_refused_with_a_note() -> None:
    topo = MachineShape(cores_per_l3=8).expected_topology()

    def parse(text: str) -> EngineConfig:
        if text == "bad":
            raise ValueError("min_shared_cpus must be at least 1")
        return EngineConfig(planner=PlannerConfig(reclaimed_min_cpus=int(text)))

    policy = QosPolicy(Engine(topo), parse)
    runtime = infer_runtime("containerd", "v2.3.4", "v0.12.0", True)
    refused = policy.configure(runtime, "bad")
    assert refused.notes[0].severity is Severity.WARNING
    assert "min_shared_cpus" in refused.notes[0].message
    assert policy.engine.config == EngineConfig()
    policy.engine.usage_sampled(UsageSample(online_cores=2.5))
    applied = policy.configure(runtime, "3")
    assert [n.message for n in applied.notes] == ["applied the runtime-provided config"]
    assert policy.engine.config.planner.reclaimed_min_cpus == 3
    assert policy.engine.planner.usage == UsageSample(online_cores=2.5)  # still measured
    assert policy.configure(runtime, "3").notes == ()  # the same again changes nothing
    assert policy.engine.runtime == runtime


def test_a_config_that_cannot_work_on_this_host_is_refused_at_construction() -> None:
    topo = MachineShape(cores_per_l3=2).expected_topology()
    with pytest.raises(ValueError, match="reserved_cpus"):
        Engine(topo, EngineConfig(planner=PlannerConfig(reserved_cpus=frozenset({9}))))


def test_a_pools_members_move_as_one_bulk_update_with_the_same_resources() -> None:
    e = engine()
    for name in ("a", "b", "c"):
        e.container_created(pod(name, "shared_cores"), container(name, 500))
    step = e.container_created(pod("db", "dedicated_cores"), container("db", 2000))
    (bulk,) = step.intents.updates
    assert isinstance(bulk, BulkUpdate) and bulk.container_ids == ("ctr-a", "ctr-b", "ctr-c")
    for u in step.intents.all_updates():
        assert u.resources == e.plan.containers[u.container_id].update().resources
    assert {cid: [c.field for c in d] for cid, d in step.diff.items()} == {
        "ctr-a": ["cpus"],
        "ctr-b": ["cpus"],
        "ctr-c": ["cpus"],
    }
    assert "updating 3 container(s)" in " ".join(n.message for n in step.intents.notes)
