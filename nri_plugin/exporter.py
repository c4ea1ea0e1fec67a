"""The node's state as Prometheus metrics, served over HTTP on a loopback address.

The engine may only be read in the policy thread, and a scrape arrives on an HTTP server
thread at any moment. So nothing here reads the engine at scrape time:

* `snapshot_of(engine, executor, protect, plugin)` runs in the policy thread (the daemon
  calls it after each signal window and each rebalance) and copies what matters into an
  immutable `MetricsSnapshot`: pool sizes, each container's plan and latest signals,
  reclaimable CPU and memory per NUMA node, detections, rungs in force, controllers, the
  host executor, the probe backend. Publishing it is one reference assignment.
* `NodeCollector` renders the latest snapshot when Prometheus scrapes; it only reads
  frozen values, so a scrape never waits for the policy thread nor sees a half-made plan.
* Values that must be monotonic across windows (detections started, mitigation steps,
  evictions) cannot be derived from "the state now": `Decisions` counts them where they
  happen, from each `Intents` the engine returns (`observe_intents`), into real counters.

Names follow Prometheus conventions: the `nri_qos_` prefix, base units in the name
(`_seconds`, `_bytes`, `_cores`, `_millicores`, `_ratio`), `_total` on counters (the
exposition adds it to a counter family's samples), `_info` gauges of value 1 for labels
that describe. Labels are low-cardinality except on `nri_qos_container_*`, which carry
`container` ("<namespace>/<pod>/<container>") and `qos_class`: one series per container
and metric, bounded by what a node runs.

The server binds a loopback address by default (`127.0.0.1:9464`): per-container names
and interference verdicts are not for the whole network. A scraper on another host goes
through a sidecar or a proxy that authenticates, or the operator opts in explicitly
(`allow_remote=True`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nri_plugin.plugin import PluginSetupError
from nri_plugin.policy.intents import Evict, Intents, Severity
from nri_plugin.policy.interference import Verdict
from nri_plugin.policy.mitigation import Rung
from nri_plugin.policy.workload import DEDICATED, RECLAIMED, SHARED, SYSTEM
from qos_model.signals import ContainerSignals

if TYPE_CHECKING:
    from nri_plugin.control.executor import HostExecutor
    from nri_plugin.policy.engine import Engine
    from nri_plugin.protect import ProtectState
    from qos_model.runtime import RuntimeInfo

DEFAULT_ADDRESS = "127.0.0.1:9464"
NS_PER_S = 1e9

# --- the snapshot ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolMetrics:
    pool: str  # "system", "shared", "shared:<name>", "reclaimed", "dedicated"
    cpus: int
    containers: int


@dataclass(frozen=True, slots=True)
class ContainerMetrics:
    """One planned container: its plan, and what the latest window measured (None: not
    measured, which is not zero)."""

    name: str  # "<namespace>/<pod>/<container>"
    qos_class: str
    pool: str
    cpus: int
    cpu_shares: int | None
    oom_score_adj: int
    io_weight: int | None
    rdt_class: str
    net_class: str
    runq_p90_seconds: float | None = None
    cpu_usage_cores: float | None = None
    cpu_pressure_some: float | None = None
    cpu_pressure_full: float | None = None
    memory_pressure_some: float | None = None
    io_pressure_some: float | None = None
    throttled_ratio: float | None = None
    memory_usage_bytes: int | None = None
    memory_bandwidth_bytes_per_second: float | None = None
    llc_occupancy_bytes: int | None = None
    cycles_per_instruction: float | None = None


@dataclass(frozen=True, slots=True)
class NumaMetrics:
    node: int
    reclaimable_millicores: int
    reclaimable_memory_bytes: int


@dataclass(frozen=True, slots=True)
class DetectionMetrics:
    container: str
    qos_class: str
    verdict: str
    delay_seconds: float
    threshold_seconds: float
    confidence: float


@dataclass(frozen=True, slots=True)
class ControllerMetrics:
    name: str
    domain: str
    mode: str
    enabled: bool
    applied: int
    failed: int
    refused: int


@dataclass(frozen=True, slots=True)
class HostMetrics:
    queued: int
    retries_pending: int
    stalled: bool
    stuck_threads: int
    quarantined: int
    jobs: tuple[tuple[str, int], ...]  # outcome -> count since start


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What the exporter shows, copied in the policy thread; never mutated afterwards."""

    taken_s: float  # monotonic clock when it was taken
    runtime: tuple[str, str, str] | None  # (name, version, NRI version) while connected
    pools: tuple[PoolMetrics, ...]
    online_demand_millicores: int
    online_usage_cores: float | None
    containers: tuple[ContainerMetrics, ...]
    numa: tuple[NumaMetrics, ...]
    detections: tuple[DetectionMetrics, ...]
    rungs_in_force: tuple[tuple[str, int], ...]  # rung -> victims it is in force for
    evictions_in_flight: int
    runq_backend: str
    signal_sources: tuple[tuple[str, str], ...]  # signal kind -> source
    signal_windows: int
    signal_window_seconds: float | None
    signals_end_s: float | None  # monotonic end of the latest window
    controllers: tuple[ControllerMetrics, ...]
    host: HostMetrics | None


