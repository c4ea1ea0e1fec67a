"""The QoS policy: the runtime's events in, a node plan out, and only what changed sent.

This is the stateful shell around the pure pieces: it keeps the pods and containers the
runtime told us about, classifies each container once (`qos.classify`), re-plans the node
(`planner.plan_node`) whenever the set changes, and turns the difference between two
plans into NRI answers:

* CreateContainer: the new container's plan as its adjustment (cpus, mems, CPU weight,
  and oom_score_adj where the runtime applies it, NRI >= v0.7).
* Every other container whose pool moved gets an update, batched, sent with
  UpdateContainers after the reply (never from inside the event).
* Synchronize (after connecting or reconnecting) rebuilds everything from the runtime's
  view; a restart that finds the assignment it left behind changes nothing.
* Host writes the runtime cannot do (oom_score_adj of running processes on runtimes
  older than v0.7, or of containers that predate us) go to an injected `ContainerHost`
  after the reply, outside the request deadline.

What the kubelet originally asked for is kept in an annotation on the container, because
after a restart the runtime reports our adjusted values (e.g. oom_score_adj), and
classifying from those would drift.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from nri_plugin.events import EventLog
from nri_plugin.policy.api import CreateResult, PolicyBase
from nri_plugin.policy.numa_reclaim import NumaReclaimable, reclaimable_by_numa
from nri_plugin.policy.plan import ContainerPlan
from nri_plugin.policy.planner import (
    NodePlan,
    PlannerConfig,
    UsageSample,
    Workload,
    plan_node,
)
from nri_plugin.policy.qos import Classification, QosConfig, classify
from nri_plugin.protocol.versions import Event
from qos_model.containers import Container, ContainerState, CpuResources, Pod, Resources, Update
from qos_model.cpulist import format_cpu_list, parse_cpu_list
from qos_model.runtime import RuntimeInfo
from qos_model.topology import Topology

log = logging.getLogger("nri_qos.policy")

ORIGINAL_ANNOTATION = "nri-qos.io/original"
"""JSON of the kubelet's own values we override: {"oom_score_adj": n, "cpu_shares": n}."""


class ContainerHost(Protocol):
    """Host writes and reads the policy needs; implemented in `isolation.host`."""

    def set_oom_score_adj(self, container: Container, value: int) -> str:
        """Apply to every process of the container; return a one-line outcome."""
        ...

    def cpu_usage_ns(self, container: Container) -> int | None:
        """Cumulative CPU time of the container; None when it cannot be read."""
        ...


# Parses the config text a runtime hands a pre-installed plugin (conf.d) into a policy
# config; injected by the daemon, which owns the config format.
ConfigParser = Callable[[str], "QosPolicyConfig"]


