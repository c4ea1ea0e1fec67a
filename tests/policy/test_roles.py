"""Container roles: which source decides (annotations, pod spec, kubelet, resource
annotator), and what init, sidecar and ephemeral containers may get."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.qos import QosClass, QosConfig, classify
from nri_plugin.policy.roles import (
    KUBELET_TYPE_ANNOTATION,
    RESOURCES_ANNOTATION,
    ROLE_ANNOTATION,
    ROLES_ANNOTATION,
    Role,
    RoleSource,
    apply_role,
    decide_role,
)
from nri_plugin.policy.workload import DEDICATED, SHARED, PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import Container, Pod
from tests.builders import QOS, container, pod
from tests.policy.sysfs_builder import MachineShape

TWO_NODES = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)


def engine() -> Engine:
    e = Engine(TWO_NODES.expected_topology(), EngineConfig(planner=PlannerConfig()))
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    e.synchronize([], [])
    return e


def member(name: str, pod_name: str, millicores: int = 2000, kind: str = "") -> Container:
    """A container of pod `pod_name` as a recent kubelet creates it (its type annotated)."""
    c = container(name, millicores, pod_name=pod_name)
    return replace(c, annotations={KUBELET_TYPE_ANNOTATION: kind} if kind else {})


# --- which source decides ------------------------------------------------------------------


BY_ANNOTATION, BY_SPEC, BY_KUBELET = RoleSource.ANNOTATION, RoleSource.POD_SPEC, RoleSource.KUBELET
ANNOTATOR = RoleSource.RESOURCE_ANNOTATOR
ANNOTATED_INIT = json.dumps({"initContainers": {"c": {}}, "containers": {}})
ANNOTATED_APP = json.dumps({"containers": {"c": {}}})
SCOPED = f"{ROLE_ANNOTATION}/container.c"


@pytest.mark.parametrize(
    ("pod_annotations", "kind", "known", "role", "source"),
    [
        ({}, "", None, Role.APP, RoleSource.DEFAULT),
        ({}, "init", None, Role.INIT, BY_KUBELET),
        ({}, "container", None, Role.APP, BY_KUBELET),
        ({}, "ephemeral", None, Role.EPHEMERAL, BY_KUBELET),
        # the pod spec tells a sidecar from an init container; the kubelet cannot
        ({}, "init", {"c": "sidecar"}, Role.SIDECAR, BY_SPEC),
        # our annotation wins over everything, in both scoped forms and as a map
        ({SCOPED: "sidecar"}, "init", {"c": "init"}, Role.SIDECAR, BY_ANNOTATION),
        ({"role.nri-qos.io/container.c": "init"}, "", None, Role.INIT, BY_ANNOTATION),
        ({ROLES_ANNOTATION: '{"c": "sidecar"}'}, "init", None, Role.SIDECAR, BY_ANNOTATION),
        # nri-plugins' resource annotator, when nothing else says
        ({RESOURCES_ANNOTATION: ANNOTATED_INIT}, "", None, Role.INIT, ANNOTATOR),
        ({RESOURCES_ANNOTATION: ANNOTATED_APP}, "", None, Role.APP, ANNOTATOR),
    ],
)
def test_the_first_usable_source_decides(
    pod_annotations: dict[str, str],
    kind: str,
    known: dict[str, str] | None,
    role: Role,
    source: RoleSource,
) -> None:
    p = Pod(id="pod-p", name="p", annotations=pod_annotations)
    decision = decide_role(p, member("c", "p", kind=kind), known)
    assert (decision.role, decision.source) == (role, source)
    assert decision.reason and not decision.warnings


def test_unusable_role_annotations_warn_and_fall_through() -> None:
    p = Pod(
        id="pod-p",
        name="p",
        annotations={f"{ROLE_ANNOTATION}/container.c": "helper", ROLES_ANNOTATION: "{not json"},
    )
    decision = decide_role(p, member("c", "p", kind="init"))
    assert (decision.role, decision.source) == (Role.INIT, RoleSource.KUBELET)
    assert len(decision.warnings) == 2
    assert "'helper'" in decision.warnings[0] and "not a JSON object" in decision.warnings[1]


# --- what a role allows ---------------------------------------------------------------------


def classified(p: Pod, c: Container, role: Role) -> tuple[QosClass, bool, str]:
    decision = decide_role(p, c, {c.name: role})
    out = apply_role(classify(p, c, QosConfig()), decision)
    return out.qos_class, out.numa_binding, out.reason


def test_init_and_ephemeral_containers_never_get_dedicated_cores_or_a_numa_binding() -> None:
    p = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    c = container("init", 4000, pod_name="db")
    for role in (Role.INIT, Role.EPHEMERAL):
        qos_class, bound, reason = classified(p, c, role)
        assert (qos_class, bound) == (QosClass.SHARED_CORES, False)
        assert "never holds exclusive CPUs" in reason
    shared = pod("web", "shared_cores", memory={"numa_binding": "true"})
    qos_class, bound, reason = classified(shared, c, Role.INIT)
    assert (qos_class, bound) == (QosClass.SHARED_CORES, False)
    assert "not NUMA-bound" in reason


def test_a_sidecar_takes_its_own_class_not_the_pods_dedicated_cores() -> None:
    p = pod("db", "dedicated_cores")
    proxy = container("proxy", 1000, pod_name="db")
    assert classified(p, proxy, Role.SIDECAR)[0] is QosClass.SHARED_CORES
    assert classified(p, proxy, Role.APP)[0] is QosClass.DEDICATED_CORES
    asked = pod("db", "dedicated_cores", **{f"{QOS}/container.proxy": "dedicated_cores"})
    assert classified(asked, proxy, Role.SIDECAR)[0] is QosClass.DEDICATED_CORES
    reclaimed = pod("batch", "reclaimed_cores")
    assert classified(reclaimed, proxy, Role.SIDECAR)[0] is QosClass.RECLAIMED_CORES


# --- through the engine ---------------------------------------------------------------------


def test_an_init_container_runs_shared_then_the_app_gets_the_exclusive_set() -> None:
    e = engine()
    db_pod = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    init = member("migrate", "db", 4000, kind="init")
    step = e.container_created(db_pod, init)
    plan = e.plan.containers[init.id]
    assert (plan.pool, plan.role, plan.mems.value) == (SHARED, "init", None)
    assert plan.cpus.reason.startswith("init container, shared_cores")
    assert init.id not in e.planner.dedicated_allocations
    (note,) = [n for n in step.intents.notes if n.kind == "role"]
    assert "io.kubernetes.container.type=init" in note.message
    assert "shared_cores" in note.message

    app = member("db", "db", 4000, kind="container")
    e.container_created(db_pod, app)
    app_plan = e.plan.containers[app.id]
    assert app_plan.pool == DEDICATED and len(app_plan.cpus.value) == 4
    assert not app_plan.cpus.value & e.plan.containers[init.id].cpus.value
    e.container_stopped(db_pod, init)
    assert e.plan.containers[app.id].cpus == app_plan.cpus  # the app does not move


def test_the_app_not_its_init_container_decides_the_pods_numa_node() -> None:
    """Another pod holds half of node 0. An init container holding 2 exclusive CPUs there
    (the tightest fit) would push the app to node 1, and keep it there after the init
    container exited; here the init container holds nothing and binds nothing, so the app
    lands where it would without it."""

    def app_node(with_init: bool) -> int:
        e = engine()
        e.container_created(pod("big", "dedicated_cores"), container("big", 4000))
        db_pod = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
        if with_init:
            e.container_created(db_pod, member("migrate", "db", 2000, kind="init"))
        e.container_created(db_pod, member("db", "db", 4000, kind="container"))
        (node,) = e.plan.containers["ctr-db"].mems.value or {-1}
        return node

    assert app_node(with_init=True) == app_node(with_init=False) == 0


def test_a_sidecar_learnt_from_the_pod_spec_gets_its_own_exclusive_set() -> None:
    e = engine()
    db_pod = pod("db", "dedicated_cores", **{f"{QOS}/container.proxy": "dedicated_cores"})
    proxy = member("proxy", "db", 2000, kind="init")
    e.container_created(db_pod, proxy)
    assert e.plan.containers[proxy.id].pool == SHARED  # "init" as far as the kubelet says
    app = member("db", "db", 2000, kind="container")
    e.container_created(db_pod, app)
    step = e.pod_roles(db_pod.uid, {"proxy": "sidecar", "db": "app"})
    plan = e.plan.containers[proxy.id]
    assert (plan.pool, plan.role) == (DEDICATED, "sidecar")
    assert not plan.cpus.value & e.plan.containers[app.id].cpus.value
    assert proxy.id in {u.container_id for u in step.intents.all_updates()}
    assert [n for n in step.intents.notes if n.kind == "role"]
    # the same roles again change nothing
    again = e.pod_roles(db_pod.uid, {"proxy": "sidecar", "db": "app"})
    assert not again.intents.all_updates() and not again.diff


def test_roles_learnt_before_the_pod_arrives_are_used_at_creation() -> None:
    e = engine()
    db_pod = pod("db", "dedicated_cores")
    e.pod_roles(db_pod.uid, {"proxy": "sidecar"})
    e.container_created(db_pod, container("proxy", 1000, pod_name="db"))
    assert e.plan.containers["ctr-proxy"].role == "sidecar"
    assert e.plan.containers["ctr-proxy"].pool == SHARED
    e.pod_removed(db_pod)
    e.container_created(db_pod, container("proxy2", 1000, pod_name="db"))
    assert e.plan.containers["ctr-proxy2"].role == "app"
