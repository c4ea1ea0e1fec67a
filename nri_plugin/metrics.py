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

from enum import StrEnum
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0)


class ConnectionState(StrEnum):
    """Where the runtime connection is; exactly one state is 1 at any time."""

    DISCONNECTED = "disconnected"  # no connection (start-up, back-off between attempts)
    CONNECTED = "connected"  # socket open, registering; the runtime has not configured us
    CONFIGURED = "configured"  # Configure answered: requests are served


class MethodMetrics(NamedTuple):
    """One NRI method's series (children of the labelled metrics)."""

    requests: Any  # Counter child: .inc()
    seconds: Any  # Histogram child: .observe(seconds)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._by_method: dict[str, MethodMetrics] = {}
        self.requests = Counter(
            "nri_qos_requests", "Runtime requests served, by NRI method", ["method"], registry=r
        )
        self.request_seconds = Histogram(
            "nri_qos_request_duration_seconds",
            "Time from request received to reply written",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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

    def of_method(self, method: str) -> MethodMetrics:
        """The request counter and the duration histogram of one NRI method, looked up
        once: `labels()` takes a lock and builds a key on every call, and these two are
        touched on every request."""
        found = self._by_method.get(method)
        if found is None:
            found = MethodMetrics(self.requests.labels(method), self.request_seconds.labels(method))
            self._by_method[method] = found
        return found

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
