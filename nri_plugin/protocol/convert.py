"""Conversions between NRI protobuf messages and `qos_model.containers` values.

Pure functions, both directions: the plugin reads pods/containers and writes
adjustments/updates; the embedded runtime does the opposite. Fields nri-qos has no use
for (mounts, hooks, seccomp, ...) are dropped on the way in and never produced on the
way out. The cpu and memory fields come from one table, `nri_plugin.protocol.fields`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
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


def _put(entries: Any, values: Mapping[str, str]) -> None:
    """Set `values` in a protobuf map (its update() is collections.abc's, in Python)."""
    for key, value in values.items():
        entries[key] = value


def _set_opt(msg: object, name: str, value: int | bool | str | None) -> None:
    if value is not None:
        getattr(msg, name).value = value


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
    if res.blockio_class is not None:
        msg.blockio_class.value = res.blockio_class
    if res.rdt_class is not None:
        msg.rdt_class.value = res.rdt_class
    if res.unified:
        _put(msg.unified, res.unified)
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
    linux = msg.linux
    return replace(
        container_for_policy(msg),
        resources=resources_from_pb(linux.resources) if linux.HasField("resources") else None,
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
# third of a pod). To read one, take it off this list and convert it below. The nested
# ones are fields of the container's resources (and of an UpdateContainer's requested
# resources): only the cpu weight, quota, period and sets, the memory limit, the RDT
# class and the unified map are read.
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
        # model.Resources
        "hugepage_limits",
        "blockio_class",
        "pids_limit",
        # model.CpuResources
        "realtime_runtime",
        "realtime_period",
        # model.MemoryResources
        "reservation",
        "swap",
        "kernel",
        "kernel_tcp",
        "swappiness",
        "disable_oom_killer",
        "use_hierarchy",
    }
)

# Maps are copied key by key: dict() of a protobuf map goes through the Python-level
# views of collections.abc, several times slower on a map of a few entries.
# The constructors below set every slot of a frozen model value directly: a dataclass's
# generated __init__ goes through object.__setattr__ once per field, which is most of
# what building the four or five values of one request costs. Each maker sets every
# field (those left out at their defaults), so the values equal the __init__-built ones
# (tests/protocol/test_convert.py compares them with `pod_from_pb` / `container_from_pb`).
_new = object.__new__


def _copy(entries: Any) -> dict[str, str]:
    return {k: entries[k] for k in entries}


def _setters(cls: type, names: str) -> tuple[Any, ...]:
    """The slot setters of `cls` for `names`, which must be all of its fields in order."""
    wanted = tuple(f.name for f in dataclasses.fields(cls))
    if tuple(names.split()) != wanted:
        raise TypeError(f"{cls.__name__} has the fields {wanted}, not {names!r}: update convert")
    return tuple(getattr(cls, name).__set__ for name in wanted)


_CPU_SET = _setters(
    model.CpuResources, "shares quota period realtime_runtime realtime_period cpus mems"
)
_MEMORY_SET = _setters(
    model.MemoryResources,
    "limit reservation swap kernel kernel_tcp swappiness disable_oom_killer use_hierarchy",
)
_MEMORY_LIMIT_SET, _MEMORY_LEFT_OUT = _MEMORY_SET[0], _MEMORY_SET[1:]
_RESOURCES_SET = _setters(
    model.Resources,
    "cpu memory hugepage_limits blockio_class rdt_class unified pids_limit",
)
_POD_SET = _setters(
    model.Pod,
    "id name uid namespace labels annotations runtime_handler cgroup_parent cgroups_path "
    "pid ips namespaces overhead pod_resources sandbox_resources",
)
_CONTAINER_SET = _setters(
    model.Container,
    "id pod_id name state labels annotations args env cgroups_path resources oom_score_adj "
    "pid namespaces created_at started_at finished_at exit_code",
)


def _cpu_for_policy(msg: pb.LinuxCPU) -> model.CpuResources:
    has = msg.HasField
    out = _new(model.CpuResources)
    shares, quota, period, rt_runtime, rt_period, cpus, mems = _CPU_SET
    shares(out, msg.shares.value if has("shares") else None)
    quota(out, msg.quota.value if has("quota") else None)
    period(out, msg.period.value if has("period") else None)
    rt_runtime(out, None)
    rt_period(out, None)
    cpus(out, msg.cpus)
    mems(out, msg.mems)
    return out


def _memory_for_policy(msg: pb.LinuxMemory) -> model.MemoryResources:
    out = _new(model.MemoryResources)
    _MEMORY_LIMIT_SET(out, msg.limit.value if msg.HasField("limit") else None)
    for left_out in _MEMORY_LEFT_OUT:
        left_out(out, None)
    return out