@dataclass(frozen=True, slots=True)
class QosPolicyConfig:
    qos: QosConfig = field(default_factory=QosConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    system_reserved_memory: int = 0  # bytes, for the NUMA reclaim report


class QosPolicy(PolicyBase):
    name = "qos"

    def __init__(
        self,
        topology: Topology,
        config: QosPolicyConfig | None = None,
        host: ContainerHost | None = None,
        decisions: EventLog | None = None,
        config_parser: ConfigParser | None = None,
    ) -> None:
        self.topology = topology
        self.config = config or QosPolicyConfig()
        self.config.planner.check(topology)
        self.host = host
        self.decisions = decisions or EventLog()
        self._config_parser = config_parser
        self.runtime: RuntimeInfo | None = None
        self.pods: dict[str, Pod] = {}
        self.containers: dict[str, Container] = {}  # as first presented, originals restored
        self.classifications: dict[str, Classification] = {}
        self.plan: NodePlan | None = None
        self.usage: UsageSample | None = None
        self._order: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._deferred: list[Update] = []
        self._oom_jobs: dict[str, tuple[Container, int]] = {}
        self._warned: set[tuple[str, str, str]] = set()

    # --- PolicyBase hooks ------------------------------------------------------------------

    def events(self) -> frozenset[Event]:
        return frozenset(
            {
                Event.CREATE_CONTAINER,
                Event.POST_START_CONTAINER,
                Event.UPDATE_CONTAINER,
                Event.STOP_CONTAINER,
                Event.REMOVE_CONTAINER,
                Event.RUN_POD_SANDBOX,
                Event.REMOVE_POD_SANDBOX,
            }
        )

    def configure(self, runtime: RuntimeInfo, config: str) -> None:
        """A pre-installed plugin gets its config (/etc/nri/conf.d/NN-name.conf) here.
        A bad one is logged and ignored: the previous config stays in force."""
        self.runtime = runtime
        if not config.strip() or self._config_parser is None:
            return
        try:
            new = self._config_parser(config)
            new.planner.check(self.topology)
        except ValueError as exc:
            log.error("runtime-provided config ignored, keeping the current one: %s", exc)
            self.decisions.add("config", "node", f"runtime-provided config ignored: {exc}")
            return
        if new != self.config:
            self.config = new
            self.decisions.add("config", "node", "applied the runtime-provided config")

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Sequence[Update]:
        self.pods = {p.id: p for p in pods}
        self.containers, self.classifications, self._order = {}, {}, {}
        self._deferred.clear()
        live = [
            c for c in containers if c.state in (ContainerState.CREATED, ContainerState.RUNNING)
        ]
        for ctr in sorted(live, key=lambda c: (c.created_at, c.id)):
            self._admit(self.pods.get(ctr.pod_id, Pod(id=ctr.pod_id)), ctr)
        self.plan = self._replan(adopt=True)
        updates = []
        for ctr in live:
            plan = self.plan.containers[ctr.id]
            if _reported_cpu(ctr) != _planned_cpu(plan):
                updates.append(plan.update())
            self._queue_oom(ctr, plan)
        self.decisions.add(
            "sync", "node", f"rebuilt from {len(live)} containers; {len(updates)} needed an update"
        )
        return updates

    def run_pod(self, pod: Pod) -> None:
        self.pods[pod.id] = pod

    def remove_pod(self, pod: Pod) -> None:
        self.pods.pop(pod.id, None)
        gone = [cid for cid, c in self.containers.items() if c.pod_id == pod.id]
        if gone:
            for cid in gone:
                self._forget(cid)
            self._replan_and_defer()

    def create_container(self, pod: Pod, container: Container) -> CreateResult:
        self.pods.setdefault(pod.id, pod)
        self._admit(pod, container)
        old = self.plan
        self._replan_and_defer(old, skip=container.id)
        plan = self._plan_of(container.id)
        adjust = plan.adjustment(
            with_oom_score_adj=self._runtime_sets_oom(),
            annotations={ORIGINAL_ANNOTATION: _originals(container)},
        )
        self.decisions.add("plan", plan.name, _describe(plan))
        return CreateResult(adjust)

    def post_start_container(self, pod: Pod, container: Container) -> None:
        if not self._runtime_sets_oom() and container.id in self.containers:
            self._queue_oom(container, self._plan_of(container.id))

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Sequence[Update]:
        known = self.containers.get(container.id)
        base = known or self._restore(container)
        if requested is not None:
            base = base.with_resources(_merge_requested(base.resources, requested))
        self.containers[container.id] = base
        self._order.setdefault(container.id, next(self._seq))
        self.classifications[container.id] = self._classify(pod, base)
        self._replan_and_defer(skip=container.id)
        # Always answer with our CPU placement: a CRI update may carry the kubelet's
        # cpuset, and it must not undo ours.
        return [self._plan_of(container.id).update()]

    def stop_container(self, pod: Pod, container: Container) -> Sequence[Update]:
        if container.id in self.containers:
            self._forget(container.id)
            self._replan_and_defer()
        return ()

    def remove_container(self, pod: Pod, container: Container) -> None:
        self.stop_container(pod, container)

    def take_deferred_updates(self) -> Sequence[Update]:
        out, self._deferred = self._deferred, []
        return out

    def after_reply(self) -> None:
        jobs, self._oom_jobs = self._oom_jobs, {}
        if self.host is None:
            return
        for container, value in jobs.values():
            outcome = self.host.set_oom_score_adj(container, value)
            self.decisions.add("host", container.name or container.id, outcome)

    def disconnected(self) -> None:
        self._deferred.clear()
        self._oom_jobs.clear()

    # --- signals ----------------------------------------------------------------------------

    def rebalance(self, usage: UsageSample) -> Sequence[Update]:
        """New online usage: resize the reclaimed pool; returns the updates to send."""
        self.usage = usage
        before = len(self._deferred)
        self._replan_and_defer()
        return self.take_deferred_updates() if len(self._deferred) > before else []

    def reclaimable(self) -> dict[int, NumaReclaimable]:
        if self.plan is None:
            self.plan = self._replan()
        return dict(
            reclaimable_by_numa(
                self.topology, self.plan, self._workloads(), self.config.system_reserved_memory
            )
        )

    def online_containers(self) -> list[Container]:
        """Containers whose CPU use counts as online demand (for the usage sampler)."""
        plan = self.plan
        if plan is None:
            return []
        return [
            self.containers[cid]
            for cid, p in plan.containers.items()
            if p.pool not in ("reclaimed", "dedicated") and cid in self.containers
        ]

    def snapshot(self) -> dict[str, object]:
        """Everything a person needs to see why each container got what it got (JSON)."""
        plan = self.plan
        containers: dict[str, object] = {}
        if plan is not None:
            for cid, p in plan.containers.items():
                mems = p.mems.value
                containers[cid] = {
                    "name": p.name,
                    "class": p.qos_class.value,
                    "pool": p.pool,
                    "cpus": format_cpu_list(p.cpus.value),
                    "mems": format_cpu_list(mems) if mems else "",
                    "cpu_shares": p.cpu_shares.value,
                    "oom_score_adj": p.oom_score_adj.value,
                    "reasons": p.reasons(),
                    "classification": self.classifications[cid].reason
                    if cid in self.classifications
                    else "",
                }
        pools: dict[str, object] = {}
        if plan is not None:
            pools = {
                "system": format_cpu_list(plan.pools.system),
                "shared": format_cpu_list(plan.pools.shared),
                "reclaimed": format_cpu_list(plan.pools.reclaimed),
                "named": {k: format_cpu_list(v) for k, v in plan.pools.named.items()},
                "dedicated": {k: format_cpu_list(v.cpus) for k, v in plan.pools.dedicated.items()},
                "reasons": dict(plan.pools.reasons),
                "online_demand_millicores": plan.online_demand_millicores,
            }
        return {
            "policy": self.name,
            "runtime": None
            if self.runtime is None
            else {
                "name": self.runtime.name,
                "version": self.runtime.version,
                "nri_version": str(self.runtime.nri_version),
            },
            "pools": pools,
            "containers": containers,
            "reclaimable": {
                str(n): {
                    "cpus": format_cpu_list(r.cpus),
                    "millicores": r.millicores,
                    "memory_bytes": r.memory_bytes,
                    "reason": r.reason,
                }
                for n, r in self.reclaimable().items()
            },
            "usage_online_cores": None if self.usage is None else self.usage.online_cores,
        }

    # --- internals --------------------------------------------------------------------------

    def _runtime_sets_oom(self) -> bool:
        return self.runtime is not None and self.runtime.capabilities.applies_oom_score_adj

    def _restore(self, container: Container) -> Container:
        """The container with the kubelet's original values our adjustments replaced."""
        raw = container.annotations.get(ORIGINAL_ANNOTATION)
        if not raw:
            return container
        try:
            original = json.loads(raw)
        except ValueError:
            return container
        if not isinstance(original, dict):
            return container
        restored = container
        if "oom_score_adj" in original:
            restored = replace(restored, oom_score_adj=original["oom_score_adj"])
        res = restored.resources
        if "cpu_shares" in original and res is not None and res.cpu is not None:
            cpu = replace(res.cpu, shares=original["cpu_shares"])
            restored = restored.with_resources(replace(res, cpu=cpu))
        return restored

    def _admit(self, pod: Pod, container: Container) -> None:
        pristine = self._restore(container)
        self.containers[container.id] = pristine
        self._order[container.id] = next(self._seq)
        self.classifications[container.id] = self._classify(pod, pristine)

    def _classify(self, pod: Pod, container: Container) -> Classification:
        c = classify(pod, container, self.config.qos)
        subject = f"{pod.namespace}/{pod.name}/{container.name}"
        for w in c.warnings:
            key = (container.id, w.key, w.value)
            if key in self._warned:
                continue
            self._warned.add(key)
            text = (
                f"annotation {w.key}{'[' + w.field + ']' if w.field else ''}={w.value!r}: "
                f"{w.reason}; using {w.default}"
            )
            log.warning("%s: %s", subject, text)
            self.decisions.add("classification", subject, text)
        return c

    def _forget(self, container_id: str) -> None:
        self.containers.pop(container_id, None)
        self.classifications.pop(container_id, None)
        self._order.pop(container_id, None)

    def _workloads(self) -> list[Workload]:
        out = []
        for cid, ctr in self.containers.items():
            pod = self.pods.get(ctr.pod_id)
            name = f"{pod.namespace}/{pod.name}/{ctr.name}" if pod else f"{ctr.pod_id}/{ctr.name}"
            res = ctr.resources
            out.append(
                Workload(
                    container_id=cid,
                    pod_id=ctr.pod_id,
                    name=name,
                    classification=self.classifications[cid],
                    created_at=self._order[cid],
                    current_cpus=_reported_cpus(ctr),
                    memory_limit=res.memory.limit if res and res.memory else None,
                )
            )
        return out

    def _replan(self, adopt: bool = False) -> NodePlan:
        previous = None if adopt or self.plan is None else self.plan.pools.dedicated
        plan = plan_node(
            self.topology, self.config.planner, self._workloads(), previous, self.usage
        )
        for warning in plan.warnings:
            subject = plan.containers[warning.container_id].name
            key = (warning.container_id, "allocation", warning.message)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s: %s", subject, warning.message)
                self.decisions.add("allocation", subject, warning.message)
        return plan

    def _replan_and_defer(self, old: NodePlan | None = None, skip: str = "") -> None:
        old = old if old is not None else self.plan
        new = self._replan()
        self.plan = new
        if old is None:
            return
        changed = []
        for cid, plan in new.containers.items():
            before = old.containers.get(cid)
            if cid != skip and before is not None and not before.same_resources(plan):
                changed.append(plan.update())
        if changed:
            self._deferred = [
                u for u in self._deferred if u.container_id not in {c.container_id for c in changed}
            ] + changed
            self.decisions.add("pool", "node", f"pools moved: updating {len(changed)} container(s)")

    def _plan_of(self, container_id: str) -> ContainerPlan:
        assert self.plan is not None
        return self.plan.containers[container_id]

    def _queue_oom(self, container: Container, plan: ContainerPlan) -> None:
        if container.oom_score_adj != plan.oom_score_adj.value:
            self._oom_jobs[container.id] = (container, plan.oom_score_adj.value)


def _originals(container: Container) -> str:
    res = container.resources
    shares = res.cpu.shares if res is not None and res.cpu is not None else None
    original: dict[str, int] = {}
    if container.oom_score_adj is not None:
        original["oom_score_adj"] = container.oom_score_adj
    if shares is not None:
        original["cpu_shares"] = shares
    return json.dumps(original, sort_keys=True, separators=(",", ":"))


def _reported_cpus(container: Container) -> frozenset[int]:
    res = container.resources
    if res is None or res.cpu is None or not res.cpu.cpus:
        return frozenset()
    try:
        return parse_cpu_list(res.cpu.cpus)
    except ValueError:
        return frozenset()


def _reported_cpu(container: Container) -> tuple[frozenset[int], frozenset[int]]:
    res = container.resources
    mems = res.cpu.mems if res is not None and res.cpu is not None else ""
    return _reported_cpus(container), parse_cpu_list(mems) if mems else frozenset()


def _planned_cpu(plan: ContainerPlan) -> tuple[frozenset[int], frozenset[int]]:
    return plan.cpus.value, plan.mems.value or frozenset()


def _merge_requested(current: Resources | None, requested: Resources) -> Resources:
    """The container's resources after a CRI update: requested values win where set."""
    if current is None:
        return requested
    cpu = current.cpu
    if requested.cpu is not None:
        base = cpu or CpuResources()
        r = requested.cpu
        cpu = CpuResources(
            shares=r.shares if r.shares is not None else base.shares,
            quota=r.quota if r.quota is not None else base.quota,
            period=r.period if r.period is not None else base.period,
            realtime_runtime=base.realtime_runtime,
            realtime_period=base.realtime_period,
            cpus=r.cpus or base.cpus,
            mems=r.mems or base.mems,
        )
    memory = requested.memory if requested.memory is not None else current.memory
    return replace(current, cpu=cpu, memory=memory)


def _describe(plan: ContainerPlan) -> str:
    mems = plan.mems.value
    return (
        f"{plan.qos_class} in pool {plan.pool}: cpus {format_cpu_list(plan.cpus.value)}"
        f"{', mems ' + format_cpu_list(mems) if mems else ''}, "
        f"oom_score_adj {plan.oom_score_adj.value}"
    )
