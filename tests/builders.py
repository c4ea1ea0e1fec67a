"""Pods, containers and hosts for tests, built the way the kubelet and runtimes build them.

One place for the kubelet's formulas (cpu shares from the request, CFS quota from the
limit), the Katalyst annotation keys (imported from the code, never retyped) and the fake
host the controllers write to, so a test says only what is special about its container.
"""

# No `from __future__ import annotations` here: it would shadow the `annotations` builder.
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nri_plugin.policy.kube_qos import CFS_PERIOD_US, kubelet_quota, kubelet_shares
from nri_plugin.policy.qos import (
    ANNOTATION_CPU_ENHANCEMENT,
    ANNOTATION_MEMORY_ENHANCEMENT,
    ANNOTATION_QOS_LEVEL,
)
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
)

QOS = ANNOTATION_QOS_LEVEL
CPU_ENHANCEMENT = ANNOTATION_CPU_ENHANCEMENT
MEMORY_ENHANCEMENT = ANNOTATION_MEMORY_ENHANCEMENT
CFS_PERIOD = CFS_PERIOD_US
MiB = 1 << 20
GiB = 1 << 30


def kubelet_cpu(request: int, limit: int | None = None, **extra: object) -> CpuResources:
    """The CPU resources the kubelet gives a container with this request / limit
    (millicores; the limit defaults to the request, as for Guaranteed pods)."""
    limit = request if limit is None else limit
    return CpuResources(
        shares=kubelet_shares(request),
        quota=kubelet_quota(limit) if limit else None,
        period=CFS_PERIOD if limit else None,
        **extra,  # type: ignore[arg-type]
    )


def annotations(
    qos: str | None = None,
    cpu: Mapping[str, str] | None = None,
    memory: Mapping[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """Katalyst pod annotations: the class and the enhancement maps (JSON of strings)."""
    out = dict(extra)
    if qos:
        out[QOS] = qos
    if cpu:
        out[CPU_ENHANCEMENT] = json.dumps(dict(cpu))
    if memory:
        out[MEMORY_ENHANCEMENT] = json.dumps(dict(memory))
    return out


def pod(
    name: str,
    qos: str | None = None,
    *,
    namespace: str = "default",
    cpu: Mapping[str, str] | None = None,
    memory: Mapping[str, str] | None = None,
    cgroup_parent: str = "",
    **extra: str,
) -> Pod:
    """A pod named `name` (id "pod-<name>") with Katalyst annotations."""
    return Pod(
        id=f"pod-{name}",
        name=name,
        namespace=namespace,
        uid=name,
        annotations=annotations(qos, cpu, memory, **extra),
        cgroup_parent=cgroup_parent,
    )


def container(
    name: str,
    millicores: int = 1000,
    *,
    pod_name: str | None = None,
    oom: int | None = 500,
    memory: int = 256 * MiB,
    state: ContainerState = ContainerState.CREATED,
    created_at: int = 0,
    cpus: str = "",
    mems: str = "",
    pid: int | None = None,
) -> Container:
    """Container "ctr-<name>" of pod "pod-<pod_name or name>", with the kubelet's values
    for a `millicores` request = limit; its cgroups_path in the cgroupfs driver's form."""
    pod_id = f"pod-{pod_name or name}"
    return Container(
        id=f"ctr-{name}",
        pod_id=pod_id,
        name=name,
        state=state,
        resources=Resources(
            cpu=kubelet_cpu(millicores, cpus=cpus, mems=mems),
            memory=MemoryResources(limit=memory),
        ),
        oom_score_adj=oom,
        cgroups_path=f"/kubepods/{pod_id}/ctr-{name}",
        created_at=created_at,
        pid=pid,
    )


@dataclass
class FakeHost:
    """The host as the controllers and the usage sampler see it (isolation.host.LinuxHost's
    methods), recording every oom_score_adj write and serving CPU time that grows at a
    rate the test sets."""

    # (cgroups_path, pid, value) of every oom_score_adj write
    oom_writes: list[tuple[str, int | None, int]] = field(default_factory=list)
    usage_ns: dict[str, int] = field(default_factory=dict)

    def missing(self) -> str:
        return ""

    def set_oom_score_adj(
        self, cgroups_path: str, container_id: str, pid: int | None, value: int, who: str
    ) -> str:
        self.oom_writes.append((cgroups_path, pid, value))
        return f"oom_score_adj {value} on 1 process(es): 1 applied"

    def cpu_usage_ns(self, cgroups_path: str, container_id: str) -> int | None:
        return self.usage_ns.get(cgroups_path)

    def group_dir(self, cgroups_path: str, container_id: str, controller: str) -> Path:
        """Where the container's group would be (collectors get it; nothing is read)."""
        return Path("/sys/fs/cgroup") / (controller or "unified") / cgroups_path.lstrip("/")
