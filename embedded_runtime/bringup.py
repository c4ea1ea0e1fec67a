"""Plugin bring-up: accepting connections, registration, Configure, (split) Synchronize.

External plugins are accepted one at a time, like the real runtimes: each must register
within the registration timeout, then is configured (event-mask validation included)
and synchronized (in chunks when the state exceeds ttrpc's 4 MiB) under the runtime's
lock before it receives events. Launched plugins go through the same steps. Whatever
fails drops only the plugin at fault; the accept loop carries on.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from embedded_runtime.connection import CallStatus, PluginConnection, RequestHandler
from embedded_runtime.errors import EmbeddedRuntimeError
from embedded_runtime.flavor import InvalidEventMaskError, subscribed_events
from embedded_runtime.plugins import (
    ConnectedPlugin,
    Reply,
    call,
    code_name,
    drop,
    drop_unconditionally,
    record_call,
)
from embedded_runtime.records import PluginState, parse
from embedded_runtime.runtime_state import RuntimeState, log
from embedded_runtime.state import container_view, pod_view
from embedded_runtime.sync import SyncError, SyncSplitter
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.services import PLUGIN_SERVICE


class PluginBringUp:
    """Takes plugin connections from accepted or launched sockets to READY.

    `serve` answers the plugin's own requests (the Runtime service) on each connection.
    """

    def __init__(self, state: RuntimeState, serve: RequestHandler) -> None:
        self._state = state
        self._serve = serve
        self._seq = 0

    async def accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                log.info("stopped accepting plugin connections (%s)", exc)
                return
            try:
                plugin = await self.new_plugin(sock, external=True)
                # One at a time, like the real runtimes: a plugin that hangs in
                # registration, Configure or Synchronize delays every later one.
                await self.bring_up(plugin)
            except (OSError, EmbeddedRuntimeError) as exc:
                log.warning("failed to start external plugin: %s", exc)

    async def new_plugin(self, sock: socket.socket, *, external: bool) -> ConnectedPlugin:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        conn = PluginConnection(reader, writer, self._serve, self._on_closed)
        self._seq += 1
        registered: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        plugin = ConnectedPlugin(self._seq, conn, external, registered)
        self._state.plugins.append(plugin)
        self._state.by_conn[conn] = plugin
        conn.start()
        self._state.bump()
        return plugin

    def _on_closed(self, conn: PluginConnection) -> None:
        plugin = self._state.by_conn.get(conn)
        if plugin is None:
            return
        plugin.state = PluginState.CLOSED
        if not plugin.registered.done():
            plugin.registered.set_exception(ConnectionError(conn.close_reason))
            plugin.registered.exception()  # retrieved here; the waiter re-raises it
        log.info("connection to plugin %s closed: %s", plugin.full_name, conn.close_reason)
        self._state.bump()

    async def bring_up(self, plugin: ConnectedPlugin) -> None:
        """Registration, Configure, Synchronize: what must succeed before events flow.
        Whatever goes wrong, only this plugin pays: the accept loop must survive."""
        try:
            await self._bring_up_steps(plugin)
        except Exception as exc:
            log.exception("bringing up plugin %s failed", plugin.full_name)
            drop_unconditionally(plugin, f"internal error: {exc}")

    async def _bring_up_steps(self, plugin: ConnectedPlugin) -> None:
        state = self._state
        try:
            async with asyncio.timeout(state.registration_timeout):
                refusal = await asyncio.shield(plugin.registered)
        except TimeoutError:
            drop_unconditionally(plugin, "plugin registration timed out")
            return
        except ConnectionError:
            return
        if refusal is not None:
            plugin.state = PluginState.REJECTED  # upstream leaves the connection open
            state.bump()
            return
        plugin.state = PluginState.REGISTERED
        if not await self._configure(plugin):
            return
        plugin.state = PluginState.CONFIGURED
        if plugin.external or state.flavor.syncs_launched_plugins:
            async with state.lock:
                ok = await self._synchronize(plugin)
            if not ok:
                return
        plugin.state = PluginState.READY
        log.info("plugin %s connected and synchronized", plugin.full_name)
        state.bump()

    async def _configure(self, plugin: ConnectedPlugin) -> bool:
        state = self._state
        flavor = state.flavor
        request = pb.ConfigureRequest(
            config=plugin.config,
            runtime_name=flavor.runtime_name,
            runtime_version=flavor.runtime_version,
        )
        if flavor.configure_sends_timeouts:
            request.registration_timeout = int(state.registration_timeout * 1000)
            request.request_timeout = int(state.request_timeout * 1000)
        if flavor.configure_sends_nri_version:
            request.NRI_version = str(flavor.nri_version)
        deadline = asyncio.get_running_loop().time() + state.request_timeout
        reply = await call(
            plugin, "Configure", request, deadline, flavor=state.flavor, exchanges=state.log
        )
        failure = None
        if reply is None:
            failure = plugin.conn.close_reason
        elif reply.code != Code.OK:
            failure = f"failed to configure plugin: {code_name(reply.code)}: {reply.message}"
        else:
            response = parse(pb.ConfigureResponse, reply.payload)
            if not isinstance(response, pb.ConfigureResponse):
                failure = "failed to configure plugin: invalid ConfigureResponse"
            else:
                try:
                    plugin.events = subscribed_events(state.flavor, response.events)
                except InvalidEventMaskError as exc:
                    failure = str(exc)
        if failure is not None:
            drop_unconditionally(plugin, failure)
            return False
        return True

    async def _synchronize(self, plugin: ConnectedPlugin) -> bool:
        state = self._state
        pods = [pod_view(r, state.flavor) for r in state.pods.values()]
        ctrs = [container_view(r, state.flavor) for r in state.containers.values() if not r.exited]
        splitter = SyncSplitter(len(pods), len(ctrs), split=state.flavor.split_sync)
        deadline = asyncio.get_running_loop().time() + state.request_timeout
        updates: Sequence[pb.ContainerUpdate] = ()
        try:
            while not splitter.done:
                chunk = splitter.chunk()
                request = pb.SynchronizeRequest(
                    pods=pods[chunk.pods], containers=ctrs[chunk.containers], more=chunk.more
                )
                reply = await self._sync_call(plugin, request, deadline, splitter)
                if reply is None:
                    continue  # refused as oversized; the splitter shrank the chunks
                response = parse(pb.SynchronizeResponse, reply.payload)
                if not isinstance(response, pb.SynchronizeResponse):
                    raise SyncError("invalid SynchronizeResponse")
                if splitter.answered(response.more, len(response.update)):
                    updates = response.update
        except SyncError as exc:
            if plugin.conn.closed:
                return False
            if state.flavor.closes_plugin_on_sync_failure or exc.closes:
                drop(plugin, f"failed to synchronize plugin: {exc}", state.flavor)
            else:
                plugin.state = PluginState.UNSYNCED  # v0.4/v0.11: left open, never added
                log.warning("failed to synchronize plugin %s: %s", plugin.full_name, exc)
                state.bump()
            return False
        await state.apply_updates(updates)
        return True

    async def _sync_call(
        self,
        plugin: ConnectedPlugin,
        request: pb.SynchronizeRequest,
        deadline: float,
        splitter: SyncSplitter,
    ) -> Reply | None:
        state = self._state
        loop = asyncio.get_running_loop()
        payload = request.SerializeToString()
        started = loop.time()
        plugin.counters.requests += 1
        result = await plugin.conn.call(PLUGIN_SERVICE, "Synchronize", payload, deadline)
        note = f"{len(request.pods)} pods, {len(request.containers)} containers"
        note += ", more" if request.more else ""
        latency = loop.time() - started
        record_call(state.log, plugin, "Synchronize", payload, (), result, latency, note)
        if result.status is CallStatus.NOT_SENT:
            splitter.oversized(result.length, result.max_length)
            return None
        if result.status is not CallStatus.REPLIED or result.reply is None:
            if result.status is CallStatus.TIMEOUT:
                plugin.counters.timeouts += 1
            drop(plugin, f"failed to synchronize plugin: {result.status.value}", state.flavor)
            raise SyncError(result.status.value)
        if result.reply.code != Code.OK:
            plugin.counters.errors += 1
            raise SyncError(f"{code_name(result.reply.code)}: {result.reply.message}")
        return Reply(result.reply.code, result.reply.message, result.reply.payload)
