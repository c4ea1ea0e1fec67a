"""Drift: what the host shows against what the plan says, and what to do about it.

Pure, like the rest of the engine: the reconcile loop (`nri_plugin.reconcile`) reads the
host on the host thread and hands the reading over as an `Observation`; `DriftBook.judge`
compares it with the plan on the policy thread and answers with `Intents`. The book is
the only state, kept across periods and touched by the policy thread alone.

Rules of this module:
* Level-triggered: every period compares the whole planned state with the host, so a
  missed event or a lost write is repaired at the next period, whatever caused it.
* A container is judged only when its planned values are the ones the host was read
  against and they did not move since the previous period: a pool resize whose update is
  still on its way is not drift. A value the host could not read (None) is not drift.
* "cpus"/"mems" are the runtime's fields: repaired with one runtime `Update` (the whole
  CPU part of the plan). "oom_score_adj" is the oom controller's: a `SetOomScoreAdj`.
  "rdt_class" (the resctrl group holding the container's processes) and "io_weight"
  (its cgroup's default weight) are the rdt and io controllers': the running-container
  intents of `class_intents.while_running`. Those two are compared only while their
  controller runs (`Observation.started`) and the plan has a value. Every repair is a
  note naming the container, the field, the value found and the planned value.
* A repair the kernel refused (oom_score_adj below 0 without CAP_SYS_RESOURCE: EACCES,
  recorded by the host adapter and read back as `Seen.oom_refused`) is no agent's
  fight: one warning says so and what to do, and the field is left alone until its
  planned value changes.
* A field found drifted again in the period right after its repair (`conflict_after`
  periods in a row) is a conflict: another agent keeps changing it. It is repaired all
  the same (the plan wins) and reported once, naming the field, until it holds again.
* The kubelet's static CPU manager is a known such agent. Evidence of it: an
  UpdateContainer whose cpuset differs from our plan (`cpuset_request_notes`, called by
  the engine on every update request), the kubelet's checkpoint naming the "static"
  policy, and a cpuset conflict. While any holds, one warning names the evidence and the
  fix, repeated every `remind_every` periods at most.
* A cgroup under the kubepods tree that belongs to no container or pod we know is a
  container the runtime never told us about (containerd#13698, cri-o#10090: created
  during Synchronize). Seen in two scans in a row, it is flagged; the next Synchronize
  delivers it, and then it is "picked up".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from nri_plugin.policy.class_intents import Paths, paths_for, rdt_clos_id, while_running
from nri_plugin.policy.class_isolation import IO_WEIGHT_MAX, Backend, HostSupport
from nri_plugin.policy.intents import (
    ContainerRef,
    HostIntent,
    Intents,
    Note,
    Phase,
    PlaceInRdtClass,
    SetIoWeight,
    SetOomScoreAdj,
    Severity,
)
from nri_plugin.policy.plan import IO, RDT, ContainerPlan
from nri_plugin.policy.state import ContainerTable
from qos_model.containers import Resources, Update
from qos_model.cpulist import CpuListError, format_cpu_list, parse_cpu_list

CPUS = "cpus"
MEMS = "mems"
OOM_SCORE_ADJ = "oom_score_adj"
RDT_CLASS = "rdt_class"
IO_WEIGHT = "io_weight"
FIELDS = (CPUS, MEMS, OOM_SCORE_ADJ, RDT_CLASS, IO_WEIGHT)
CPUSET_FIELDS = frozenset({CPUS, MEMS})
# The fields a class controller repairs, by the plan domain `while_running` is asked for.
CLASS_FIELDS = {RDT_CLASS: RDT, IO_WEIGHT: IO}

DRIFT_KIND = "drift"  # a repair
CONFLICT_KIND = "drift-conflict"  # a field another agent keeps changing
CPU_MANAGER_KIND = "cpu-manager"  # the kubelet's CPU manager asked for another cpuset
UNKNOWN_KIND = "unknown-container"  # running on the host, never delivered to us
REFUSED_KIND = "drift-refused"  # the kernel refuses our repair: no retry until the plan moves

# Why the kernel refuses a lower oom_score_adj, and what to do about it.
CAP_SYS_RESOURCE_FIX = (
    "the kernel refuses the write (EACCES): lowering oom_score_adj below the process's "
    "floor needs CAP_SYS_RESOURCE, which nri-qos runs without. Run nri-qos with "
    "CAP_SYS_RESOURCE (the systemd unit keeps it in CapabilityBoundingSet; the DaemonSet "
    "adds SYS_RESOURCE in securityContext.capabilities.add) and restart it"
)

# What the kubelet state file says, and what to do about a static CPU manager.
STATIC = "static"
CPU_MANAGER_FIX = (
    "set `cpuManagerPolicy: none` in the kubelet configuration, remove "
    "/var/lib/kubelet/cpu_manager_state and restart the kubelet (nri-qos owns cpusets)"
)

# Evidence kinds of a CPU manager fight (metric label values).
EVIDENCE = ("update_request", "state_file", "cpuset_drift")


@dataclass(frozen=True, slots=True)
class DriftConfig:
    conflict_after: int = 2  # periods in a row a field is found drifted: a conflict
    unknown_after: int = 2  # scans in a row a foreign group is seen: flagged
    remind_every: int = 360  # periods between repeated CPU manager warnings

    def check(self) -> None:
        if self.conflict_after < 2 or self.unknown_after < 1 or self.remind_every < 1:
            raise ValueError(
                "drift: conflict_after must be >= 2, unknown_after and remind_every >= 1"
            )


@dataclass(frozen=True, slots=True)
class Planned:
    """The values a container's host state is compared with (mems None: not pinned;
    rdt_class / io_weight None: the plan has none, not compared)."""

    cpus: frozenset[int]
    mems: frozenset[int] | None
    oom_score_adj: int
    rdt_class: str | None = None
    io_weight: int | None = None

    @classmethod
    def of(cls, plan: ContainerPlan) -> Planned:
        return cls(
            plan.cpus.value,
            plan.mems.value,
            plan.oom_score_adj.value,
            plan.rdt_class.value,
            plan.io_weight.value,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """One container to read on the host: where it is, and what it should show."""

    ref: ContainerRef
    planned: Planned


@dataclass(frozen=True, slots=True)
class Seen:
    """One container as the host shows it. None: could not be read (not drift)."""

    planned: Planned  # what the reading was taken against
    cpus: frozenset[int] | None = None
    mems: frozenset[int] | None = None
    oom_score_adj: tuple[tuple[int, int], ...] = ()  # (pid, value) per process read
    # (pid, resctrl control group holding it; "" for the root group) per process read
    rdt: tuple[tuple[int, str], ...] = ()
    io_weight: int | None = None  # the cgroup's default weight as its file shows it
    io_weight_max: int = IO_WEIGHT_MAX  # the most that file holds (v1 blkio.bfq.weight: 1000)
    oom_refused: int | None = None  # the oom_score_adj the kernel refused us (EACCES)


@dataclass(frozen=True, slots=True)
class HostGroup:
    """A container's cgroup under the kubepods tree, with processes in it."""

    names: tuple[str, ...]  # ids its directory name may stand for
    group: str


