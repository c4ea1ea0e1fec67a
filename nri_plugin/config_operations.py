"""The [debug] and [metrics] sections: how people and their tools see the agent.

```toml
[debug]
socket = "/run/nri-qos/debug.sock"   # the gRPC debug API ("" = off)
group = ""                           # members of this group may use it too (root always)

[metrics]
address = "127.0.0.1:9464"           # Prometheus /metrics ("" = off)
```
([reporter], publishing reclaimable resources on the node, is `nri_plugin.reporter`'s.)
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
class OperationsSettings:
    debug: DebugSettings = field(default_factory=DebugSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


_KEYS = {
    "debug": {"socket", "group"},
    "metrics": {"address"},
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
    address = _text(metrics, "metrics", "address", DEFAULT_METRICS_ADDRESS)
    try:
        check_address(address)
    except ValueError as exc:
        raise OperationsSectionError(f"[metrics] address: {exc}") from None
    socket = _text(debug, "debug", "socket", DEFAULT_DEBUG_SOCKET)
    if socket and not socket.startswith("/"):
        raise OperationsSectionError(f"[debug] socket = {socket!r} must be an absolute path")
    return OperationsSettings(
        debug=DebugSettings(socket=socket, group=_text(debug, "debug", "group", "")),
        metrics=MetricsSettings(address=address),
    )
