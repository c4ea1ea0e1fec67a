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
  messages never interleave, and a reply costs no `await` (the plugin's reply latency
  matters). Callers that want back-pressure await `drain()`.
- One writer may live in another thread: `write_from_thread` lets the plugin's policy
  thread put its reply on the socket itself, sparing the reply a hop back to the loop
  (a wakeup that costs most under the CPU contention of a container start). It writes
  straight to the socket only while nothing is queued before it (transport buffer and
  carry empty); otherwise its bytes are carried to the loop in order. One lock orders
  every write and the close, and the socket is written through a duplicate descriptor
  the channel owns, so a thread can never write to a reused descriptor number.
- Reading may belong to another thread (`external_reading`, the plugin's): the channel
  then never reads by itself. Whoever owns the socket calls `read_now` and handles what
  it returns: the plugin's policy thread while it is free (it serves requests inline,
  settling replies to our calls through `settle_from_thread`), the loop otherwise
  (`read_in_loop(True)`: requests go through the backlog and handler tasks as in the
  default mode, with the same bounds). Both read the same descriptor, one at a time;
  the owner switches them. Its descriptor is released with `release_fd` once no thread
  can be waiting on it.
- A request `NriConnection` refuses (`BadRequest`) is answered with its error here: the
  refusal is the protocol's, not the owner's. The owner is told, to count it.
- The first close wins and says why (an `Ending` and a sentence): every pending call
  fails with `ChannelClosed`, the writer is closed (aborted, unsent bytes dropped, when
  the peer is not reading them) and reading stops. After it, writes
  are dropped (nobody reads them) and new calls raise `ChannelClosed`.
- Handler tasks outlive close, since one may be waiting and must notice its peer is
  gone; `wait_closed()` cancels those still running.
- Memory stays bounded whatever the peer does (`ChannelLimits`). At most `max_handlers`
  requests are handled at once (with external reading, plus the one the owner's thread
  is serving), and none is started while the transport holds more than
  `write_high_water` unsent bytes (its reply would only add to them); requests read
  meanwhile wait in order in a backlog. When that backlog is full (`max_handlers`
  requests or `max_waiting_bytes`) reading pauses until it moves. So reading goes on
  while our own writes are blocked, and replies to our calls are settled as they are
  read: two channels flooding each other within that bound drain each other instead of
  both waiting (beyond it, both stall and close). Waiting is on events (a handler
  ending, the transport draining), never a timer loop. Paused for longer than
  `stall_timeout`, or past `write_buffer_max` unsent bytes at any time, the channel
  closes with an ending that names the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

