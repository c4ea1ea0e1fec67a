"""What one container gets, as one typed value with a reason for every field.

The plan is the engine's whole answer for a container; everything else is derived from it:
the CreateContainer adjustment, the updates sent when pools move, the host intents the
controllers apply, and what the status views show when someone asks "why is this
container on CPUs 4-7?".

Rules of this module:
* Every planned value is a `Decision` field of `ContainerPlan`, and every such field names
  its *domain* in its metadata: who applies it. "cpu" fields travel to the runtime in NRI
  adjustments and updates; "oom" is a host intent for the oom controller; "rdt", "io" and
  "net" are placeholders the isolation issue fills (value None, reason "not managed yet").
* `diff_plans` walks the fields generically, so a new field is diffed the moment it is
  declared; the engine refuses to start with a domain nobody routes
  (`engine.check_routes`), so a new domain cannot be silently dropped either.
* A container's reason for its CPUs names its pool; why the pool has the size it has is the
  pool's reason (`Pools.reasons`), kept once per pool so that a pool resize does not
  rewrite every member's plan. The views join the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

from nri_plugin.policy.qos import QosClass
from qos_model.containers import Adjustment, CpuResources, Resources, Update
from qos_model.cpulist import format_cpu_list

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Decision(Generic[T]):
    """A planned value and why. `value` None means "leave what the runtime set"."""

    value: T
    reason: str


NOT_MANAGED = "not managed yet"

# Domains: who applies a plan field.
CPU = "cpu"  # the runtime, through NRI adjustments and container updates
OOM = "oom"  # the oom controller, on the container's processes
RDT = "rdt"
IO = "io"
NET = "net"


def _domain(name: str) -> dict[str, str]:
    return {"domain": name}


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    container_id: str
    pod_id: str
    name: str  # "<namespace>/<pod>/<container>", for people
    qos_class: QosClass
    pool: str  # "system", "shared", "shared:<name>", "reclaimed" or "dedicated"
    cpus: Decision[frozenset[int]] = field(metadata=_domain(CPU))
    mems: Decision[frozenset[int] | None] = field(metadata=_domain(CPU))  # None: all nodes
    cpu_shares: Decision[int | None] = field(metadata=_domain(CPU))
    cpu_quota: Decision[int | None] = field(metadata=_domain(CPU))
    oom_score_adj: Decision[int] = field(metadata=_domain(OOM))
    rdt_class: Decision[str | None] = field(
        default=Decision(None, NOT_MANAGED), metadata=_domain(RDT)
    )
    io_weight: Decision[int | None] = field(
        default=Decision(None, NOT_MANAGED), metadata=_domain(IO)
    )
    net_class: Decision[str | None] = field(
        default=Decision(None, NOT_MANAGED), metadata=_domain(NET)
    )
    role: str = "app"  # roles.Role: app, init, sidecar or ephemeral (not a planned value)

    def decisions(self) -> dict[str, Decision[Any]]:
        """Every planned field by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in plan_fields(type(self))}

    def reasons(self) -> dict[str, str]:
        return {name: d.reason for name, d in self.decisions().items()}

    def cpu_resources(self) -> CpuResources:
        """The CPU part of the plan in NRI terms ("" = leave the runtime's value)."""
        mems = self.mems.value
        return CpuResources(
            shares=self.cpu_shares.value,
            quota=self.cpu_quota.value,
            cpus=cpu_list(self.cpus.value),
            mems=cpu_list(mems) if mems else "",
        )

    def adjustment(
        self, with_oom_score_adj: bool, annotations: dict[str, str] | None = None
    ) -> Adjustment:
        """The CreateContainer adjustment. `with_oom_score_adj` is False for runtimes
        older than NRI v0.7, which drop that field; the oom controller writes it instead."""
        return Adjustment(
            resources=self._resources(),
            oom_score_adj=self.oom_score_adj.value if with_oom_score_adj else None,
            annotations=annotations or {},
        )

    def update(self) -> Update:
        """The resources to (re)apply to the running container."""
        return Update(self.container_id, self._resources())

    def _resources(self) -> Resources:
        """`cpu_resources` as Resources, made once per distinct value: a pool's members
        (and the replicas created into it) all get the same, and they are frozen."""
        key = (self.cpus.value, self.mems.value, self.cpu_shares.value, self.cpu_quota.value)
        resources = _RESOURCES.get(key)
        if resources is None:
            if len(_RESOURCES) > 4096:
                _RESOURCES.clear()
            resources = _RESOURCES[key] = Resources(cpu=self.cpu_resources())
        return resources


_RESOURCES: dict[tuple[object, ...], Resources] = {}


_CPU_LISTS: dict[frozenset[int], str] = {}


def cpu_list(cpus: frozenset[int]) -> str:
    """format_cpu_list, remembered: a pool's list is rendered for each of its members (in
    its update and in the note that describes its plan)."""
    text = _CPU_LISTS.get(cpus)
    if text is None:
        if len(_CPU_LISTS) > 4096:
            _CPU_LISTS.clear()
        text = _CPU_LISTS[cpus] = format_cpu_list(cpus)
    return text


def plan_fields(cls: type[ContainerPlan]) -> tuple[Any, ...]:
    """The Decision fields of a plan class (those that declare a domain)."""
    cached = _FIELDS.get(cls)
    if cached is None:
        cached = _FIELDS[cls] = tuple(f for f in fields(cls) if "domain" in f.metadata)
    return cached


_FIELDS: dict[type, tuple[Any, ...]] = {}


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One planned value that differs between two plans of the same container."""

    field: str
    domain: str
    old: object
    new: object


def diff_plans(old: ContainerPlan, new: ContainerPlan) -> tuple[FieldChange, ...]:
    """Every planned value that changed, over every Decision field of the plan class.

    Compares values only: a new reason with the same value asks nothing of anyone."""
    changes = []
    for name, domain in _domains(type(new)):
        before = getattr(old, name)
        after = getattr(new, name)
        # Members of a pool share Decision objects: most fields are the very same object.
        if before is not after and before.value != after.value:
            changes.append(FieldChange(name, domain, before.value, after.value))
    return tuple(changes)


def _domains(cls: type[ContainerPlan]) -> tuple[tuple[str, str], ...]:
    cached = _DOMAINS.get(cls)
    if cached is None:
        cached = _DOMAINS[cls] = tuple((f.name, f.metadata["domain"]) for f in plan_fields(cls))
    return cached


_DOMAINS: dict[type, tuple[tuple[str, str], ...]] = {}
