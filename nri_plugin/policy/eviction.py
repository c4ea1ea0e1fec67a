"""Who to evict, and whether now: the eviction policy.

Candidates are ranked by class (reclaimed_cores first, then shared_cores; system_cores and
dedicated_cores are never evicted), then by Kubernetes priority (lowest first; NRI does
not carry it, so it comes from the pod annotation `nri-qos.io/priority` until the API
server enrichment lands, else 0), then by their use of the contended resource (highest
first), then by name for determinism.

A rate limit bounds the damage a wrong signal can do: at most `burst` evictions per
`window_s`, and `cooldown_s` between two. Evictions already under way count: a victim
that already has one in flight gets no second one ("never more victims than needed").

Eviction loops (koordinator#2529, #1114): an evicted pod's owner (its ReplicaSet,
StatefulSet, DaemonSet or Job) makes a new pod at once, and a scheduler that sees the
same free capacity may put it straight back here, where it is evicted again. `owner_of`
names the owner from the pod's name and labels alone (no API server: the engine is
pure); `OwnerMemory` remembers when each owner last lost a pod here. Within
`owner_window_s` the owner's pods are not evicted again: the next candidate is taken
instead, and the skip is a decision event saying what to do about it. A pod without a
recognisable owner (a bare pod) is never judged a loop: nothing re-creates it.
Pure: times come from the snapshots.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from nri_plugin.policy.qos import QosClass

PRIORITY_ANNOTATION = "nri-qos.io/priority"
EVICTABLE = (QosClass.RECLAIMED_CORES, QosClass.SHARED_CORES)


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    enabled: bool = True
    dry_run: bool = False  # log the full decision, evict nothing
    burst: int = 1
    window_s: float = 60.0
    cooldown_s: float = 30.0
    # memory pressure: evict reclaimed pods before the kernel's OOM killer acts
    memory_available_min: float = 0.05  # share of node (or NUMA node) memory
    memory_full_psi: float = 0.10  # memory "full" pressure over the window
    # an owner that lost a pod here is not evicted from here again within this long
    owner_window_s: float = 600.0
    # after evicting a reclaimed pod, publish that much less reclaimable capacity for
    # this long (None: `cooldown_s`), so a scheduler does not put it straight back
    holdback_s: float | None = None

    def check(self) -> None:
        if self.burst < 1 or self.window_s <= 0 or self.cooldown_s < 0:
            raise ValueError("burst >= 1, window_s > 0 and cooldown_s >= 0 are required")
        if self.owner_window_s < 0 or (self.holdback_s is not None and self.holdback_s < 0):
            raise ValueError("owner_window_s >= 0 and holdback_s >= 0 are required")

    @property
    def holdback(self) -> float:
        """How long published reclaimable capacity stays reduced after an eviction."""
        return self.cooldown_s if self.holdback_s is None else self.holdback_s


@dataclass(frozen=True, slots=True)
class Candidate:
    container_id: str
    pod_id: str
    namespace: str
    pod: str
    name: str
    qos_class: QosClass
    priority: int
    usage: float  # of the contended resource (blame share, CPU, memory bytes)
    oom_score_adj: int = 0
    owner: Owner | None = None  # the workload that re-creates the pod (None: none known)


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Evictable candidates, best victim first; others are dropped."""
    order = {cls: i for i, cls in enumerate(EVICTABLE)}
    return sorted(
        (c for c in candidates if c.qos_class in order),
        key=lambda c: (order[c.qos_class], c.priority, -c.usage, c.name),
    )