@dataclass(frozen=True, slots=True)
class Observation:
    """One period's reading of the host."""

    containers: Mapping[str, Seen]
    groups: tuple[HostGroup, ...] | None = None  # None: the kubepods tree was not scanned
    cpu_manager_policy: str | None = None  # the kubelet checkpoint's policyName, if read
    kubelet_requests: tuple[str, ...] = ()  # CPU manager notes since the last period
    read_seconds: float = 0.0
    started: frozenset[str] = frozenset()  # domains whose controllers run ("rdt", "io")


@dataclass(slots=True)
class Streak:
    """A field found drifted in consecutive periods."""

    periods: int
    last: int  # the period it was last found
    found: str
    planned: str


@dataclass(frozen=True, slots=True)
class Conflict:
    container: str  # name
    field: str
    found: str
    planned: str
    since: int  # period


@dataclass(frozen=True, slots=True)
class Refusal:
    """A repair the kernel refused: not retried while the plan asks for `planned`."""

    container: str  # name
    field: str
    planned: int
    since: int  # period


@dataclass(slots=True)
class Unknown:
    group: str
    first: int
    last: int
    flagged: bool = False


@dataclass(slots=True)
class CpuManager:
    """What says the kubelet's static CPU manager fights us, and since when."""

    state_file: str | None = None  # policyName as read, None: not read
    requests: int = 0  # UpdateContainer cpusets that differed from our plan
    last_request: str = ""
    warned_at: int | None = None  # period of the last warning

    def evidence(self, cpuset_conflicts: int) -> dict[str, str]:
        out = {}
        if self.requests:
            out["update_request"] = (
                f"{self.requests} UpdateContainer request(s) carried a cpuset other than "
                f"ours (last: {self.last_request})"
            )
        if self.state_file == STATIC:
            out["state_file"] = 'the kubelet checkpoint cpu_manager_state says "static"'
        if cpuset_conflicts:
            out["cpuset_drift"] = (
                f"{cpuset_conflicts} container cpuset(s) changed again right after repair"
            )
        return out


