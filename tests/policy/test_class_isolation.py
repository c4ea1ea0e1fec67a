"""RDT class, I/O weight and network class: what the engine plans per QoS class, and
which way each value reaches the host for each runtime (adjustment or controller)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nri_plugin.policy.class_intents import RDT_GROUP_PREFIX, RdtPath, paths_for, rdt_clos_id
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import (
    Phase,
    PlaceInRdtClass,
    ReleaseNetClass,
    ReleaseRdt,
    SetIoWeight,
    SetNetClass,
)
from nri_plugin.policy.workload import SHARED, PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import ContainerState, Pod
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

ON = Backend(True, "started")


def engine(
    support: HostSupport | None = None,
    *,
    runtime: str = "v2.3.4",
    degraded: dict[str, str] | None = None,
) -> Engine:
    topo = MachineShape(cores_per_l3=8).expected_topology()
    isolation = IsolationConfig(host=support or HostSupport(), rdt_degraded=degraded or {})
    e = Engine(topo, EngineConfig(planner=PlannerConfig(isolation=isolation)))
    nri = "v0.12.0" if runtime.startswith("v2") else ""
    e.connect(infer_runtime("containerd", runtime, nri, has_timeouts=bool(nri)))
    e.synchronize([], [])
    return e


ALL = HostSupport(rdt=ON, io=ON, net=ON, io_via_runtime=True)


def batch_pod() -> Pod:
    return replace(pod("etl", "reclaimed_cores"), namespaces={"network": "/var/run/netns/etl"})


def test_without_backends_the_plan_says_why_each_field_is_empty() -> None:
    e = engine(HostSupport(rdt=Backend(False, "no resctrl: not mounted")))
    step = e.container_created(batch_pod(), container("etl", 0, oom=1000))
    plan = step.plan.containers["ctr-etl"]
    assert plan.rdt_class.value is None
    assert plan.rdt_class.reason == "RDT class reclaimed not applied: no resctrl: not mounted"
    assert plan.io_weight.value is None and "no controller" in plan.io_weight.reason
    assert plan.net_class.value is None
    adj = step.intents.adjustment
    assert adj is not None and adj.rdt is None
    assert adj.resources is not None and not adj.resources.unified
    started = e.container_started(batch_pod(), replace(container("etl", 0, oom=1000), pid=42))
    assert not [i for i in started.intents.host if i.domain in ("rdt", "io", "net")]


@pytest.mark.parametrize(
    ("qos", "rdt", "weight", "net"),
    [
        ("system_cores", "system", 1000, "system"),
        ("dedicated_cores", "dedicated", 500, "online"),
        ("shared_cores", SHARED, 100, "online"),
        ("reclaimed_cores", "reclaimed", 10, "batch"),
    ],
)
def test_each_class_gets_its_levels_with_reasons(qos: str, rdt: str, weight: int, net: str) -> None:
    e = engine(ALL)
    millicores = 0 if qos == "reclaimed_cores" else 1000
    step = e.container_created(pod("p", qos), container("p", millicores))
    plan = step.plan.containers["ctr-p"]
    assert (plan.rdt_class.value, plan.io_weight.value, plan.net_class.value) == (rdt, weight, net)
    assert plan.rdt_class.reason.startswith(f"{qos}: RDT class {rdt}")
    assert f"I/O weight {weight}" in plan.io_weight.reason
    assert f"network class {net}" in plan.net_class.reason


def test_containerd_2_places_rdt_and_io_at_creation_and_classifies_net_after_start() -> None:
    e = engine(ALL)
    ctr = container("etl", 0, oom=1000)
    step = e.container_created(batch_pod(), ctr)
    adj = step.intents.adjustment
    assert adj is not None and adj.rdt is not None
    assert adj.rdt.clos_id == "nri-qos-reclaimed" and adj.rdt.enable_monitoring is True
    assert adj.resources is not None and adj.resources.unified == {"io.weight": "default 10"}
    assert adj.resources.rdt_class is None  # not both ways
    assert adj.resources.cpu is not None and adj.resources.cpu.cpus  # the CPU part stays

    started = e.container_started(batch_pod(), replace(ctr, pid=42))
    host = started.intents.host
    assert [type(i) for i in host] == [SetNetClass]  # RDT and I/O were the runtime's job
    net = host[0]
    assert isinstance(net, SetNetClass)
    assert (net.net_class, net.netns, net.phase) == (
        "batch",
        "/var/run/netns/etl",
        Phase.POST_START,
    )
    assert net.container.pid == 42

    gone = e.container_stopped(batch_pod(), ctr)
    kinds = {type(i): i for i in gone.intents.host}
    assert set(kinds) == {ReleaseRdt, ReleaseNetClass}
    release = kinds[ReleaseRdt]
    assert isinstance(release, ReleaseRdt) and release.rdt_class == "reclaimed"


def test_containerd_1_7_gets_the_controllers_fallback_with_rechecks() -> None:
    e = engine(replace(ALL, io_via_runtime=False), runtime="v1.7.13")
    ctr = container("etl", 0, oom=1000)
    adj = e.container_created(batch_pod(), ctr).intents.adjustment
    assert adj is not None and adj.rdt is None  # NRI v0.4 has no LinuxRdt
    assert adj.resources is not None
    assert adj.resources.rdt_class is None and not adj.resources.unified

    host = e.container_started(batch_pod(), replace(ctr, pid=42)).intents.host
    by_type = {type(i): i for i in host}
    place = by_type[PlaceInRdtClass]
    assert isinstance(place, PlaceInRdtClass)
    assert place.rdt_class == "reclaimed" and place.monitor
    assert place.recheck_after  # late forks are picked up again
    io = by_type[SetIoWeight]
    assert isinstance(io, SetIoWeight) and (io.weight, io.qos_class) == (10, "reclaimed_cores")
    assert SetNetClass in by_type


def test_runtime_rdt_classes_are_asked_by_name_on_old_runtimes() -> None:
    e = engine(replace(ALL, rdt_runtime_classes=True), runtime="v1.7.13")
    adj = e.container_created(batch_pod(), container("etl", 0, oom=1000)).intents.adjustment
    assert adj is not None and adj.resources is not None
    assert adj.resources.rdt_class == "reclaimed"
    started = e.container_started(batch_pod(), replace(container("etl", 0), pid=7))
    assert not [i for i in started.intents.host if isinstance(i, PlaceInRdtClass)]


def test_a_degraded_rdt_class_plans_nothing_and_says_why() -> None:
    e = engine(ALL, degraded={"reclaimed": "out of CLOSIDs (num_closids=4)"})
    step = e.container_created(batch_pod(), container("etl", 0, oom=1000))
    plan = step.plan.containers["ctr-etl"]
    assert plan.rdt_class.value is None
    assert "out of CLOSIDs (num_closids=4)" in plan.rdt_class.reason
    adj = step.intents.adjustment
    assert adj is not None and adj.rdt is None


def test_synchronize_reapplies_every_domain_to_running_containers() -> None:
    e = engine(ALL)
    running = replace(container("etl", 0, oom=1000), state=ContainerState.RUNNING, pid=99)
    step = e.synchronize([batch_pod()], [running])
    host = [i for i in step.intents.host if i.domain in ("rdt", "io", "net")]
    assert {type(i) for i in host} == {PlaceInRdtClass, SetIoWeight, SetNetClass}
    assert all(i.phase is Phase.POST_UPDATE for i in host)
    # the runtime cannot move a running container between resctrl groups: we do,
    # whatever its NRI version
    place = next(i for i in host if isinstance(i, PlaceInRdtClass))
    assert place.rdt_class == "reclaimed"


def test_paths_follow_the_runtime_and_the_host() -> None:
    assert paths_for(HostSupport(), True).rdt is RdtPath.NONE
    assert paths_for(ALL, True).rdt is RdtPath.ADJUSTMENT
    assert paths_for(ALL, False).rdt is RdtPath.HOST
    assert paths_for(replace(ALL, rdt_runtime_classes=True), False).rdt is RdtPath.RUNTIME_CLASS
    assert paths_for(ALL, False).io_unified
    # the unified map is never sent where the io backend is missing (runc would fail)
    assert not paths_for(replace(ALL, io=Backend(False, "no iocost")), False).io_unified
    assert rdt_clos_id("reclaimed") == RDT_GROUP_PREFIX + "reclaimed"


def test_the_clos_id_names_the_group_the_rdt_backend_makes() -> None:
    from isolation.rdt import Resctrl

    assert Resctrl.PREFIX == RDT_GROUP_PREFIX
    assert Resctrl().group_name("reclaimed") == rdt_clos_id("reclaimed")


def test_io_weights_out_of_range_are_refused() -> None:
    from nri_plugin.policy.qos import QosClass
    from nri_plugin.policy.workload import PlannerConfigError

    bad = IsolationConfig(io_weights={QosClass.RECLAIMED_CORES: 0})
    with pytest.raises(PlannerConfigError, match=r"outside 1\.\.10000"):
        PlannerConfig(isolation=bad).check(MachineShape(cores_per_l3=4).expected_topology())
