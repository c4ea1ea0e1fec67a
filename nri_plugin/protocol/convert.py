"""Conversions between NRI protobuf messages and `qos_model.containers` values.

Pure functions, both directions: the plugin reads pods/containers and writes
adjustments/updates; the embedded runtime does the opposite. Fields nri-qos has no use
for (mounts, hooks, seccomp, ...) are dropped on the way in and never produced on the
way out. The cpu and memory fields come from one table, `nri_plugin.protocol.fields`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from google.protobuf.message import Message

from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.fields import CPU_FIELDS, MEMORY_FIELDS, ResourceField
from qos_model import containers as model

# --- small helpers for NRI's presence wrappers -------------------------------------------


def _opt(msg: object, name: str) -> int | None:
    """Value of an Optional* wrapper field, or None when the wrapper is absent."""
    if msg.HasField(name):  # type: ignore[attr-defined]
        return int(getattr(msg, name).value)
    return None


def _opt_str(msg: object, name: str) -> str | None:
    if msg.HasField(name):  # type: ignore[attr-defined]
        return str(getattr(msg, name).value)
    return None


def _set_opt(msg: object, name: str, value: int | bool | str | None) -> None:
    if value is not None:
        getattr(msg, name).value = value


def _namespaces(items: Iterable[pb.LinuxNamespace]) -> dict[str, str]:
    return {ns.type: ns.path for ns in items}


# --- resources ---------------------------------------------------------------------------


# (model attribute, protobuf name, plain string?) for each row of the field table: these
# loops run on every NRI request, so they unpack plain tuples instead of reading rows.
_Plan = tuple[tuple[str, str, bool], ...]


def _plan(fields: tuple[ResourceField, ...]) -> _Plan:
    return tuple((f.attr, f.name, not f.wrapped) for f in fields)


_CPU_PLAN = _plan(CPU_FIELDS)
_MEMORY_PLAN = _plan(MEMORY_FIELDS)


def _group_from_pb(msg: Message, plan: _Plan) -> dict[str, Any]:
    """Model keyword arguments for a LinuxCPU / LinuxMemory message. A wrapper's `value`
    is already the model's int or bool; an absent wrapper is None."""
    values: dict[str, Any] = {}
    for attr, name, plain in plan:
        if plain:
            values[attr] = getattr(msg, name)
        elif msg.HasField(name):
            values[attr] = getattr(msg, name).value
        else:
            values[attr] = None
    return values


def _group_to_pb(values: object, msg: Message, plan: _Plan) -> None:
    """Write a CpuResources / MemoryResources into its LinuxCPU / LinuxMemory message."""
    for attr, name, plain in plan:
        value = getattr(values, attr)
        if plain:
            setattr(msg, name, value)
        elif value is not None:
            getattr(msg, name).value = value


def resources_from_pb(msg: pb.LinuxResources) -> model.Resources:
    cpu = None
    if msg.HasField("cpu"):
        cpu = model.CpuResources(**_group_from_pb(msg.cpu, _CPU_PLAN))
    memory = None
    if msg.HasField("memory"):
        memory = model.MemoryResources(**_group_from_pb(msg.memory, _MEMORY_PLAN))
    return model.Resources(
        cpu=cpu,
        memory=memory,
        hugepage_limits=tuple(
            model.HugepageLimit(h.page_size, h.limit) for h in msg.hugepage_limits
        ),
        blockio_class=_opt_str(msg, "blockio_class"),
        rdt_class=_opt_str(msg, "rdt_class"),
        unified=dict(msg.unified),
        pids_limit=msg.pids.limit if msg.HasField("pids") else None,
    )


def resources_to_pb(
    res: model.Resources, out: pb.LinuxResources | None = None
) -> pb.LinuxResources:
    msg = pb.LinuxResources() if out is None else out
    if res.cpu is not None:
        c = msg.cpu
        c.SetInParent()
        _group_to_pb(res.cpu, c, _CPU_PLAN)
    if res.memory is not None:
        m = msg.memory
        m.SetInParent()
        _group_to_pb(res.memory, m, _MEMORY_PLAN)
    for h in res.hugepage_limits:
        msg.hugepage_limits.add(page_size=h.page_size, limit=h.limit)
    _set_opt(msg, "blockio_class", res.blockio_class)
    _set_opt(msg, "rdt_class", res.rdt_class)
    msg.unified.update(res.unified)
    if res.pids_limit is not None:
        msg.pids.limit = res.pids_limit
    return msg


# --- pods and containers -----------------------------------------------------------------


