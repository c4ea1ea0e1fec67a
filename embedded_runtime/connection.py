"""The runtime side of one plugin connection: an `NriChannel` in the runtime role.

The channel moves the bytes (our calls on mux conn 1 wait for their replies, the
plugin's calls on conn 2 go to a handler in their own task, any protocol violation, EOF
or write failure closes the connection and fails every pending call). This layer adds
what the runtime's modules (`bringup`, `relay`, `runtime_service`) want on top: calls
under a loop-time deadline that report a `CallResult` instead of raising, back-pressure
on every write, and the plugin's pid. Nothing here decides anything about NRI.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nri_plugin.channel import ChannelClosed, Ending, NriChannel
from nri_plugin.protocol import ttrpc_pb2
from nri_plugin.protocol.connection import RequestReceived, ResponseReceived, Role
from nri_plugin.protocol.errors import LocalProtocolError
from nri_plugin.protocol.ttrpc import MAX_DATA

# The connection is (or became) closed; the message says why.
PluginClosedError = ChannelClosed


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


RequestHandler = Callable[["PluginConnection", RequestReceived], Coroutine[Any, Any, None]]


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
        self._writer = writer
        self._on_close = on_close
        self.channel = NriChannel(
            Role.RUNTIME, reader, writer, lambda req: on_request(self, req), on_close=self._closed
        )
        self.conn = self.channel.conn
        self._attempts = 0
        self.peer_pid = peer_pid(writer.get_extra_info("socket"))

    @property
    def closed(self) -> bool:
        return self.channel.closed

    @property
    def close_reason(self) -> str:
        return self.channel.close_reason

    def start(self) -> None:
        self.channel.start()

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
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return CallResult(CallStatus.TIMEOUT, 0, 0, detail="deadline passed before sending")
        timeout_nano = int(remaining * 1e9)
        metadata = tuple(metadata)
        # Like Go's client, NriConnection consumes a stream id even for a request it
        # refuses to encode; count attempts to know which id that was.
        self._attempts += 1
        try:
            sid, reply = self.channel.start_call(service, method, payload, timeout_nano, metadata)
        except LocalProtocolError as exc:
            length = _envelope_length(service, method, payload, timeout_nano, metadata)
            return CallResult(
                CallStatus.NOT_SENT, 2 * self._attempts - 1, timeout_nano, None, str(exc), length
            )
        try:
            async with asyncio.timeout_at(deadline):
                with contextlib.suppress(ChannelClosed):  # then `reply` holds why
                    await self.channel.drain()
                response = await reply
        except TimeoutError:
            return CallResult(CallStatus.TIMEOUT, sid, timeout_nano, detail="no reply in time")
        except ChannelClosed as exc:
            return CallResult(CallStatus.CLOSED, sid, timeout_nano, detail=str(exc))
        finally:
            reply.cancel()  # abandons the call unless it was answered
        return CallResult(CallStatus.REPLIED, sid, timeout_nano, response)

    # --- replies on mux conn 2 -----------------------------------------------------------

    async def respond(self, stream_id: int, payload: bytes = b"") -> None:
        await self._sent(self.channel.respond(stream_id, payload))

    async def respond_error(self, stream_id: int, code: int, message: str) -> None:
        await self._sent(self.channel.respond_error(stream_id, code, message))

    async def _sent(self, written: bool) -> None:
        if not written:
            raise PluginClosedError(self.close_reason or "connection lost")
        await self.channel.drain()

    # --- closing -------------------------------------------------------------------------

    def _closed(self, ending: Ending, reason: str) -> None:
        if self._on_close is not None:
            self._on_close(self)

    def close(self, reason: str) -> None:
        """Close the socket and fail every pending call. Handlers of the plugin's own
        calls keep running: one may be waiting for the runtime's lock and must be able to
        notice (and log) that its plugin is gone."""
        self.channel.close(reason)

    async def wait_closed(self) -> None:
        """After close(): wait for the reader, cancel handlers still running."""
        await self.channel.wait_closed()
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
