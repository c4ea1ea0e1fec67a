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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nri_plugin.policy.eviction import (
    Candidate,
    EvictionConfig,
    RateLimit,
    choose,
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
from nri_plugin.policy.qos import QosClass
from qos_model.containers import CpuResources, Resources, Update
from qos_model.signals import SignalSnapshot

CFS_PERIOD_US = 100_000
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
        return choose(rank(candidates), frozenset(self.evicting), self.limit, now)

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
                host += self._evict(m, why, now, notes)
            return
        notes.append(
            Note(
                "mitigation",
                subject,
                f"{verb} {rung}{' on ' + names if names else ''}: {action.reason}",
                Severity.WARNING if action.move is Move.APPLY else Severity.INFO,
            )
        )

    def _evict(self, m: Member, why: str, now: float, notes: list[Note]) -> list[HostIntent]:
        cfg = self.config.eviction
        self.limit.record(now)
        self.evicting[m.ref.pod_id] = now
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
        pick, why_not = choose(ranked, frozenset(self.evicting), self.limit, now)
        if pick is None:
            notes.append(Note("eviction", "node", f"memory pressure ({why}): none: {why_not}"))
            return []
        member = members[pick.container_id]
        return self._evict(member, f"memory pressure: {why}; batch yields first", now, notes)


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
    )


def _place(m: Member, rdt_class: str | None, reason: str) -> HostIntent:
    return PlaceInRdtClass(
        phase=Phase.POST_UPDATE, container=m.ref, reason=reason, rdt_class=rdt_class
    )
