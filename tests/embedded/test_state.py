"""Pure tests of how each flavor reports pods and containers at each moment."""

from __future__ import annotations

import pytest

from embedded_runtime import CONTAINERD_1_7, CONTAINERD_2_3, CRIO_1_36, RuntimeFlavor
from embedded_runtime.state import (
    ContainerRecord,
    Moment,
    PodRecord,
    container_model,
    container_spec,
    container_view,
    create_request_view,
    pod_view,
)
from nri_plugin.protocol import nri_pb2 as pb
from qos_model.containers import ContainerState


def record(state: ContainerState = ContainerState.RUNNING) -> ContainerRecord:
    spec = pb.Container(id="c0", pod_sandbox_id="p0", name="c")
    spec.linux.resources.cpu.shares.value = 2
    return ContainerRecord(
        spec, state=state, pid=42, process_pid=42, created_at=1, started_at=2, finished_at=0
    )


def pod_record(stopped: bool = False) -> PodRecord:
    spec = pb.PodSandbox(id="p0", name="p", pid=7)
    spec.annotations.update({"io.kubernetes.cri.sandbox-id": "p0", "mine": "1"})
    spec.linux.cgroup_parent = "/kubepods"
    spec.linux.cgroups_path = "/kubepods/p0"
    spec.linux.namespaces.add(type="ipc")
    spec.linux.resources.cpu.shares.value = 2
    return PodRecord(spec, stopped=stopped)


def test_container_spec_drops_what_the_runtime_owns() -> None:
    given = pb.Container(id="c0", state=pb.CONTAINER_RUNNING, pid=9, created_at=5, name="x")
    spec = container_spec(given, "p1")
    assert spec == pb.Container(id="c0", name="x", pod_sandbox_id="p1")


def test_create_request_has_nris_empty_but_present_parts() -> None:
    view = create_request_view(ContainerRecord(pb.Container(id="c0")))
    assert view.HasField("hooks") and view.linux.resources.HasField("memory")
    assert view.linux.resources.HasField("cpu")
    assert (view.state, view.pid) == (pb.CONTAINER_UNKNOWN, 0)


@pytest.mark.parametrize(
    ("flavor", "moment", "state", "pid", "started_at"),
    [
        (CONTAINERD_1_7, Moment.CURRENT, pb.CONTAINER_RUNNING, 42, 0),  # no timestamps in v0.4
        (CONTAINERD_2_3, Moment.POST_START, pb.CONTAINER_RUNNING, 42, 2),
        (CRIO_1_36, Moment.POST_START, pb.CONTAINER_CREATED, 42, 0),
        (CONTAINERD_2_3, Moment.REMOVE, pb.CONTAINER_UNKNOWN, 0, 2),
        (CRIO_1_36, Moment.REMOVE, pb.CONTAINER_RUNNING, 42, 2),
    ],
    ids=[
        "containerd 1.7.13 now: running, no timestamps (NRI v0.4)",
        "containerd 2.3.4 post-start: running, started_at set",
        "CRI-O 1.36.3 post-start: still created, no started_at",
        "containerd 2.3.4 at removal: unknown state, no pid",
        "CRI-O 1.36.3 at removal: the recorded state, pid and times",
    ],
)
def test_container_state_pid_and_timestamps_at_each_moment_follow_the_runtime(
    flavor: RuntimeFlavor, moment: Moment, state: int, pid: int, started_at: int
) -> None:
    view = container_view(record(), flavor, moment)
    assert (view.state, view.pid, view.started_at) == (state, pid, started_at)
    assert view.created_at == (1 if flavor.container_timestamps else 0)


def test_containerd_1_7_reports_a_stopped_sandbox_from_metadata_only() -> None:
    view = pod_view(pod_record(stopped=True), CONTAINERD_1_7)
    expected = pb.PodSandbox(id="p0", name="p")
    expected.annotations["mine"] = "1"
    expected.linux.cgroup_parent = "/kubepods"
    assert view == expected
    assert pod_view(pod_record(stopped=True), CONTAINERD_2_3) == pod_record().spec


@pytest.mark.parametrize(
    ("flavor", "pid"),
    [(CONTAINERD_2_3, 0), (CRIO_1_36, 7)],
    ids=["containerd 2.3.4: no pid", "CRI-O 1.36.3: the pid it had"],
)
def test_removed_pod_has_its_pid_on_cri_o_and_none_on_containerd_2_3(
    flavor: RuntimeFlavor, pid: int
) -> None:
    assert pod_view(pod_record(stopped=True), flavor, removing=True).pid == pid


def test_model_carries_the_classes_nri_cannot_report() -> None:
    rec = record()
    rec.blockio_class, rec.rdt_class = "slow", "gold"
    ctr = container_model(rec, CONTAINERD_2_3)
    assert ctr.resources is not None
    assert (ctr.resources.blockio_class, ctr.resources.rdt_class) == ("slow", "gold")
    assert ctr.resources.cpu is not None and ctr.resources.cpu.shares == 2
    assert not container_view(rec, CONTAINERD_2_3).linux.resources.HasField("blockio_class")
