"""Prometheus metrics of the plugin runtime.

One `Metrics` object per process owns its own registry, so tests (and the lab, which
runs a plugin and a runtime side by side) never collide on global collector names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