def resources_for_policy(msg: pb.LinuxResources) -> model.Resources:
    """`resources_from_pb` without the fields in LEFT_OUT_FOR_POLICY. Remembered by the
    message's bytes: the replicas of a workload, and each request about one container,
    carry the same resources, and encoding them is a fraction of converting them."""
    wire = msg.SerializeToString()
    known = _RESOURCES.get(wire)
    if known is None:
        known = _resources_for_policy(msg)
        if len(wire) <= _RESOURCES_KEY_MAX:  # a huge one (a big unified map) is not kept
            if len(_RESOURCES) >= _RESOURCES_LIMIT:
                _RESOURCES.clear()
            _RESOURCES[wire] = known
    return known


# Frozen values; their `unified` dict is shared like any model mapping (read-only).
_RESOURCES: dict[bytes, model.Resources] = {}
_RESOURCES_LIMIT = 1024
_RESOURCES_KEY_MAX = 512  # a container's usual resources encode to ~50 bytes


def _resources_for_policy(msg: pb.LinuxResources) -> model.Resources:
    has = msg.HasField
    out = _new(model.Resources)
    cpu, memory, hugepage_limits, blockio_class, rdt_class, unified, pids_limit = _RESOURCES_SET
    cpu(out, _cpu_for_policy(msg.cpu) if has("cpu") else None)
    memory(out, _memory_for_policy(msg.memory) if has("memory") else None)
    hugepage_limits(out, ())
    blockio_class(out, None)
    rdt_class(out, msg.rdt_class.value if has("rdt_class") else None)
    unified(out, _copy(msg.unified))
    pids_limit(out, None)
    return out


def pod_for_policy(msg: pb.PodSandbox) -> model.Pod:
    """`pod_from_pb` without the fields in LEFT_OUT_FOR_POLICY (on every request)."""
    linux = msg.linux
    (
        id_,
        name,
        uid,
        namespace,
        labels,
        annotations,
        runtime_handler,
        cgroup_parent,
        cgroups_path,
        pid,
        ips,
        namespaces,
        overhead,
        pod_resources,
        sandbox_resources,
    ) = _POD_SET
    out = _new(model.Pod)
    id_(out, msg.id)
    name(out, msg.name)
    uid(out, msg.uid)
    namespace(out, msg.namespace)
    labels(out, _copy(msg.labels))
    annotations(out, _copy(msg.annotations))
    runtime_handler(out, "")
    cgroup_parent(out, linux.cgroup_parent)
    cgroups_path(out, linux.cgroups_path)
    pid(out, msg.pid or None)
    ips(out, ())
    namespaces(out, {ns.type: ns.path for ns in linux.namespaces})
    overhead(out, None)
    pod_resources(out, None)
    sandbox_resources(out, None)
    return out


def container_for_policy(msg: pb.Container) -> model.Container:
    """`container_from_pb` without the fields in LEFT_OUT_FOR_POLICY (on every request)."""
    linux = msg.linux  # an absent linux reads as an empty one: no resources, no oom value
    (
        id_,
        pod_id,
        name,
        state,
        labels,
        annotations,
        args,
        env,
        cgroups_path,
        resources,
        oom_score_adj,
        pid,
        namespaces,
        created_at,
        started_at,
        finished_at,
        exit_code,
    ) = _CONTAINER_SET
    out = _new(model.Container)
    id_(out, msg.id)
    pod_id(out, msg.pod_sandbox_id)
    name(out, msg.name)
    state(out, _STATES.get(msg.state, model.ContainerState.UNKNOWN))
    labels(out, _copy(msg.labels))
    annotations(out, _copy(msg.annotations))
    args(out, ())
    env(out, ())
    cgroups_path(out, linux.cgroups_path)
    has = linux.HasField
    resources(out, resources_for_policy(linux.resources) if has("resources") else None)
    oom_score_adj(out, linux.oom_score_adj.value if has("oom_score_adj") else None)
    pid(out, msg.pid or None)
    namespaces(out, {ns.type: ns.path for ns in linux.namespaces})
    created_at(out, msg.created_at)
    started_at(out, 0)
    finished_at(out, 0)
    exit_code(out, 0)
    return out


# a state a newer runtime added reads as UNKNOWN
_STATES = {int(s): s for s in model.ContainerState}


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
    if adj.annotations:
        _put(msg.annotations, adj.annotations)
    for key, value in adj.env:
        msg.env.add(key=key, value=value)
    linux = msg.linux
    if adj.resources is not None and not adj.resources.is_empty():
        resources = linux.resources
        resources_to_pb(adj.resources, resources)
        resources.SetInParent()
    if adj.oom_score_adj is not None:
        linux.oom_score_adj.value = adj.oom_score_adj
    if adj.rdt is not None:
        rdt_to_pb(adj.rdt, linux.rdt)
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
    if not updates:  # the usual reply: nothing to add
        return
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
