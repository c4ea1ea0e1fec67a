"""What one container gets, as one typed value with a reason for every field.

The plan is the policy's whole answer for a container; everything else is derived from
it: the CreateContainer adjustment, the updates sent when pools move, the host writes
the runtime cannot do for us, and (later) what the debug API shows when someone asks
"why is this container on CPUs 4-7?".

Fields that later issues fill (RDT class, io weight, net class) are here already, as
decisions with value None and a reason saying they are not managed yet, so every
consumer handles them from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

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


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    container_id: str
    pod_id: str
    name: str  # "<namespace>/<pod>/<container>", for people
    qos_class: QosClass
    pool: str  # "system", "shared", "shared:<name>", "reclaimed" or "dedicated"
    cpus: Decision[frozenset[int]]
    mems: Decision[frozenset[int] | None]  # None: not bound, all memory nodes
    cpu_shares: Decision[int | None]
    cpu_quota: Decision[int | None]
    oom_score_adj: Decision[int]
    rdt_class: Decision[str | None] = Decision(None, NOT_MANAGED)
    io_weight: Decision[int | None] = Decision(None, NOT_MANAGED)
    net_class: Decision[str | None] = Decision(None, NOT_MANAGED)

    def reasons(self) -> dict[str, str]:
        return {
            "cpus": self.cpus.reason,
            "mems": self.mems.reason,
            "cpu_shares": self.cpu_shares.reason,
            "cpu_quota": self.cpu_quota.reason,
            "oom_score_adj": self.oom_score_adj.reason,
            "rdt_class": self.rdt_class.reason,
            "io_weight": self.io_weight.reason,
            "net_class": self.net_class.reason,
        }

    def cpu_resources(self) -> CpuResources:
        """The CPU part of the plan in NRI terms ("" = leave the runtime's value)."""
        mems = self.mems.value
        return CpuResources(
            shares=self.cpu_shares.value,
            quota=self.cpu_quota.value,
            cpus=format_cpu_list(self.cpus.value),
            mems=format_cpu_list(mems) if mems else "",
        )

    def adjustment(
        self, with_oom_score_adj: bool, annotations: dict[str, str] | None = None
    ) -> Adjustment:
        """The CreateContainer adjustment. `with_oom_score_adj` is False for runtimes
        older than NRI v0.7, which drop that field; the host adapter writes it instead."""
        return Adjustment(
            resources=Resources(cpu=self.cpu_resources()),
            oom_score_adj=self.oom_score_adj.value if with_oom_score_adj else None,
            annotations=annotations or {},
        )

    def update(self) -> Update:
        """The resources to (re)apply to the running container."""
        return Update(self.container_id, Resources(cpu=self.cpu_resources()))

    def same_resources(self, other: ContainerPlan) -> bool:
        """True when applying `other` instead would change nothing in the runtime.

        Runs for every container on every event, so it compares the planned values, not
        their NRI rendering (which formats CPU lists)."""
        return (
            self.cpus.value == other.cpus.value
            and self.mems.value == other.mems.value
            and self.cpu_shares.value == other.cpu_shares.value
            and self.cpu_quota.value == other.cpu_quota.value
        )