def rank_for_memory(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Under memory pressure: reclaimed only, the OOM killer's order (highest
    oom_score_adj first), then the largest memory user."""
    return sorted(
        (c for c in candidates if c.qos_class is QosClass.RECLAIMED_CORES),
        key=lambda c: (c.priority, -c.oom_score_adj, -c.usage, c.name),
    )


class RateLimit:
    def __init__(self, config: EvictionConfig) -> None:
        self.config = config
        self._times: deque[float] = deque()

    def allows(self, now: float) -> str:
        """ "" when an eviction may happen now, else why not."""
        window = self.config.window_s
        while self._times and now - self._times[0] >= window:
            self._times.popleft()
        if self._times and now - self._times[-1] < self.config.cooldown_s:
            since = now - self._times[-1]
            left = self.config.cooldown_s - since
            return f"cool-down: the last eviction was {since:.0f} s ago ({left:.0f} s left)"
        if len(self._times) >= self.config.burst:
            return f"rate limit: {len(self._times)} eviction(s) in the last {window:g} s"
        return ""

    def record(self, now: float) -> None:
        self._times.append(now)


def choose(
    ranked: Sequence[Candidate], in_flight: frozenset[str], limit: RateLimit, now: float
) -> tuple[Candidate | None, str]:
    """The one pod to evict now (None, and why not, when there is none)."""
    if not ranked:
        return None, "no evictable candidate (system_cores and dedicated_cores never are)"
    if any(c.pod_id in in_flight for c in ranked):
        return None, "an eviction for this is already under way"
    why_not = limit.allows(now)
    if why_not:
        return None, why_not
    return ranked[0], ""


# --------------------------------------------------------------------------- owners

# Labels the built-in controllers put on the pods they make (their values are hashes).
POD_TEMPLATE_HASH = "pod-template-hash"  # Deployment -> ReplicaSet -> pod
CONTROLLER_REVISION_HASH = "controller-revision-hash"  # StatefulSet and DaemonSet
STATEFULSET_POD_NAME = "statefulset.kubernetes.io/pod-name"
POD_TEMPLATE_GENERATION = "pod-template-generation"  # DaemonSet only
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
_ORDINAL = re.compile(r"^(?P<set>.+)-(?P<ordinal>[0-9]+)$")
_GENERATED_SUFFIX = re.compile(r"^(?P<owner>.+)-[a-z0-9]{5}$")  # generateName's 5 chars


@dataclass(frozen=True, slots=True, order=True)
class Owner:
    """The workload that re-creates a pod: `kind` ("ReplicaSet", "StatefulSet",
    "DaemonSet", "Job", or an ownerReference's kind) and its name in the namespace.
    `source` says how it was found (for the decision event), and is not part of the
    identity."""

    kind: str
    namespace: str
    name: str
    source: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def owner_of(namespace: str, pod: str, labels: Mapping[str, str]) -> Owner | None:
    """The pod's owner as far as its name and labels tell (None: no owner known).

    * `pod-template-hash` (a Deployment's pods): the ReplicaSet, whose name is the pod's
      name up to and including the hash ("web-5d8f7c9b4-x2k9p" -> "web-5d8f7c9b4");
    * `controller-revision-hash` with `statefulset.kubernetes.io/pod-name`, or a name
      ending in an ordinal while the hash starts with the rest: the StatefulSet;
    * `controller-revision-hash` with `pod-template-generation` (or otherwise): the
      DaemonSet, the pod's name without its five generated characters;
    * `batch.kubernetes.io/job-name` or `job-name`: the Job.
    """
    template_hash = labels.get(POD_TEMPLATE_HASH, "")
    if template_hash:
        marker = f"-{template_hash}-"
        at = pod.find(marker)
        if at > 0:
            name = pod[: at + len(marker) - 1]
        else:  # a name that does not follow generateName: the hash still tells the set
            trimmed = _GENERATED_SUFFIX.match(pod)
            name = trimmed.group("owner") if trimmed else pod
        return Owner("ReplicaSet", namespace, name, f"label {POD_TEMPLATE_HASH}")
    revision = labels.get(CONTROLLER_REVISION_HASH, "")
    if revision:
        ordinal = _ORDINAL.match(pod)
        stateful = STATEFULSET_POD_NAME in labels or (
            ordinal is not None
            and POD_TEMPLATE_GENERATION not in labels
            and revision.startswith(ordinal.group("set") + "-")
        )
        if stateful and ordinal is not None:
            source = f"label {CONTROLLER_REVISION_HASH} and the ordinal in the name"
            return Owner("StatefulSet", namespace, ordinal.group("set"), source)
        trimmed = _GENERATED_SUFFIX.match(pod)
        if trimmed is not None:
            source = f"label {CONTROLLER_REVISION_HASH}"
            return Owner("DaemonSet", namespace, trimmed.group("owner"), source)
    for key in JOB_NAME_LABELS:
        job = labels.get(key, "")
        if job:
            return Owner("Job", namespace, job, f"label {key}")
    return None


@dataclass(frozen=True, slots=True)
class EvictionLoop:
    """A candidate left alone because its owner lost a pod here `ago_s` seconds ago."""

    candidate: Candidate
    owner: Owner
    ago_s: float
    earlier_pod: str
    window_s: float

    def message(self) -> str:
        c = self.candidate
        return (
            f"not evicting pod {c.namespace}/{c.pod}: its owner {self.owner} lost pod "
            f"{self.earlier_pod} here {self.ago_s:.0f} s ago (window {self.window_s:g} s), "
            "so it is being rescheduled onto this node in a loop; keep it off this node "
            "(a taint it does not tolerate, or node anti-affinity), or have the scheduler "
            "place reclaimed pods by the node's published reclaimable resources "
            "(resource.katalyst.kubewharf.io/reclaimed_millicpu, reclaimed_memory)"
        )


class OwnerMemory:
    """When each owner last lost a pod on this node (entries older than the window are
    forgotten as time passes)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last: dict[Owner, tuple[float, str]] = {}  # owner -> (when, "ns/pod")

    def record(self, owner: Owner, pod: str, now: float) -> None:
        self._last[owner] = (now, pod)

    def recent(self, owner: Owner, now: float) -> tuple[float, str] | None:
        """(seconds since, which pod) when `owner` lost a pod here within the window."""
        self._forget(now)
        seen = self._last.get(owner)
        if seen is None:
            return None
        return now - seen[0], seen[1]

    def split(
        self, ranked: Sequence[Candidate], now: float
    ) -> tuple[list[Candidate], list[EvictionLoop]]:
        """The candidates that may be evicted, in order, and those that would loop."""
        allowed: list[Candidate] = []
        loops: list[EvictionLoop] = []
        for c in ranked:
            seen = self.recent(c.owner, now) if c.owner is not None else None
            if c.owner is None or seen is None:
                allowed.append(c)
            else:
                loops.append(EvictionLoop(c, c.owner, seen[0], seen[1], self.window_s))
        return allowed, loops

    def entries(self, now: float) -> dict[Owner, tuple[float, str]]:
        """Every owner remembered at `now`: (when it lost a pod here, which pod)."""
        self._forget(now)
        return dict(self._last)

    def __len__(self) -> int:
        return len(self._last)

    def _forget(self, now: float) -> None:
        for owner, (when, _) in list(self._last.items()):
            if now - when >= self.window_s:
                del self._last[owner]


@dataclass(frozen=True, slots=True)
class Choice:
    pick: Candidate | None
    why_not: str  # "" when there is a pick
    loops: tuple[EvictionLoop, ...] = ()


def choose_without_loops(
    ranked: Sequence[Candidate],
    in_flight: frozenset[str],
    limit: RateLimit,
    now: float,
    owners: OwnerMemory,
) -> Choice:
    """`choose`, passing over candidates whose owner lost a pod here within the window:
    the next candidate is taken instead (and the loops are reported)."""
    if ranked and any(c.pod_id in in_flight for c in ranked):
        return Choice(None, "an eviction for this is already under way")
    allowed, loops = owners.split(ranked, now)
    if ranked and not allowed:
        owners_text = ", ".join(sorted({str(loop.owner) for loop in loops}))
        why = f"every candidate's owner lost a pod here recently ({owners_text})"
        return Choice(None, why, tuple(loops))
    pick, why_not = choose(allowed, in_flight, limit, now)
    return Choice(pick, why_not, tuple(loops))