class RuntimeSource(Protocol):
    """What `snapshot_of` reads of the plugin: the connected runtime, None when none."""

    @property
    def runtime(self) -> RuntimeInfo | None: ...


def snapshot_of(
    engine: Engine,
    executor: HostExecutor | None = None,
    protect: ProtectState | None = None,
    plugin: RuntimeSource | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> MetricsSnapshot:
    """Copy the node's state for the exporter. Call it in the policy thread only: it reads
    the engine's plan, table and protection state, which that thread owns."""
    plan = engine.plan
    pools = plan.pools
    members: Tally[str] = Tally(p.pool for p in plan.containers.values())
    sized = [
        (SYSTEM, len(pools.system)),
        (SHARED, len(pools.shared)),
        (RECLAIMED, len(pools.reclaimed)),
        (DEDICATED, len(frozenset().union(*(a.cpus for a in pools.dedicated.values())))),
        *((f"{SHARED}:{name}", len(cpus)) for name, cpus in sorted(pools.named.items())),
    ]
    last = protect.last if protect is not None else None
    measured = last.containers if last is not None else {}
    window = last.window_s if last is not None and last.window_s > 0 else None
    containers = []
    for cid, p in sorted(plan.containers.items(), key=lambda kv: kv[1].name):
        row = ContainerMetrics(
            name=p.name,
            qos_class=p.qos_class.value,
            pool=p.pool,
            cpus=len(p.cpus.value),
            cpu_shares=p.cpu_shares.value,
            oom_score_adj=p.oom_score_adj.value,
            io_weight=p.io_weight.value,
            rdt_class=p.rdt_class.value or "",
            net_class=p.net_class.value or "",
        )
        s = measured.get(cid)
        if s is not None:
            row = _with_signals(row, s, window)
        containers.append(row)
    names = {cid: (p.name, p.qos_class.value) for cid, p in plan.containers.items()}
    detections = tuple(
        DetectionMetrics(
            *names.get(d.victim, (d.victim, "")),
            verdict=str(d.verdict),
            delay_seconds=d.delay_ms / 1000.0,
            threshold_seconds=d.threshold_ms / 1000.0,
            confidence=d.confidence,
        )
        for d in sorted(engine.protection.last_detections.values(), key=lambda d: d.victim)
    )
    rungs: Tally[str] = Tally()
    for in_force in engine.protection.ladder.in_force().values():
        rungs.update({str(rung) for rung, _targets in in_force})
    runtime = plugin.runtime if plugin is not None else engine.runtime
    usage = engine.planner.usage
    return MetricsSnapshot(
        taken_s=clock(),
        runtime=None
        if runtime is None
        else (runtime.name, runtime.version, str(runtime.nri_version)),
        pools=tuple(PoolMetrics(name, n, members.get(name, 0)) for name, n in sized),
        online_demand_millicores=plan.online_demand_millicores,
        online_usage_cores=usage.online_cores if usage is not None else None,
        containers=tuple(containers),
        numa=tuple(
            NumaMetrics(n, r.millicores, r.memory_bytes)
            for n, r in sorted(engine.reclaimable().items())
        ),
        detections=detections,
        rungs_in_force=tuple((str(r), rungs.get(str(r), 0)) for r in Rung),
        evictions_in_flight=len(engine.protection.evicting),
        runq_backend=protect.runq_source if protect is not None else "none",
        signal_sources=tuple(
            sorted((kind, a.source) for kind, a in (protect.sources if protect else {}).items())
        ),
        signal_windows=protect.windows if protect is not None else 0,
        signal_window_seconds=window,
        signals_end_s=last.end_s if last is not None else None,
        controllers=_controllers(executor),
        host=_host(executor),
    )


def _with_signals(
    row: ContainerMetrics, s: ContainerSignals, window: float | None
) -> ContainerMetrics:
    runq = s.runq
    usage = None
    if s.cpu_usage_ns is not None and window:
        usage = s.cpu_usage_ns / NS_PER_S / window
    bandwidth = None
    if s.mbm_total_bytes is not None and window:
        bandwidth = s.mbm_total_bytes / window
    return replace(
        row,
        # the detector's delay signal: p90 from a histogram, the mean without one
        runq_p90_seconds=runq.quantile_ns(0.9) / NS_PER_S if runq and runq.count else None,
        cpu_usage_cores=usage,
        cpu_pressure_some=s.cpu_pressure.some if s.cpu_pressure else None,
        cpu_pressure_full=s.cpu_pressure.full if s.cpu_pressure else None,
        memory_pressure_some=s.memory_pressure.some if s.memory_pressure else None,
        io_pressure_some=s.io_pressure.some if s.io_pressure else None,
        throttled_ratio=s.throttling.ratio if s.throttling else None,
        memory_usage_bytes=s.memory.usage_bytes if s.memory else None,
        memory_bandwidth_bytes_per_second=bandwidth,
        llc_occupancy_bytes=s.llc_occupancy_bytes,
        cycles_per_instruction=s.cpi,
    )


def _controllers(executor: HostExecutor | None) -> tuple[ControllerMetrics, ...]:
    if executor is None:
        return ()
    return tuple(
        ControllerMetrics(c.name, c.domain, str(c.mode), c.enabled, c.applied, c.failed, c.refused)
        for c in executor.controllers.status()
    )


HOST_JOB_OUTCOMES = (
    "done",
    "failed",
    "refused",
    "retried",
    "rechecks",
    "superseded",
    "abandoned",
    "dropped",
)


def _host(executor: HostExecutor | None) -> HostMetrics | None:
    if executor is None:
        return None
    status = executor.status()
    counts = dict.fromkeys(HOST_JOB_OUTCOMES, 0) | status.counts
    return HostMetrics(
        queued=status.queued,
        retries_pending=status.retries_pending,
        stalled=status.stalled,
        stuck_threads=len(status.stuck),
        quarantined=len(status.quarantined),
        jobs=tuple(sorted(counts.items())),
    )


# --- decisions, counted where they happen --------------------------------------------------

TRIGGERS = ("interference", "memory_pressure")
DIRECTIONS = ("up", "down")
_STEP = re.compile(r"^step (?P<dir>up|down) (?P<rung>[a-z-]+)")
_DRY_RUN = re.compile(r"^dry-run: would evict pod \S+: (?P<why>.*)$", re.DOTALL)
_VERDICTS = {str(v) for v in Verdict}
_NOTE_SERIES_KEPT = 256  # (kind, severity) pairs whose counter child is kept
_RUNGS = {str(r) for r in Rung}


class Decisions:
    """Monotonic counters of what the protection loop decided, fed with every `Intents`
    the engine returns. The engine's notes are its decision record (each detection,
    ladder step and eviction is one note), and an `Evict` host intent is an eviction
    asked for; counting them here, as they are handed over, keeps the counters right
    across windows, restarts of episodes, and snapshots that a scrape may never see.

    Every label combination is created at zero, so `rate()` and the dashboard have a
    series before the first event."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.detections = Counter(
            "nri_qos_interference_detections",
            "Interference episodes declared, by verdict (neighbours, self-throttled, unknown)",
            ["verdict"],
            registry=registry,
        )
        self.cleared = Counter(
            "nri_qos_interference_cleared",
            "Interference episodes that ended: the victim is back under its thresholds",
            registry=registry,
        )
        self.steps = Counter(
            "nri_qos_mitigation_steps",
            "Mitigation ladder steps, by rung and direction (up: applied, down: undone); "
            "the evict rung's step up is each eviction for interference",
            ["rung", "direction"],
            registry=registry,
        )
        self.evictions = Counter(
            "nri_qos_evictions",
            "Pod evictions asked for, by trigger (interference, memory_pressure)",
            ["trigger"],
            registry=registry,
        )
        self.dry_run_evictions = Counter(
            "nri_qos_dry_run_evictions",
            "Evictions that [eviction] dry_run only logged, by trigger",
            ["trigger"],
            registry=registry,
        )
        self.notes = Counter(
            "nri_qos_engine_notes",
            "Decisions and problems the engine reported, by note kind and severity",
            ["kind", "severity"],
            registry=registry,
        )
        # The notes counter's children by (kind, severity): a CreateContainer hands over
        # a note or two, and prometheus_client's labels() checks and locks on each call.
        # The engine's note kinds are a handful; the bound is for safety only.
        self._notes_by: dict[tuple[str, Severity], Any] = {}
        for verdict in sorted(_VERDICTS):
            self.detections.labels(verdict)
        for rung in Rung:
            for direction in DIRECTIONS:
                self.steps.labels(str(rung), direction)
        for trigger in TRIGGERS:
            self.evictions.labels(trigger)
            self.dry_run_evictions.labels(trigger)

    def observe_intents(self, intents: Intents) -> None:
        """Count the decisions in one `Intents`. Call it exactly once per value the
        engine returned (where it is handed to `HostExecutor.submit`); thread-safe."""
        for note in intents.notes:
            self._note_counter(note.kind, note.severity).inc()
            if note.kind == "interference":
                verdict = note.message.partition(":")[0]
                if verdict in _VERDICTS:  # a new episode ("now X:" is the same one)
                    self.detections.labels(verdict).inc()
                elif note.message.startswith("back under"):
                    self.cleared.inc()
            elif note.kind == "mitigation":
                step = _STEP.match(note.message)
                if step is not None and step["rung"] in _RUNGS:
                    self.steps.labels(step["rung"], step["dir"]).inc()
            elif note.kind == "eviction":
                dry = _DRY_RUN.match(note.message)
                if dry is not None:
                    self._evicted(_trigger(dry["why"]), self.dry_run_evictions)
        for intent in intents.host:
            if isinstance(intent, Evict):
                self._evicted(_trigger(intent.reason), self.evictions)

    def _note_counter(self, kind: str, severity: Severity) -> Any:
        key = (kind, severity)
        child = self._notes_by.get(key)
        if child is None:
            child = self.notes.labels(kind, str(severity))
            if len(self._notes_by) < _NOTE_SERIES_KEPT:
                self._notes_by[key] = child
        return child

    def _evicted(self, trigger: str, counter: Counter) -> None:
        """The ladder's top rung has no mitigation note: its step up is the eviction
        (asked or, in dry-run, logged), so it is counted as one step too."""
        counter.labels(trigger).inc()
        if trigger == "interference":
            self.steps.labels(str(Rung.EVICT), "up").inc()


def _trigger(why: str) -> str:
    return "memory_pressure" if why.startswith("memory pressure") else "interference"


# --- rendering ------------------------------------------------------------------------------


class NodeCollector(Collector):
    """Renders the latest `MetricsSnapshot` at scrape time; nothing before the first."""

    def __init__(
        self,
        get: Callable[[], MetricsSnapshot | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._get = get
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        s = self._get()
        if s is None:
            return
        now = self._clock()
        yield _gauge(
            "nri_qos_snapshot_age_seconds",
            "Seconds since the node state shown here was copied from the engine "
            "(after each signal window and rebalance): a large value means a stalled loop",
            [((), max(0.0, now - s.taken_s))],
        )
        if s.runtime is not None:
            yield _gauge(
                "nri_qos_runtime_info",
                "The runtime that configured us",
                [(s.runtime, 1.0)],
                ["runtime", "version", "nri_version"],
            )
        yield from self._pools(s)
        yield from self._containers(s)
        yield from self._protection(s)
        yield from self._signals(s, now)
        yield from self._host(s)

    def _pools(self, s: MetricsSnapshot) -> Iterator[Metric]:
        yield _gauge(
            "nri_qos_pool_cpus",
            "CPUs in each pool (dedicated: all exclusive allocations together)",
            [((p.pool,), p.cpus) for p in s.pools],
            ["pool"],
        )
        yield _gauge(
            "nri_qos_pool_containers",
            "Planned containers in each pool",
            [((p.pool,), p.containers) for p in s.pools],
            ["pool"],
        )
        yield _gauge(
            "nri_qos_online_demand_millicores",
            "CPU the online containers asked for (requests), which sizes the shared pool",
            [((), s.online_demand_millicores)],
        )
        if s.online_usage_cores is not None:
            yield _gauge(
                "nri_qos_online_usage_cores",
                "CPU the online containers used at the last usage sample",
                [((), s.online_usage_cores)],
            )
        yield _gauge(
            "nri_qos_reclaimable_cpu_millicores",
            "CPU the reclaimed pool offers batch pods, per NUMA node",
            [((str(n.node),), n.reclaimable_millicores) for n in s.numa],
            ["numa_node"],
        )
        yield _gauge(
            "nri_qos_reclaimable_memory_bytes",
            "Memory left for batch pods per NUMA node: its size minus the system reserve "
            "and the online containers' limits",
            [((str(n.node),), n.reclaimable_memory_bytes) for n in s.numa],
            ["numa_node"],
        )

    def _containers(self, s: MetricsSnapshot) -> Iterator[Metric]:
        rows = s.containers
        key = ["container", "qos_class"]
        yield _gauge(
            "nri_qos_container_info",
            "One series per planned container, with where the plan put it",
            [((c.name, c.qos_class, c.pool, c.rdt_class, c.net_class), 1.0) for c in rows],
            [*key, "pool", "rdt_class", "net_class"],
        )
        plan: list[tuple[str, str, Callable[[ContainerMetrics], float | None]]] = [
            ("cpus", "CPUs in the container's planned cpuset", lambda c: c.cpus),
            ("cpu_shares", "Planned CPU weight (cgroup v1 shares)", lambda c: c.cpu_shares),
            ("oom_score_adj", "Planned oom_score_adj", lambda c: c.oom_score_adj),
            ("io_weight", "Planned I/O weight", lambda c: c.io_weight),
            (
                "runq_wait_p90_seconds",
                "90th percentile of wakeup-to-run waits in the latest window (the mean "
                "where the probe gives no histogram): the detector's delay signal",
                lambda c: c.runq_p90_seconds,
            ),
            (
                "cpu_usage_cores",
                "CPU used in the latest window",
                lambda c: c.cpu_usage_cores,
            ),
            (
                "cpu_throttled_ratio",
                "Share of CFS periods throttled in the latest window",
                lambda c: c.throttled_ratio,
            ),
            (
                "memory_usage_bytes",
                "Memory in use at the end of the latest window",
                lambda c: c.memory_usage_bytes,
            ),
            (
                "memory_bandwidth_bytes_per_second",
                "Memory bandwidth (RDT MBM total) over the latest window",
                lambda c: c.memory_bandwidth_bytes_per_second,
            ),
            (
                "llc_occupancy_bytes",
                "Last-level cache occupied at the end of the latest window (RDT CMT)",
                lambda c: c.llc_occupancy_bytes,
            ),
            (
                "cycles_per_instruction",
                "Cycles per instruction in the latest window (hardware counters)",
                lambda c: c.cycles_per_instruction,
            ),
        ]
        for suffix, doc, value in plan:
            yield _gauge(
                f"nri_qos_container_{suffix}",
                doc,
                [((c.name, c.qos_class), v) for c in rows if (v := value(c)) is not None],
                key,
            )
        pressure: list[tuple[str, str, Callable[[ContainerMetrics], float | None]]] = [
            ("cpu", "some", lambda c: c.cpu_pressure_some),
            ("cpu", "full", lambda c: c.cpu_pressure_full),
            ("memory", "some", lambda c: c.memory_pressure_some),
            ("io", "some", lambda c: c.io_pressure_some),
        ]
        yield _gauge(
            "nri_qos_container_pressure_ratio",
            "PSI over the latest window: share of time some (or all) tasks of the "
            "container stalled on the resource",
            [
                ((c.name, c.qos_class, resource, kind), v)
                for c in rows
                for resource, kind, value in pressure
                if (v := value(c)) is not None
            ],
            [*key, "resource", "kind"],
        )

    def _protection(self, s: MetricsSnapshot) -> Iterator[Metric]:
        key = ["container", "qos_class"]
        yield _gauge(
            "nri_qos_container_interference",
            "1 while the container suffers interference, with the verdict",
            [((d.container, d.qos_class, d.verdict), 1.0) for d in s.detections],
            [*key, "verdict"],
        )
        yield _gauge(
            "nri_qos_container_interference_delay_seconds",
            "The delay that declared the container's interference episode",
            [((d.container, d.qos_class), d.delay_seconds) for d in s.detections],
            key,
        )
        yield _gauge(
            "nri_qos_container_interference_threshold_seconds",
            "The delay threshold the container is judged by (absolute or relative to its baseline)",
            [((d.container, d.qos_class), d.threshold_seconds) for d in s.detections],
            key,
        )
        verdicts = Tally(d.verdict for d in s.detections)
        yield _gauge(
            "nri_qos_interference_victims",
            "Containers suffering interference now, by verdict",
            [((v,), verdicts.get(v, 0)) for v in sorted(_VERDICTS)],
            ["verdict"],
        )
        yield _gauge(
            "nri_qos_mitigation_rungs_in_force",
            "Victims for which each mitigation rung is in force now",
            [((rung,), n) for rung, n in s.rungs_in_force],
            ["rung"],
        )
        yield _gauge(
            "nri_qos_evictions_in_flight",
            "Pods whose eviction was asked for and is not seen through yet",
            [((), s.evictions_in_flight)],
        )

    def _signals(self, s: MetricsSnapshot, now: float) -> Iterator[Metric]:
        yield _gauge(
            "nri_qos_runq_backend_info",
            "Which run-queue latency backend measures (core, bcc, schedstat, none)",
            [((s.runq_backend,), 1.0)],
            ["backend"],
        )
        yield _gauge(
            "nri_qos_signal_source_info",
            "Which source produced each signal kind in the latest window",
            [((kind, source), 1.0) for kind, source in s.signal_sources],
            ["signal", "source"],
        )
        windows = CounterMetricFamily(
            "nri_qos_signal_windows", "Signal windows measured since start"
        )
        windows.add_metric([], s.signal_windows)
        yield windows
        if s.signal_window_seconds is not None:
            yield _gauge(
                "nri_qos_signal_window_seconds",
                "Length of the latest signal window",
                [((), s.signal_window_seconds)],
            )
        if s.signals_end_s is not None:
            yield _gauge(
                "nri_qos_signals_age_seconds",
                "Seconds since the latest signal window ended",
                [((), max(0.0, now - s.signals_end_s))],
            )

    def _host(self, s: MetricsSnapshot) -> Iterator[Metric]:
        ctl = s.controllers
        yield _gauge(
            "nri_qos_controller_enabled",
            "1 when the host controller started, 0 when it is disabled (status says why)",
            [((c.name, c.domain, c.mode), float(c.enabled)) for c in ctl],
            ["controller", "domain", "mode"],
        )
        intents = CounterMetricFamily(
            "nri_qos_controller_intents",
            "Host intents each controller handled, by outcome (applied, failed, refused)",
            labels=["controller", "outcome"],
        )
        for c in ctl:
            intents.add_metric([c.name, "applied"], c.applied)
            intents.add_metric([c.name, "failed"], c.failed)
            intents.add_metric([c.name, "refused"], c.refused)
        yield intents
        h = s.host
        if h is None:
            return
        yield _gauge("nri_qos_host_jobs_queued", "Host jobs waiting", [((), h.queued)])
        yield _gauge(
            "nri_qos_host_retries_pending",
            "Failed host jobs waiting for their retry",
            [((), h.retries_pending)],
        )
        yield _gauge(
            "nri_qos_host_stalled",
            "1 while host work is stalled: too many threads blocked in the kernel",
            [((), float(h.stalled))],
        )
        yield _gauge(
            "nri_qos_host_stuck_threads",
            "Host threads abandoned while blocked on a file",
            [((), h.stuck_threads)],
        )
        yield _gauge(
            "nri_qos_host_quarantined_keys",
            "Container domains whose host work is held back after a stuck operation",
            [((), h.quarantined)],
        )
        jobs = CounterMetricFamily(
            "nri_qos_host_jobs", "Host jobs since start, by outcome", labels=["outcome"]
        )
        for outcome, n in h.jobs:
            jobs.add_metric([outcome], n)
        yield jobs


def _gauge(
    name: str,
    doc: str,
    samples: Iterable[tuple[tuple[str, ...], float]],
    labels: list[str] | None = None,
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), float(value))
    return family


# --- wiring ---------------------------------------------------------------------------------


class NodeExporter:
    """The latest snapshot, the decision counters and the collector, on one registry.

    `publish` (from the policy thread) swaps one reference; `NodeCollector` reads it from
    the HTTP thread. A reference assignment is atomic, and the snapshot is immutable."""

    def __init__(
        self,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
        refresh: Callable[[], MetricsSnapshot | None] | None = None,
    ) -> None:
        """`refresh`, when given, is asked for a fresh snapshot at each scrape (the daemon
        hands it a call into the policy thread with a deadline); None or an error keeps
        the last one. Scrapes then cost nothing while nobody scrapes: no periodic work."""
        self._latest: MetricsSnapshot | None = None
        self._refresh = refresh
        self.decisions = Decisions(registry)
        self.collector = NodeCollector(self._current, clock)
        registry.register(self.collector)

    def _current(self) -> MetricsSnapshot | None:
        if self._refresh is not None:
            try:
                fresh = self._refresh()
            except Exception:
                fresh = None
            if fresh is not None:
                self._latest = fresh
        return self._latest

    @property
    def latest(self) -> MetricsSnapshot | None:
        return self._latest

    def publish(self, snapshot: MetricsSnapshot) -> None:
        self._latest = snapshot

    def observe_intents(self, intents: Intents) -> None:
        self.decisions.observe_intents(intents)


class MetricsSetupError(PluginSetupError):
    """`[metrics] address` cannot be served; the message says why and what to set."""


def parse_address(address: str, allow_remote: bool = False) -> tuple[str, int] | None:
    """ "HOST:PORT" (an IPv6 host in brackets: "[::1]:9464") to (host, port); "" is off
    (None). A host that is not loopback is refused unless `allow_remote`: the metrics
    name every container and what it suffers, which is not for the whole network."""
    address = address.strip()
    if not address:
        return None
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsSetupError(
            f"[metrics] address = {address!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS!r} "
            '("" turns the metrics server off)'
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not allow_remote and not _is_loopback(host):
        raise MetricsSetupError(
            f"[metrics] address = {address!r}: {host} is not a loopback address; serve on "
            "127.0.0.1 or [::1] and scrape through a sidecar or an authenticating proxy"
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name ("localhost"): every address it resolves to must be loopback
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).partition("%")[0]).is_loopback for a in addresses
    )


class MetricsServer:
    """A running /metrics HTTP server; `close()` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    address: str, registry: CollectorRegistry, allow_remote: bool = False
) -> MetricsServer | None:
    """Serve `registry` in the Prometheus text format on `address` ("HOST:PORT"; port 0
    picks a free one) from a daemon thread. "" serves nothing and returns None. Raises
    MetricsSetupError for a bad or non-loopback address (unless `allow_remote`) and for
    a port that cannot be bound."""
    parsed = parse_address(address, allow_remote)
    if parsed is None:
        return None
    host, port = parsed
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise MetricsSetupError(
            f"[metrics] address = {address!r}: cannot listen: {exc.strerror or exc}"
        ) from None
    return MetricsServer(server, thread)
