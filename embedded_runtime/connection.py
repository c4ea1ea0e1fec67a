"""The only part of the embedded runtime that touches a socket: one plugin connection.

It pumps bytes between an asyncio stream and the sans-IO `NriConnection` (runtime
role): our calls on mux conn 1 wait for their replies under a deadline, the plugin's
calls on conn 2 are handed to a callback in their own task (so a handler that waits for
the runtime's lock never stops replies from being read), and any protocol violation,
EOF or write failure closes the connection and fails every pending call. Nothing here
decides anything about NRI; the runtime's modules (`bringup`, `relay`, `runtime_service`)
do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from nri_plugin.protocol import ttrpc_pb2
from nri_plugin.protocol.connection import (
    BadRequest,
    NriConnection,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.errors import LocalProtocolError, RemoteProtocolError
from nri_plugin.protocol.ttrpc import MAX_DATA

READ_SIZE = 1 << 16


class PluginClosedError(Exception):
    """The connection is (or became) closed; the message says why."""


class CallStatus(Enum):
    REPLIED = "replied"  # `reply` holds the response (which may carry an error status)
    TIMEOUT = "timeout"  # no reply before the deadline; the call was abandoned
    CLOSED = "closed"  # the connection was or became closed
    NOT_SENT = "not sent"  # refused locally as too large; the stream id is consumed


@dataclass(frozen=True, slots=True)
class CallResult:
    status: CallStatus
    stream_id: int
    timeout_nano: int
    reply: ResponseReceived | None = None
    detail: str = ""
    length: int = 0  # NOT_SENT: size of the refused ttrpc message data
    max_length: int = MAX_DATA


RequestHandler = Callable[["PluginConnection", RequestReceived], Awaitable[None]]


def peer_pid(sock: socket.socket | None) -> int | None:
    """The peer's pid from SO_PEERCRED (what the real runtimes log), if available."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid or None


class PluginConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_request: RequestHandler,
        on_close: Callable[[PluginConnection], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_request = on_request
        self._on_close = on_close
        self.conn = NriConnection(Role.RUNTIME)
        self._pending: dict[int, asyncio.Future[ResponseReceived]] = {}
        self._write_lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        self._attempts = 0
        self.closed = False
        self.close_reason = ""
        self.peer_pid = peer_pid(writer.get_extra_info("socket"))

    def start(self) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name="nri-plugin-reader")

    # --- calls on mux conn 1 -------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        deadline: float,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> CallResult:
        """Send one request and wait for its reply until `deadline` (loop time)."""
        if self.closed:
            return CallResult(CallStatus.CLOSED, 0, 0, detail=self.close_reason)
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return CallResult(CallStatus.TIMEOUT, 0, 0, detail="deadline passed before sending")
        timeout_nano = int(remaining * 1e9)
        metadata = tuple(metadata)
        # Like Go's client, NriConnection consumes a stream id even for a request it
        # refuses to encode; count attempts to know which id that was.
        self._attempts += 1
        try:
            sid, data = self.conn.send_request(service, method, payload, timeout_nano, metadata)
        except LocalProtocolError as exc:
            length = _envelope_length(service, method, payload, timeout_nano, metadata)
            return CallResult(
                CallStatus.NOT_SENT, 2 * self._attempts - 1, timeout_nano, None, str(exc), length
            )
        future: asyncio.Future[ResponseReceived] = loop.create_future()
        self._pending[sid] = future
        try:
            async with asyncio.timeout_at(deadline):
                await self._write(data)
                reply = await future
        except TimeoutError:
            self.conn.abandon(sid)
            return CallResult(CallStatus.TIMEOUT, sid, timeout_nano, detail="no reply in time")
        except PluginClosedError as exc:
            return CallResult(CallStatus.CLOSED, sid, timeout_nano, detail=str(exc))
        finally:
            self._pending.pop(sid, None)
        return CallResult(CallStatus.REPLIED, sid, timeout_nano, reply)

    # --- replies on mux conn 2 -----------------------------------------------------------

    async def respond(self, stream_id: int, payload: bytes = b"") -> None:
        await self._write(self.conn.send_response(stream_id, payload))

    async def respond_error(self, stream_id: int, code: int, message: str) -> None:
        await self._write(self.conn.send_error(stream_id, code, message))

    # --- plumbing ------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self.closed:
            raise PluginClosedError(self.close_reason)
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self.close(f"write failed: {exc}")
                raise PluginClosedError(self.close_reason) from exc

    async def _read_loop(self) -> None:
        try:
            while not self.closed:
                try:
                    data = await self._reader.read(READ_SIZE)
                except OSError as exc:
                    self.close(f"read failed: {exc}")
                    return
                if not data:
                    if self.conn.has_partial_message:
                        self.close("connection closed in the middle of a message")
                    else:
                        self.close("connection closed by the plugin")
                    return
                try:
                    events = self.conn.receive_data(data)
                except RemoteProtocolError as exc:
                    self.close(f"protocol error: {exc}")
                    return
                for event in events:
                    self._dispatch(event)
        except asyncio.CancelledError:
            self.close(self.close_reason or "runtime shutting down")
            raise

    def _dispatch(self, event: ResponseReceived | RequestReceived | BadRequest) -> None:
        if isinstance(event, ResponseReceived):
            future = self._pending.get(event.stream_id)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, RequestReceived):
            self._spawn(self._on_request(self, event))
        else:
            self._spawn(self._refuse(event))

    async def _refuse(self, event: BadRequest) -> None:
        with contextlib.suppress(PluginClosedError):
            await self.respond_error(event.stream_id, event.code, event.message)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(PluginClosedError):
                await coro

        task = asyncio.create_task(run(), name="nri-runtime-service")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def close(self, reason: str) -> None:
        """Close the socket and fail every pending call."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PluginClosedError(reason))
        self._pending.clear()
        # Handlers of the plugin's own calls keep running: one may be waiting for the
        # runtime's lock and must be able to notice (and log) that its plugin is gone.
        current = asyncio.current_task()
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._reader_task is not None and self._reader_task is not current:
            self._reader_task.cancel()
        if self._on_close is not None:
            self._on_close(self)

    async def wait_closed(self) -> None:
        """After close(): wait for the reader, cancel handlers still running."""
        for handler in list(self._handlers):
            handler.cancel()
        tasks = [t for t in (self._reader_task, *self._handlers) if t is not None]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def _envelope_length(
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int,
    metadata: Iterable[tuple[str, str]],
) -> int:
    """Size of the ttrpc Request that would have carried `payload` (what Go's client
    reports as the rejected length of an oversized message)."""
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    if timeout_nano > 0:
        req.timeout_nano = timeout_nano
    for key, value in metadata:
        req.metadata.add(key=key, value=value)
    return req.ByteSize()