def pod_from_pb(msg: pb.PodSandbox) -> model.Pod:
    linux = msg.linux
    has_linux = msg.HasField("linux")
    return replace(
        pod_for_policy(msg),
        runtime_handler=msg.runtime_handler,
        ips=tuple(msg.ips),
        overhead=resources_from_pb(linux.pod_overhead)
        if has_linux and linux.HasField("pod_overhead")
        else None,
        pod_resources=resources_from_pb(linux.pod_resources)
        if has_linux and linux.HasField("pod_resources")
        else None,
        sandbox_resources=resources_from_pb(linux.resources)
        if has_linux and linux.HasField("resources")
        else None,
    )


def pod_to_pb(pod: model.Pod, out: pb.PodSandbox | None = None) -> pb.PodSandbox:
    msg = pb.PodSandbox() if out is None else out
    msg.id = pod.id
    msg.name = pod.name
    msg.uid = pod.uid
    msg.namespace = pod.namespace
    msg.labels.update(pod.labels)
    msg.annotations.update(pod.annotations)
    msg.runtime_handler = pod.runtime_handler
    linux = msg.linux
    linux.SetInParent()
    linux.cgroup_parent = pod.cgroup_parent
    linux.cgroups_path = pod.cgroups_path
    for ns_type, path in pod.namespaces.items():
        linux.namespaces.add(type=ns_type, path=path)
    if pod.overhead is not None:
        resources_to_pb(pod.overhead, linux.pod_overhead)
        linux.pod_overhead.SetInParent()
    if pod.pod_resources is not None:
        resources_to_pb(pod.pod_resources, linux.pod_resources)
        linux.pod_resources.SetInParent()
    if pod.sandbox_resources is not None:
        resources_to_pb(pod.sandbox_resources, linux.resources)
        linux.resources.SetInParent()
    msg.pid = pod.pid or 0
    msg.ips.extend(pod.ips)
    return msg


def container_from_pb(msg: pb.Container) -> model.Container:
    return replace(
        container_for_policy(msg),
        args=tuple(msg.args),
        env=tuple(msg.env),
        started_at=msg.started_at,
        finished_at=msg.finished_at,
        exit_code=msg.exit_code,
    )


# --- what the policy reads ------------------------------------------------------------------

# Fields of the model the request path leaves at their defaults: nothing downstream of
# the policy reads them (tests/test_layering.py checks that no code that sees the
# policy's pods and containers names one), and converting them is most of what turning
# a real ~3 KB request into model values costs (the sandbox's resources alone are a
# third of a pod). To read one, take it off this list and convert it below.
LEFT_OUT_FOR_POLICY = frozenset(
    {
        "runtime_handler",
        "ips",
        "overhead",
        "pod_resources",
        "sandbox_resources",
        "args",
        "env",
        "started_at",
        "finished_at",
        "exit_code",
    }
)


def pod_for_policy(msg: pb.PodSandbox) -> model.Pod:
    """`pod_from_pb` without the fields in LEFT_OUT_FOR_POLICY (on every request)."""
    linux = msg.linux
    return model.Pod(
        id=msg.id,
        name=msg.name,
        uid=msg.uid,
        namespace=msg.namespace,
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        cgroup_parent=linux.cgroup_parent,
        cgroups_path=linux.cgroups_path,
        pid=msg.pid or None,
        namespaces=_namespaces(linux.namespaces),
    )


def container_for_policy(msg: pb.Container) -> model.Container:
    """`container_from_pb` without the fields in LEFT_OUT_FOR_POLICY (on every request)."""
    linux = msg.linux
    has_linux = msg.HasField("linux")
    return model.Container(
        id=msg.id,
        pod_id=msg.pod_sandbox_id,
        name=msg.name,
        state=_state(msg.state),
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        cgroups_path=linux.cgroups_path,
        resources=resources_from_pb(linux.resources)
        if has_linux and linux.HasField("resources")
        else None,
        oom_score_adj=_opt(linux, "oom_score_adj") if has_linux else None,
        pid=msg.pid or None,
        namespaces=_namespaces(linux.namespaces),
        created_at=msg.created_at,
    )


def _state(value: int) -> model.ContainerState:
    try:
        return model.ContainerState(value)
    except ValueError:  # a newer runtime's state we do not know
        return model.ContainerState.UNKNOWN


