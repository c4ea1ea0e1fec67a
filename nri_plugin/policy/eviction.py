"""Who to evict, and whether now: the eviction policy.

Candidates are ranked by class (reclaimed_cores first, then shared_cores; system_cores and
dedicated_cores are never evicted), then by Kubernetes priority (lowest first; NRI does
not carry it, so it comes from the pod annotation `nri-qos.io/priority` until the API
server enrichment lands, else 0), then by their use of the contended resource (highest
first), then by name for determinism.

A rate limit bounds the damage a wrong signal can do: at most `burst` evictions per
`window_s`, and `cooldown_s` between two. Evictions already under way count: a victim
that already has one in flight gets no second one ("never more victims than needed").
Pure: times come from the snapshots.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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

    def check(self) -> None:
        if self.burst < 1 or self.window_s <= 0 or self.cooldown_s < 0:
            raise ValueError("burst >= 1, window_s > 0 and cooldown_s >= 0 are required")


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
