"""Typed, protobuf-free view of pods, containers and the changes a policy asks for.

Policies and the embedded runtime work on these values; only
`nri_plugin.protocol.convert` knows the protobuf classes. Keeping the wire types out of
the policy means a policy test builds a `Container(...)` in one line and can never
forget NRI's presence rules.

Presence rules carried over from NRI: `None` means "not set / leave alone"; for `cpus`
and `mems` the empty string means the same (NRI cannot express an empty cpuset). Mapping
fields hold plain dicts: treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, TypeVar


class ContainerState(IntEnum):
    UNKNOWN = 0
    CREATED = 1
    PAUSED = 2
    RUNNING = 3
    STOPPED = 4


@dataclass(frozen=True, slots=True)
class CpuResources:
    shares: int | None = None
    quota: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str = ""
    mems: str = ""


@dataclass(frozen=True, slots=True)
class MemoryResources:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    kernel: int | None = None
    kernel_tcp: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool | None = None
    use_hierarchy: bool | None = None


@dataclass(frozen=True, slots=True)
class HugepageLimit:
    page_size: str
    limit: int


@dataclass(frozen=True, slots=True)
class Resources:
    """Linux resources, both as the runtime reports them and as a plugin requests them."""

    cpu: CpuResources | None = None
    memory: MemoryResources | None = None
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    blockio_class: str | None = None
    rdt_class: str | None = None
    unified: Mapping[str, str] = field(default_factory=dict)
    pids_limit: int | None = None

    def is_empty(self) -> bool:
        """Equal to `Resources()`, field by field: on every CreateContainer reply, where
        the generated __eq__ would build two tuples of every field to compare."""
        return (
            self.cpu is None
            and self.memory is None
            and not self.hugepage_limits
            and self.blockio_class is None
            and self.rdt_class is None
            and not self.unified
            and self.pids_limit is None
        )


@dataclass(frozen=True, slots=True)
class Pod:
    id: str
    name: str = ""
    uid: str = ""
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    runtime_handler: str = ""
    cgroup_parent: str = ""
    cgroups_path: str = ""
    pid: int | None = None
    ips: tuple[str, ...] = ()
    # linux namespace type -> path ("" when the runtime gives no path)
    namespaces: Mapping[str, str] = field(default_factory=dict)
    overhead: Resources | None = None
    pod_resources: Resources | None = None
    sandbox_resources: Resources | None = None


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    pod_id: str = ""
    name: str = ""
    state: ContainerState = ContainerState.UNKNOWN
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "KEY=VALUE", as the runtime sends them
    cgroups_path: str = ""
    resources: Resources | None = None
    oom_score_adj: int | None = None
    pid: int | None = None
    namespaces: Mapping[str, str] = field(default_factory=dict)
    created_at: int = 0  # unix nanoseconds; 0 = unknown (before NRI v0.10)
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0

    def with_resources(self, resources: Resources | None) -> Container:
        return _evolve(self, {"resources": resources})


@dataclass(frozen=True, slots=True)
class Rdt:
    """The NRI LinuxRdt adjustment (v0.11): the resctrl group (CLOS) the runtime puts the
    container's tasks in at creation, with no race against forks. With only `clos_id`
    set, the group must already exist (the rdt controller makes one per class)."""

    clos_id: str | None = None
    schemata: tuple[str, ...] | None = None
    enable_monitoring: bool | None = None
    remove: bool = False


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What a plugin changes on a container being created (CreateContainer reply)."""

    resources: Resources | None = None
    oom_score_adj: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: tuple[tuple[str, str], ...] = ()
    rdt: Rdt | None = None

    def is_empty(self) -> bool:
        return (
            (self.resources is None or self.resources.is_empty())
            and self.oom_score_adj is None
            and not self.annotations
            and not self.env
            and self.rdt is None
        )


@dataclass(frozen=True, slots=True)
class Update:
    """A resource change for an existing container (event replies, UpdateContainers)."""

    container_id: str
    resources: Resources
    ignore_failure: bool = False


@dataclass(frozen=True, slots=True)
class BulkUpdate:
    """The same resources for many existing containers: a pool's members when the pool's
    CPUs move (hundreds on a dense node, so one value instead of one Update each)."""

    container_ids: tuple[str, ...]
    resources: Resources

    def updates(self) -> list[Update]:
        return [Update(cid, self.resources) for cid in self.container_ids]


def flat_updates(updates: Iterable[Update | BulkUpdate]) -> list[Update]:
    """One Update per container."""
    out: list[Update] = []
    for u in updates:
        if isinstance(u, BulkUpdate):
            out.extend(u.updates())
        else:
            out.append(u)
    return out


NO_ADJUSTMENT = Adjustment()


_T = TypeVar("_T")
_Member = tuple[str, Callable[[Any], Any], Callable[[Any, Any], None]]
_MEMBERS: dict[type, tuple[_Member, ...]] = {}


def _evolve(value: _T, changes: Mapping[str, Any]) -> _T:
    """`dataclasses.replace(value, **changes)` for the frozen, slotted values of this
    module (every field in __init__, no __post_init__): the fields are copied slot to slot
    instead of going through replace()'s keyword arguments and the frozen __init__'s
    object.__setattr__, a third of the cost. The engine does this on every update."""
    cls = type(value)
    members = _MEMBERS.get(cls)
    if members is None:
        members = _MEMBERS[cls] = tuple(
            (f.name, getattr(cls, f.name).__get__, getattr(cls, f.name).__set__)
            for f in fields(cls)  # type: ignore[arg-type]
        )
    new = object.__new__(cls)
    used = 0
    for name, get, set_ in members:
        if name in changes:
            set_(new, changes[name])
            used += 1
        else:
            set_(new, get(value))
    if used != len(changes):
        unknown = sorted(set(changes) - {m[0] for m in members})
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return new


# CPU fields a CRI update (UpdateContainerResources) cannot carry: always the current ones.
_CPU_KEPT_ON_UPDATE = frozenset({"realtime_runtime", "realtime_period"})
_CPU_UPDATABLE = tuple(f.name for f in fields(CpuResources) if f.name not in _CPU_KEPT_ON_UPDATE)


def merge_requested(current: Resources | None, requested: Resources) -> Resources:
    """A container's resources after a CRI update: requested values win where set.

    - No `current`: `requested`, unchanged (every field, even those kept below).
    - cpu: when `requested.cpu` is set, each of its fields that is set (int not None,
      cpus/mems not "") replaces the current one, except the realtime fields, which a CRI
      update cannot carry and stay as they are; a current without cpu counts as
      `CpuResources()`. When `requested.cpu` is None the current cpu stays.
    - memory: `requested.memory`, as a whole, when set; else the current memory.
    - hugepage_limits, blockio_class, rdt_class, unified, pids_limit: the current ones;
      the requested ones are ignored.

    Pure; the policy's view of the update. The embedded runtime applies updates the way
    each runtime really does instead (`embedded_runtime.merge.apply_update`).
    """
    if current is None:
        return requested
    cpu = current.cpu
    if requested.cpu is not None:
        wanted = requested.cpu
        changes: dict[str, Any] = {}  # int | None or str, per field
        for name in _CPU_UPDATABLE:
            value = getattr(wanted, name)
            if value is not None and value != "":
                changes[name] = value
        cpu = _evolve(cpu or CpuResources(), changes)
    memory = requested.memory if requested.memory is not None else current.memory
    return _evolve(current, {"cpu": cpu, "memory": memory})
