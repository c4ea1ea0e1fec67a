"""What the embedded runtime reports about plugins and exchanges: plain values.

`ExchangeRecord` is one request and its reply in either direction (the lab prints the
runtime's `log` of them); `PluginInfo` is a snapshot of one plugin connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from google.protobuf.message import Message

from nri_plugin.protocol import services
from nri_plugin.protocol.errors import RemoteProtocolError

TO_PLUGIN = "runtime->plugin"
TO_RUNTIME = "plugin->runtime"


class PluginState(Enum):
    CONNECTED = "connected"  # waiting for RegisterPlugin
    REGISTERED = "registered"  # Configure in flight
    CONFIGURED = "configured"  # Synchronize in flight
    READY = "ready"  # receives events
    REJECTED = "rejected"  # registration refused; the runtime leaves the connection open
    UNSYNCED = "unsynced"  # sync failed on NRI < v0.12: left open, never gets events
    CLOSED = "closed"


class Outcome(Enum):
    OK = "ok"
    ERROR = "error"  # replied with an error status
    TIMEOUT = "timeout"
    CLOSED = "closed"
    NOT_SENT = "not sent"  # refused locally (larger than ttrpc's 4 MiB)
    DROPPED = "dropped"  # a plugin request the runtime abandoned (plugin closed)


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    """One request and its reply, in either direction, as the lab prints it."""

    plugin: str
    direction: str  # TO_PLUGIN for the runtime's calls, TO_RUNTIME for the plugin's
    conn: int
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]
    outcome: Outcome
    code: int = 0
    message: str = ""
    reply: bytes = b""
    latency: float = 0.0
    note: str = ""

    def request_message(self) -> Message | None:
        spec = services.lookup(self.service, self.method)
        if spec is None:
            return None
        return parse(spec.request, self.payload)

    def reply_message(self) -> Message | None:
        spec = services.lookup(self.service, self.method)
        if spec is None or self.outcome is not Outcome.OK:
            return None
        return parse(spec.response, self.reply)

    def describe(self) -> str:
        arrow = "->" if self.direction == TO_PLUGIN else "<-"
        status = self.outcome.value
        if self.outcome is Outcome.ERROR:
            status = f"error {self.code}: {self.message}"
        elif self.message:
            status = f"{status}: {self.message}"
        text = (
            f"{self.plugin:>14} {arrow} c{self.conn} s{self.stream_id:<4} {self.method:<28} "
            f"{self.latency * 1000:7.1f} ms  {status}"
        )
        return f"{text} ({self.note})" if self.note else text


def parse(message_type: type[Message], payload: bytes) -> Message | None:
    try:
        return services.decode(message_type, payload, message_type.__name__)
    except RemoteProtocolError:
        return None


@dataclass(frozen=True, slots=True)
class PluginCounters:
    requests: int = 0  # calls the runtime made
    errors: int = 0  # error statuses received
    timeouts: int = 0
    state_change_fallbacks: int = 0
    update_requests: int = 0  # UpdateContainers calls received
    updates_applied: int = 0
    evictions_ignored: int = 0


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    idx: str
    events: int  # subscribed event mask (0 before Configure)
    pid: int | None
    state: PluginState
    external: bool
    nri_version: str  # what RegisterPlugin claimed (v0.12+ plugins send it)
    uses_state_change: bool
    close_reason: str
    counters: PluginCounters

    @property
    def full_name(self) -> str:
        """The runtimes' "NN-name" ("??-plugin" before registration)."""
        return f"{self.idx or '??'}-{self.name or 'plugin'}"


@dataclass(slots=True)
class CounterSet:
    """The live counters of one plugin; `PluginInfo` carries frozen snapshots."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    state_change_fallbacks: int = 0
    update_requests: int = 0
    updates_applied: int = 0
    evictions_ignored: int = 0

    def frozen(self) -> PluginCounters:
        return PluginCounters(
            self.requests,
            self.errors,
            self.timeouts,
            self.state_change_fallbacks,
            self.update_requests,
            self.updates_applied,
            self.evictions_ignored,
        )
