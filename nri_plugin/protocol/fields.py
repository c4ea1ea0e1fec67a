"""NRI's LinuxResources cpu and memory fields, each listed once.

One row per field of `pb.LinuxCPU` and `pb.LinuxMemory`: its protobuf name, the
`pb.Field` id NRI's ownership tracking uses for it, how presence is expressed on the
wire (`Kind`), the attribute of `qos_model.containers.CpuResources` /
`MemoryResources` holding it, and two facts the embedded runtime needs (NRI v0.4.0's
wording in conflict messages, and whether containerd's CRI update path carries it).

`convert` (protobuf <-> model) and `embedded_runtime.merge` (NRI's merge, the runtimes'
apply rules) iterate these tuples instead of naming fields. tests/protocol/test_fields.py
checks the table against the protobuf descriptors and the model dataclasses, so a field
added to one of them and not here fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nri_plugin.protocol import nri_pb2 as pb

F = pb.Field


class Kind(Enum):
    """How a field says "not set", on the wire and in the model."""

    INT = "int"  # Optional{Int64,UInt64} wrapper message; model: int | None
    BOOL = "bool"  # OptionalBool wrapper message; model: bool | None
    STRING = "string"  # plain proto3 string, "" = not set; model: str


@dataclass(frozen=True, slots=True)
class ResourceField:
    group: str  # "cpu" | "memory": the LinuxResources member (= model.Resources attribute)
    name: str  # field name inside pb.LinuxCPU / pb.LinuxMemory
    field_id: int  # pb.Field value NRI's ownership tracking (OwningPlugins) uses
    kind: Kind
    attr: str  # attribute of model.CpuResources / model.MemoryResources
    legacy_subject: str  # NRI v0.4.0's name for it in "both tried to set ..." (no Field enum)
    cri: bool = False  # taken from NRI by containerd's CRI update path (§6.8)

    @property
    def wrapped(self) -> bool:
        """True for Optional* wrappers (presence = HasField), False for plain strings."""
        return self.kind is not Kind.STRING


def _cpu(
    name: str, field_id: int, kind: Kind, legacy_subject: str, *, cri: bool = False
) -> ResourceField:
    # The model attribute has the protobuf field's name (a row with a different one would
    # construct ResourceField itself).
    return ResourceField("cpu", name, field_id, kind, name, legacy_subject, cri)


def _mem(
    name: str, field_id: int, kind: Kind, legacy_subject: str, *, cri: bool = False
) -> ResourceField:
    return ResourceField("memory", name, field_id, kind, name, legacy_subject, cri)


# In protobuf field-number order; embedded_runtime.merge claims ownership in this order.
CPU_FIELDS: tuple[ResourceField, ...] = (
    _cpu("shares", F.CPUShares, Kind.INT, "CPU shares", cri=True),
    _cpu("quota", F.CPUQuota, Kind.INT, "CPU quota", cri=True),
    _cpu("period", F.CPUPeriod, Kind.INT, "CPU period", cri=True),
    _cpu("realtime_runtime", F.CPURealtimeRuntime, Kind.INT, "CPU realtime runtime"),
    _cpu("realtime_period", F.CPURealtimePeriod, Kind.INT, "CPU realtime period"),
    _cpu("cpus", F.CPUSetCPUs, Kind.STRING, "CPU pinning", cri=True),
    _cpu("mems", F.CPUSetMems, Kind.STRING, "memory pinning", cri=True),
)

MEMORY_FIELDS: tuple[ResourceField, ...] = (
    _mem("limit", F.MemLimit, Kind.INT, "memory limit", cri=True),
    _mem("reservation", F.MemReservation, Kind.INT, "memory reservation"),
    _mem("swap", F.MemSwapLimit, Kind.INT, "memory swap limit"),
    _mem("kernel", F.MemKernelLimit, Kind.INT, "memory kernel limit"),
    _mem("kernel_tcp", F.MemTCPLimit, Kind.INT, "memory TCP limit"),
    _mem("swappiness", F.MemSwappiness, Kind.INT, "memory swappiness"),
    _mem("disable_oom_killer", F.MemDisableOomKiller, Kind.BOOL, "memory disable OOM killer"),
    _mem("use_hierarchy", F.MemUseHierarchy, Kind.BOOL, "memory 'UseHierarchy'"),
)

RESOURCE_FIELDS: tuple[ResourceField, ...] = CPU_FIELDS + MEMORY_FIELDS
