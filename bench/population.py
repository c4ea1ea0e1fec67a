"""The containers the benchmarks run: what the kubelet would hand the runtime.

Populations (the live containers of each level, those Synchronize starts with, and the
measured create/remove pairs; one container per pod):
- uniform (default, as before): identical shared_cores containers, shares 102, quota 10,000
  per 100,000, 64 MiB, oom_score_adj 900.
- mixed: Katalyst classes in the proportions of each 100 containers below, laid out by a
  seeded shuffle of the 100 slots (live container i takes slot i mod 100), sizes drawn from
  a seeded generator, so every policy and every checkout sees the very same containers. The
  measured pairs are drawn from the same 100 slots with another seeded generator per level.
    1 system_cores     kube-system, Burstable 100-250m, 128-256 MiB
    1 dedicated_cores  Guaranteed 1 or 2 CPUs, 2-4 GiB, memory_enhancement numa_binding
    1 dedicated_cores  Guaranteed 1 or 2 CPUs, 2-4 GiB
   49 shared_cores     50-150m; a fifth Guaranteed, the rest Burstable (limit 2x or none)
   10 shared_cores     cpu_enhancement cpuset_pool "batch-a", Burstable 100-150m, limit 2x
    3 shared_cores     memory_enhancement numa_binding, Guaranteed 250m or 500m
   35 reclaimed_cores  BestEffort: no request, no limit (Katalyst's reclaimed resources
                       are extended resources, invisible in the cgroup values)
  The class is the pod annotation `katalyst.kubewharf.io/qos_level`; enhancements are the
  pod annotations `katalyst.kubewharf.io/{cpu,memory}_enhancement` holding JSON objects of
  strings; pods carry `kubernetes.io/config.source: api` like every kubelet pod. Resources
  are the kubelet's: shares max(2, m*1024//1000) of the request, quota m*100 of the limit
  with period 100,000 (no quota without a limit), the memory limit, and oom_score_adj -997
  (Guaranteed), 1000 (BestEffort) or 1000 - 1000*request/capacity clamped to 3..999
  (Burstable, node capacity 374 GiB like `server`). At 1,000 live that is 20 dedicated
  containers (29 CPUs, at most 40 threads with full cores) and 76 CPUs of other
  requests: the requests fit 112 CPUs, as the scheduler would ensure. With the qos policy
  the bench reports how many dedicated containers hold exclusive CPUs at 1,000 live.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from nri_plugin.policy.kube_qos import CFS_PERIOD_US, kubelet_quota, kubelet_shares
from nri_plugin.policy.qos import (
    ANNOTATION_CONFIG_SOURCE,
)
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
)
from tests.builders import annotations as katalyst_annotations

LEVELS = (0, 100, 1000)  # live containers at which CreateContainer is measured
WARMUP = 20
SEED = 20261122
MIB = 1 << 20
GIB = 1 << 30
SHARED_SLOT = "shared-plain"  # the plain shared_cores slot of the mix
NODE_MEMORY = 374 * GIB  # the kubelet's memory capacity, for Burstable oom_score_adj


@dataclass(frozen=True, slots=True)
class Spec:
    """One pod with one container, as the kubelet would hand it to the runtime."""

    kind: str  # the slot of the mix, e.g. "shared/pool"
    qos_level: str
    namespace: str = "bench"
    qos_dir: str = "/bench"  # cgroup parent directory of the pod
    shares: int = 102
    quota: int | None = 10_000
    period: int | None = 100_000
    memory_limit: int | None = 64 * MIB
    oom_score_adj: int = 900
    cpu_enhancement: Mapping[str, str] = field(default_factory=dict)
    memory_enhancement: Mapping[str, str] = field(default_factory=dict)
    from_api: bool = False  # kubernetes.io/config.source: api (the mixed population)


UNIFORM = Spec(kind=SHARED_SLOT, qos_level="shared_cores")


def _kubelet(
    kind: str,
    qos_level: str,
    *,
    cpu_request: int = 0,  # millicores
    cpu_limit: int = 0,
    memory_request: int = 0,  # bytes
    memory_limit: int = 0,
    namespace: str = "bench",
    cpu_enhancement: Mapping[str, str] | None = None,
    memory_enhancement: Mapping[str, str] | None = None,
) -> Spec:
    """The values the kubelet asks the runtime for (pkg/kubelet/kuberuntime and qos)."""
    guaranteed = 0 < cpu_limit == cpu_request and 0 < memory_limit == memory_request
    best_effort = not (cpu_request or cpu_limit or memory_request or memory_limit)
    if guaranteed:
        oom, qos_dir = -997, "/kubepods"
    elif best_effort:
        oom, qos_dir = 1000, "/kubepods/besteffort"
    else:
        oom = 1000 - (1000 * memory_request) // NODE_MEMORY
        oom = 999 if oom >= 1000 else max(3, oom)
        qos_dir = "/kubepods/burstable"
    return Spec(
        kind=kind,
        qos_level=qos_level,
        namespace=namespace,
        qos_dir=qos_dir,
        shares=kubelet_shares(cpu_request or cpu_limit),
        quota=kubelet_quota(cpu_limit) if cpu_limit else None,
        period=CFS_PERIOD_US,
        memory_limit=memory_limit or None,
        oom_score_adj=oom,
        cpu_enhancement=dict(cpu_enhancement or {}),
        memory_enhancement=dict(memory_enhancement or {}),
        from_api=True,
    )


NUMA_BINDING = {"numa_binding": "true"}

# slot kind -> how many of every 100 containers
MIX: tuple[tuple[str, int], ...] = (
    ("system", 1),
    ("dedicated/numa", 1),
    ("dedicated", 1),
    (SHARED_SLOT, 49),
    ("shared/pool", 10),
    ("shared/numa", 3),
    ("reclaimed", 35),
)
assert sum(n for _, n in MIX) == 100


def mixed_spec(kind: str, rng: random.Random) -> Spec:
    if kind == "system":
        mem = rng.choice((128, 256)) * MIB
        return _kubelet(
            kind,
            "system_cores",
            cpu_request=rng.choice((100, 250)),
            memory_request=mem,
            memory_limit=2 * mem,
            namespace="kube-system",
        )
    if kind.startswith("dedicated"):
        cpus, mem = rng.choice((1, 2)) * 1000, rng.choice((2, 4)) * GIB
        return _kubelet(
            kind,
            "dedicated_cores",
            cpu_request=cpus,
            cpu_limit=cpus,
            memory_request=mem,
            memory_limit=mem,
            memory_enhancement=NUMA_BINDING if kind == "dedicated/numa" else None,
        )
    if kind == SHARED_SLOT:
        request, mem = rng.choice((50, 100, 100, 150)), rng.choice((64, 128, 256, 512)) * MIB
        style = rng.random()
        if style < 0.2:  # Guaranteed
            return _kubelet(
                kind,
                "shared_cores",
                cpu_request=request,
                cpu_limit=request,
                memory_request=mem,
                memory_limit=mem,
            )
        return _kubelet(
            kind,
            "shared_cores",
            cpu_request=request,
            cpu_limit=2 * request if style < 0.6 else 0,
            memory_request=mem,
            memory_limit=2 * mem,
        )
    if kind == "shared/pool":
        request, mem = rng.choice((100, 150)), rng.choice((128, 256)) * MIB
        return _kubelet(
            kind,
            "shared_cores",
            cpu_request=request,
            cpu_limit=2 * request,
            memory_request=mem,
            memory_limit=2 * mem,
            cpu_enhancement={"cpuset_pool": "batch-a"},
        )
    if kind == "shared/numa":
        request, mem = rng.choice((250, 500)), rng.choice((1, 2)) * GIB
        return _kubelet(
            kind,
            "shared_cores",
            cpu_request=request,
            cpu_limit=request,
            memory_request=mem,
            memory_limit=mem,
            memory_enhancement=NUMA_BINDING,
        )
    if kind == "reclaimed":
        return _kubelet(kind, "reclaimed_cores")
    raise ValueError(f"unknown slot kind {kind!r}")


@dataclass(frozen=True, slots=True)
class Population:
    """The live containers (index i < 1,000) and, per level, the warm-up + measured pairs."""

    name: str
    live: tuple[Spec, ...]
    pairs: Mapping[int, tuple[Spec, ...]]

    @staticmethod
    def build(name: str, samples: int) -> Population:
        count = max(LEVELS)
        if name == "uniform":
            return Population(
                name, (UNIFORM,) * count, {lv: (UNIFORM,) * (WARMUP + samples) for lv in LEVELS}
            )
        slots = [kind for kind, n in MIX for _ in range(n)]
        rng = random.Random(SEED)
        rng.shuffle(slots)
        live = tuple(mixed_spec(slots[i % len(slots)], rng) for i in range(count))
        pairs = {}
        for level in LEVELS:
            draw = random.Random(SEED + 1 + level)
            pairs[level] = tuple(
                mixed_spec(draw.choice(slots), draw) for _ in range(WARMUP + samples)
            )
        return Population(name, live, pairs)


def demo_pod(i: int, spec: Spec) -> Pod:
    source = {ANNOTATION_CONFIG_SOURCE: "api"} if spec.from_api else {}
    return Pod(
        id=f"pod-{i:05d}",
        name=f"bench-{i}",
        namespace=spec.namespace,
        uid=f"uid-{i:05d}",
        annotations=katalyst_annotations(
            spec.qos_level, spec.cpu_enhancement, spec.memory_enhancement, **source
        ),
        cgroup_parent=f"{spec.qos_dir}/pod-{i:05d}",
    )


def demo_container(i: int, spec: Spec) -> Container:
    return Container(
        id=f"ctr-{i:05d}",
        pod_id=f"pod-{i:05d}",
        name="app",
        state=ContainerState.CREATED,
        args=("sleep", "3600"),
        env=("A=1",),
        resources=Resources(
            cpu=CpuResources(shares=spec.shares, quota=spec.quota, period=spec.period),
            memory=MemoryResources(limit=spec.memory_limit),
        ),
        oom_score_adj=spec.oom_score_adj,
    )
