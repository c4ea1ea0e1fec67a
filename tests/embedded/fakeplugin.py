"""A scriptable NRI plugin for the embedded-runtime tests.

It speaks through the project's `NriChannel` (plugin role) over a real unix
socket, answers every Plugin-service request with a per-method handler (default: the
obvious empty reply, Configure with its event mask, Synchronize echoing `more`), and
records what it received. Handlers run in their own tasks, so one may call the runtime
(UpdateContainers) and wait, exactly like a real plugin's event handler can.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from nri_plugin.channel import Ending, NriChannel
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol import services
from nri_plugin.protocol.connection import RequestReceived, ResponseReceived, Role
from nri_plugin.protocol.versions import Event, event_mask


@dataclass(frozen=True)
class Error:
    code: int
    message: str


class NoReply:
    """Handler result: never answer this request."""


NO_REPLY = NoReply()

Result = Message | Error | NoReply
Handler = Callable[["FakePlugin", Message], Awaitable[Result]]

CORE_EVENTS = event_mask(
    {
        Event.RUN_POD_SANDBOX,
        Event.CREATE_CONTAINER,
        Event.POST_CREATE_CONTAINER,
        Event.START_CONTAINER,
        Event.POST_START_CONTAINER,
        Event.UPDATE_CONTAINER,
        Event.POST_UPDATE_CONTAINER,
        Event.STOP_CONTAINER,
        Event.REMOVE_CONTAINER,
        Event.STOP_POD_SANDBOX,
        Event.REMOVE_POD_SANDBOX,
    }
)


class FakePlugin:
    def __init__(
        self,
        name: str = "fake",
        idx: str = "10",
        events: int = CORE_EVENTS,
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        self.name = name
        self.idx = idx
        self.events = events
        self.handlers = dict(handlers or {})
        self.received: list[tuple[str, Message]] = []
        self.register_reply: ResponseReceived | None = None
        self.eof = asyncio.Event()  # the connection ended, whoever ended it
        self._channel: NriChannel | None = None

    # --- connection ----------------------------------------------------------------------

    async def connect(self, path: Path, *, register: bool = True) -> FakePlugin:
        reader, writer = await asyncio.open_unix_connection(str(path))
        self._channel = NriChannel(Role.PLUGIN, reader, writer, self._serve, on_close=self._closed)
        self._channel.start()
        if register:
            self.register_reply = await self.register()
        return self

    async def register(self, name: str | None = None, idx: str | None = None) -> ResponseReceived:
        msg = pb.RegisterPluginRequest(
            plugin_name=self.name if name is None else name,
            plugin_idx=self.idx if idx is None else idx,
            NRI_version="v0.12.0",
        )
        return await self.call("RegisterPlugin", msg)

    @property
    def channel(self) -> NriChannel:
        assert self._channel is not None, "connect() first"
        return self._channel

    async def call(self, method: str, msg: Message, timeout: float = 5.0) -> ResponseReceived:
        payload = msg.SerializeToString()
        return await self.channel.call(services.RUNTIME_SERVICE, method, payload, timeout)

    def write(self, data: bytes) -> None:
        self.channel.write(data)

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.close("fake plugin closed the connection")
            await self._channel.wait_closed()

    async def wait_eof(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.eof.wait(), timeout)

    # --- what it saw ---------------------------------------------------------------------

    def methods(self) -> list[str]:
        return [m for m, _ in self.received]

    def requests(self, method: str) -> list[Message]:
        return [msg for m, msg in self.received if m == method]

    # --- plumbing ------------------------------------------------------------------------

    def _closed(self, ending: Ending, reason: str) -> None:
        self.eof.set()

    async def _serve(self, req: RequestReceived) -> None:
        spec = services.PLUGIN_METHODS[req.method]
        msg = services.decode(spec.request, req.payload, req.method)
        self.received.append((req.method, msg))
        handler = self.handlers.get(req.method)
        result = await handler(self, msg) if handler is not None else self._default(req.method, msg)
        if isinstance(result, NoReply) or self.eof.is_set():
            return
        if isinstance(result, Error):
            self.channel.respond_error(req.stream_id, result.code, result.message)
        else:
            self.channel.respond(req.stream_id, result.SerializeToString())

    def _default(self, method: str, msg: Message) -> Message:
        if method == "Configure":
            return pb.ConfigureResponse(events=self.events)
        if method == "Synchronize":
            assert isinstance(msg, pb.SynchronizeRequest)
            return pb.SynchronizeResponse(more=msg.more)
        return services.PLUGIN_METHODS[method].response()


def reply(result: Result) -> Handler:
    """A handler that always gives `result`."""

    async def handler(plugin: FakePlugin, msg: Message) -> Result:
        return result

    return handler


def late(result: Result, delay: float) -> Handler:
    """A handler that answers only after `delay` seconds."""

    async def handler(plugin: FakePlugin, msg: Message) -> Result:
        await asyncio.sleep(delay)
        return result

    return handler