@dataclass(slots=True)
class DriftBook:
    """Drift across periods: streaks, conflicts, foreign groups, CPU manager evidence."""

    config: DriftConfig = field(default_factory=DriftConfig)
    period: int = 0
    planned: dict[str, Planned] = field(default_factory=dict)
    streaks: dict[tuple[str, str], Streak] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], Conflict] = field(default_factory=dict)
    refused: dict[tuple[str, str], Refusal] = field(default_factory=dict)
    unknown: dict[str, Unknown] = field(default_factory=dict)
    cpu_manager: CpuManager = field(default_factory=CpuManager)
    repaired: Counter[str] = field(default_factory=Counter)  # field -> repairs since start
    last_read_seconds: float = 0.0
    last_drifted: int = 0  # containers repaired in the latest period

    def judge(
        self, plans: Mapping[str, ContainerPlan], table: ContainerTable, seen: Observation
    ) -> Intents:
        """One period: compare, repair, report. See the module's rules."""
        self.period += 1
        self.last_read_seconds = seen.read_seconds
        notes: list[Note] = []
        updates: list[Update] = []
        host: list[HostIntent] = []
        found_now: set[tuple[str, str]] = set()
        paths = _paths(seen.started)
        for cid, observed in seen.containers.items():
            plan = plans.get(cid)
            record = table.get(cid)
            if plan is None or record is None:
                continue
            planned = Planned.of(plan)
            stable = self.planned.get(cid) == planned == observed.planned
            self.planned[cid] = planned
            self._plan_moved(cid, planned)
            if not stable:
                continue
            drifted = [
                d
                for d in _drifted(planned, observed, seen.started)
                if not self._refused(cid, plan.name, d, observed, notes)
            ]
            if not drifted:
                continue
            for name, found, want in drifted:
                found_now.add((cid, name))
                self._streak(cid, plan.name, name, found, want, notes)
                self.repaired[name] += 1
                notes.append(
                    Note(
                        DRIFT_KIND,
                        plan.name,
                        f"{name} is {found} on the host, planned {want}: re-applied",
                        Severity.WARNING,
                    )
                )
            names = {n for n, _, _ in drifted}
            ref = ContainerRef.of(record.container, record.name)
            if names & CPUSET_FIELDS:
                updates.append(plan.update())
            if OOM_SCORE_ADJ in names:
                host.append(
                    SetOomScoreAdj(
                        phase=Phase.POST_UPDATE,
                        container=ref,
                        reason=f"drift repair: {plan.oom_score_adj.reason}",
                        value=plan.oom_score_adj.value,
                    )
                )
            domains = {CLASS_FIELDS[n] for n in names if n in CLASS_FIELDS}
            if domains:
                # netns: only the net domain reads it, and net_class is not compared
                host.extend(_repair(i) for i in while_running(plan, ref, "", domains, paths))
        self.last_drifted = len({cid for cid, _ in found_now})
        self._settle(found_now, plans, notes)
        if seen.groups is not None:
            self._foreign(seen.groups, table, notes)
        self._cpu_manager(seen, notes)
        return Intents(updates=tuple(updates), host=tuple(host), notes=tuple(notes))

    # --- repairs the kernel refuses --------------------------------------------------

    def _plan_moved(self, cid: str, planned: Planned) -> None:
        """A refusal lasts while the plan asks for the refused value."""
        key = (cid, OOM_SCORE_ADJ)
        refusal = self.refused.get(key)
        if refusal is not None and refusal.planned != planned.oom_score_adj:
            del self.refused[key]

    def _refused(
        self,
        cid: str,
        name: str,
        drifted: tuple[str, str, str],
        observed: Seen,
        notes: list[Note],
    ) -> bool:
        """True for a drifted field not to repair: the kernel refused the last repair
        (said once, with the fix), or refuses it still."""
        fld, found, want = drifted
        key = (cid, fld)
        if fld != OOM_SCORE_ADJ:
            return False
        if key in self.refused:
            return True
        planned = observed.planned.oom_score_adj
        if observed.oom_refused is None or observed.oom_refused != planned:
            return False
        self.refused[key] = Refusal(name, fld, planned, self.period)
        self.streaks.pop(key, None)
        self.conflicts.pop(key, None)  # no other agent: the kernel says no
        notes.append(
            Note(
                REFUSED_KIND,
                name,
                f"{fld} is {found} on the host, planned {want}: {CAP_SYS_RESOURCE_FIX}. "
                "Not retried until the plan changes",
                Severity.WARNING,
            )
        )
        return True

    # --- conflicts --------------------------------------------------------------------

    def _streak(
        self, cid: str, name: str, fld: str, found: str, want: str, notes: list[Note]
    ) -> None:
        key = (cid, fld)
        streak = self.streaks.get(key)
        if streak is not None and streak.last == self.period - 1:
            streak.periods += 1
        else:
            streak = self.streaks[key] = Streak(1, self.period, found, want)
        streak.last, streak.found, streak.planned = self.period, found, want
        if streak.periods >= self.config.conflict_after and key not in self.conflicts:
            self.conflicts[key] = Conflict(name, fld, found, want, self.period)
            notes.append(
                Note(
                    CONFLICT_KIND,
                    name,
                    f"{fld} changed again right after its repair ({streak.periods} periods "
                    f"in a row, now {found}, planned {want}): another agent (another NRI "
                    "plugin, the kubelet, a node agent) keeps setting it; nri-qos keeps "
                    "re-applying its plan",
                    Severity.WARNING,
                )
            )

    def _settle(
        self, found_now: set[tuple[str, str]], plans: Mapping[str, ContainerPlan], notes: list[Note]
    ) -> None:
        """Streaks and conflicts of fields that held this period end; gone containers go."""
        for key in [k for k in self.streaks if k not in found_now]:
            del self.streaks[key]
        for key in [k for k in self.conflicts if k not in found_now]:
            conflict = self.conflicts.pop(key)
            if key[0] in plans:
                notes.append(
                    Note(CONFLICT_KIND, conflict.container, f"{conflict.field} holds again")
                )
        for cid in [c for c in self.planned if c not in plans]:
            del self.planned[cid]
        for key in [k for k in self.refused if k[0] not in plans]:
            del self.refused[key]

    def cpuset_conflicts(self) -> int:
        return sum(1 for _, fld in self.conflicts if fld in CPUSET_FIELDS)

    # --- containers we were never told about ----------------------------------------------

    def _foreign(
        self, groups: Sequence[HostGroup], table: ContainerTable, notes: list[Note]
    ) -> None:
        known = set(table.pods)
        known.update(r.id for r in table)
        current = {}
        for g in groups:
            if known.isdisjoint(g.names) and g.names:
                current[g.names[0]] = g.group
        for cid, gone in [(c, u) for c, u in self.unknown.items() if c not in current]:
            del self.unknown[cid]
            if gone.flagged and cid in known:
                notes.append(Note(UNKNOWN_KIND, cid, f"picked up ({gone.group})"))
        for cid, group in current.items():
            entry = self.unknown.get(cid)
            if entry is None or entry.last != self.period - 1:
                entry = self.unknown[cid] = Unknown(group, self.period, self.period)
            entry.last = self.period
            runs = self.period - entry.first + 1
            if not entry.flagged and runs >= self.config.unknown_after:
                entry.flagged = True
                notes.append(
                    Note(
                        UNKNOWN_KIND,
                        cid,
                        f"runs in {group} but the runtime never delivered it to nri-qos "
                        "(created while we synchronized: containerd#13698, cri-o#10090); "
                        "it keeps the runtime's settings until the next Synchronize "
                        "(a runtime or nri-qos restart) delivers it",
                        Severity.WARNING,
                    )
                )

    def flagged(self) -> dict[str, str]:
        """Containers running unknown to us: id -> cgroup."""
        return {cid: u.group for cid, u in self.unknown.items() if u.flagged}

    # --- the kubelet's CPU manager ------------------------------------------------------

    def _cpu_manager(self, seen: Observation, notes: list[Note]) -> None:
        cm = self.cpu_manager
        if seen.cpu_manager_policy is not None:
            cm.state_file = seen.cpu_manager_policy
        if seen.kubelet_requests:
            cm.requests += len(seen.kubelet_requests)
            cm.last_request = seen.kubelet_requests[-1]
        evidence = cm.evidence(self.cpuset_conflicts())
        if not evidence:
            return
        due = cm.warned_at is None or self.period - cm.warned_at >= self.config.remind_every
        if due:
            cm.warned_at = self.period
            notes.append(
                Note(
                    CPU_MANAGER_KIND,
                    "node",
                    "the kubelet's static CPU manager and nri-qos both set container "
                    f"cpusets ({'; '.join(evidence.values())}); nri-qos keeps its "
                    f"placement and answers every update with it. Fix: {CPU_MANAGER_FIX}",
                    Severity.WARNING,
                )
            )

    def fighting(self) -> dict[str, str]:
        """The evidence that the kubelet's CPU manager fights us (empty: none)."""
        return self.cpu_manager.evidence(self.cpuset_conflicts())


