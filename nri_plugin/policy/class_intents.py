"""How a container's RDT class, I/O weight and network class reach the host.

Rule: ask the runtime where it can apply a value when it creates the container (no race
with the container's first forks, nothing written behind its back), and fall back to a
host controller only where it cannot. Per domain:

* RDT: NRI >= v0.11 carries `LinuxRdt.clos_id` — the runtime's OCI runtime puts the tasks
  into our class's resctrl group at creation, and `enable_monitoring` gives the container
  a monitoring group named after its id. Older runtimes whose own RDT config defines our
  class names (`[rdt] runtime_classes`) get `resources.rdt_class`. Otherwise the rdt
  controller moves the processes after start and checks again once late forks settled.
* I/O: on a cgroup v2 host with the io controller, `io.weight` in the `unified` map (runc
  refuses `unified` on v1, so never there); otherwise the io controller writes blkio.
* Network: no runtime field exists; the net controller classifies after start.

Containers that were already running (Synchronize) or whose class moved are handled by
the controllers in every case: the runtime has no way to move a live container between
resctrl groups. Pure: values in, values out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from enum import StrEnum

from nri_plugin.policy.class_isolation import HostSupport
from nri_plugin.policy.intents import (
    ContainerRef,
    HostIntent,
    Phase,
    PlaceInRdtClass,
    ReleaseNetClass,
    ReleaseRdt,
    SetIoWeight,
    SetNetClass,
)
from nri_plugin.policy.plan import IO, NET, RDT, ContainerPlan
from qos_model.containers import Adjustment, Rdt, Resources

# Our resctrl control groups are named after the RDT class with this prefix, so the rdt
# controller can tell them from groups other software made (isolation.rdt uses the same).
RDT_GROUP_PREFIX = "nri-qos-"

# After we move a container's processes into a resctrl group, check again at these delays:
# a process forked between our listing and our write would stay behind in the root group.
RDT_RECHECKS = (1.0, 10.0)


def rdt_clos_id(rdt_class: str) -> str:
    return RDT_GROUP_PREFIX + rdt_class


class RdtPath(StrEnum):
    ADJUSTMENT = "LinuxRdt clos_id in the CreateContainer adjustment (NRI >= v0.11)"
    RUNTIME_CLASS = "rdt_class in the adjustment (the runtime's own RDT classes)"
    HOST = "the rdt controller moves the tasks after start"
    NONE = "not applied"


@dataclass(frozen=True, slots=True)
class Paths:
    """Which way each domain takes for a container being created now."""

    rdt: RdtPath
    io_unified: bool  # io.weight in the adjustment's unified map
    rdt_available: bool
    io_available: bool
    net_available: bool


def paths_for(support: HostSupport, runtime_applies_rdt: bool) -> Paths:
    if not support.rdt.available:
        rdt = RdtPath.NONE
    elif runtime_applies_rdt:
        rdt = RdtPath.ADJUSTMENT
    elif support.rdt_runtime_classes:
        rdt = RdtPath.RUNTIME_CLASS
    else:
        rdt = RdtPath.HOST
    return Paths(
        rdt=rdt,
        io_unified=support.io.available and support.io_via_runtime,
        rdt_available=support.rdt.available,
        io_available=support.io.available,
        net_available=support.net.available,
    )


def at_create(adjustment: Adjustment, plan: ContainerPlan, paths: Paths) -> Adjustment:
    """The CreateContainer adjustment with what the runtime applies for us."""
    resources = adjustment.resources or Resources()
    rdt = None
    rdt_class = plan.rdt_class.value
    if rdt_class is not None and paths.rdt is RdtPath.ADJUSTMENT:
        rdt = Rdt(clos_id=rdt_clos_id(rdt_class), enable_monitoring=True)
    elif rdt_class is not None and paths.rdt is RdtPath.RUNTIME_CLASS:
        resources = replace(resources, rdt_class=rdt_class)
    weight = plan.io_weight.value
    if weight is not None and paths.io_unified:
        resources = replace(
            resources, unified={**resources.unified, "io.weight": f"default {weight}"}
        )
    if rdt is None and (resources is adjustment.resources or resources == adjustment.resources):
        return adjustment
    return replace(adjustment, resources=resources, rdt=rdt)


def after_start(
    plan: ContainerPlan, ref: ContainerRef, netns: str, paths: Paths
) -> list[HostIntent]:
    """Host work once the container's first process runs: what the runtime did not do."""
    out: list[HostIntent] = []
    if plan.rdt_class.value is not None and paths.rdt is RdtPath.HOST:
        out.append(_place(plan, ref, Phase.POST_START))
    if plan.io_weight.value is not None and not paths.io_unified:
        out.append(_io(plan, ref, Phase.POST_START))
    if plan.net_class.value is not None:
        out.append(_net(plan, ref, netns, Phase.POST_START))
    return out


def while_running(
    plan: ContainerPlan, ref: ContainerRef, netns: str, domains: Collection[str], paths: Paths
) -> list[HostIntent]:
    """Host work for a running container whose values in `domains` are to be (re)applied:
    it ran before we planned it, or its class moved. A value that went to None (the new
    class has none) is undone: tasks back to the root group, traffic unclassified."""
    out: list[HostIntent] = []
    if RDT in domains and paths.rdt_available:
        out.append(_place(plan, ref, Phase.POST_UPDATE))
    if IO in domains and paths.io_available and plan.io_weight.value is not None:
        out.append(_io(plan, ref, Phase.POST_UPDATE))
    if NET in domains and paths.net_available:
        out.append(_net(plan, ref, netns, Phase.POST_UPDATE))
    return out


def after_stop(
    plan: ContainerPlan, ref: ContainerRef, netns: str, paths: Paths
) -> list[HostIntent]:
    """Clean-up once the container is gone: its monitoring group (an RMID) and its
    classifier entry."""
    out: list[HostIntent] = []
    rdt_class = plan.rdt_class.value
    if rdt_class is not None and paths.rdt_available:
        out.append(
            ReleaseRdt(
                phase=Phase.POST_STOP,
                container=ref,
                reason="the container is gone: its monitoring group is freed",
                rdt_class=rdt_class,
            )
        )
    if plan.net_class.value is not None and paths.net_available:
        out.append(
            ReleaseNetClass(
                phase=Phase.POST_STOP,
                container=ref,
                reason="the container is gone: its traffic is no longer classified",
                netns=netns,
            )
        )
    return out


def _place(plan: ContainerPlan, ref: ContainerRef, phase: Phase) -> PlaceInRdtClass:
    return PlaceInRdtClass(
        phase=phase,
        container=ref,
        reason=plan.rdt_class.reason,
        rdt_class=plan.rdt_class.value,
        recheck_after=RDT_RECHECKS,
    )


def _io(plan: ContainerPlan, ref: ContainerRef, phase: Phase) -> SetIoWeight:
    weight = plan.io_weight.value
    assert weight is not None
    return SetIoWeight(
        phase=phase,
        container=ref,
        reason=plan.io_weight.reason,
        weight=weight,
        qos_class=str(plan.qos_class),
    )


def _net(plan: ContainerPlan, ref: ContainerRef, netns: str, phase: Phase) -> SetNetClass:
    return SetNetClass(
        phase=phase,
        container=ref,
        reason=plan.net_class.reason,
        net_class=plan.net_class.value,
        netns=netns,
    )
