"""What people are shown, built from the engine's state — never by the engine itself.

The status socket (and the debug API that replaces it) answers "why is this container on
these CPUs?" with these views. They are JSON-ready dicts built on demand, in the policy
thread, from the engine's table and plan; the engine keeps no rendering code and no
presentation state. A container's CPU reason is joined here with its pool's reason (why
the pool has the size it has), which the plan keeps once per pool.
"""

from __future__ import annotations

from nri_plugin.control.executor import HostExecutor
from nri_plugin.podspec import PodSpecStatus
from nri_plugin.policy.api import PolicyBase, RecordingPolicy
from nri_plugin.policy.drift import CPU_MANAGER_FIX, DriftBook
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.plan import ContainerPlan
from nri_plugin.policy.planner import NodePlan
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.protect import ProtectState
from qos_model.cpulist import format_cpu_list
from qos_model.runtime import RuntimeInfo


def policy_view(policy: PolicyBase) -> dict[str, object]:
    """The status socket's `plan` answer for whichever policy runs."""
    if isinstance(policy, QosPolicy):
        return {**engine_view(policy.engine), "reconcile": drift_view(policy.drift)}
    if isinstance(policy, RecordingPolicy):
        return {"policy": policy.name, "observations": [o.event for o in policy.observations]}
    return {"policy": policy.name}


def engine_view(engine: Engine) -> dict[str, object]:
    """Everything a person needs to see why each container got what it got."""
    plan = engine.plan
    return {
        "policy": "qos",
        "runtime": runtime_view(engine.runtime),
        "pools": pools_view(plan),
        "containers": {cid: container_view(engine, plan, p) for cid, p in plan.containers.items()},
        "reclaimable": {
            str(n): {
                "cpus": format_cpu_list(r.cpus),
                "millicores": r.millicores,
                "memory_bytes": r.memory_bytes,
                "reason": r.reason,
            }
            for n, r in engine.reclaimable().items()
        },
        "usage_online_cores": None
        if engine.planner.usage is None
        else engine.planner.usage.online_cores,
        "interference": interference_view(engine),
    }


def interference_view(engine: Engine) -> dict[str, object]:
    """Who suffers now, why, who is blamed, and which mitigation rungs are in force."""
    protection = engine.protection
    names = {cid: p.name for cid, p in engine.plan.containers.items()}
    return {
        "detections": [
            {
                "victim": names.get(d.victim, d.victim),
                "verdict": str(d.verdict),
                "delay_ms": round(d.delay_ms, 2),
                "threshold_ms": round(d.threshold_ms, 2),
                "cpu_pressure": d.psi_some,
                "windows": d.windows,
                "confidence": d.confidence,
                "antagonists": [
                    {
                        "name": names.get(a.container_id, a.container_id),
                        "score": a.score,
                        "reason": a.reason,
                    }
                    for a in d.antagonists
                ],
                "reason": d.reason,
            }
            for d in protection.last_detections.values()
        ],
        "rungs": {
            names.get(victim, victim): [
                {"rung": str(rung), "on": [names.get(t, t) for t in targets]}
                for rung, targets in rungs
            ]
            for victim, rungs in protection.ladder.in_force().items()
        },
        "evictions_in_flight": sorted(protection.evicting),
    }


def drift_view(book: DriftBook) -> dict[str, object]:
    """Drift reconciliation: periods, repairs, conflicts with other agents, containers
    the runtime never delivered, and whether the kubelet's CPU manager fights us (with
    the fix)."""
    evidence = book.fighting()
    return {
        "periods": book.period,
        "last_read_ms": round(book.last_read_seconds * 1000, 2),
        "last_drifted_containers": book.last_drifted,
        "repairs": dict(book.repaired),
        "conflicts": [
            {
                "container": c.container,
                "field": c.field,
                "found": c.found,
                "planned": c.planned,
                "since_period": c.since,
            }
            for c in book.conflicts.values()
        ],
        "unknown_containers": book.flagged(),
        "cpu_manager": {
            "fighting": bool(evidence),
            "evidence": evidence,
            "state_file_policy": book.cpu_manager.state_file,
            "fix": CPU_MANAGER_FIX if evidence else "",
        },
    }


def runtime_view(runtime: RuntimeInfo | None) -> dict[str, str] | None:
    if runtime is None:
        return None
    return {
        "name": runtime.name,
        "version": runtime.version,
        "nri_version": str(runtime.nri_version),
    }


def pools_view(plan: NodePlan) -> dict[str, object]:
    pools = plan.pools
    return {
        "system": format_cpu_list(pools.system),
        "shared": format_cpu_list(pools.shared),
        "reclaimed": format_cpu_list(pools.reclaimed),
        "named": {k: format_cpu_list(v) for k, v in pools.named.items()},
        "dedicated": {k: format_cpu_list(v.cpus) for k, v in pools.dedicated.items()},
        "reasons": dict(pools.reasons),
        "online_demand_millicores": plan.online_demand_millicores,
    }


def container_view(engine: Engine, plan: NodePlan, p: ContainerPlan) -> dict[str, object]:
    mems = p.mems.value
    record = engine.table.get(p.container_id)
    return {
        "name": p.name,
        "class": p.qos_class.value,
        "pool": p.pool,
        "cpus": format_cpu_list(p.cpus.value),
        "mems": format_cpu_list(mems) if mems else "",
        "cpu_shares": p.cpu_shares.value,
        "oom_score_adj": p.oom_score_adj.value,
        "rdt_class": p.rdt_class.value,
        "io_weight": p.io_weight.value,
        "net_class": p.net_class.value,
        "reasons": reasons(plan, p),
        "classification": record.classification.reason if record is not None else "",
    }


def reasons(plan: NodePlan, p: ContainerPlan) -> dict[str, str]:
    """Every field's reason; the CPUs' reason ends with why the pool is that size."""
    out = p.reasons()
    detail = plan.pools.reasons.get(p.pool)
    if detail:
        out["cpus"] = f"{out['cpus']} ({detail})"
    return out


def host_view(
    executor: HostExecutor,
    protect: ProtectState | None = None,
    pod_spec: PodSpecStatus | None = None,
) -> dict[str, object]:
    """Host work as people need it: each controller's state, files host I/O is stuck on,
    what is quarantined until when, the counters, which signal sources measure, and
    whether container roles are read from the pod spec (one line)."""
    status = executor.status()
    signals: dict[str, object] = {}
    if protect is not None:
        signals = {
            "runq_backend": protect.runq_source,
            "runq_reason": protect.runq_reason,
            "windows": protect.windows,
            "sources": {
                k: {"source": a.source, "reason": a.reason} for k, a in protect.sources.items()
            },
        }
    return {
        "signals": signals,
        "pod_spec_roles": pod_spec.line() if pod_spec is not None else "",
        "controllers": [
            {
                "name": c.name,
                "mode": str(c.mode),
                "enabled": c.enabled,
                "reason": c.reason,
                "applied": c.applied,
                "failed": c.failed,
                "refused": c.refused,
                "last_error": c.last_error,
            }
            for c in executor.controllers.status()
        ],
        "stalled": status.stalled,
        "stuck": [
            {"path": s.path, "job": s.label, "seconds": round(s.seconds, 1)} for s in status.stuck
        ],
        "quarantined": status.quarantined,
        "queued": status.queued,
        "retries_pending": status.retries_pending,
        "counts": status.counts,
    }