def targets(plans: Mapping[str, ContainerPlan], table: ContainerTable) -> list[Target]:
    """Every planned container with what its host state should be (policy thread)."""
    out = []
    for cid, plan in plans.items():
        record = table.get(cid)
        if record is not None and record.container.cgroups_path:
            out.append(Target(ContainerRef.of(record.container, record.name), Planned.of(plan)))
    return out


def cpuset_request_notes(plan: ContainerPlan, requested: Resources | None) -> tuple[Note, ...]:
    """An UpdateContainer asking for a cpuset other than ours: the kubelet's static CPU
    manager (its reconcile sends UpdateContainerResources with its own cpuset). We answer
    with our placement all the same; the note is the evidence (kind "cpu-manager")."""
    cpu = requested.cpu if requested is not None else None
    if cpu is None or not cpu.cpus:
        return ()
    try:
        asked = parse_cpu_list(cpu.cpus)
    except CpuListError:
        return ()
    if not plan.cpus.value or asked == plan.cpus.value:
        return ()
    return (
        Note(
            CPU_MANAGER_KIND,
            plan.name,
            f"an update asked for cpuset {format_cpu_list(asked)}; kept the planned "
            f"{format_cpu_list(plan.cpus.value)}",
        ),
    )


def _drifted(planned: Planned, seen: Seen, started: frozenset[str]) -> list[tuple[str, str, str]]:
    """(field, found, planned) for every field the host shows otherwise."""
    out = []
    if seen.cpus is not None and planned.cpus and seen.cpus != planned.cpus:
        out.append((CPUS, _cpus(seen.cpus), _cpus(planned.cpus)))
    if seen.mems is not None and planned.mems and seen.mems != planned.mems:
        out.append((MEMS, _cpus(seen.mems), _cpus(planned.mems)))
    wrong = sorted({v for _, v in seen.oom_score_adj if v != planned.oom_score_adj})
    if wrong:
        pids = sum(1 for _, v in seen.oom_score_adj if v != planned.oom_score_adj)
        found = ",".join(map(str, wrong))
        out.append((OOM_SCORE_ADJ, f"{found} ({pids} process(es))", str(planned.oom_score_adj)))
    if planned.rdt_class is not None and RDT in started:
        out.extend(_rdt_drift(planned.rdt_class, seen.rdt))
    weight = planned.io_weight
    if weight is not None and IO in started and seen.io_weight is not None:
        want = min(weight, seen.io_weight_max)  # v1 BFQ holds 1..1000: the io controller caps
        if seen.io_weight != want:
            out.append((IO_WEIGHT, str(seen.io_weight), str(want)))
    return out


