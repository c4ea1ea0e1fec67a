"""The engine: runtime events in, a new plan, its diff and typed intents out.

Pure: no sockets, files, clocks, threads or protobuf; one caller at a time. The engine
owns the container table (`state`), classifies each container once (`qos.classify`),
keeps the node plan up to date incrementally (`incremental.Planner`) and turns what
changed into `Intents`:

* a new container gets its plan as the CreateContainer adjustment (oom_score_adj in it
  only when the runtime applies it, NRI >= v0.7; our values' originals in an annotation,
  so a restart classifies from what the kubelet asked, not from what we set);
* every other live container whose planned values moved gets an intent per domain that
  moved: "cpu" fields as one batched runtime update, "oom" as a host intent for the oom
  controller (a running process's oom_score_adj is not an NRI update field);
* Synchronize rebuilds everything from the runtime's view; a restart that finds the
  assignment it left behind changes nothing.

`ROUTES` says who applies each plan domain; `check_routes` (run at construction) fails
when a plan field declares a domain nobody routes, so a new field cannot be planned and
then silently never applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Concatenate, ParamSpec, TypeVar

from nri_plugin.policy.class_intents import (
    Paths,
    RdtPath,
    after_start,
    after_stop,
    at_create,
    paths_for,
    while_running,
)
from nri_plugin.policy.class_isolation import HostSupport
from nri_plugin.policy.drift import DriftBook, Observation, cpuset_request_notes
from nri_plugin.policy.eviction import PRIORITY_ANNOTATION
from nri_plugin.policy.incremental import Planner, PlanStep
from nri_plugin.policy.intents import (
    NO_INTENTS,
    ContainerRef,
    HostIntent,
    Intents,
    Note,
    Phase,
    SetOomScoreAdj,
    Severity,
)
from nri_plugin.policy.interference import config_for
from nri_plugin.policy.numa_reclaim import NumaReclaimable, reclaimable_by_numa
from nri_plugin.policy.plan import (
    CPU,
    IO,
    NET,
    OOM,
    RDT,
    ContainerPlan,
    FieldChange,
    cpu_list,
    diff_plans,
    plan_fields,
)
from nri_plugin.policy.planner import NodePlan
from nri_plugin.policy.protection import Member, Protection, ProtectionConfig
from nri_plugin.policy.qos import Classification, QosConfig, classify
from nri_plugin.policy.qos import annotation_keys as qos_annotation_keys
from nri_plugin.policy.roles import Role, apply_role, decide_role
from nri_plugin.policy.roles import annotation_keys as role_annotation_keys
from nri_plugin.policy.state import (
    ORIGINAL_ANNOTATION,
    ContainerRecord,
    ContainerTable,
    originals_annotation,
    resized_since_created,
    restore_original,
)
from nri_plugin.policy.workload import DEDICATED, RECLAIMED, PlannerConfig, UsageSample, Workload
from qos_model.containers import (
    BulkUpdate,
    Container,
    ContainerState,
    Pod,
    Resources,
    Update,
    merge_requested,
)
from qos_model.cpulist import CpuListError, parse_cpu_list
from qos_model.runtime import RuntimeInfo
from qos_model.signals import SignalSnapshot
from qos_model.text import NAME_LIMIT, clip
from qos_model.topology import Topology


class Route(Enum):
    RUNTIME = "the runtime, through NRI adjustments and updates"
    HOST = "a host controller, through a host intent"
    RUNTIME_AT_CREATE = (
        "the runtime at creation where its NRI version and the host allow it "
        "(an adjustment), else a host controller; live containers by a host controller"
    )
    UNMANAGED = "nobody yet: always None"


ROUTES: Mapping[str, Route] = {
    CPU: Route.RUNTIME,
    OOM: Route.HOST,
    RDT: Route.RUNTIME_AT_CREATE,  # LinuxRdt clos_id (v0.11), rdt_class, else tasks
    IO: Route.RUNTIME_AT_CREATE,  # the unified io.weight on cgroup v2, else blkio
    NET: Route.HOST,  # tc classes and a classifier map: no runtime field for them
}


def check_routes(plan_class: type[ContainerPlan] = ContainerPlan) -> None:
    """Every domain a plan field declares must be routed (raises ValueError otherwise)."""
    for f in plan_fields(plan_class):
        if f.metadata["domain"] not in ROUTES:
            raise ValueError(
                f"plan field {f.name} belongs to domain {f.metadata['domain']!r}, which no "
                "route applies: add it to engine.ROUTES"
            )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    qos: QosConfig = field(default_factory=QosConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    system_reserved_memory: int = 0  # bytes, for the NUMA reclaim report
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)


@dataclass(frozen=True, slots=True)
class Step:
    """One event's outcome: the plan after it, what changed per live container, and the
    intents that carry it out."""

    plan: NodePlan
    diff: Mapping[str, tuple[FieldChange, ...]]
    intents: Intents


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _recovering(
    method: Callable[Concatenate[Engine, _P], _R],
) -> Callable[Concatenate[Engine, _P], _R]:
    """A step that raises half-way (a bug, or input nothing anticipated) must not leave
    the container table and the planner disagreeing: every later event would trip on it.
    The planner is rebuilt from the table (or both start empty if even that fails) and
    the error goes on to the caller, which fails open for that one request."""

    @functools.wraps(method)
    def step(self: Engine, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self._recover()
            raise

    return step


class Engine:
    def __init__(self, topology: Topology, config: EngineConfig | None = None) -> None:
        check_routes()
        self.topology = topology
        self.config = config or EngineConfig()
        self.config.planner.check(topology)
        self.runtime: RuntimeInfo | None = None
        self.table = ContainerTable()
        self.planner = Planner(topology, self.config.planner)
        self.config.protection.check()
        self.protection = Protection(self.config.protection)
        self._noted: dict[str, set[tuple[str, str]]] = {}  # container -> notes given once
        self._classified = _ClassifyMemo(self.config.qos)
        self._kept_paths: tuple[HostSupport, bool, Paths] | None = None
        self._pod_roles: dict[str, dict[str, str]] = {}  # pod uid -> container -> role

    # --- reading --------------------------------------------------------------------------

    @property
    def plan(self) -> NodePlan:
        return self.planner.plan

    def reclaimable(self) -> Mapping[int, NumaReclaimable]:
        # minus what an eviction just took away (`Protection.withhold`, docs/interference.md)
        return self.protection.withhold(
            reclaimable_by_numa(
                self.topology,
                self.plan,
                list(self.planner.workloads()),
                self.config.system_reserved_memory,
            )
        )

    def watch_list(self) -> list[tuple[ContainerRef, str | None]]:
        """Every planned container with its RDT class (for the signal collectors)."""
        out = []
        for cid, plan in self.plan.containers.items():
            record = self.table.get(cid)
            if record is not None:
                out.append((ContainerRef.of(record.container, record.name), plan.rdt_class.value))
        return out

    def online_containers(self) -> list[ContainerRef]:
        """Containers whose CPU use counts as online demand (for the usage sampler)."""
        out = []
        for cid, plan in self.plan.containers.items():
            record = self.table.get(cid)
            if plan.pool not in (RECLAIMED, DEDICATED) and record is not None:
                out.append(ContainerRef.of(record.container, record.name))
        return out

    # --- configuration --------------------------------------------------------------------

    def connect(self, runtime: RuntimeInfo) -> None:
        """A runtime configured us; its Synchronize follows."""
        self.runtime = runtime

    def reconfigure(self, config: EngineConfig) -> None:
        """New settings (runtime-provided config at Configure). Raises ValueError when
        they cannot work on this host; the Synchronize that follows re-plans with them."""
        config.planner.check(self.topology)
        config.protection.check()
        usage = self.planner.usage  # the last measurement still holds under new settings
        self.config = config
        self.protection = Protection(config.protection)
        self.planner = Planner(self.topology, config.planner)
        self.planner.set_usage(usage)
        self.table.clear()

    # --- runtime events -------------------------------------------------------------------

    @_recovering
    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Step:
        self.table.clear()
        self._noted.clear()
        self.table.pods.update((p.id, p) for p in pods)
        live = [
            c for c in containers if c.state in (ContainerState.CREATED, ContainerState.RUNNING)
        ]
        notes: list[Note] = []
        for ctr in sorted(live, key=lambda c: (c.created_at, c.id)):
            self._admit(restore_original(ctr), notes, resized=resized_since_created(ctr))
        planned = self.planner.rebuild([_workload(r) for r in self.table], self.planner.usage)
        updates: list[Update] = []
        host: list[HostIntent] = []
        paths = self._paths()
        for ctr in live:
            plan = self._plan_of(ctr.id)
            if _reported_cpu(ctr) != (plan.cpus.value, plan.mems.value or frozenset()):
                updates.append(plan.update())
            if ctr.oom_score_adj != plan.oom_score_adj.value:
                host.append(self._oom_intent(Phase.POST_UPDATE, ctr, plan))
            # Running before we planned it (or before a restart): its RDT group, I/O
            # weight and network class are ours to (re)apply; controllers skip what holds.
            host.extend(
                while_running(
                    plan, self._ref(ctr, plan), self._netns(ctr.pod_id), (RDT, IO, NET), paths
                )
            )
        self._allocation_notes(notes)
        notes.append(
            Note(
                "sync",
                "node",
                f"rebuilt from {len(live)} containers; {len(updates)} needed an update",
            )
        )
        intents = Intents(reply_updates=tuple(updates), host=tuple(host), notes=tuple(notes))
        return self._step(_diff(planned), intents)

    @_recovering
    def pod_started(self, pod: Pod) -> Step:
        self.table.pods[pod.id] = pod
        return self._step({}, NO_INTENTS)

    @_recovering
    def pod_removed(self, pod: Pod) -> Step:
        self.table.pods.pop(pod.id, None)
        self.protection.forget_pod(pod.id)
        self._pod_roles.pop(pod.uid, None)
        return self._forget(self.table.of_pod(pod.id))

    @_recovering
    def container_created(self, pod: Pod, container: Container) -> Step:
        self.table.pods[pod.id] = pod  # the pod as the runtime sends it now
        notes: list[Note] = []
        record = self._admit(restore_original(container), notes, pod)
        planned = self.planner.add(_workload(record))
        plan = self._plan_of(container.id)
        adjustment = at_create(
            plan.adjustment(
                with_oom_score_adj=self._runtime_sets_oom(),
                annotations={ORIGINAL_ANNOTATION: originals_annotation(container)},
            ),
            plan,
            self._paths(),
        )
        notes.append(Note("plan", plan.name, _describe(plan)))
        diff = _diff(planned)
        others = self._route(planned, diff, skip=container.id)
        self._allocation_notes(notes)
        intents = Intents(adjustment=adjustment, notes=tuple(notes)) + others
        return self._step(diff, intents)

    @_recovering
    def container_started(self, pod: Pod, container: Container) -> Step:
        record = self.table.get(container.id)
        if record is None:
            return self._step({}, NO_INTENTS)
        if container.pid and record.container.pid != container.pid:
            self.table.replace(
                replace(record, container=replace(record.container, pid=container.pid))
            )
        plan = self._plan_of(container.id)
        record = self.table.get(container.id)
        started = replace(
            container, pid=container.pid or (record.container.pid if record else None)
        )
        host: list[HostIntent] = []
        if not self._runtime_sets_oom() and container.oom_score_adj != plan.oom_score_adj.value:
            host.append(self._oom_intent(Phase.POST_START, container, plan))
        host.extend(after_start(plan, self._ref(started, plan), self._netns(pod.id), self._paths()))
        return self._step({}, Intents(host=tuple(host)) if host else NO_INTENTS)

    @_recovering
    def container_updated(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Step:
        known = self.table.get(container.id)
        base = known.container if known is not None else restore_original(container)
        resized = known is not None and known.resized
        if requested is not None:
            resized = resized or _kubelet_resized(base.resources, requested)
            base = base.with_resources(merge_requested(base.resources, requested))
        notes: list[Note] = []
        record = self._admit(base, notes, pod, resized)
        planned = self.planner.add(_workload(record))
        plan = self._plan_of(container.id)
        notes.extend(cpuset_request_notes(plan, requested))  # the kubelet's CPU manager
        self._allocation_notes(notes)  # e.g. a resize that does not fit, and why
        # Always answer with our placement: a CRI update may carry the kubelet's cpuset,
        # and it must not undo ours. Nothing else: the weight, quota and memory of a
        # resize are the kubelet's (the plan keeps them, `_kubelet_resized`), since a
        # kubelet before 1.33 compares what it reads back with what it asked for.
        own = Intents(reply_updates=(plan.update(),), notes=tuple(notes))
        diff = _diff(planned)
        return self._step(diff, own + self._route(planned, diff, skip_runtime=container.id))

    @_recovering
    def container_stopped(self, pod: Pod, container: Container) -> Step:
        return self._forget([container.id])

    @_recovering
    def pod_roles(self, pod_uid: str, roles: Mapping[str, str]) -> Step:
        """What an in-cluster adapter read from the pod spec: each container's role
        (roles.Role values by container name; the only source that tells a sidecar from
        an init container unasked). Kept for the pod's life, bounded, even before its
        containers arrive; its live containers whose classification changes are
        re-planned at once (updates after the reply, with notes)."""
        self._pod_roles.pop(pod_uid, None)
        self._pod_roles[pod_uid] = dict(roles)
        while len(self._pod_roles) > _POD_ROLES_LIMIT:  # the adapter may know pods we never see
            del self._pod_roles[next(iter(self._pod_roles))]
        notes: list[Note] = []
        diff: dict[str, tuple[FieldChange, ...]] = {}
        routed = NO_INTENTS
        for pod in [p for p in self.table.pods.values() if p.uid == pod_uid]:
            for cid in self.table.of_pod(pod.id):
                record = self.table.get(cid)
                assert record is not None, cid
                again = self._admit(record.container, notes, pod, record.resized)
                if again.classification == record.classification:
                    continue
                planned = self.planner.add(_workload(again))
                moved = _diff(planned)
                diff.update(moved)
                routed = routed + self._route(planned, moved)
        latest = {u.container_id: u for u in routed.all_updates()}  # one per container
        if len(latest) < len(routed.all_updates()):
            routed = replace(routed, updates=tuple(latest.values()))
        self._allocation_notes(notes)
        return self._step(diff, routed + Intents(notes=tuple(notes)))

    @_recovering
    def usage_sampled(self, usage: UsageSample) -> Step:
        """New online CPU usage: resize the reclaimed pool (the CPUs it must avoid for
        interference stay as the last signal window set them)."""
        current = self.planner.usage
        if current is not None:
            usage = replace(usage, avoid_cpus=current.avoid_cpus, avoid_reason=current.avoid_reason)
        planned = self.planner.set_usage(usage)
        diff = _diff(planned)
        return self._step(diff, self._route(planned, diff))

    @_recovering
    def signals_sampled(self, snapshot: SignalSnapshot) -> Step:
        """One window of interference signals: detection, the mitigation ladder and
        eviction (`protection`). Shrinking the reclaimed pool is a planner input (its
        members move with one update each); caps are runtime updates; MBA and eviction are
        host intents; every decision is a note."""
        plan = self.plan
        iso = self.config.planner.isolation
        rdt_ready = frozenset(iso.rdt_limits) if iso.host.rdt.available else frozenset()
        outcome = self.protection.window(
            snapshot,
            self._members(),
            plan.pools.reclaimed,
            plan.pools.shared | plan.pools.reclaimed,
            rdt_ready,
            "" if iso.host.evict.available else iso.host.evict.reason,
        )
        usage = self.planner.usage or UsageSample(online_cores=0.0)
        routed = NO_INTENTS
        diff: Mapping[str, tuple[FieldChange, ...]] = {}
        if (usage.avoid_cpus, usage.avoid_reason) != (outcome.avoid_cpus, outcome.avoid_reason):
            moved = replace(usage, avoid_cpus=outcome.avoid_cpus, avoid_reason=outcome.avoid_reason)
            planned = self.planner.set_usage(moved)
            diff = _diff(planned)
            routed = self._route(planned, diff)
        own = Intents(updates=outcome.updates, host=outcome.host, notes=outcome.notes)
        return self._step(diff, routed + own)

    def _members(self) -> dict[str, Member]:
        """The containers as the protection loop sees them."""
        base = self.config.protection.detection
        out = {}
        for cid, p in self.plan.containers.items():
            record = self.table.get(cid)
            if record is None:
                continue
            ctr = record.container
            pod = self.table.pods.get(ctr.pod_id) or Pod(id=ctr.pod_id)
            annotations = {**pod.annotations, **ctr.annotations}
            res = ctr.resources
            quota = res.cpu.quota if res is not None and res.cpu is not None else None
            out[cid] = Member(
                ref=ContainerRef.of(ctr, record.name),
                namespace=pod.namespace,
                pod=pod.name,
                pod_uid=pod.uid,
                qos_class=p.qos_class,
                pool=p.pool,
                cpus=p.cpus.value,
                rdt_class=p.rdt_class.value,
                kubelet_quota=quota if quota and quota > 0 else None,
                oom_score_adj=p.oom_score_adj.value,
                priority=_priority(annotations),
                config=config_for(annotations, base),
                labels=pod.labels,  # the pod's owner, for eviction loops (eviction.owner_of)
                cpu_request_millicores=record.classification.cpu_request_millicores
                or record.classification.cpu_limit_millicores
                or 0,
                memory_request_bytes=res.memory.limit or 0
                if res is not None and res.memory is not None
                else 0,
            )
        return out

    # --- internals ------------------------------------------------------------------------

    def _runtime_sets_oom(self) -> bool:
        return self.runtime is not None and self.runtime.capabilities.applies_oom_score_adj

    def needs_post_start(self, runtime: RuntimeInfo) -> bool:
        """Whether a started container may need host work this runtime cannot do at
        creation: oom_score_adj before NRI v0.7, RDT tasks without the LinuxRdt adjustment,
        io.weight without the unified map, network classification (always after start)."""
        caps = runtime.capabilities
        if not caps.applies_oom_score_adj:
            return True
        paths = paths_for(self.config.planner.isolation.host, caps.applies_rdt)
        if paths.rdt is RdtPath.HOST:
            return True
        if paths.io_available and not paths.io_unified:
            return True
        return paths.net_available

    def _paths(self) -> Paths:
        """How RDT and I/O reach a new container with this runtime on this host (the
        same until the runtime or the host support changes: kept for them)."""
        runtime_rdt = self.runtime is not None and self.runtime.capabilities.applies_rdt
        host = self.config.planner.isolation.host
        kept = self._kept_paths
        if kept is None or kept[0] is not host or kept[1] != runtime_rdt:
            kept = self._kept_paths = (host, runtime_rdt, paths_for(host, runtime_rdt))
        return kept[2]

    def _netns(self, pod_id: str) -> str:
        pod = self.table.pods.get(pod_id)
        return pod.namespaces.get("network", "") if pod is not None else ""

    def _ref(self, container: Container, plan: ContainerPlan) -> ContainerRef:
        record = self.table.get(container.id)
        return ContainerRef.of(container, record.name if record is not None else plan.name)

    def _recover(self) -> None:
        try:
            self.planner.rebuild([_workload(r) for r in self.table], self.planner.usage)
        except Exception:
            self.table.clear()
            self._noted.clear()
            self.planner.rebuild([], None)

    def _plan_of(self, container_id: str) -> ContainerPlan:
        plan = self.planner.get(container_id)
        assert plan is not None, container_id
        return plan

    def _admit(
        self,
        container: Container,
        notes: list[Note],
        pod: Pod | None = None,
        resized: bool = False,
    ) -> ContainerRecord:
        pod = pod or self.table.pods.get(container.pod_id) or Pod(id=container.pod_id)
        classification = self._classify(pod, container, notes)
        return self.table.admit(container, classification, resized)

    def _classify(self, pod: Pod, container: Container, notes: list[Note]) -> Classification:
        """The Katalyst class (qos.classify), then what the container's role in its pod
        allows (roles.apply_role); warnings and a non-app role are noted once."""
        known = self._pod_roles.get(pod.uid) if pod.uid else None
        key = _classify_key(pod, container, known)
        memo = self._classified
        if memo.config is not self.config.qos:
            memo.reset(self.config.qos)
        found = memo.results.get(key) if key is not None else None
        if found is None:
            role = decide_role(pod, container, known)
            c = apply_role(classify(pod, container, self.config.qos), role)
            found = (role.warnings, c)
            if key is not None:
                memo.keep(key, found)
        role_warnings, c = found
        if role_warnings or c.role != Role.APP or c.warnings:
            self._classify_notes(pod, container, role_warnings, c, notes)
        return c

    def _classify_notes(
        self,
        pod: Pod,
        container: Container,
        role_warnings: tuple[str, ...],
        c: Classification,
        notes: list[Note],
    ) -> None:
        subject = clip(f"{pod.namespace}/{pod.name}/{container.name}", NAME_LIMIT)
        for text in role_warnings:
            note = Note("role", subject, text, Severity.WARNING)
            self._note_once(container.id, note, notes)
        if c.role != Role.APP:
            said = f"{c.role_reason}: {c.qos_class} ({clip(c.reason, 300)})"
            self._note_once(container.id, Note("role", subject, said), notes)
        for w in c.warnings:
            scope = f"[{w.field}]" if w.field else ""
            text = (
                f"annotation {clip(w.key, 120)}{scope}={clip(repr(w.value))}: "
                f"{clip(w.reason)}; using {w.default}"
            )
            self._note_once(
                container.id, Note("classification", subject, text, Severity.WARNING), notes
            )

    def _allocation_notes(self, notes: list[Note]) -> None:
        if not self.planner.warnings:
            return
        plan = self.plan
        for warning in plan.warnings:
            subject = plan.containers[warning.container_id].name
            note = Note("allocation", subject, warning.message, Severity.WARNING)
            self._note_once(warning.container_id, note, notes)

    def _note_once(self, container_id: str, note: Note, notes: list[Note]) -> None:
        given = self._noted.setdefault(container_id, set())
        if (note.kind, note.message) not in given:
            given.add((note.kind, note.message))
            notes.append(note)

    def _forget(self, container_ids: Sequence[str]) -> Step:
        released: list[HostIntent] = []
        gone = []
        for cid in container_ids:
            plan = self.planner.get(cid)
            record = self.table.drop(cid)
            if record is None:
                continue
            gone.append(cid)
            self._noted.pop(cid, None)
            # after_stop releases only an RDT group or a network class: none, nothing to do
            if plan is not None and (
                plan.rdt_class.value is not None or plan.net_class.value is not None
            ):
                ref = ContainerRef.of(record.container, record.name)
                released.extend(after_stop(plan, ref, self._netns(record.pod_id), self._paths()))
        if not gone:
            return self._step({}, NO_INTENTS)
        planned = self.planner.remove(gone)
        diff = _diff(planned)
        return self._step(diff, self._route(planned, diff) + Intents(host=tuple(released)))

    def _route(
        self,
        step: PlanStep,
        diff: Mapping[str, tuple[FieldChange, ...]],
        skip: str = "",
        skip_runtime: str = "",
    ) -> Intents:
        """Intents for live containers whose planned values moved (`diff`): one runtime
        update per container whose "cpu" fields moved, one host intent per host domain
        that moved. `skip`: the container being created (its plan travels in the
        adjustment); `skip_runtime`: the container being updated (its update travels in
        the reply). A pool move's members all get the move's resources."""
        updates: list[Update | BulkUpdate] = []
        host: list[HostIntent] = []
        for cid, (_old, new) in step.changes.items():
            fields = diff.get(cid)
            if new is None or not fields or cid == skip:
                continue
            domains = {c.domain for c in fields}
            if CPU in domains and cid != skip_runtime:
                updates.append(new.update())
            record = self.table.get(cid)
            if OOM in domains and record is not None:
                host.append(self._oom_intent(Phase.POST_UPDATE, record.container, new))
            moved_host = domains & {RDT, IO, NET}
            if moved_host and record is not None:
                ref = self._ref(record.container, new)
                netns = self._netns(record.pod_id)
                host.extend(while_running(new, ref, netns, moved_host, self._paths()))
        moved = 0
        for move in step.moves:
            updates.append(BulkUpdate(move.members, move.resources))
            moved += len(move.members)
        if not updates and not host:
            return NO_INTENTS  # nothing moved (an Intents with nothing in it, shared)
        notes: tuple[Note, ...] = ()
        if updates:
            count = len(updates) - len(step.moves) + moved
            notes = (Note("pool", "node", f"pools moved: updating {count} container(s)"),)
        return Intents(updates=tuple(updates), host=tuple(host), notes=notes)

    def _oom_intent(
        self, phase: Phase, container: Container, plan: ContainerPlan
    ) -> SetOomScoreAdj:
        record = self.table.get(container.id)
        name = record.name if record is not None else plan.name
        return SetOomScoreAdj(
            phase=phase,
            container=ContainerRef.of(container, name),
            reason=plan.oom_score_adj.reason,
            value=plan.oom_score_adj.value,
        )

    def _step(self, diff: Mapping[str, tuple[FieldChange, ...]], intents: Intents) -> Step:
        return Step(self.plan, diff, intents)

    def drift_found(self, observed: Observation, book: DriftBook) -> Step:
        """One reconcile period: the host as read (`observed`) against the plan; drifted
        fields are re-applied (cpuset: a runtime update, oom_score_adj: a host intent),
        each with a note. The plan does not move; `book` (the caller's, kept across
        periods) remembers streaks, conflicts and foreign containers (`policy.drift`)."""
        return self._step({}, book.judge(self.plan.containers, self.table, observed))


class _ClassifyMemo:
    """Classifications by everything `Engine._classify` reads (`_classify_key`), for the
    qos config they were made with. A container is classified at creation and again on
    each update, and the replicas of a workload all look alike: deciding again only
    repeats work (a tenth of a CreateContainer). Bounded; pure values, so never stale."""

    LIMIT = 1024

    def __init__(self, config: QosConfig) -> None:
        self.config = config
        self.results: dict[Hashable, tuple[tuple[str, ...], Classification]] = {}

    def reset(self, config: QosConfig) -> None:
        self.config = config
        self.results.clear()

    def keep(self, key: Hashable, found: tuple[tuple[str, ...], Classification]) -> None:
        if len(self.results) >= self.LIMIT:
            self.results.clear()
        self.results[key] = found


def _read_keys(name: str) -> frozenset[str]:
    """The annotation keys classification reads for a container named `name`."""
    keys = _READ_KEYS.get(name)
    if keys is None:
        keys = qos_annotation_keys(name) | role_annotation_keys(name)
        if len(name) <= _KEY_TEXT_MAX:  # names are input: never keep a huge one
            if len(_READ_KEYS) >= 4096:
                _READ_KEYS.clear()
            _READ_KEYS[name] = keys
    return keys


_READ_KEYS: dict[str, frozenset[str]] = {}
_NOTHING: frozenset[tuple[str, str]] = frozenset()
# Texts a remembered classification may be keyed by: a Kubernetes name is at most 253
# characters, and Katalyst's annotations are short JSON. Longer input is classified
# every time rather than kept (the memo is bounded in entries, so must be in bytes too).
_KEY_TEXT_MAX = 253
_KEY_VALUES_MAX = 4096


def _classify_key(
    pod: Pod, container: Container, known: Mapping[str, str] | None
) -> Hashable | None:
    """Every input of qos.classify and roles.decide_role: the annotations they look up
    (present ones with their values, on the pod and on the container), the values
    kube_qos.estimate_kube_qos reads, the namespace and the role the pod spec gave.
    None when the input is too big to keep."""
    name = container.name
    role = known.get(name) if known is not None else None
    if len(name) > _KEY_TEXT_MAX or len(pod.namespace) > _KEY_TEXT_MAX:
        return None
    if role is not None and len(role) > _KEY_TEXT_MAX:
        return None
    keys = _read_keys(name)
    on_pod, on_ctr = pod.annotations, container.annotations
    pod_found = on_pod.keys() & keys
    ctr_found = on_ctr.keys() & keys
    found_pod = frozenset((k, on_pod[k]) for k in pod_found) if pod_found else _NOTHING
    found_ctr = frozenset((k, on_ctr[k]) for k in ctr_found) if ctr_found else _NOTHING
    if (pod_found or ctr_found) and sum(
        len(v) for _, v in (*found_pod, *found_ctr)
    ) > _KEY_VALUES_MAX:
        return None
    res = container.resources
    cpu = res.cpu if res is not None else None
    memory = res.memory if res is not None else None
    return (
        name,
        pod.namespace,
        found_pod,
        found_ctr,
        (cpu.shares, cpu.quota, cpu.period) if cpu is not None else None,
        memory.limit if memory is not None else None,
        container.oom_score_adj,
        role,
    )


def _priority(annotations: Mapping[str, str]) -> int:
    """The pod's Kubernetes priority as far as NRI lets us know it (see eviction.py)."""
    try:
        return int(annotations.get(PRIORITY_ANNOTATION, "0"))
    except ValueError:
        return 0


