"""A plugin connection as the embedded runtime tracks it, and the calls it makes to one.

`ConnectedPlugin` is the runtime's live record of one connection (launched or external);
`call` is one runtime -> plugin request on mux conn 1, logged as an `ExchangeRecord`,
whose failures drop the plugin; `drop` and `drop_unconditionally` close it. Plugin
bring-up (`bringup`) and event relaying (`relay`) both go through these.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from google.protobuf.message import Message

from embedded_runtime.connection import CallResult, CallStatus, PluginConnection
from embedded_runtime.flavor import RuntimeFlavor
from embedded_runtime.launch import LaunchedProcess
from embedded_runtime.records import (
    TO_PLUGIN,
    CounterSet,
    ExchangeRecord,
    Outcome,
    PluginInfo,
    PluginState,
)
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.services import PLUGIN_SERVICE


@dataclass(slots=True, eq=False)
class ConnectedPlugin:
    seq: int
    conn: PluginConnection
    external: bool
    registered: asyncio.Future[str | None]  # None = accepted, else the refusal
    name: str = ""
    idx: str = ""
    config: str = ""
    process: LaunchedProcess | None = None
    events: int = 0
    state: PluginState = PluginState.CONNECTED
    nri_version: str = ""
    uses_state_change: bool = False
    counters: CounterSet = field(default_factory=CounterSet)

    @property
    def full_name(self) -> str:
        return f"{self.idx or '??'}-{self.name or 'plugin'}"  # Go's naming before registration

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self.conn.peer_pid

    def info(self) -> PluginInfo:
        return PluginInfo(
            name=self.name,
            idx=self.idx,
            events=self.events,
            pid=self.pid,
            state=self.state,
            external=self.external,
            nri_version=self.nri_version,
            uses_state_change=self.uses_state_change,
            close_reason=self.conn.close_reason,
            counters=self.counters.frozen(),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    message: str
    payload: bytes


async def call(
    plugin: ConnectedPlugin,
    method: str,
    request: Message,
    deadline: float,
    note: str = "",
    *,
    flavor: RuntimeFlavor,
    exchanges: list[ExchangeRecord],
) -> Reply | None:
    """One runtime -> plugin call, logged. None = fatal (the plugin was dropped)."""
    loop = asyncio.get_running_loop()
    payload = request.SerializeToString()
    metadata = flavor.metadata_for(method)
    started = loop.time()
    plugin.counters.requests += 1
    result = await plugin.conn.call(PLUGIN_SERVICE, method, payload, deadline, metadata)
    latency = loop.time() - started
    record_call(exchanges, plugin, method, payload, metadata, result, latency, note)
    if result.status is CallStatus.REPLIED:
        assert result.reply is not None
        if result.reply.code != Code.OK:
            plugin.counters.errors += 1
        return Reply(result.reply.code, result.reply.message, result.reply.payload)
    if result.status is CallStatus.NOT_SENT:
        # Go's client refuses > 4 MiB with RESOURCE_EXHAUSTED: a plain error, not fatal.
        return Reply(Code.RESOURCE_EXHAUSTED, result.detail, b"")
    if result.status is CallStatus.TIMEOUT:
        plugin.counters.timeouts += 1
    drop(plugin, f"failed to handle {method} request: {result.status.value}", flavor)
    return None


def record_call(
    exchanges: list[ExchangeRecord],
    plugin: ConnectedPlugin,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...],
    result: CallResult,
    latency: float,
    note: str = "",
) -> None:
    """Append one runtime -> plugin exchange to `exchanges` (the runtime's `log`)."""
    outcome = {
        CallStatus.TIMEOUT: Outcome.TIMEOUT,
        CallStatus.CLOSED: Outcome.CLOSED,
        CallStatus.NOT_SENT: Outcome.NOT_SENT,
    }.get(result.status, Outcome.OK)
    reply = result.reply
    if reply is not None and reply.code != Code.OK:
        outcome = Outcome.ERROR
    exchanges.append(
        ExchangeRecord(
            plugin=plugin.full_name,
            direction=TO_PLUGIN,
            conn=1,
            stream_id=result.stream_id,
            service=PLUGIN_SERVICE,
            method=method,
            payload=payload,
            timeout_nano=result.timeout_nano,
            metadata=metadata,
            outcome=outcome,
            code=reply.code if reply is not None else 0,
            message=reply.message if reply is not None else result.detail,
            reply=reply.payload if reply is not None else b"",
            latency=latency,
            note=note,
        )
    )


def drop(plugin: ConnectedPlugin, reason: str, flavor: RuntimeFlavor) -> None:
    """Close a plugin the runtime gives up on (and kill it if launched and the
    flavor does so)."""
    plugin.conn.close(reason)
    if plugin.process is not None and flavor.kill_dropped_plugins:
        plugin.process.kill()


def drop_unconditionally(plugin: ConnectedPlugin, reason: str) -> None:
    plugin.conn.close(reason)
    if plugin.process is not None:
        plugin.process.kill()


def code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"code {code}"