def container_to_pb(ctr: model.Container, out: pb.Container | None = None) -> pb.Container:
    msg = pb.Container() if out is None else out
    msg.id = ctr.id
    msg.pod_sandbox_id = ctr.pod_id
    msg.name = ctr.name
    msg.state = int(ctr.state)  # type: ignore[assignment]
    msg.labels.update(ctr.labels)
    msg.annotations.update(ctr.annotations)
    msg.args.extend(ctr.args)
    msg.env.extend(ctr.env)
    linux = msg.linux
    linux.SetInParent()
    for ns_type, path in ctr.namespaces.items():
        linux.namespaces.add(type=ns_type, path=path)
    if ctr.resources is not None:
        resources_to_pb(ctr.resources, linux.resources)
        linux.resources.SetInParent()
    _set_opt(linux, "oom_score_adj", ctr.oom_score_adj)
    linux.cgroups_path = ctr.cgroups_path
    msg.pid = ctr.pid or 0
    msg.created_at = ctr.created_at
    msg.started_at = ctr.started_at
    msg.finished_at = ctr.finished_at
    msg.exit_code = ctr.exit_code
    return msg


# --- what plugins ask for ----------------------------------------------------------------


def adjustment_to_pb(
    adj: model.Adjustment, out: pb.ContainerAdjustment | None = None
) -> pb.ContainerAdjustment:
    """Into `out` when given (a reply's own field: no copy of a built message)."""
    msg = pb.ContainerAdjustment() if out is None else out
    msg.annotations.update(adj.annotations)
    for key, value in adj.env:
        msg.env.add(key=key, value=value)
    if adj.resources is not None and not adj.resources.is_empty():
        resources_to_pb(adj.resources, msg.linux.resources)
        msg.linux.resources.SetInParent()
    if adj.oom_score_adj is not None:
        msg.linux.oom_score_adj.value = adj.oom_score_adj
    if adj.rdt is not None:
        rdt_to_pb(adj.rdt, msg.linux.rdt)
    return msg


def rdt_to_pb(rdt: model.Rdt, msg: pb.LinuxRdt) -> None:
    msg.SetInParent()
    if rdt.clos_id is not None:
        msg.clos_id.value = rdt.clos_id
    if rdt.schemata is not None:
        msg.schemata.value.extend(rdt.schemata)
        msg.schemata.SetInParent()
    if rdt.enable_monitoring is not None:
        msg.enable_monitoring.value = rdt.enable_monitoring
    msg.remove = rdt.remove


def rdt_from_pb(msg: pb.LinuxRdt) -> model.Rdt:
    return model.Rdt(
        clos_id=msg.clos_id.value if msg.HasField("clos_id") else None,
        schemata=tuple(msg.schemata.value) if msg.HasField("schemata") else None,
        enable_monitoring=msg.enable_monitoring.value
        if msg.HasField("enable_monitoring")
        else None,
        remove=msg.remove,
    )


def adjustment_from_pb(msg: pb.ContainerAdjustment) -> model.Adjustment:
    linux = msg.linux
    return model.Adjustment(
        resources=resources_from_pb(linux.resources)
        if msg.HasField("linux") and linux.HasField("resources")
        else None,
        oom_score_adj=_opt(linux, "oom_score_adj") if msg.HasField("linux") else None,
        annotations=dict(msg.annotations),
        env=tuple((kv.key, kv.value) for kv in msg.env),
        rdt=rdt_from_pb(linux.rdt) if msg.HasField("linux") and linux.HasField("rdt") else None,
    )


def update_to_pb(upd: model.Update, out: pb.ContainerUpdate | None = None) -> pb.ContainerUpdate:
    msg = pb.ContainerUpdate() if out is None else out
    msg.container_id = upd.container_id
    resources_to_pb(upd.resources, msg.linux.resources)
    msg.linux.resources.SetInParent()
    msg.ignore_failure = upd.ignore_failure
    return msg


def updates_to_pb(updates: Iterable[model.Update | model.BulkUpdate], field: object) -> None:
    """Append `updates` to a repeated ContainerUpdate field of a response message.

    When a pool moves, hundreds of containers get the very same resources: each distinct
    Resources value is converted once and copied."""
    converted: dict[int, pb.LinuxResources] = {}

    def add(container_id: str, resources: model.Resources, ignore_failure: bool) -> None:
        encoded = converted.get(id(resources))
        if encoded is None:
            encoded = converted[id(resources)] = resources_to_pb(resources)
        msg = field.add()  # type: ignore[attr-defined]
        msg.container_id = container_id
        msg.linux.resources.CopyFrom(encoded)
        msg.linux.resources.SetInParent()
        msg.ignore_failure = ignore_failure

    for upd in updates:
        if isinstance(upd, model.BulkUpdate):
            for container_id in upd.container_ids:
                add(container_id, upd.resources, False)
        else:
            add(upd.container_id, upd.resources, upd.ignore_failure)
