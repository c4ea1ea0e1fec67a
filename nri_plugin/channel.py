"""One NRI connection over asyncio: moves bytes between a stream and `NriConnection`.

The plugin, the embedded runtime and the test doubles all use this, each in its role.
Rules:
- Bytes only. NRI meaning lives in `NriConnection` (framing, stream ids, refusals) and
  in the owner; nothing here looks inside a payload.
- One reader task feeds every chunk into `NriConnection.receive_data` (an optional tap
  sees each chunk first). Each request goes to the owner's `serve` callback in its own
  task, so a handler that waits (for a lock, for a call of its own) never stops replies
  from being read; a handler's failure is logged, since nobody else would see it.
- Writes are whole messages through the synchronous `writer.write`, so frames of two
  messages never interleave and need no lock, and a reply costs no `await` (the plugin's
  reply latency matters). Callers that want back-pressure await `drain()`.
- A request `NriConnection` refuses (`BadRequest`) is answered with its error here: the
  refusal is the protocol's, not the owner's. The owner is told, to count it.
- The first close wins and says why (an `Ending` and a sentence): every pending call
  fails with `ChannelClosed`, the writer is closed and reading stops. After it, writes
  are dropped (nobody reads them) and new calls raise `ChannelClosed`.
- Handler tasks outlive close, since one may be waiting and must notice its peer is
  gone; `wait_closed()` cancels those still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from enum import Enum
from functools import partial
from typing import Any

from nri_plugin.protocol.connection import (
    BadRequest,
    NriConnection,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.errors import RemoteProtocolError

READ_SIZE = 1 << 16
log = logging.getLogger("nri_qos.channel")

Serve = Callable[[RequestReceived], Coroutine[Any, Any, None]]


class ChannelClosed(ConnectionError):
    """The channel is (or became) closed; the message says why."""


class Ending(Enum):
    """Why a channel closed: owners count and word these differently."""

    LOCAL = "local"  # the owner called close()
    EOF = "eof"  # the peer closed between messages
    TRUNCATED = "truncated"  # the peer closed in the middle of a message
    CORRUPT = "corrupt"  # the peer's bytes broke the protocol
    READ_FAILED = "read failed"
    WRITE_FAILED = "write failed"


class NriChannel:
    """One connection in one role: `start()` it, `close()` it, `wait_closed()` for its tasks."""

    def __init__(
        self,
        role: Role,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        serve: Serve,
        *,
        on_bad_request: Callable[[BadRequest], None] | None = None,
        on_close: Callable[[Ending, str], None] | None = None,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self.conn = NriConnection(role)
        self._reader, self._writer = reader, writer
        self._serve = serve
        self._on_bad_request, self._on_close, self._tap = on_bad_request, on_close, tap
        self._peer = "runtime" if role is Role.PLUGIN else "plugin"
        self._pending: dict[int, asyncio.Future[ResponseReceived]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        self.ending: Ending | None = None
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self.ending is not None

    def start(self) -> asyncio.Task[None]:
        """Start reading; the returned task ends (without raising) when the channel closes."""
        self._reader_task = asyncio.create_task(self._read_loop(), name="nri-channel-reader")
        return self._reader_task

    # --- calls ---------------------------------------------------------------------------

    def start_call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, asyncio.Future[ResponseReceived]]:
        """Write one request now; the future gets its reply or `ChannelClosed`. Cancelling
        the future abandons the call, so a late reply is ignored. LocalProtocolError means
        nothing was sent (the stream id is consumed all the same, as in Go)."""
        if self.closed:
            raise ChannelClosed(self.close_reason)
        sid, data = self.conn.send_request(service, method, payload, timeout_nano, metadata)
        reply: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        reply.add_done_callback(partial(self._settled, sid))
        self._pending[sid] = reply
        self.write(data)
        return sid, reply

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> ResponseReceived:
        """One call with `timeout` seconds to answer (also sent as the request's timeout).
        Raises TimeoutError (the call is abandoned) or ChannelClosed."""
        _, reply = self.start_call(service, method, payload, int(timeout * 1e9), metadata)
        return await asyncio.wait_for(reply, timeout)

    def _settled(self, sid: int, reply: asyncio.Future[ResponseReceived]) -> None:
        if reply.cancelled():  # the caller stopped waiting
            self._pending.pop(sid, None)
            self.conn.abandon(sid)

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write whole messages. False: closed (or closing), the bytes were dropped. A
        transport closing under us is not an ending: the reader will see why it closed."""
        if self.closed or self._writer.is_closing():
            return False
        try:
            self._writer.write(data)
        except (OSError, RuntimeError) as exc:
            self._close(Ending.WRITE_FAILED, f"write failed: {exc}")
            return False
        return True

    def respond(self, stream_id: int, payload: bytes = b"") -> bool:
        return self.write(self.conn.send_response(stream_id, payload))

    def respond_error(self, stream_id: int, code: int, message: str) -> bool:
        return self.write(self.conn.send_error(stream_id, code, message))

    async def drain(self) -> None:
        """Wait while the transport's buffer is full. Raises ChannelClosed."""
        if self.closed:
            raise ChannelClosed(self.close_reason)
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._close(Ending.WRITE_FAILED, f"write failed: {exc}")
            raise ChannelClosed(self.close_reason) from exc

    # --- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while not self.closed:
                try:
                    data = await self._reader.read(READ_SIZE)
                except OSError as exc:
                    return self._close(Ending.READ_FAILED, f"read failed: {exc}")
                if not data:
                    if self.conn.has_partial_message:
                        what = f"{self._peer} closed the connection in the middle of a message"
                        return self._close(Ending.TRUNCATED, what)
                    return self._close(Ending.EOF, f"{self._peer} closed the connection")
                if self._tap is not None:
                    self._tap(data)
                try:
                    events = self.conn.receive_data(data)
                except RemoteProtocolError as exc:
                    return self._close(Ending.CORRUPT, f"protocol error: {exc}")
                for event in events:
                    if self.closed:
                        return
                    if isinstance(event, RequestReceived):
                        task = asyncio.create_task(self._serve(event))
                        self._handlers.add(task)
                        task.add_done_callback(self._handler_done)
                    elif isinstance(event, ResponseReceived):
                        reply = self._pending.pop(event.stream_id, None)
                        if reply is not None and not reply.done():
                            reply.set_result(event)
                    else:
                        if self._on_bad_request is not None:
                            self._on_bad_request(event)
                        self.respond_error(event.stream_id, event.code, event.message)
        except asyncio.CancelledError:
            if not self.closed:
                raise
            # close() stops reading by cancelling this task: a normal end.
        finally:
            self.close("stopped reading")  # only if cancelled by someone else, or a bug

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        """A handler's failure has nobody to go to: log it rather than lose it."""
        self._handlers.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ChannelClosed):
                log.error("request handler failed", exc_info=exc)

    # --- closing -------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close for `reason`; idempotent, the first reason stays."""
        self._close(Ending.LOCAL, reason)

    def _close(self, ending: Ending, reason: str) -> None:
        if self.ending is not None:
            return
        self.ending, self.close_reason = ending, reason
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            if not reply.done():
                reply.set_exception(ChannelClosed(reason))
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task(task.get_loop()):
            task.cancel()
        if self._on_close is not None:
            self._on_close(ending, reason)

    async def wait_closed(self) -> None:
        """After close(): cancel the handlers still running, wait for them and the reader."""
        current = asyncio.current_task()
        for task in self._handlers:
            if task is not current:
                task.cancel()
        tasks = [t for t in (self._reader_task, *self._handlers) if t is not None]
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)