from nri_plugin.protocol.connection import (
    BadRequest,
    Event,
    NriConnection,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.errors import LocalProtocolError, RemoteProtocolError

READ_SIZE = 1 << 16
FLUSH_AT_CLOSE = 2.0  # seconds a graceful close waits for unsent bytes (external reading)
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
    # A bound of ChannelLimits was exceeded (the peer misbehaves, or we are stuck):
    UNREAD_REPLIES = "unread replies"  # the peer stopped reading for stall_timeout
    WRITE_BUFFER_FULL = "write buffer full"  # more than write_buffer_max unsent bytes
    HANDLERS_STALLED = "handlers stalled"  # max_handlers busy for stall_timeout


# Endings after which unsent bytes are thrown away rather than flushed: the peer is not
# reading them, and a graceful close would keep them (and the socket) until it does.
_ABORTING = frozenset({Ending.UNREAD_REPLIES, Ending.WRITE_BUFFER_FULL})


@dataclass(frozen=True, slots=True)
class ChannelLimits:
    """Per-connection bounds. The defaults are far above what a real runtime does (it
    sends one request at a time per plugin and reads every reply at once, so a healthy
    connection never pauses), and far below what would hurt a node."""

    max_handlers: int = 256  # requests handled at once, and requests waiting for a slot
    max_waiting_bytes: int = 16 << 20  # payload bytes of the requests waiting
    write_high_water: int = 1 << 20  # unsent bytes above which no request is started
    write_buffer_max: int = 64 << 20  # unsent bytes above which the channel closes
    stall_timeout: float = 30.0  # seconds reading may stay paused before closing

    def validate(self) -> None:
        if self.max_handlers < 1 or self.max_waiting_bytes < 1 or self.stall_timeout <= 0:
            raise ValueError("max_handlers, max_waiting_bytes must be >= 1, stall_timeout > 0")
        if not 0 < self.write_high_water <= self.write_buffer_max:
            raise ValueError("need 0 < write_high_water <= write_buffer_max")


@dataclass(slots=True)
class ChannelStats:
    """High-water marks, for tests, benchmarks and the status view."""

    peak_handlers: int = 0  # most requests handled at once
    peak_waiting: int = 0  # most requests waiting for a slot
    peak_write_buffer: int = 0  # most unsent bytes seen after a write
    pauses: int = 0  # times reading paused for back-pressure


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
        limits: ChannelLimits | None = None,
        external_reading: bool = False,
    ) -> None:
        self.conn = NriConnection(role)
        self._reader, self._writer = reader, writer
        self._serve = serve
        self._on_bad_request, self._on_close, self._tap = on_bad_request, on_close, tap
        self._peer = "runtime" if role is Role.PLUGIN else "plugin"
        self._pending: dict[int, asyncio.Future[ResponseReceived]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._backlog: deque[RequestReceived] = deque()  # read, not yet handled
        self._backlog_bytes = 0
        self._backlog_moved = asyncio.Event()  # a waiting request was started
        self._handler_ended = asyncio.Event()
        self._pumper: asyncio.Task[None] | None = None  # starts the backlog when it can
        self._reader_task: asyncio.Task[None] | None = None
        self.limits = limits if limits is not None else ChannelLimits()
        self.limits.validate()
        # The transport pauses our writer (and drain() waits) above the high-water mark,
        # and resumes it at a quarter of it: that is what the read loop waits on.
        writer.transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self.stats = ChannelStats()
        self.ending: Ending | None = None
        self.close_reason = ""
        # Writes from another thread (write_from_thread): every write and the close take
        # the lock; `_carry` holds a thread's bytes the loop has yet to hand to the
        # transport (they go before anything written after them).
        self._loop = asyncio.get_running_loop()
        self._write_lock = threading.Lock()
        self._carry = bytearray()
        self._fd = _dup_socket(writer)
        self._external = external_reading and self._fd >= 0
        self._loop_reads = False  # external: the loop is (meant to be) reading
        self._loop_reader_on = False  # external: the loop's reader is registered
        self._closed_event = asyncio.Event()
        self._resumer: asyncio.Task[None] | None = None  # external: reading paused
        self._flushing = False  # external: closed gracefully with bytes still unsent
        self._read_ended = False  # external: nothing more will be read

    @property
    def closed(self) -> bool:
        return self.ending is not None

    @property
    def outstanding(self) -> int:
        """Requests read and not yet finished: being handled, or waiting for a slot."""
        return len(self._handlers) + len(self._backlog)

    @property
    def write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the socket."""
        return self._writer.transport.get_write_buffer_size()

    def start(self) -> asyncio.Task[None]:
        """Start reading; the returned task ends (without raising) when the channel closes.
        With external reading nothing reads until the owner does (`read_now`,
        `read_in_loop`); the transport never reads."""
        if self._external:
            transport = self._writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
            self._reader_task = asyncio.create_task(self._until_closed(), name="nri-channel")
            return self._reader_task
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
        Raises TimeoutError (the call is abandoned) or ChannelClosed.

        `asyncio.timeout`, not `wait_for`: on Python 3.11 a `wait_for` whose reply lands
        as the caller is cancelled returns the reply and loses the cancellation, and a
        loop cancelled at shutdown then waits forever for a runtime that is gone."""
        _, reply = self.start_call(service, method, payload, int(timeout * 1e9), metadata)
        async with asyncio.timeout(timeout):
            return await reply

    def _settled(self, sid: int, reply: asyncio.Future[ResponseReceived]) -> None:
        if reply.cancelled():  # the caller stopped waiting
            self._pending.pop(sid, None)
            self.conn.abandon(sid)

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write whole messages (from the loop). False: closed (or closing), the bytes
        were dropped. A transport closing under us is not an ending: the reader will see
        why it closed."""
        with self._write_lock:
            if self.closed or self._writer.is_closing():
                return False
            failed: Exception | None = None
            try:
                if self._carry:
                    self._writer.write(bytes(self._carry))
                    self._carry.clear()
                self._writer.write(data)
            except (OSError, RuntimeError) as exc:
                failed = exc
        if failed is not None:
            self._close(Ending.WRITE_FAILED, f"write failed: {failed}")
            return False
        return self._check_write_buffer()

    def write_from_thread(self, data: bytes) -> bool:
        """Write whole messages from a thread other than the loop's. Straight to the
        socket when nothing waits before them (the common case: a reply without a hop
        back to the loop); else, or for what the socket did not take, through the loop,
        in order. False: the channel is closed (or closing) and the bytes were dropped."""
        with self._write_lock:
            if self.closed or self._writer.is_closing():
                return False
            sent = 0
            if self._fd >= 0 and not self._carry and self.write_buffer_size == 0:
                try:
                    sent = os.write(self._fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    # The loop's reader or writer sees the same failure and says why.
                    sent = 0
            if sent == len(data):
                return True
            self._carry += data[sent:]
        try:
            self._loop.call_soon_threadsafe(self._flush_carry)
        except RuntimeError:  # the loop is closed: nobody will ever send it
            return False
        return True

    def _flush_carry(self) -> None:
        """In the loop: hand what threads left to the transport, before anything newer."""
        with self._write_lock:
            if not self._carry or self.closed or self._writer.is_closing():
                self._carry.clear()
                return
            data = bytes(self._carry)
            self._carry.clear()
            failed: Exception | None = None
            try:
                self._writer.write(data)
            except (OSError, RuntimeError) as exc:
                failed = exc
        if failed is not None:
            self._close(Ending.WRITE_FAILED, f"write failed: {failed}")
            return
        self._check_write_buffer()

    def _check_write_buffer(self) -> bool:
        """The hard cap: reading pauses above the high-water mark, so only replies of
        requests already read (and our own calls) can get the buffer this far."""
        size = self.write_buffer_size
        self.stats.peak_write_buffer = max(self.stats.peak_write_buffer, size)
        limit = self.limits.write_buffer_max
        if size <= limit:
            return True
        self._close(
            Ending.WRITE_BUFFER_FULL,
            f"{size} bytes written to the {self._peer} are unsent (limit {limit}): "
            f"the {self._peer} is not reading",
        )
        return False

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
                await self._throttle()
                if self.closed:
                    return
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
                self.dispatch(events)
        except asyncio.CancelledError:
            if not self.closed:
                raise
            # close() stops reading by cancelling this task: a normal end.
        finally:
            self.close("stopped reading")  # only if cancelled by someone else, or a bug

    # --- reading by its owner (external_reading) --------------------------------------------

    async def _until_closed(self) -> None:
        await self._closed_event.wait()

    @property
    def read_fd(self) -> int:
        """The descriptor the owner waits on (external reading); -1 once reading ended
        (end of stream, a read error, corrupt data: the close is on its way to the loop,
        and a thread that kept polling would find the socket readable forever)."""
        return -1 if self._read_ended else self._fd

    def read_now(self, in_loop: bool) -> list[Event] | None:
        """One read of what the socket holds, parsed into events, from the loop or the
        owner's thread. [] when nothing was there; None when nothing more will be read
        (the channel closes, in the loop, saying why)."""
        if self.closed or self._fd < 0 or self._read_ended:
            return None
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            self._close_from(in_loop, Ending.READ_FAILED, f"read failed: {exc}")
            return None
        if not data:
            if self.conn.has_partial_message:
                what = f"{self._peer} closed the connection in the middle of a message"
                self._close_from(in_loop, Ending.TRUNCATED, what)
            else:
                self._close_from(in_loop, Ending.EOF, f"{self._peer} closed the connection")
            return None
        if self._tap is not None:
            self._tap(data)
        try:
            return self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            self._close_from(in_loop, Ending.CORRUPT, f"protocol error: {exc}")
            return None

    def _close_from(self, in_loop: bool, ending: Ending, reason: str) -> None:
        self._read_ended = True
        if in_loop:
            self._close(ending, reason)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._close, ending, reason)

    def settle_from_thread(self, event: ResponseReceived) -> None:
        """The owner's thread read a reply to one of our calls: settle it in the loop."""
        with contextlib.suppress(RuntimeError):
            events: list[Event] = [event]
            self._loop.call_soon_threadsafe(self.dispatch, events)

    def refuse_from_thread(self, event: BadRequest) -> None:
        """The owner's thread read a request the protocol refuses: answer it from there."""
        if self._on_bad_request is not None:
            self._on_bad_request(event)
        try:
            self.write_from_thread(self.conn.send_error(event.stream_id, event.code, event.message))
        except LocalProtocolError as exc:
            log.error("could not refuse the request on stream %d: %s", event.stream_id, exc)

    @property
    def replies_backed_up(self) -> bool:
        """More unsent bytes than `write_high_water`: the peer is not taking our replies,
        and reading more would only add to them (the loop's reading waits for it)."""
        return self.write_buffer_size + len(self._carry) > self.limits.write_high_water

    @property
    def backlog_waiting(self) -> bool:
        """Requests read and not started, or reading paused for back-pressure."""
        return bool(self._backlog) or (self._resumer is not None and not self._resumer.done())

    def read_in_loop(self, on: bool) -> None:
        """External reading: the loop reads (True) or leaves the socket to the owner."""
        if not self._external or self.closed:
            return
        self._loop_reads = on
        self._set_loop_reader(on)

    def _set_loop_reader(self, on: bool) -> None:
        if on == self._loop_reader_on:
            return
        if on:
            self._loop.add_reader(self._fd, self._loop_readable)
        else:
            self._loop.remove_reader(self._fd)
        self._loop_reader_on = on

    def _loop_readable(self) -> None:
        events = self.read_now(in_loop=True)
        if events is None:
            return
        self.dispatch(events)
        if self._backlog_full() and not self.closed:
            # Pause as the read loop of the default mode does (its `_throttle`).
            self._set_loop_reader(False)
            self._resumer = asyncio.create_task(
                self._resume_loop_reading(), name="nri-channel-paused"
            )

    async def _resume_loop_reading(self) -> None:
        await self._throttle()
        if not self.closed and self._loop_reads:
            self._set_loop_reader(True)

    def release_fd(self) -> None:
        """External reading, after close: no thread waits on the descriptor any more."""
        with self._write_lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1

    def dispatch(self, events: list[RequestReceived | ResponseReceived | BadRequest]) -> None:
        """Act on one read's events in order. Replies and refusals are settled at once (a
        handler may be waiting for a reply); a request waits in the backlog, in order,
        while `max_handlers` are busy or replies are not being taken."""
        for event in events:
            if self.closed:
                return
            if isinstance(event, RequestReceived):
                self._backlog.append(event)
                self._backlog_bytes += len(event.payload)
                self.stats.peak_waiting = max(self.stats.peak_waiting, len(self._backlog))
                self._pump()
            elif isinstance(event, ResponseReceived):
                reply = self._pending.pop(event.stream_id, None)
                if reply is not None and not reply.done():
                    reply.set_result(event)
            else:
                self._refuse(event)

    def _refuse(self, event: BadRequest) -> None:
        """Answer a request the protocol refused; whatever its id, the connection stays."""
        if self._on_bad_request is not None:
            self._on_bad_request(event)
        try:
            self.respond_error(event.stream_id, event.code, event.message)
        except LocalProtocolError as exc:  # not reachable from the wire; never fatal
            log.error("could not refuse the request on stream %d: %s", event.stream_id, exc)

    def _start_handler(self, event: RequestReceived) -> None:
        task = asyncio.create_task(self._serve(event))
        self._handlers.add(task)
        self.stats.peak_handlers = max(self.stats.peak_handlers, len(self._handlers))
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        """Free its slot (the read loop starts the backlog). A handler's failure has
        nobody to go to: log it rather than lose it."""
        self._handlers.discard(task)
        self._handler_ended.set()
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ChannelClosed):
                log.error("request handler failed", exc_info=exc)

    # --- back-pressure ---------------------------------------------------------------------

    def _slots_full(self) -> bool:
        return len(self._handlers) >= self.limits.max_handlers

    def _writes_blocked(self) -> bool:
        transport = self._writer.transport
        return not transport.is_closing() and self.write_buffer_size > self.limits.write_high_water

    def _backlog_full(self) -> bool:
        limits = self.limits
        return (
            len(self._backlog) >= limits.max_handlers
            or self._backlog_bytes >= limits.max_waiting_bytes
        )

    def _start_ready(self) -> None:
        """Start waiting requests, in order, while a slot is free and replies are being
        taken (a request started now would only add to unsent replies)."""
        started = False
        while self._backlog and not self.closed:
            if self._slots_full() or self._writes_blocked():
                break
            event = self._backlog.popleft()
            self._backlog_bytes -= len(event.payload)
            self._start_handler(event)
            started = True
        if started:
            self._backlog_moved.set()

    def _pump(self) -> None:
        """Start what can start now; what must wait is started by one pump task, so the
        backlog moves as soon as it can even while the read loop waits for bytes."""
        self._start_ready()
        if not self._backlog or self.closed:
            return
        if self._pumper is None or self._pumper.done():
            self._pumper = asyncio.create_task(self._pump_later(), name="nri-channel-backlog")

    async def _pump_later(self) -> None:
        while self._backlog and not self.closed:
            if self._slots_full():
                self._handler_ended.clear()
                await self._handler_ended.wait()
            elif self._writes_blocked():
                await self._drained()
            self._start_ready()

    async def _throttle(self) -> None:
        """Before the next read: while the backlog is full, wait for it to move; close
        when it does not for `stall_timeout`."""
        if not self._backlog_full():
            return
        self.stats.pauses += 1
        try:
            async with asyncio.timeout(self.limits.stall_timeout):
                while self._backlog_full() and not self.closed:
                    self._backlog_moved.clear()
                    await self._backlog_moved.wait()
        except TimeoutError:
            self._close(*self._stall())

    async def _drained(self) -> None:
        """Wait for the transport to resume writing. If the connection is lost meanwhile,
        return: the next read sees how it ended."""
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()

    def _stall(self) -> tuple[Ending, str]:
        seconds = self.limits.stall_timeout
        if not self._writes_blocked():
            return Ending.HANDLERS_STALLED, (
                f"{len(self._handlers)} requests from the {self._peer} still being handled "
                f"after {seconds:g}s (limit {self.limits.max_handlers}), "
                f"{len(self._backlog)} more waiting"
            )
        return Ending.UNREAD_REPLIES, (
            f"the {self._peer} has not read our replies for {seconds:g}s "
            f"({self.write_buffer_size} bytes unsent, reading paused above "
            f"{self.limits.write_high_water})"
        )

    # --- closing -------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close for `reason`; idempotent, the first reason stays."""
        self._close(Ending.LOCAL, reason)

    def _close(self, ending: Ending, reason: str) -> None:
        if self.ending is not None:
            return
        self.ending, self.close_reason = ending, reason
        self._backlog.clear()
        self._backlog_bytes = 0
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            if not reply.done():
                reply.set_exception(ChannelClosed(reason))
        if self._loop_reader_on:
            self._set_loop_reader(False)
        with self._write_lock:  # a thread's write in progress ends first; none starts after
            self._carry.clear()
            if self._external and self._fd >= 0:
                # The owner's thread may be waiting on it (or be stuck, and keep it open
                # for long): shut the socket down, which wakes a waiting thread and lets
                # the peer see the end whoever still holds a descriptor, and leave the
                # number to `release_fd`. Unsent bytes of a graceful close go first.
                if ending in _ABORTING or self.write_buffer_size == 0:
                    _shutdown(self._fd, socket.SHUT_RDWR)
                else:
                    _shutdown(self._fd, socket.SHUT_RD)
                    self._flushing = True
            elif self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError, RuntimeError):
                if ending in _ABORTING:
                    self._writer.transport.abort()
                else:
                    self._writer.close()
        self._closed_event.set()
        task = self._reader_task
        if (
            task is not None
            and not self._external
            and task is not asyncio.current_task(task.get_loop())
        ):
            task.cancel()
        if self._on_close is not None:
            self._on_close(ending, reason)

    async def wait_closed(self) -> None:
        """After close(): cancel the handlers still running, wait for them and the reader."""
        current = asyncio.current_task()
        for task in (*self._handlers, self._pumper, self._resumer):
            if task is not None and task is not current:
                task.cancel()
        tasks = [
            t
            for t in (self._reader_task, self._pumper, self._resumer, *self._handlers)
            if t is not None
        ]
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)
        if self._flushing:
            # What was unsent is flushed (or given up): now the peer may see the end.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FLUSH_AT_CLOSE):
                    await self._writer.wait_closed()
            with self._write_lock:
                if self._fd >= 0:
                    _shutdown(self._fd, socket.SHUT_RDWR)


def _shutdown(fd: int, how: int) -> None:
    """shutdown() of the socket behind `fd`. SHUT_RD: a thread in poll() on it wakes up
    and reads end-of-file, and what we still have to write is not affected. SHUT_RDWR:
    the peer sees the end too, however many descriptors of it are still open."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(how)
    except OSError:
        pass
    finally:
        sock.detach()


def _dup_socket(writer: asyncio.StreamWriter) -> int:
    """A descriptor of the writer's socket that the channel owns (-1: not a socket, so
    threads always write through the loop)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        fd = os.dup(sock.fileno())
    except (OSError, ValueError):
        return -1
    os.set_blocking(fd, False)
    return fd
