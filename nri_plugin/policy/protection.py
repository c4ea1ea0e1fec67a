"""The interference -> mitigation -> eviction loop, per signal window: detection
(`interference`), the ladder (`mitigation`) and the eviction policy (`eviction`) turned
into what the engine carries out.

Each rung's effect:
* shrink-reclaimed: the CPUs of every victim with this rung in force become the reclaimed
  pool's `avoid_cpus` (the planner moves the pool; its members get one update);
* cap-cpu: the reclaimed antagonists get a CFS quota of `cap_cores` (runtime updates);
  undone by restoring the quota the kubelet set (or unlimited);
* tighten-mba: the reclaimed antagonists move to the RDT class `mba_class` (host intents
  for the rdt controller); undone by moving them back to their planned class;
* evict: one pod, the best-ranked evictable antagonist, when the rate limit allows.

Under memory pressure (node or NUMA node below `memory_available_min`, or memory "full"
pressure above `memory_full_psi`), one reclaimed pod is evicted per window, in the OOM
killer's order, before the kernel has to kill anything. Every detection, step,
relaxation and eviction is a note. Pure: no clock (the snapshot's), no I/O.

Two guards keep an eviction from being undone by the scheduler:
* the owner memory (`eviction.OwnerMemory`): a pod whose owner lost a pod here within
  `owner_window_s` is passed over (the next candidate is taken), with a note and a
  `ReportEvictionLoop` host intent (a Kubernetes Event on the pod) once per loop;
* the hold-back: evicting a reclaimed_cores pod lowers the reclaimable CPU and memory
  the engine reports (and the reporter publishes) by that pod's request for
  `holdback` seconds (`withhold`), so the capacity just taken away is not offered to
  the very pod its owner is re-creating.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from nri_plugin.policy.eviction import (
    Candidate,
    EvictionConfig,
    EvictionLoop,
    OwnerMemory,
    RateLimit,
    choose_without_loops,
    owner_of,
    rank,
    rank_for_memory,
)
from nri_plugin.policy.intents import (
    ContainerRef,
    Evict,
    HostIntent,
    Note,
    Phase,
    PlaceInRdtClass,
    ReportEvictionLoop,
    Severity,
)
from nri_plugin.policy.interference import (
    Detection,
    Detector,
    InterferenceConfig,
    Verdict,
    Watched,
    WindowResult,
)
from nri_plugin.policy.mitigation import Action, Ladder, LadderConfig, Move, Rung
from nri_plugin.policy.numa_reclaim import MILLICORES_PER_CPU, NumaReclaimable
from nri_plugin.policy.qos import QosClass
from qos_model.containers import CpuResources, Resources, Update
from qos_model.signals import SignalSnapshot

CFS_PERIOD_US = 100_000
_UNLIMITED = 1 << 60  # a memory "limit" this large is none (the runtime's "max")
EVICTION_PENDING_S = 120.0  # an eviction not seen through by then may be tried again


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    detection: InterferenceConfig = field(default_factory=InterferenceConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    cap_cores: float = 0.2  # CPU quota of a capped antagonist
    mba_class: str | None = None  # RDT class for tightened antagonists (None: no rung)

    def check(self) -> None:
        self.detection.check()
        self.ladder.check()
        self.eviction.check()
        if not self.cap_cores > 0:
            raise ValueError("cap_cores must be > 0")


@dataclass(frozen=True, slots=True)
class Member:
    """What the loop knows of one container (from the engine's table and plan)."""

    ref: ContainerRef
    namespace: str
    pod: str
    pod_uid: str
    qos_class: QosClass
    pool: str
    cpus: frozenset[int]
    rdt_class: str | None
    kubelet_quota: int | None  # the CFS quota the kubelet asked for (None: unlimited)
    oom_score_adj: int
    priority: int
    config: InterferenceConfig
    labels: Mapping[str, str] = field(default_factory=dict)  # the pod's (for its owner)
    # what the container asked for as NRI shows it (0: nothing visible): the hold-back
    cpu_request_millicores: int = 0
    memory_request_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Holdback:
    """Reclaimable capacity not offered again until `until_s`: an evicted reclaimed pod's
    request, on the NUMA nodes its CPUs were on (every node when unknown)."""

    pod: str  # "namespace/name"
    until_s: float
    millicores: int
    memory_bytes: int
    cpus: frozenset[int]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one window asks of the engine."""

    avoid_cpus: frozenset[int]
    avoid_reason: str
    updates: tuple[Update, ...]
    host: tuple[HostIntent, ...]
    notes: tuple[Note, ...]
    result: WindowResult


class Protection:
    def __init__(self, config: ProtectionConfig | None = None) -> None:
        self.config = config or ProtectionConfig()
        self.detector = Detector()
        self.ladder = Ladder(self.config.ladder)
        self.limit = RateLimit(self.config.eviction)
        self.evicting: dict[str, float] = {}  # pod id -> when its eviction was asked
        self._capped: dict[str, str] = {}  # antagonist -> victim whose rung capped it
        self._tightened: dict[str, str] = {}
        self._skipped: dict[str, str] = {}  # victim -> last skipped text (said once)
        self.last: WindowResult = WindowResult()
        self._evict_unavailable = ""
        self._verdicts: dict[str, Verdict] = {}
        self.last_detections: dict[str, Detection] = {}
        self.owners = OwnerMemory(self.config.eviction.owner_window_s)
        self.holdbacks: list[Holdback] = []
        self._now: float | None = None  # the last window's end (the engine's only clock)
        self._snapshot: SignalSnapshot | None = None
        self._loops: list[EvictionLoop] = []  # found while judging candidates this window
        self._loops_said: set[tuple[str, str]] = set()  # (owner, earlier pod) told once

    def forget_pod(self, pod_id: str) -> None:
        self.evicting.pop(pod_id, None)

    def window(
        self,
        snapshot: SignalSnapshot,
        members: Mapping[str, Member],
        reclaimed_cpus: frozenset[int],
        shareable_cpus: frozenset[int],
        rdt_classes: frozenset[str],
        evict_unavailable: str = "",
    ) -> Outcome:
        """One window. `evict_unavailable`: why no eviction executor runs ("" when one
        does): the ladder then stops below eviction and says so."""
        now = snapshot.end_s
        self._now = now
        self._snapshot = snapshot
        self._loops = []
        self.holdbacks = [h for h in self.holdbacks if h.until_s > now]
        self._evict_unavailable = evict_unavailable
        for pod, since in list(self.evicting.items()):
            if now - since > EVICTION_PENDING_S:
                del self.evicting[pod]
        watched = {
            cid: Watched(
                m.ref.name,
                m.qos_class is not QosClass.RECLAIMED_CORES,
                m.cpus,
                m.config,
            )
            for cid, m in members.items()
        }
        result = self.detector.observe(snapshot, watched)
        self.last = result
        self.last_detections = {d.victim: d for d in result.active}
        notes: list[Note] = []
        for victim in result.started:
            d = self.last_detections.get(victim)
            if d is not None:
                severity = Severity.WARNING if d.antagonists else Severity.INFO
                text = f"{d.verdict}: {d.reason} (confidence {d.confidence:.0%})"
                notes.append(Note("interference", members[victim].ref.name, text, severity))
        for d in result.active:  # an episode whose cause became clearer (or changed)
            before = self._verdicts.get(d.victim)
            if before is not None and before != d.verdict and d.victim not in result.started:
                text = f"now {d.verdict}: {d.reason} (confidence {d.confidence:.0%})"
                notes.append(Note("interference", members[d.victim].ref.name, text))
            self._verdicts[d.victim] = d.verdict
        for victim in result.cleared:
            self._verdicts.pop(victim, None)
            if victim in members:
                notes.append(
                    Note("interference", members[victim].ref.name, "back under its thresholds")
                )

        def applicable(rung: Rung, d: Detection) -> tuple[str, tuple[str, ...]]:
            return self._applicable(
                rung, d, members, reclaimed_cpus, shareable_cpus, rdt_classes, now
            )

        actions = self.ladder.step(now, result, applicable)
        for victim in list(self._skipped):
            if victim not in self.last_detections:
                del self._skipped[victim]
        if self.ladder.skipped:
            for d in result.active:
                text = "; ".join(self.ladder.skipped)
                if self._skipped.get(d.victim) != text and d.victim in members:
                    self._skipped[d.victim] = text
                    subject = members[d.victim].ref.name
                    notes.append(Note("mitigation", subject, f"skipped {text}"))
        for gone in [v for v in self.ladder.in_force() if v not in members]:
            actions += self.ladder.forget(gone)
        updates: list[Update] = []
        host: list[HostIntent] = []
        for action in actions:
            self._carry_out(action, members, now, updates, host, notes)
        host += self._memory_pressure(snapshot, members, now, notes)
        host += self._report_loops(members, notes)
        avoid, why = self._avoid(members)
        return Outcome(avoid, why, tuple(updates), tuple(host), tuple(notes), result)

    # --- rungs ------------------------------------------------------------------------

    def _targets(self, d: Detection, members: Mapping[str, Member]) -> tuple[str, ...]:
        return tuple(
            a.container_id
            for a in d.antagonists
            if a.container_id in members
            and members[a.container_id].qos_class is QosClass.RECLAIMED_CORES
        )

    def _applicable(
        self,
        rung: Rung,
        d: Detection,
        members: Mapping[str, Member],
        reclaimed_cpus: frozenset[int],
        shareable_cpus: frozenset[int],
        rdt_classes: frozenset[str],
        now: float,
    ) -> tuple[str, tuple[str, ...]]:
        victim = members.get(d.victim)
        if victim is None:
            return "the victim is gone", ()
        reclaimed = self._targets(d, members)
        if rung is Rung.SHRINK_RECLAIMED:
            if not reclaimed_cpus & victim.cpus:
                return "the reclaimed pool does not use the victim's CPUs", ()
            if not shareable_cpus - victim.cpus:
                return "no other CPU to move the reclaimed pool to", ()
            return "", reclaimed
        if rung is Rung.CAP_CPU:
            uncapped = tuple(t for t in reclaimed if t not in self._capped)
            return ("", uncapped) if uncapped else ("no reclaimed antagonist left to cap", ())
        if rung is Rung.TIGHTEN_MBA:
            mba = self.config.mba_class
            if mba is None or mba not in rdt_classes:
                return "no RDT class for throttled antagonists ([interference] mba_class)", ()
            loose = tuple(t for t in reclaimed if t not in self._tightened)
            return ("", loose) if loose else ("no reclaimed antagonist left to tighten", ())
        cfg = self.config.eviction
        if not cfg.enabled:
            return "eviction is off ([eviction] enabled = false)", ()
        if self._evict_unavailable and not cfg.dry_run:
            return f"no eviction executor: {self._evict_unavailable}", ()
        pick, why_not = self._pick(d, members, now)
        return ("", (pick.container_id,)) if pick is not None else (why_not, ())

    def _pick(
        self, d: Detection, members: Mapping[str, Member], now: float
    ) -> tuple[Candidate | None, str]:
        candidates = [
            _candidate(members[a.container_id], a.score)
            for a in d.antagonists
            if a.container_id in members
        ]
        choice = choose_without_loops(
            rank(candidates), frozenset(self.evicting), self.limit, now, self.owners
        )
        self._loops.extend(choice.loops)
        return choice.pick, choice.why_not

    def _carry_out(
        self,
        action: Action,
        members: Mapping[str, Member],
        now: float,
        updates: list[Update],
        host: list[HostIntent],
        notes: list[Note],
    ) -> None:
        victim = members.get(action.victim)
        subject = victim.ref.name if victim is not None else action.victim
        names = ", ".join(members[t].ref.name for t in action.targets if t in members)
        verb = "step up" if action.move is Move.APPLY else "step down"
        rung = action.rung
        if rung is Rung.CAP_CPU:
            for t in action.targets:
                m = members.get(t)
                if action.move is Move.APPLY:
                    self._capped[t] = action.victim
                    quota = max(1000, round(self.config.cap_cores * CFS_PERIOD_US))
                elif self._capped.pop(t, None) is not None and m is not None:
                    quota = m.kubelet_quota if m.kubelet_quota else -1
                else:
                    continue
                updates.append(
                    Update(t, Resources(cpu=CpuResources(quota=quota, period=CFS_PERIOD_US)))
                )
        elif rung is Rung.TIGHTEN_MBA:
            for t in action.targets:
                m = members.get(t)
                if m is None:
                    continue
                if action.move is Move.APPLY:
                    self._tightened[t] = action.victim
                    target = self.config.mba_class
                else:
                    self._tightened.pop(t, None)
                    target = m.rdt_class
                host.append(_place(m, target, action.reason))
        elif rung is Rung.EVICT and action.move is Move.APPLY:
            for t in action.targets:
                m = members.get(t)
                if m is None:
                    continue
                why = f"interference with {subject}: {action.reason}"
                host += self._evict(m, why, now, notes, members)
            return
        notes.append(
            Note(
                "mitigation",
                subject,
                f"{verb} {rung}{' on ' + names if names else ''}: {action.reason}",
                Severity.WARNING if action.move is Move.APPLY else Severity.INFO,
            )
        )

    def _evict(
        self,
        m: Member,
        why: str,
        now: float,
        notes: list[Note],
        members: Mapping[str, Member],
    ) -> list[HostIntent]:
        cfg = self.config.eviction
        self.limit.record(now)
        self.evicting[m.ref.pod_id] = now
        owner = owner_of(m.namespace, m.pod, m.labels)
        if owner is not None:
            self.owners.record(owner, f"{m.namespace}/{m.pod}", now)
        if m.qos_class is QosClass.RECLAIMED_CORES and cfg.holdback > 0:
            hold = self._holdback(m, members, now + cfg.holdback)
            if hold.millicores or hold.memory_bytes:
                self.holdbacks.append(hold)
                notes.append(
                    Note(
                        "eviction",
                        m.ref.name,
                        f"reclaimable capacity held back for {cfg.holdback:g} s: "
                        f"{hold.millicores}m CPU, {hold.memory_bytes} bytes of memory "
                        f"(what pod {hold.pod} asked for), so it is not placed straight back",
                    )
                )
        if cfg.dry_run:
            notes.append(Note("eviction", m.ref.name, f"dry-run: would evict pod "
                              f"{m.namespace}/{m.pod}: {why}", Severity.WARNING))  # fmt: skip
            return []
        text = f"evicting pod {m.namespace}/{m.pod}: {why}"
        notes.append(Note("eviction", m.ref.name, text, Severity.WARNING))
        return [
            Evict(
                phase=Phase.POST_UPDATE,
                container=m.ref,
                reason=why,
                namespace=m.namespace,
                pod=m.pod,
                pod_uid=m.pod_uid,
            )
        ]

    def _avoid(self, members: Mapping[str, Member]) -> tuple[frozenset[int], str]:
        cpus: set[int] = set()
        victims = []
        for victim, rungs in self.ladder.in_force().items():
            if any(r is Rung.SHRINK_RECLAIMED for r, _ in rungs) and victim in members:
                cpus |= members[victim].cpus
                victims.append(members[victim].ref.name)
        if not cpus:
            return frozenset(), ""
        return frozenset(cpus), f"interference with {', '.join(sorted(victims))}"

    def _memory_pressure(
        self,
        snapshot: SignalSnapshot,
        members: Mapping[str, Member],
        now: float,
        notes: list[Note],
    ) -> list[HostIntent]:
        cfg = self.config.eviction
        if not cfg.enabled or (self._evict_unavailable and not cfg.dry_run):
            return []
        why = _memory_short(snapshot, cfg)
        if not why:
            return []
        candidates = []
        for cid, m in members.items():
            s = snapshot.containers.get(cid)
            usage = s.memory.usage_bytes if s is not None and s.memory is not None else 0
            candidates.append(_candidate(m, float(usage)))
        ranked = rank_for_memory(candidates)
        choice = choose_without_loops(
            ranked, frozenset(self.evicting), self.limit, now, self.owners
        )
        self._loops.extend(choice.loops)
        if choice.pick is None:
            text = f"memory pressure ({why}): none: {choice.why_not}"
            notes.append(Note("eviction", "node", text))
            return []
        member = members[choice.pick.container_id]
        why = f"memory pressure: {why}; batch yields first"
        return self._evict(member, why, now, notes, members)

    # --- eviction loops and the hold-back ---------------------------------------------

    def _report_loops(self, members: Mapping[str, Member], notes: list[Note]) -> list[HostIntent]:
        """Each loop found this window, once per (owner, earlier eviction): a warning
        note, and a Kubernetes Event on the pod through the evict controller."""
        host: list[HostIntent] = []
        live = set()
        for loop in self._loops:
            key = (str(loop.owner), loop.earlier_pod)
            live.add(key)
            if key in self._loops_said:
                continue
            self._loops_said.add(key)
            m = members.get(loop.candidate.container_id)
            if m is None:
                continue
            text = loop.message()
            notes.append(Note("eviction", m.ref.name, text, Severity.WARNING))
            if not self.config.eviction.dry_run:
                host.append(
                    ReportEvictionLoop(
                        phase=Phase.POST_UPDATE,
                        container=m.ref,
                        reason=text,
                        namespace=m.namespace,
                        pod=m.pod,
                        pod_uid=m.pod_uid,
                        owner=str(loop.owner),
                    )
                )
        # forget what was said about loops whose earlier eviction left the window
        remembered = {
            (str(owner), pod) for owner, (_, pod) in self.owners.entries(self._now or 0.0).items()
        }
        self._loops_said &= live | remembered
        return host

    def _holdback(self, m: Member, members: Mapping[str, Member], until: float) -> Holdback:
        """The pod's request (all its containers): what NRI shows of it (the CPU request
        from cpu.shares, else the limit; the memory limit), and for a container showing
        none (BestEffort, or Katalyst's reclaimed_* extended resources, which NRI does
        not carry) what it used in the last window."""
        millicores = memory = 0
        cpus: set[int] = set()
        snapshot = self._snapshot
        for cid, other in members.items():
            if other.ref.pod_id != m.ref.pod_id:
                continue
            cpus |= other.cpus
            used = snapshot.containers.get(cid) if snapshot is not None else None
            cpu = other.cpu_request_millicores
            if not cpu and used is not None and used.cpu_usage_ns and snapshot is not None:
                window_ns = max(snapshot.window_s, 1e-3) * 1e9
                cpu = round(used.cpu_usage_ns / window_ns * MILLICORES_PER_CPU)
            mem = other.memory_request_bytes if other.memory_request_bytes < _UNLIMITED else 0
            if not mem and used is not None and used.memory is not None:
                mem = used.memory.usage_bytes
            millicores += max(0, cpu)
            memory += max(0, mem)
        return Holdback(f"{m.namespace}/{m.pod}", until, millicores, memory, frozenset(cpus))

    def withhold(self, reclaimable: Mapping[int, NumaReclaimable]) -> Mapping[int, NumaReclaimable]:
        """`reclaimable` minus the hold-backs in force: each one first from the NUMA
        nodes the evicted pod's CPUs were on, the rest from the others in order, never
        below zero; the reason says so."""
        now = self._now
        holds = [h for h in self.holdbacks if now is None or h.until_s > now]
        if not holds:
            return reclaimable
        out = dict(reclaimable)
        for h in holds:
            home = [n for n, r in sorted(out.items()) if r.cpus & h.cpus]
            order = home + [n for n in sorted(out) if n not in home]
            cpu_left, mem_left = h.millicores, h.memory_bytes
            for node in order:
                r = out[node]
                cpu = min(cpu_left, r.millicores)
                mem = min(mem_left, r.memory_bytes)
                if not cpu and not mem:
                    continue
                cpu_left -= cpu
                mem_left -= mem
                until = f"{h.until_s - now:.0f} s more" if now is not None else "a while"
                out[node] = replace(
                    r,
                    millicores=r.millicores - cpu,
                    memory_bytes=r.memory_bytes - mem,
                    reason=f"{r.reason}; held back {cpu}m and {mem} bytes after evicting "
                    f"{h.pod} ({until})",
                )
        return out


def _memory_short(snapshot: SignalSnapshot, cfg: EvictionConfig) -> str:
    """Why memory is short on the node or on one NUMA node ("" when it is not)."""
    places = [("node", snapshot.node_memory)] + [
        (f"NUMA node {n}", m) for n, m in sorted(snapshot.numa_memory.items())
    ]
    for where, mem in places:
        if mem is None or mem.total_bytes <= 0:
            continue
        share = mem.available_bytes / mem.total_bytes
        if share < cfg.memory_available_min:
            return f"{where} memory available {share:.1%} (min {cfg.memory_available_min:.0%})"
        full = mem.pressure.full if mem.pressure is not None else None
        if full is not None and full > cfg.memory_full_psi:
            return f"{where} memory full pressure {full:.0%} (max {cfg.memory_full_psi:.0%})"
    return ""


def _candidate(m: Member, usage: float) -> Candidate:
    return Candidate(
        container_id=m.ref.id,
        pod_id=m.ref.pod_id,
        namespace=m.namespace,
        pod=m.pod,
        name=m.ref.name,
        qos_class=m.qos_class,
        priority=m.priority,
        usage=usage,
        oom_score_adj=m.oom_score_adj,
        owner=owner_of(m.namespace, m.pod, m.labels),
    )


def _place(m: Member, rdt_class: str | None, reason: str) -> HostIntent:
    return PlaceInRdtClass(
        phase=Phase.POST_UPDATE, container=m.ref, reason=reason, rdt_class=rdt_class
    )
