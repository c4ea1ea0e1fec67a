"""The pod's Kubernetes QoS class, read back from what NRI shows of its container.

NRI carries no requests and no QoS class; the kubelet's choices leave traces in the
cgroup values and oom_score_adj it asks the runtime for:

* oom_score_adj is pod-wide, so it is trusted first (pkg/kubelet/qos/policy.go). -997 is
  Guaranteed or system-node-critical (-998 on old kubelets). 1000 is BestEffort. Burstable
  is `1000 - 1000*mem_request/capacity`, clamped to 3..999 (2..999 on old kubelets). Any
  other value is not the kubelet's, and the resources decide.
* The request comes from shares. The kubelet writes `floor(m*1024/1000)`, at least 2
  (pkg/kubelet/cm/helpers_linux.go), and `ceil(shares*1000/1024)` inverts that exactly; 2
  means no request. The limit is `ceil(quota*1000/period)`. A quota <= 0 or missing means
  no limit, and a missing period means 100 ms.
* Guaranteed: a memory limit and a CPU limit equal to the request (within 1m). BestEffort:
  no limits and no request. Anything else is Burstable; a memory request alone leaves no
  trace in cgroups. With the kubelet's CFS quota off, a Guaranteed container has no quota,
  and -997 still marks it Guaranteed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from qos_model.containers import Container, CpuResources

# kubelet numbers (pkg/kubelet/qos/policy.go, pkg/kubelet/cm/helpers_linux.go)
_KUBELET_GUARANTEED_OOM_ADJ: Final = frozenset({-997, -998})
_KUBELET_BEST_EFFORT_OOM_ADJ: Final = 1000
_KUBELET_BURSTABLE_OOM_ADJ: Final = range(2, 1000)
_MIN_SHARES: Final = 2
_SHARES_PER_CPU: Final = 1024
MILLI_PER_CPU: Final = 1000
_DEFAULT_CFS_PERIOD_US: Final = 100_000
CFS_PERIOD_US: Final = _DEFAULT_CFS_PERIOD_US  # the kubelet's default cpu.cfs_period_us
_MEMORY_UNLIMITED: Final = 1 << 62  # runtimes report "max" as ~PAGE_COUNTER_MAX pages


class KubeQos(StrEnum):
    GUARANTEED = "Guaranteed"
    BURSTABLE = "Burstable"
    BEST_EFFORT = "BestEffort"


@dataclass(frozen=True, slots=True)
class KubeQosEstimate:
    kube_qos: KubeQos | None  # None: nothing to go on
    node_critical: bool  # kubelet's Guaranteed oom_score_adj on a non-Guaranteed container
    cpu_request_millicores: int | None
    cpu_limit_millicores: int | None
    memory_limit_bytes: int | None
    reason: str


def kubelet_shares(request_millicores: int) -> int:
    """cpu.shares the kubelet sets for a CPU request (MilliCPUToShares), which
    `_cpu_request_millicores` inverts; the lab and the tests build containers with it."""
    return max(_MIN_SHARES, request_millicores * _SHARES_PER_CPU // MILLI_PER_CPU)


def kubelet_quota(limit_millicores: int, period: int = _DEFAULT_CFS_PERIOD_US) -> int:
    """cpu.cfs_quota_us the kubelet sets for a CPU limit (MilliCPUToQuota: at least 1 ms)."""
    return max(1000, limit_millicores * period // MILLI_PER_CPU)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cpu_request_millicores(cpu: CpuResources | None) -> int | None:
    if cpu is None or cpu.shares is None or cpu.shares <= 0:
        return None
    if cpu.shares <= _MIN_SHARES:
        return 0
    return _ceil_div(cpu.shares * MILLI_PER_CPU, _SHARES_PER_CPU)


def _cpu_limit_millicores(cpu: CpuResources | None) -> int | None:
    if cpu is None or cpu.quota is None or cpu.quota <= 0:
        return None
    period = cpu.period if cpu.period is not None and cpu.period > 0 else _DEFAULT_CFS_PERIOD_US
    return _ceil_div(cpu.quota * MILLI_PER_CPU, period)


def estimate_kube_qos(container: Container) -> KubeQosEstimate:
    """Read the pod's Kubernetes QoS class back from the cgroup values the kubelet chose."""
    res = container.resources
    cpu = res.cpu if res is not None else None
    mem = res.memory.limit if res is not None and res.memory is not None else None
    mem = mem if mem is not None and 0 < mem < _MEMORY_UNLIMITED else None
    request, limit = _cpu_request_millicores(cpu), _cpu_limit_millicores(cpu)

    if request is None and limit is None and mem is None:
        by_res: KubeQos | None = None
        res_text = "no cpu or memory values"
    elif mem is None and limit is None and not request:
        by_res, res_text = KubeQos.BEST_EFFORT, "no limits and no cpu request"
    elif mem is not None and limit is not None and (request is None or abs(request - limit) <= 1):
        by_res = KubeQos.GUARANTEED
        res_text = f"memory limit {mem} and cpu limit {limit}m equal to the request"
    else:
        by_res = KubeQos.BURSTABLE
        res_text = (
            f"cpu request {request}m, cpu limit {limit}m, memory limit {mem}: "
            "some but not all of a Guaranteed set"
        )
    # memory limit without quota: may be Guaranteed with the kubelet's CFS quota turned off
    maybe_guaranteed = mem is not None and limit is None

    adj = container.oom_score_adj
    node_critical = False
    if adj in _KUBELET_GUARANTEED_OOM_ADJ:
        if by_res is None or by_res is KubeQos.GUARANTEED or maybe_guaranteed:
            kube_qos: KubeQos | None = KubeQos.GUARANTEED
            reason = f"oom_score_adj {adj} is the kubelet's Guaranteed value"
        else:
            kube_qos, node_critical = by_res, True
            reason = (
                f"oom_score_adj {adj} is the kubelet's Guaranteed value but the resources "
                f"({res_text}) cannot be Guaranteed: a system-node-critical {by_res} pod"
            )
    elif adj == _KUBELET_BEST_EFFORT_OOM_ADJ:
        kube_qos = KubeQos.BEST_EFFORT
        reason = f"oom_score_adj {adj} is the kubelet's BestEffort value"
    elif adj is not None and adj in _KUBELET_BURSTABLE_OOM_ADJ:
        kube_qos = KubeQos.BURSTABLE
        reason = f"oom_score_adj {adj} is in the kubelet's Burstable range"
    else:
        kube_qos = by_res
        what = "no oom_score_adj" if adj is None else f"oom_score_adj {adj} is not a kubelet value"
        reason = f"{what}; resources: {res_text}"
    return KubeQosEstimate(kube_qos, node_critical, request, limit, mem, reason)
