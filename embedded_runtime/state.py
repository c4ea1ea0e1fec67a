"""The embedded runtime's pods and containers, and how each flavor reports them.

A record holds the truth (the container spec with every adjustment applied, the real
process state); a *view* is the NRI message a given runtime would send at a given
moment. Views differ between runtimes in ways plugins notice (the captures show each of
them), so they are pure functions of (record, flavor, moment), tested without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import PurePosixPath

from embedded_runtime.flavor import RuntimeFlavor
from embedded_runtime.merge import prepare_create_request
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from qos_model import containers as model
from qos_model.containers import ContainerState


class Moment(Enum):
    """When a view is taken, where a runtime's report differs from the plain truth."""

    CURRENT = "current"
    POST_START = "post-start"  # CRI-O still reports CREATED
    REMOVE = "remove"  # containerd 2.x: already deleted (UNKNOWN, no pid)


@dataclass(slots=True)
class PodRecord:
    spec: pb.PodSandbox
    stopped: bool = False


@dataclass(slots=True)
class ContainerRecord:
    spec: pb.Container  # configuration with adjustments/updates applied; no runtime state
    state: ContainerState = ContainerState.UNKNOWN
    pid: int = 0  # the pid the runtime reports (0 = none)
    process_pid: int = 0  # the backend's process, possibly not reported yet
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    blockio_class: str | None = None  # None = no class
    rdt_class: str | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def exited(self) -> bool:
        return self.state in (ContainerState.STOPPED, ContainerState.UNKNOWN)


_RUNTIME_FIELDS = (
    "state",
    "pid",
    "created_at",
    "started_at",
    "finished_at",
    "exit_code",
    "status_reason",
    "status_message",
)


def container_spec(container: pb.Container, pod_id: str) -> pb.Container:
    """A creation request's container without the fields the runtime itself owns."""
    spec = pb.Container()
    spec.CopyFrom(container)
    for name in _RUNTIME_FIELDS:
        spec.ClearField(name)
    spec.pod_sandbox_id = pod_id
    return spec


def create_request_view(rec: ContainerRecord) -> pb.Container:
    """The container in a CreateContainer request: spec only, after NRI's preparation."""
    msg = pb.Container()
    msg.CopyFrom(rec.spec)
    prepare_create_request(msg)
    return msg


def container_view(
    rec: ContainerRecord, flavor: RuntimeFlavor, moment: Moment = Moment.CURRENT
) -> pb.Container:
    msg = pb.Container()
    msg.CopyFrom(rec.spec)
    msg.state = int(rec.state)  # type: ignore[assignment]
    msg.pid = rec.pid
    if flavor.container_timestamps:
        msg.created_at = rec.created_at
        msg.started_at = rec.started_at
        msg.finished_at = rec.finished_at
        msg.exit_code = rec.exit_code
    if moment is Moment.POST_START and flavor.post_start_reports_created:
        msg.state = int(ContainerState.CREATED)  # type: ignore[assignment]
        msg.started_at = 0
    if moment is Moment.REMOVE and flavor.remove_reports_unknown:
        msg.state = int(ContainerState.UNKNOWN)  # type: ignore[assignment]
        msg.pid = 0
    return msg


def pod_view(rec: PodRecord, flavor: RuntimeFlavor, *, removing: bool = False) -> pb.PodSandbox:
    msg = pb.PodSandbox()
    msg.CopyFrom(rec.spec)
    if rec.stopped and flavor.stopped_pod_loses_spec:
        for key in [k for k in msg.annotations if k.startswith(flavor.spec_annotation_prefix)]:
            del msg.annotations[key]
        msg.pid = 0
        msg.linux.SetInParent()
        for name in ("cgroups_path", "namespaces", "resources"):
            msg.linux.ClearField(name)
    if removing and flavor.removed_pod_loses_pid:
        msg.pid = 0
    return msg


def container_model(rec: ContainerRecord, flavor: RuntimeFlavor) -> model.Container:
    """The record as a model value: the current view plus the class-based resources
    (block I/O, RDT) that NRI messages cannot carry back."""
    ctr = convert.container_from_pb(container_view(rec, flavor))
    if rec.blockio_class is None and rec.rdt_class is None:
        return ctr
    resources = ctr.resources or model.Resources()
    return ctr.with_resources(
        replace(resources, blockio_class=rec.blockio_class, rdt_class=rec.rdt_class)
    )


def cgroups_path_for(cgroup_parent: str, container_id: str) -> str:
    """The cgroups_path containerd gives a container of a pod with this cgroup_parent.

    A parent whose last element is a systemd slice gets the systemd form
    ``<slice>:cri-containerd:<id>``; any other parent is joined with the id (cgroupfs
    driver). The embedded runtime composes it when a container comes without one.
    """
    if not cgroup_parent:
        raise ValueError("a pod without cgroup_parent has no container cgroups_path")
    base = PurePosixPath(cgroup_parent).name
    if base.endswith(".slice"):
        return f"{base}:cri-containerd:{container_id}"
    return str(PurePosixPath(cgroup_parent) / container_id)
