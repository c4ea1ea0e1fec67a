"""The Runtime service the plugins call (plugin -> runtime, mux conn 2).

RegisterPlugin settles a connection's registration (name and index checks for external
plugins); UpdateContainers applies unsolicited updates through the runtime's update
path under the same lock as event relaying, which reproduces the deadlock a plugin
walks into when it calls UpdateContainers from inside an event handler (§7.4). Every
request is logged as an `ExchangeRecord`.
"""

from __future__ import annotations

import asyncio

from embedded_runtime.connection import PluginConnection
from embedded_runtime.errors import EmbeddedRuntimeError
from embedded_runtime.flavor import registration_error
from embedded_runtime.plugins import ConnectedPlugin
from embedded_runtime.records import TO_RUNTIME, ExchangeRecord, Outcome, parse
from embedded_runtime.runtime_state import RuntimeState, log
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import RequestReceived
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.services import RUNTIME_SERVICE


class RuntimeService:
    def __init__(self, state: RuntimeState) -> None:
        self._state = state

    async def serve(self, conn: PluginConnection, req: RequestReceived) -> None:
        """Answer one request of a plugin (the connection's request handler)."""
        plugin = self._state.by_conn[conn]
        loop = asyncio.get_running_loop()
        started = loop.time()
        code: int
        try:
            if req.service != RUNTIME_SERVICE:
                code, message, reply = Code.UNIMPLEMENTED, f"service {req.service}", b""
            elif req.method == "RegisterPlugin":
                code, message, reply = await self._register(plugin, req)
            elif req.method == "UpdateContainers":
                code, message, reply = await self._update_containers(plugin, req)
            else:
                code, message, reply = Code.UNIMPLEMENTED, f"method {req.method}", b""
        except EmbeddedRuntimeError as exc:  # e.g. a backend failure while applying
            log.exception("serving %s for %s failed", req.method, plugin.full_name)
            code, message, reply = Code.UNKNOWN, str(exc), b""
        outcome = Outcome.OK if code == Code.OK else Outcome.ERROR
        if conn.closed:
            outcome = Outcome.DROPPED
        else:
            if code == Code.OK:
                await conn.respond(req.stream_id, reply)
            else:
                await conn.respond_error(req.stream_id, code, message)
        self._state.log.append(
            ExchangeRecord(
                plugin=plugin.full_name,
                direction=TO_RUNTIME,
                conn=2,
                stream_id=req.stream_id,
                service=req.service,
                method=req.method,
                payload=req.payload,
                timeout_nano=req.timeout_nano,
                metadata=req.metadata,
                outcome=outcome,
                code=int(code),
                message=message,
                reply=reply,
                latency=loop.time() - started,
            )
        )
        if req.method == "RegisterPlugin" and not plugin.registered.done():
            plugin.registered.set_result(message if code != Code.OK else None)

    async def _register(
        self, plugin: ConnectedPlugin, req: RequestReceived
    ) -> tuple[int, str, bytes]:
        msg = parse(pb.RegisterPluginRequest, req.payload)
        if not isinstance(msg, pb.RegisterPluginRequest):
            return Code.INVALID_ARGUMENT, "invalid RegisterPluginRequest", b""
        if plugin.registered.done():
            log.warning("plugin %s registered twice; ignored", plugin.full_name)
            return Code.OK, "", b""
        if plugin.external:
            refusal = registration_error(self._state.flavor, msg.plugin_name, msg.plugin_idx)
            if refusal is not None:
                return Code.UNKNOWN, refusal, b""
            plugin.name, plugin.idx = msg.plugin_name, msg.plugin_idx
        plugin.nri_version = msg.NRI_version
        log.info("plugin %s registered (NRI version %s)", plugin.full_name, msg.NRI_version or "?")
        return Code.OK, "", b""

    async def _update_containers(
        self, plugin: ConnectedPlugin, req: RequestReceived
    ) -> tuple[int, str, bytes]:
        msg = parse(pb.UpdateContainersRequest, req.payload)
        if not isinstance(msg, pb.UpdateContainersRequest):
            return Code.INVALID_ARGUMENT, "invalid UpdateContainersRequest", b""
        plugin.counters.update_requests += 1
        plugin.counters.evictions_ignored += len(msg.evict)
        # The trap (§7.4): served under the same lock as event relaying, so a plugin
        # that waits for this reply inside an event handler blocks until that event's
        # request timeout drops it.
        async with self._state.lock:
            if plugin.conn.closed:
                # Dropped while waiting (typically by the timeout of the very event it
                # was handling). Go's handler is racing a closed connection here; the
                # embedded runtime does not apply updates of a plugin it dropped.
                return Code.CANCELLED, "plugin closed while waiting for the runtime", b""
            applied, failed = await self._state.apply_updates(msg.update)
        plugin.counters.updates_applied += applied
        if failed:
            return Code.UNKNOWN, "NRI update of some containers failed", b""
        return Code.OK, "", pb.UpdateContainersResponse().SerializeToString()
