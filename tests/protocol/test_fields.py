"""The NRI field table against the protobuf schema and the model dataclasses.

A field added to pb.LinuxCPU / pb.LinuxMemory (a newer api.proto), to the model's
CpuResources / MemoryResources, or to the table alone fails here until the three agree.
"""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.fields import (
    CPU_FIELDS,
    MEMORY_FIELDS,
    RESOURCE_FIELDS,
    Kind,
    ResourceField,
)
from qos_model import containers as model

GROUPS: list[tuple[str, tuple[ResourceField, ...], type[Message], type]] = [
    ("cpu", CPU_FIELDS, pb.LinuxCPU, model.CpuResources),
    ("memory", MEMORY_FIELDS, pb.LinuxMemory, model.MemoryResources),
]
# Protobuf fields nri-qos deliberately does not model (none today). A new NRI field goes
# either here or into the table and the model.
NOT_MODELLED: dict[str, set[str]] = {"cpu": set(), "memory": set()}

WRAPPER_KIND = {
    "OptionalInt64": Kind.INT,
    "OptionalUInt64": Kind.INT,
    "OptionalBool": Kind.BOOL,
}
GROUP_IDS = [g[0] for g in GROUPS]
MODEL_TYPE = {Kind.INT: int | None, Kind.BOOL: bool | None, Kind.STRING: str}


@pytest.mark.parametrize(("group", "table", "message", "cls"), GROUPS, ids=GROUP_IDS)
def test_table_covers_every_protobuf_field(
    group: str, table: tuple[ResourceField, ...], message: type[Message], cls: type
) -> None:
    descriptor = message.DESCRIPTOR
    names = [f.name for f in table]
    assert len(set(names)) == len(names)
    assert set(descriptor.fields_by_name) == set(names) | NOT_MODELLED[group]
    assert all(f.group == group for f in table)
    # protobuf field-number order: merge.py claims ownership in table order
    numbers = [descriptor.fields_by_name[n].number for n in names]
    assert numbers == sorted(numbers)


@pytest.mark.parametrize(("group", "table", "message", "cls"), GROUPS, ids=GROUP_IDS)
def test_table_covers_every_model_field(
    group: str, table: tuple[ResourceField, ...], message: type[Message], cls: type
) -> None:
    assert [f.attr for f in table] == [f.name for f in fields(cls)]
    # the group is the attribute of model.Resources / the LinuxResources member holding it
    assert typing.get_type_hints(model.Resources)[group] == cls | None
    member = pb.LinuxResources.DESCRIPTOR.fields_by_name[group]
    assert member.message_type is message.DESCRIPTOR


@pytest.mark.parametrize("row", RESOURCE_FIELDS, ids=lambda f: f"{f.group}.{f.name}")
def test_kind_matches_the_schema_and_the_model(row: ResourceField) -> None:
    parent = pb.LinuxCPU if row.group == "cpu" else pb.LinuxMemory
    cls = model.CpuResources if row.group == "cpu" else model.MemoryResources
    fd = parent.DESCRIPTOR.fields_by_name[row.name]
    if fd.type == FieldDescriptor.TYPE_STRING:
        assert row.kind is Kind.STRING and not row.wrapped
    else:
        assert fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None
        assert WRAPPER_KIND[fd.message_type.name] is row.kind and row.wrapped
    assert typing.get_type_hints(cls)[row.attr] == MODEL_TYPE[row.kind]


def test_field_ids_are_exactly_nris_cpu_and_memory_ids() -> None:
    ids = [f.field_id for f in RESOURCE_FIELDS]
    assert len(set(ids)) == len(ids)
    cpu_and_memory = {
        v.number
        for v in pb.Field.DESCRIPTOR.values
        if v.name.startswith(("CPU", "Mem")) and v.name != "MemoryPolicy"
    }
    assert set(ids) == cpu_and_memory
    for f in RESOURCE_FIELDS:
        assert pb.Field.Name(f.field_id).startswith("CPU" if f.group == "cpu" else "Mem")  # type: ignore[arg-type]


def test_legacy_subjects_are_distinct() -> None:
    subjects = [f.legacy_subject for f in RESOURCE_FIELDS]
    assert len(set(subjects)) == len(subjects)


def test_cri_fields_are_what_containerd_takes_from_an_update() -> None:
    """containerd converts an NRI update to CRI LinuxContainerResources (§6.8)."""
    cri = {(f.group, f.name) for f in RESOURCE_FIELDS if f.cri}
    assert cri == {
        ("cpu", "shares"),
        ("cpu", "quota"),
        ("cpu", "period"),
        ("cpu", "cpus"),
        ("cpu", "mems"),
        ("memory", "limit"),
    }
