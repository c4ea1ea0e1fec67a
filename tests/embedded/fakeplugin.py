"""A scriptable NRI plugin for the embedded-runtime tests.

It speaks through the project's sans-IO `NriConnection` (plugin role) over a real unix
socket, answers every Plugin-service request with a per-method handler (default: the
obvious empty reply, Configure with its event mask, Synchronize echoing `more`), and
records what it received. Handlers run in their own tasks, so one may call the runtime
(UpdateContainers) and wait, exactly like a real plugin's event handler can.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol import services
from nri_plugin.protocol.connection import (
    BadRequest,
    NriConnection,
    RequestReceived,
    ResponseReceived,
    Role,
)
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
        self.conn = NriConnection(Role.PLUGIN)
        self.received: list[tuple[str, Message]] = []
        self.register_reply: ResponseReceived | None = None
        self.eof = asyncio.Event()
        self._pending: dict[int, asyncio.Future[ResponseReceived]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    # --- connection ----------------------------------------------------------------------

    async def connect(self, path: Path, *, register: bool = True) -> FakePlugin:
        reader, writer = await asyncio.open_unix_connection(str(path))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader))
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

    async def call(self, method: str, msg: Message, timeout: float = 5.0) -> ResponseReceived:
        sid, data = self.conn.send_request(
            services.RUNTIME_SERVICE, method, msg.SerializeToString(), int(timeout * 1e9)
        )
        future: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        self._pending[sid] = future
        self.write(data)
        return await asyncio.wait_for(future, timeout)

    def write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        for task in [self._reader_task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def wait_eof(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.eof.wait(), timeout)

    # --- what it saw ---------------------------------------------------------------------

    def methods(self) -> list[str]:
        return [m for m, _ in self.received]

    def requests(self, method: str) -> list[Message]:
        return [msg for m, msg in self.received if m == method]

    # --- plumbing ------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(1 << 16):
                for event in self.conn.receive_data(data):
                    if isinstance(event, ResponseReceived):
                        future = self._pending.pop(event.stream_id, None)
                        if future is not None and not future.done():
                            future.set_result(event)
                    elif isinstance(event, RequestReceived):
                        task = asyncio.create_task(self._serve(event))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, BadRequest):
                        self.write(self.conn.send_error(event.stream_id, event.code, event.message))
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("runtime closed the connection"))

    async def _serve(self, req: RequestReceived) -> None:
        spec = services.PLUGIN_METHODS[req.method]
        msg = services.decode(spec.request, req.payload, req.method)
        self.received.append((req.method, msg))
        handler = self.handlers.get(req.method)
        result = await handler(self, msg) if handler is not None else self._default(req.method, msg)
        if isinstance(result, NoReply) or self.eof.is_set():
            return
        if isinstance(result, Error):
            self.write(self.conn.send_error(req.stream_id, result.code, result.message))
        else:
            self.write(self.conn.send_response(req.stream_id, result.SerializeToString()))

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
