"""Interference detection: from one window of signals to "this online container suffers,
and these neighbours cause it" — or "it is throttled by its own CPU limit".

Pure and deterministic: fed `qos_model.signals.SignalSnapshot`s in time order, it keeps a
baseline per container and a count of consecutive bad windows. The rules:

* Only online containers are watched (system, dedicated and shared cores); batch may
  suffer.
* The delay signal is the run-queue wait of the window: the 90th percentile when the
  probe gives a histogram, else the mean wait (schedstat gives sums only), in ms. The
  pressure signal is PSI cpu "some" (the share of the window some task was runnable but
  not running).
* A window is bad when the delay is above max(`runq_ms`, `runq_relative` x baseline), or
  PSI is above `psi_some`. Interference is declared after `windows` bad windows in a row;
  it clears after `clear_windows` good ones (hysteresis).
* The baseline is an exponential average of the delay over good windows only, so a long
  episode does not raise the bar it is judged by.
* Self-throttling is told apart: CFS bandwidth throttling also stalls tasks and raises
  PSI, but no neighbour is to blame. When the container was throttled in a share of its
  periods above `throttled_ratio` and the blame matrix shows neighbours took less than
  `blame_min` of its wait, the verdict is "self-throttled" (its own CPU limit; no action
  against anyone).
* Antagonists come from the blame matrix (who ran on the victim's CPU while it waited),
  ranked by the share of the victim's wait; the confidence is the share of the wait that
  is attributed to a known container. Without a blame matrix (schedstat, no BPF) the
  candidates are the containers whose CPUs overlap the victim's, ranked by their CPU use
  in the window, with a lower confidence.

Per-pod override: the annotation `nri-qos.io/interference` on the pod (or
`.../container.<name>`) holds a JSON object of strings: {"runq_ms": "5", "psi_some":
"0.3", "windows": "4"} or {"enabled": "false"}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from qos_model.signals import ContainerSignals, SignalSnapshot

OVERRIDE_ANNOTATION = "nri-qos.io/interference"


@dataclass(frozen=True, slots=True)
class InterferenceConfig:
    enabled: bool = True
    runq_ms: float = 2.0  # absolute delay threshold (p90 wakeup -> run), ms
    runq_relative: float = 4.0  # ... or this many times the container's baseline
    psi_some: float = 0.25  # share of the window stalled on CPU
    windows: int = 3  # consecutive bad windows before interference is declared
    clear_windows: int = 4  # consecutive good windows before it is over
    baseline_alpha: float = 0.1  # EWMA weight of a good window in the baseline
    throttled_ratio: float = 0.2  # share of CFS periods throttled: self-limited
    blame_min: float = 0.3  # neighbours' share of the wait below which it is not them
    min_waits: int = 5  # fewer waits in a window: too little to judge
    antagonist_share: float = 0.1  # a neighbour below this share of the wait is not one

    def check(self) -> None:
        if self.windows < 1 or self.clear_windows < 1:
            raise ValueError("windows and clear_windows must be at least 1")
        if not 0 < self.baseline_alpha <= 1:
            raise ValueError("baseline_alpha must be in (0, 1]")
        if self.runq_ms <= 0 or self.runq_relative <= 1 or not 0 < self.psi_some <= 1:
            raise ValueError("runq_ms > 0, runq_relative > 1 and 0 < psi_some <= 1 are required")


class Verdict(StrEnum):
    NEIGHBOURS = "neighbours"  # contention by other containers
    SELF_THROTTLED = "self-throttled"  # its own CPU limit (CFS quota)
    UNKNOWN = "unknown"  # suffering, cause not attributable (e.g. host processes)


@dataclass(frozen=True, slots=True)
class Antagonist:
    container_id: str
    score: float  # share of the victim's wait (blame) or of overlapping CPU use
    reason: str


@dataclass(frozen=True, slots=True)
class Detection:
    """An online container that suffers, and why."""

    victim: str
    verdict: Verdict
    delay_ms: float
    threshold_ms: float
    psi_some: float | None
    windows: int  # consecutive bad windows so far
    antagonists: tuple[Antagonist, ...]
    confidence: float  # 0..1
    reason: str


@dataclass(frozen=True, slots=True)
class Watched:
    """What the detector knows of a container besides its signals."""

    name: str
    online: bool
    cpus: frozenset[int]
    config: InterferenceConfig


@dataclass(slots=True)
class _State:
    baseline_ms: float | None = None
    bad: int = 0
    good: int = 0
    active: bool = False
    last: Detection | None = None


@dataclass(frozen=True, slots=True)
class WindowResult:
    """What one window changed: detections that started or continue, and the containers
    whose episode ended."""

    active: tuple[Detection, ...] = ()
    started: tuple[str, ...] = ()
    cleared: tuple[str, ...] = ()
    bad: Mapping[str, int] = field(default_factory=dict)  # victim -> consecutive bad windows


class Detector:
    def __init__(self) -> None:
        self._state: dict[str, _State] = {}

    def forget(self, container_id: str) -> None:
        self._state.pop(container_id, None)

    def state_of(self, container_id: str) -> tuple[float | None, bool]:
        """(baseline ms, in an episode) — for the views."""
        s = self._state.get(container_id)
        return (s.baseline_ms, s.active) if s is not None else (None, False)

    def observe(self, snapshot: SignalSnapshot, watched: Mapping[str, Watched]) -> WindowResult:
        """One window. Containers not in `watched` are forgotten."""
        for gone in set(self._state) - set(watched):
            del self._state[gone]
        active: list[Detection] = []
        started: list[str] = []
        cleared: list[str] = []
        bad_counts: dict[str, int] = {}
        for cid, info in sorted(watched.items()):
            cfg = info.config
            if not info.online or not cfg.enabled:
                continue
            signals = snapshot.containers.get(cid)
            if signals is None:
                continue
            state = self._state.setdefault(cid, _State())
            delay = _delay_ms(signals, cfg)
            psi = signals.cpu_pressure.some if signals.cpu_pressure is not None else None
            if delay is None and psi is None:
                continue  # nothing measured for it in this window
            threshold = cfg.runq_ms
            if state.baseline_ms is not None:
                threshold = max(threshold, cfg.runq_relative * state.baseline_ms)
            bad = (delay is not None and delay > threshold) or (
                psi is not None and psi > cfg.psi_some
            )
            if bad:
                state.bad += 1
                state.good = 0
                bad_counts[cid] = state.bad
            else:
                state.good += 1
                state.bad = 0
                if delay is not None:
                    a = cfg.baseline_alpha
                    base = state.baseline_ms
                    state.baseline_ms = delay if base is None else (1 - a) * base + a * delay
            if state.active and state.good >= cfg.clear_windows:
                state.active = False
                state.last = None
                cleared.append(cid)
                continue
            if not state.active and state.bad >= cfg.windows:
                state.active = True
                started.append(cid)
            if state.active and bad:
                detection = _explain(
                    cid, info, signals, snapshot, watched, delay, threshold, psi, state.bad
                )
                state.last = detection
                active.append(detection)
            elif state.active and state.last is not None:
                active.append(state.last)  # a good window inside the episode: still on
        return WindowResult(tuple(active), tuple(started), tuple(cleared), bad_counts)


def _delay_ms(signals: ContainerSignals, cfg: InterferenceConfig) -> float | None:
    runq = signals.runq
    if runq is None or runq.count < cfg.min_waits:
        return None
    return runq.quantile_ns(0.9) / 1e6 if runq.buckets else runq.mean_ns / 1e6


def _explain(
    cid: str,
    info: Watched,
    signals: ContainerSignals,
    snapshot: SignalSnapshot,
    watched: Mapping[str, Watched],
    delay: float | None,
    threshold: float,
    psi: float | None,
    windows: int,
) -> Detection:
    cfg = info.config

    def found(
        verdict: Verdict, antagonists: tuple[Antagonist, ...], confidence: float, reason: str
    ) -> Detection:
        return Detection(
            cid, verdict, delay or 0.0, threshold, psi, windows, antagonists, confidence, reason
        )

    blamed = {
        runner: ns
        for (victim, runner), ns in snapshot.blame.items()
        if victim == cid and runner != cid and ns > 0
    }
    wait_ns = signals.runq.total_ns if signals.runq is not None else 0
    attributed = sum(ns for runner, ns in blamed.items() if runner in watched)
    throttled = signals.throttling.ratio if signals.throttling is not None else 0.0
    what = _what(delay, threshold, psi, cfg)
    if blamed and wait_ns > 0:
        neighbours_share = min(1.0, attributed / wait_ns)
        antagonists = tuple(
            Antagonist(
                runner,
                round(min(1.0, ns / wait_ns), 3),
                f"ran on {info.name}'s CPU for {ns / 1e6:.1f} ms of its "
                f"{wait_ns / 1e6:.1f} ms wait",
            )
            for runner, ns in sorted(blamed.items(), key=lambda kv: (-kv[1], kv[0]))
            if runner in watched and ns / wait_ns >= cfg.antagonist_share
        )
        if throttled >= cfg.throttled_ratio and neighbours_share < cfg.blame_min:
            return found(
                Verdict.SELF_THROTTLED, (), round(throttled, 3), _own(info, what, throttled)
            )
        if not antagonists:
            outside = f"{info.name}: {what}; the CPU went to processes outside every container"
            return found(Verdict.UNKNOWN, (), 0.0, outside)
        top = watched[antagonists[0].container_id].name
        return found(
            Verdict.NEIGHBOURS,
            antagonists,
            round(neighbours_share, 3),
            f"{info.name}: {what} for {windows} windows; it waited behind {top} "
            f"({antagonists[0].score:.0%} of its wait)",
        )
    if throttled >= cfg.throttled_ratio:
        return found(Verdict.SELF_THROTTLED, (), round(throttled, 3), _own(info, what, throttled))
    # No blame matrix: neighbours on the same CPUs, by their CPU use in the window.
    usage = {
        other: s.cpu_usage_ns or 0
        for other, s in snapshot.containers.items()
        if other != cid and other in watched and watched[other].cpus & info.cpus
    }
    total = sum(usage.values())
    ranked = tuple(
        Antagonist(
            other,
            round(ns / total, 3),
            f"shares CPUs with {info.name} and used {ns / 1e6:.0f} ms of CPU in the window",
        )
        for other, ns in sorted(usage.items(), key=lambda kv: (-kv[1], kv[0]))
        if ns > 0 and ns / total >= cfg.antagonist_share
    )
    if not ranked:
        return found(Verdict.UNKNOWN, (), 0.0, f"{info.name}: {what}; no container shares its CPUs")
    top = watched[ranked[0].container_id].name
    return found(
        Verdict.NEIGHBOURS,
        ranked,
        round(0.5 * ranked[0].score, 3),  # overlap is a guess, not a measurement
        f"{info.name}: {what} for {windows} windows; no blame matrix, so by CPU overlap: "
        f"{top} used {ranked[0].score:.0%} of the shared CPUs' busy time",
    )


def _own(info: Watched, what: str, throttled: float) -> str:
    return (
        f"{info.name}: {what}, but it was throttled in {throttled:.0%} of its CFS periods "
        "and neighbours took little of its wait: its own CPU limit, not interference"
    )


def _what(delay: float | None, threshold: float, psi: float | None, cfg: InterferenceConfig) -> str:
    parts = []
    if delay is not None and delay > threshold:
        parts.append(f"run-queue delay {delay:.1f} ms > {threshold:.1f} ms")
    if psi is not None and psi > cfg.psi_some:
        parts.append(f"cpu pressure {psi:.0%} > {cfg.psi_some:.0%}")
    return " and ".join(parts) or "signals back under the thresholds"


def config_for(annotations: Mapping[str, str], base: InterferenceConfig) -> InterferenceConfig:
    """The per-pod override (annotation `nri-qos.io/interference`) applied to `base`;
    unusable keys are ignored (the caller reports them through classification warnings
    if it wants to; detection must never fail on an annotation)."""
    text = annotations.get(OVERRIDE_ANNOTATION)
    if not text:
        return base
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return base
    if not isinstance(raw, dict):
        return base
    changes: dict[str, object] = {}
    if raw.get("enabled") == "false":
        changes["enabled"] = False
    for key, conv in (("runq_ms", float), ("psi_some", float), ("windows", int)):
        value = raw.get(key)
        if isinstance(value, str):
            try:
                number = conv(value)
            except ValueError:
                continue
            if math.isfinite(number):
                changes[key] = number
    try:
        result = replace(base, **changes)  # type: ignore[arg-type]
        result.check()
    except (TypeError, ValueError):
        return base
    return result
