"""The [debug], [metrics] and [report] sections: how people and the cluster see the agent.

```toml
[debug]
socket = "/run/nri-qos/debug.sock"   # the gRPC debug API ("" = off)
group = ""                           # members of this group may use it too (root always)

[metrics]
address = "127.0.0.1:9464"           # Prometheus /metrics ("" = off)

[report]
enabled = true                       # publish reclaimable CPU/memory on the node
min_interval_ms = 10000              # at most one update per interval
kubeconfig = ""                      # default: in-cluster service account
node_name = ""                       # default: $NODE_NAME, else the host name
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DEBUG_SOCKET = "/run/nri-qos/debug.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"


class OperationsSectionError(ValueError):
    """A bad key or value; the message names it."""


@dataclass(frozen=True, slots=True)
class DebugSettings:
    socket: str = DEFAULT_DEBUG_SOCKET
    group: str = ""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    address: str = DEFAULT_METRICS_ADDRESS


@dataclass(frozen=True, slots=True)
class ReportSettings:
    enabled: bool = True
    min_interval_s: float = 10.0
    kubeconfig: str = ""
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class OperationsSettings:
    debug: DebugSettings = field(default_factory=DebugSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


_KEYS = {
    "debug": {"socket", "group"},
    "metrics": {"address"},
    "report": {"enabled", "min_interval_ms", "kubeconfig", "node_name"},
}


def _table(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise OperationsSectionError(f"[{name}] must be a table")
    unknown = set(table) - _KEYS[name]
    if unknown:
        raise OperationsSectionError(
            f"[{name}] has no key(s) {sorted(unknown)}; allowed: {sorted(_KEYS[name])}"
        )
    return table


def _text(table: Mapping[str, Any], section: str, key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise OperationsSectionError(f"[{section}] {key} = {value!r} must be a string")
    return value


def check_address(address: str) -> tuple[str, int] | None:
    """ "HOST:PORT" -> (host, port); "" -> None; ValueError with a sentence otherwise."""
    if not address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host.strip("[]"), int(port)


def parse_operations(raw: Mapping[str, Any]) -> OperationsSettings:
    debug = _table(raw, "debug")
    metrics = _table(raw, "metrics")
    report = _table(raw, "report")
    address = _text(metrics, "metrics", "address", DEFAULT_METRICS_ADDRESS)
    try:
        check_address(address)
    except ValueError as exc:
        raise OperationsSectionError(f"[metrics] address: {exc}") from None
    socket = _text(debug, "debug", "socket", DEFAULT_DEBUG_SOCKET)
    if socket and not socket.startswith("/"):
        raise OperationsSectionError(f"[debug] socket = {socket!r} must be an absolute path")
    enabled = report.get("enabled", True)
    if not isinstance(enabled, bool):
        raise OperationsSectionError(f"[report] enabled = {enabled!r} must be true or false")
    interval = report.get("min_interval_ms", 10000)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
        raise OperationsSectionError(f"[report] min_interval_ms = {interval!r} must be >= 0")
    return OperationsSettings(
        debug=DebugSettings(socket=socket, group=_text(debug, "debug", "group", "")),
        metrics=MetricsSettings(address=address),
        report=ReportSettings(
            enabled=enabled,
            min_interval_s=float(interval) / 1000,
            kubeconfig=_text(report, "report", "kubeconfig", ""),
            node_name=_text(report, "report", "node_name", ""),
        ),
    )