def _workload(record: ContainerRecord) -> Workload:
    res = record.container.resources
    return Workload(
        container_id=record.id,
        pod_id=record.pod_id,
        name=record.name,
        classification=record.classification,
        created_at=record.order,
        current_cpus=_reported_cpus(record.container),
        memory_limit=res.memory.limit if res is not None and res.memory is not None else None,
        kubelet_resized=record.resized,
    )


_POD_ROLES_LIMIT = 4096  # pods whose roles an adapter told us (a node runs ~110 to ~1000)


def _kubelet_resized(current: Resources | None, requested: Resources) -> bool:
    """Whether a CRI update changes what the kubelet itself set (CPU weight, CFS quota,
    memory limit): an in-place resize, as opposed to a cpuset-only update (the CPU
    manager's reconcile loop) or a repeat of the values it already had."""
    cpu = current.cpu if current is not None else None
    wanted = requested.cpu
    if wanted is not None:
        if wanted.shares is not None and wanted.shares != (cpu.shares if cpu else None):
            return True
        if _quota(wanted.quota) is not None and _quota(wanted.quota) != _quota(
            cpu.quota if cpu else None
        ):
            return True
    memory = current.memory if current is not None else None
    limit = requested.memory.limit if requested.memory is not None else None
    return limit is not None and limit != (memory.limit if memory is not None else None)


