"""Prometheus metrics of the plugin runtime.

One `Metrics` object per process owns its own registry, so tests (and the lab, which
runs a plugin and a runtime side by side) never collide on global collector names. The
node's state (pools, containers, signals, controllers) is rendered into the same registry
by `nri_plugin.exporter`; this module holds what the connection and request path count.

Naming follows Prometheus conventions: an `nri_qos_` prefix, base units in the name
(`_seconds`), and counters declared without `_total`, which prometheus_client appends in
the exposition (`nri_qos_requests` is scraped as `nri_qos_requests_total`).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# the `le` text prometheus_client writes for a bucket bound ("0.0002", "1.0", "+Inf")
_go_float: Callable[[float], str] = floatToGoString

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0)


class ConnectionState(StrEnum):
    """Where the runtime connection is; exactly one state is 1 at any time."""

    DISCONNECTED = "disconnected"  # no connection (start-up, back-off between attempts)
    CONNECTED = "connected"  # socket open, registering; the runtime has not configured us
    CONFIGURED = "configured"  # Configure answered: requests are served


class MethodSeries:
    """One method's request count (`inc`) and latency histogram (`observe`), written
    from the thread that answered (the policy thread, or the loop for a late request)."""

    __slots__ = ("_bounds", "_lock", "buckets", "count", "created", "sum")

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._lock = lock
        self.count = 0  # requests served
        self.buckets = [0] * (len(bounds) + 1)  # per bucket (not cumulative), +Inf last
        self.sum = 0.0
        self.created = time.time()

    def inc(self) -> None:
        with self._lock:
            self.count += 1

    def observe(self, seconds: float) -> None:
        at = bisect.bisect_left(self._bounds, seconds)  # the first bound >= seconds: le
        with self._lock:
            self.buckets[at] += 1
            self.sum += seconds


class RequestSeries(Collector):
    """`nri_qos_requests` and `nri_qos_request_duration_seconds`, exposed exactly as a
    prometheus_client Counter and Histogram labelled by method would be (with `_created`),
    but counted with one lock and a bisect. Both are touched on every runtime request, on
    the thread that answers it; prometheus_client's children take a lock per value and
    check in Python, on each call, that they may be observed: about a hundred bytecodes a
    request between the two."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._lock = threading.Lock()
        self._methods: dict[str, MethodSeries] = {}

    def labels(self, method: str) -> MethodSeries:
        """One method's series, as a labelled prometheus_client metric's `labels`."""
        found = self._methods.get(method)
        if found is None:
            with self._lock:
                found = self._methods.setdefault(method, MethodSeries(self.bounds, self._lock))
        return found

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [
                (m, s.count, list(s.buckets), s.sum, s.created) for m, s in self._methods.items()
            ]
        counter = CounterMetricFamily(
            "nri_qos_requests", "Runtime requests served, by NRI method", labels=["method"]
        )
        histogram = HistogramMetricFamily(
            "nri_qos_request_duration_seconds",
            "Time from request received to reply written",
            labels=["method"],
        )
        bounds = [_go_float(b) for b in self.bounds] + ["+Inf"]
        for method, count, buckets, total, created in rows:
            counter.add_metric([method], count, created=created)
            cumulative, running = [], 0
            for bound, n in zip(bounds, buckets, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            histogram.add_metric([method], cumulative, total)
            histogram.samples.append(
                Sample(f"{histogram.name}_created", {"method": method}, created)
            )
        yield counter
        yield histogram

    def describe(self) -> Iterator[Metric]:
        """The names, so the registry refuses a clash with another collector's."""
        yield CounterMetricFamily("nri_qos_requests", "", labels=["method"])
        yield HistogramMetricFamily("nri_qos_request_duration_seconds", "", labels=["method"])


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        series = RequestSeries(_LATENCY_BUCKETS)
        r.register(series)
        self.requests = series  # .labels(method).inc()
        self.request_seconds = series  # .labels(method).observe(seconds)
        self.fail_open = Counter(
            "nri_qos_fail_open",
            "Requests answered with no adjustment because the handler was late or failed",
            ["method", "reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "nri_qos_protocol_errors",
            "Malformed or refused traffic from the runtime, and replies too large to send",
            ["kind"],
            registry=r,
        )
        self.overload = Counter(
            "nri_qos_connection_overload",
            "Runtime connections closed because the runtime went past a per-connection "
            "bound (unread_replies, write_buffer, requests_in_flight, sync_chunks, "
            "sync_objects)",
            ["limit"],
            registry=r,
        )
        self.connections = Counter(
            "nri_qos_runtime_connections",
            "Connection attempts to the runtime, by outcome",
            ["outcome"],
            registry=r,
        )
        self.update_containers = Counter(
            "nri_qos_update_containers",
            "Unsolicited UpdateContainers calls, by result",
            ["result"],
            registry=r,
        )
        self.connection_state = Gauge(
            "nri_qos_runtime_connection_state",
            "1 for the state the runtime connection is in (disconnected, connected, "
            "configured), 0 for the others",
            ["state"],
            registry=r,
        )
        self.reconnects = Counter(
            "nri_qos_runtime_reconnects",
            "Runtime connections established after an earlier one ended (a runtime "
            "restart, or a connection we closed for overload or corruption)",
            registry=r,
        )
        self._ever_connected = False
        self._state = ConnectionState.DISCONNECTED
        self._show(ConnectionState.DISCONNECTED)

    def of_method(self, method: str) -> MethodSeries:
        """The request count and duration histogram of one NRI method (kept by the
        collector: touched on every request)."""
        return self.requests.labels(method)

    def connection_changed(self, state: ConnectionState) -> None:
        """Record a transition of the runtime connection. The plugin calls it with
        CONNECTED when a connection starts being served, CONFIGURED when the runtime's
        Configure was answered, and DISCONNECTED when the connection ended. Entering
        CONNECTED after an earlier connection counts one reconnect, so a node that keeps
        losing its runtime shows up as a rate, not just as a flickering state.

        Called from the event loop only; repeating the current state changes nothing."""
        if state == self._state:
            return
        if state is ConnectionState.CONNECTED:
            if self._ever_connected:
                self.reconnects.inc()
            self._ever_connected = True
        self._state = state
        self._show(state)

    @property
    def state(self) -> ConnectionState:
        return self._state

    def _show(self, state: ConnectionState) -> None:
        for s in ConnectionState:
            self.connection_state.labels(s.value).set(1.0 if s is state else 0.0)


_RECONCILE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ReconcileMetrics:
    """What the drift reconciliation loop (`nri_plugin.reconcile`) counts and shows.

    Every label value is created up front, so a dashboard has a series (at zero) before
    the first drift."""

    def __init__(self, registry: CollectorRegistry, fields: tuple[str, ...] = ()) -> None:
        r = registry
        self.periods = Counter(
            "nri_qos_reconcile_periods",
            "Reconcile periods run (host read + comparison)",
            registry=r,
        )
        self.seconds = Histogram(
            "nri_qos_reconcile_duration_seconds",
            "Cost of one reconcile period, by phase: read (host thread: cgroup and procfs "
            "reads) and decide (policy thread: the comparison)",
            ["phase"],
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )
        self.repairs = Counter(
            "nri_qos_drift_repairs",
            "Planned values found otherwise on the host and re-applied, by field",
            ["field"],
            registry=r,
        )
        self.conflicts = Gauge(
            "nri_qos_drift_conflicts",
            "Container fields another agent keeps changing right after our repair, by field",
            ["field"],
            registry=r,
        )
        self.unknown = Gauge(
            "nri_qos_unknown_containers",
            "Pod containers running on the host that the runtime never delivered to nri-qos "
            "(created during Synchronize); picked up at the next Synchronize",
            registry=r,
        )
        self.cpu_manager = Gauge(
            "nri_qos_cpu_manager_conflict",
            "1 while the kubelet's static CPU manager fights nri-qos over cpusets, by "
            "evidence; fix: set cpuManagerPolicy: none on the kubelet",
            ["evidence"],
            registry=r,
        )
        self.cpu_manager_requests = Counter(
            "nri_qos_cpu_manager_overridden_requests",
            "UpdateContainer requests whose cpuset (the kubelet CPU manager's) we answered "
            "with our own placement",
            registry=r,
        )
        for phase in ("read", "decide"):
            self.seconds.labels(phase)
        for name in fields:
            self.repairs.labels(name)
            self.conflicts.labels(name).set(0)