def _rdt_drift(rdt_class: str, seen: tuple[tuple[int, str], ...]) -> list[tuple[str, str, str]]:
    """The class's group must hold every process read. A group named like the class
    itself is the runtime's own RDT class of that name ([rdt] runtime_classes): fine."""
    group = rdt_clos_id(rdt_class)
    holding = (group, rdt_class)
    if all(g in holding for _, g in seen):
        return []
    elsewhere = Counter(g for _, g in seen if g not in holding)
    found = ", ".join(
        f"{g or 'the root group'} ({n} process(es))" for g, n in sorted(elsewhere.items())
    )
    return [(RDT_CLASS, found, group)]


def _paths(started: frozenset[str]) -> Paths:
    """The way a repair of a running container takes: always the controllers (no
    runtime moves a live container between resctrl groups or rewrites its io.weight)."""
    on, off = Backend(True, "started"), Backend(False, "not started")
    support = HostSupport(
        rdt=on if RDT in started else off,
        io=on if IO in started else off,
        net=off,  # net_class is not compared
    )
    return paths_for(support, runtime_applies_rdt=False)


def _repair(intent: HostIntent) -> HostIntent:
    """A class controller's intent, its reason marked as a drift repair."""
    if isinstance(intent, PlaceInRdtClass | SetIoWeight):
        return replace(intent, reason=f"drift repair: {intent.reason}")
    return intent


def _cpus(cpus: frozenset[int]) -> str:
    return format_cpu_list(cpus) or '""'