def _quota(quota: int | None) -> int | None:
    """A CFS quota, None for "no limit" (-1, 0 and absent all mean that)."""
    return quota if quota is not None and quota > 0 else None


def _diff(step: PlanStep) -> dict[str, tuple[FieldChange, ...]]:
    """Field changes of the containers that stayed; arrivals and departures are whole. A
    pool move changes its members' CPUs only: one shared tuple for all of them."""
    out = {
        cid: diff
        for cid, (old, new) in step.changes.items()
        if old is not None and new is not None and (diff := diff_plans(old, new))
    }
    for move in step.moves:
        moved = (FieldChange("cpus", CPU, move.before, move.after),)
        out.update(dict.fromkeys(move.members, moved))
    return out


def _reported_cpus(container: Container) -> frozenset[int]:
    res = container.resources
    if res is None or res.cpu is None or not res.cpu.cpus:
        return frozenset()
    try:
        return parse_cpu_list(res.cpu.cpus)
    except CpuListError:
        return frozenset()


def _reported_cpu(container: Container) -> tuple[frozenset[int], frozenset[int]]:
    res = container.resources
    mems = res.cpu.mems if res is not None and res.cpu is not None else ""
    try:
        reported_mems = parse_cpu_list(mems) if mems else frozenset()
    except CpuListError:
        reported_mems = frozenset()
    return _reported_cpus(container), reported_mems


def _describe(plan: ContainerPlan) -> str:
    mems = plan.mems.value
    return (
        f"{plan.qos_class} in pool {plan.pool}: cpus {cpu_list(plan.cpus.value)}"
        f"{', mems ' + cpu_list(mems) if mems else ''}, "
        f"oom_score_adj {plan.oom_score_adj.value}"
    )
