"""convert: protobuf <-> model, on generated values and on every resource set in the
captured traffic of containerd 1.7.13, containerd 2.3.4 and CRI-O 1.36.3."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from nri_plugin.protocol import convert, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.fields import CPU_FIELDS, MEMORY_FIELDS, Kind, ResourceField
from qos_model import containers as model
from tests.captures import SESSIONS, Session, session_id

WIRE_INTS = {
    "OptionalInt64": st.integers(-(1 << 63), (1 << 63) - 1),
    "OptionalUInt64": st.integers(0, (1 << 64) - 1),
}


def _group(
    cls: type, message: type[Message], table: tuple[ResourceField, ...]
) -> st.SearchStrategy[Any]:
    """Model values whose every field the wire type can carry, built from the table."""
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for f in table:
        if f.kind is Kind.STRING:
            kwargs[f.attr] = st.sampled_from(["", "0", "0-3", "1,5-7"])
        elif f.kind is Kind.BOOL:
            kwargs[f.attr] = st.none() | st.booleans()
        else:
            wrapper = message.DESCRIPTOR.fields_by_name[f.name].message_type
            assert wrapper is not None
            kwargs[f.attr] = st.none() | WIRE_INTS[wrapper.name]
    return st.builds(cls, **kwargs)


resources = st.builds(
    model.Resources,
    cpu=st.none() | _group(model.CpuResources, pb.LinuxCPU, CPU_FIELDS),
    memory=st.none() | _group(model.MemoryResources, pb.LinuxMemory, MEMORY_FIELDS),
    hugepage_limits=st.lists(
        st.builds(model.HugepageLimit, st.sampled_from(["2MB", "1GB"]), st.integers(0, 1 << 40)),
        max_size=2,
    ).map(tuple),
    blockio_class=st.none() | st.sampled_from(["", "slow"]),
    rdt_class=st.none() | st.sampled_from(["", "gold"]),
    unified=st.dictionaries(st.sampled_from(["memory.high", "cpu.idle"]), st.just("1")),
    pids_limit=st.none() | st.integers(-1, 1 << 20),
)


@given(resources)
def test_resources_round_trip(res: model.Resources) -> None:
    assert convert.resources_from_pb(convert.resources_to_pb(res)) == res


@given(resources)
def test_unset_fields_stay_absent_on_the_wire(res: model.Resources) -> None:
    msg = convert.resources_to_pb(res)
    for group, table in (("cpu", CPU_FIELDS), ("memory", MEMORY_FIELDS)):
        values = getattr(res, group)
        assert msg.HasField(group) is (values is not None)
        if values is None:
            continue
        sub = getattr(msg, group)
        for f in table:
            if f.wrapped:
                assert sub.HasField(f.name) is (getattr(values, f.attr) is not None), f.name


def test_zero_and_false_are_values_not_absence() -> None:
    res = model.Resources(
        cpu=model.CpuResources(shares=0, quota=-1),
        memory=model.MemoryResources(limit=0, disable_oom_killer=False),
    )
    msg = convert.resources_to_pb(res)
    assert msg.cpu.HasField("shares") and msg.cpu.quota.value == -1
    assert msg.memory.HasField("limit") and msg.memory.HasField("disable_oom_killer")
    assert convert.resources_from_pb(msg) == res


@given(st.text(max_size=8), resources, st.booleans())
def test_update_to_pb(container_id: str, res: model.Resources, ignore: bool) -> None:
    msg = convert.update_to_pb(model.Update(container_id, res, ignore_failure=ignore))
    assert (msg.container_id, msg.ignore_failure) == (container_id, ignore)
    assert msg.linux.HasField("resources")
    assert convert.resources_from_pb(msg.linux.resources) == res


# --- captured traffic --------------------------------------------------------------------


def _payloads(session: Session) -> Iterator[Message]:
    for i, msg in enumerate(session.messages):
        ref = session.decoded[i]
        spec = services.lookup(str(ref["service"]), str(ref["method"]))
        assert spec is not None
        if msg.ttrpc_type == ttrpc.MessageType.REQUEST:
            yield spec.request.FromString(ttrpc_pb2.Request.FromString(msg.data).payload)
        else:
            env = ttrpc_pb2.Response.FromString(msg.data)
            if not env.HasField("status"):
                yield spec.response.FromString(env.payload)


def _linux_resources(message: Message) -> Iterator[pb.LinuxResources]:
    if isinstance(message, pb.LinuxResources):
        yield message
        return
    for fd, value in message.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        for item in value if fd.is_repeated else [value]:
            yield from _linux_resources(item)


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_captured_cpu_and_memory_reencode_byte_for_byte(session: Session) -> None:
    """Every LinuxResources a real runtime or plugin sent: its cpu and memory, read into
    the model and written back, are Go's bytes again (no map involved in either)."""
    seen = 0
    for payload in _payloads(session):
        for res in _linux_resources(payload):
            again = convert.resources_to_pb(convert.resources_from_pb(res))
            for group in ("cpu", "memory"):
                assert again.HasField(group) is res.HasField(group)
                original = getattr(res, group).SerializeToString()
                assert getattr(again, group).SerializeToString() == original, group
            seen += 1
    assert seen > 0


