"""Reclaimable CPU and memory per NUMA node (kubewharf/katalyst-core#217).

Batch schedulers that place reclaimed_cores pods need to know not just how much idle
capacity a node has, but on which NUMA node it is, or a NUMA-bound batch pod lands where
its memory is remote. One pure function computes it from the current plan, so the debug
API and the metrics report the same numbers.

Rules:
* CPU: the reclaimed pool's CPUs on the node, 1000 millicores each.
* Memory: the node's MemTotal, minus its share of the configured system reserve, minus
  the memory limits of the online (non-reclaimed) containers that can use it: all of a
  limit bound to that node, and a node-size-proportional share of an unbound one. A
  container without a limit cannot be accounted for and is listed in the reason. Never
  below zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nri_plugin.policy.planner import NodePlan
from nri_plugin.policy.qos import QosClass
from nri_plugin.policy.workload import Workload
from qos_model.topology import Topology

MILLICORES_PER_CPU = 1000


@dataclass(frozen=True, slots=True)
class NumaReclaimable:
    node: int
    cpus: frozenset[int]
    millicores: int
    memory_bytes: int
    reason: str


def reclaimable_by_numa(
    topology: Topology,
    plan: NodePlan,
    workloads: Sequence[Workload],
    system_reserved_memory: int = 0,
) -> Mapping[int, NumaReclaimable]:
    sizes = {n.id: n.memory_bytes or 0 for n in topology.nodes}
    total = sum(sizes.values())
    used = {node: 0.0 for node in sizes}
    unlimited: list[str] = []
    for w in workloads:
        if w.classification.qos_class is QosClass.RECLAIMED_CORES:
            continue
        if w.memory_limit is None:
            unlimited.append(w.name)
            continue
        container_plan = plan.containers.get(w.container_id)
        bound = container_plan.mems.value if container_plan is not None else None
        if bound:
            share = w.memory_limit / len(bound)
            for node in bound:
                used[node] += share
        elif total:
            for node, size in sizes.items():
                used[node] += w.memory_limit * size / total
    result: dict[int, NumaReclaimable] = {}
    for node, size in sorted(sizes.items()):
        reserve = system_reserved_memory * size / total if total else 0
        memory = max(0, int(size - reserve - used[node]))
        cpus = plan.pools.reclaimed & topology.node(node).cpus
        reason = (
            f"{len(cpus)} reclaimed CPU(s); memory {size} - reserve {int(reserve)} "
            f"- online limits {int(used[node])}"
        )
        if unlimited:
            reason += f"; not counted (no memory limit): {', '.join(sorted(unlimited))}"
        result[node] = NumaReclaimable(node, cpus, len(cpus) * MILLICORES_PER_CPU, memory, reason)
    return result