def test_captured_container_survives_the_model() -> None:
    """A captured CreateContainer container, read and written back, keeps what the model
    holds (bytes may differ only where maps are involved: compare decoded)."""
    checked = 0
    for session in SESSIONS:
        for payload in _payloads(session):
            if isinstance(payload, pb.CreateContainerRequest):
                ctr = convert.container_from_pb(payload.container)
                assert convert.container_from_pb(convert.container_to_pb(ctr)) == ctr
                pod = convert.pod_from_pb(payload.pod)
                assert convert.pod_from_pb(convert.pod_to_pb(pod)) == pod
                checked += 1
    assert checked > 0


@given(st.lists(st.text(max_size=8), max_size=5), resources)
def test_a_bulk_update_encodes_as_one_update_per_container(
    ids: list[str], res: model.Resources
) -> None:
    bulk = pb.UpdateContainersRequest()
    convert.updates_to_pb([model.BulkUpdate(tuple(ids), res)], bulk.update)
    single = pb.UpdateContainersRequest()
    for cid in ids:
        single.update.add().CopyFrom(convert.update_to_pb(model.Update(cid, res)))
    assert bulk.SerializeToString() == single.SerializeToString()


def _without_left_out(value: Any) -> Any:
    """`value` with the fields of LEFT_OUT_FOR_POLICY at their defaults, nested ones too."""
    if value is None:
        return None
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        current = getattr(value, f.name)
        if f.name in convert.LEFT_OUT_FOR_POLICY:
            if f.default is not dataclasses.MISSING:
                changes[f.name] = f.default
            else:
                assert f.default_factory is not dataclasses.MISSING
                changes[f.name] = f.default_factory()
        elif isinstance(current, model.Resources | model.CpuResources | model.MemoryResources):
            changes[f.name] = _without_left_out(current)
    return dataclasses.replace(value, **changes)


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_what_the_policy_reads_is_the_full_conversion_minus_the_left_out_fields(
    session: Session,
) -> None:
    """pod_for_policy / container_for_policy / resources_for_policy, on every pod,
    container and requested resources a real runtime sent: equal to the full conversion
    with the left-out fields (nested ones included) at their defaults, also when the
    resources come back remembered."""
    seen = 0
    for payload in _payloads(session):
        for fd, value in payload.ListFields():
            if fd.message_type is None or fd.is_repeated:
                continue
            if isinstance(value, pb.PodSandbox):
                want = _without_left_out(convert.pod_from_pb(value))
                assert convert.pod_for_policy(value) == want
                seen += 1
            elif isinstance(value, pb.Container):
                want_ctr = _without_left_out(convert.container_from_pb(value))
                for _ in range(2):  # the second time, the resources are remembered
                    assert convert.container_for_policy(value) == want_ctr
                seen += 1
            elif isinstance(value, pb.LinuxResources):
                want_res = _without_left_out(convert.resources_from_pb(value))
                for _ in range(2):
                    assert convert.resources_for_policy(value) == want_res
                seen += 1
    assert seen > 0 or not any(True for _ in _payloads(session))


@given(resources)
def test_resources_for_policy_on_generated_values(res: model.Resources) -> None:
    msg = convert.resources_to_pb(res)
    assert convert.resources_for_policy(msg) == _without_left_out(res)


def test_a_container_without_linux_has_no_resources_and_no_oom_score_adj() -> None:
    ctr = convert.container_for_policy(pb.Container(id="c", state=pb.CONTAINER_RUNNING))
    assert ctr.resources is None and ctr.oom_score_adj is None
    assert ctr.state is model.ContainerState.RUNNING
    assert convert.container_for_policy(pb.Container(state=99)).state is (  # type: ignore[arg-type]
        model.ContainerState.UNKNOWN
    )
