"""The asyncio channel alone, over a socketpair: calls, replies, refusals and endings."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from nri_plugin.channel import ChannelClosed, ChannelLimits, Ending, NriChannel
from nri_plugin.protocol import mux, ttrpc
from nri_plugin.protocol.connection import BadRequest, RequestReceived, Role
from nri_plugin.protocol.errors import Code

Serve = Callable[[NriChannel, RequestReceived], Coroutine[Any, Any, None]]


async def _echo(channel: NriChannel, req: RequestReceived) -> None:
    channel.respond(req.stream_id, req.method.encode() + b":" + req.payload)


@dataclass
class Side:
    """One end: its channel and what its hooks saw."""

    channel: NriChannel
    endings: list[tuple[Ending, str]] = field(default_factory=list)
    refused: list[BadRequest] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    read: asyncio.Event = field(default_factory=asyncio.Event)

    def on_close(self, ending: Ending, reason: str) -> None:
        self.endings.append((ending, reason))
        self.ended.set()

    def tap(self, data: bytes) -> None:
        self.chunks.append(data)
        # Set once the channel has acted on these bytes and the tasks it started have
        # taken their first step (both are queued before this callback).
        asyncio.get_running_loop().call_soon(self.read.set)

    async def read_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():
                self.read.clear()
                await self.read.wait()


async def _side(
    sock: socket.socket,
    role: Role,
    serve: Serve = _echo,
    limits: ChannelLimits | None = None,
) -> Side:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    side: Side

    def handle(req: RequestReceived) -> Coroutine[Any, Any, None]:
        return serve(side.channel, req)

    channel = NriChannel(
        role,
        reader,
        writer,
        handle,
        on_bad_request=lambda event: side.refused.append(event),
        on_close=lambda ending, reason: side.on_close(ending, reason),
        tap=lambda data: side.tap(data),
        limits=limits,
    )
    side = Side(channel)
    channel.start()
    return side


@pytest.fixture
async def opened() -> AsyncIterator[list[Side]]:
    """Sides to close after the test."""
    sides: list[Side] = []
    yield sides
    for side in sides:
        side.channel.close("test over")
        await asyncio.wait_for(side.channel.wait_closed(), 5)


async def _pair(
    opened: list[Side], plugin_serve: Serve = _echo, runtime_serve: Serve = _echo
) -> tuple[Side, Side]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    plugin = await _side(a, Role.PLUGIN, plugin_serve)
    runtime = await _side(b, Role.RUNTIME, runtime_serve)
    opened += [plugin, runtime]
    return plugin, runtime


async def _raw_peer(
    opened: list[Side],
    role: Role = Role.PLUGIN,
    serve: Serve = _echo,
    limits: ChannelLimits | None = None,
) -> tuple[Side, asyncio.StreamReader, asyncio.StreamWriter]:
    """A channel whose peer is raw bytes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    side = await _side(a, role, serve, limits)
    opened.append(side)
    reader, writer = await asyncio.open_unix_connection(sock=b)
    return side, reader, writer


async def _read_frame(reader: asyncio.StreamReader, conn: int) -> ttrpc.Frame:
    """One whole ttrpc message the channel wrote on mux `conn`."""
    async with asyncio.timeout(5):
        conn_id, length = mux.HEADER.unpack(await reader.readexactly(mux.HEADER_SIZE))
        assert conn_id == conn
        (frame,) = ttrpc.FrameReader().feed(await reader.readexactly(length))
    assert isinstance(frame, ttrpc.Frame)
    return frame


async def _wait_closed(side: Side) -> None:
    async with asyncio.timeout(5):
        while not side.channel.closed:
            await asyncio.sleep(0.005)


# --- calls and replies ---------------------------------------------------------------------


async def test_calls_in_both_directions_get_their_replies(opened: list[Side]) -> None:
    plugin, runtime = await _pair(opened)
    reply = await plugin.channel.call("svc", "Register", b"me", timeout=2)
    assert (reply.stream_id, reply.code, reply.payload) == (1, 0, b"Register:me")
    replies = await asyncio.gather(
        *(runtime.channel.call("svc", f"M{i}", b"x", timeout=2) for i in range(3))
    )
    assert [r.payload for r in replies] == [b"M0:x", b"M1:x", b"M2:x"]
    assert [r.stream_id for r in replies] == [1, 3, 5]


async def test_error_replies_carry_code_and_message(opened: list[Side]) -> None:
    async def refuse(channel: NriChannel, req: RequestReceived) -> None:
        channel.respond_error(req.stream_id, Code.UNIMPLEMENTED, f"method {req.method}")

    plugin, _ = await _pair(opened, runtime_serve=refuse)
    reply = await plugin.channel.call("svc", "Nope", b"", timeout=2)
    assert (reply.code, reply.message) == (Code.UNIMPLEMENTED, "method Nope")


async def test_a_timed_out_call_is_abandoned_and_its_late_reply_ignored(
    opened: list[Side],
) -> None:
    release = asyncio.Event()

    async def slow(channel: NriChannel, req: RequestReceived) -> None:
        if req.method == "Slow":
            await release.wait()
        channel.respond(req.stream_id, req.method.encode())

    plugin, _ = await _pair(opened, runtime_serve=slow)
    with pytest.raises(TimeoutError):
        await plugin.channel.call("svc", "Slow", b"", timeout=0.05)
    release.set()
    reply = await plugin.channel.call("svc", "Fast", b"", timeout=2)
    assert (reply.stream_id, reply.payload) == (3, b"Fast")
    assert plugin.channel.conn.stats.late_responses == 1
    assert not plugin.channel.closed


async def test_the_timeout_is_sent_as_the_requests_deadline(opened: list[Side]) -> None:
    seen: list[int] = []

    async def record(channel: NriChannel, req: RequestReceived) -> None:
        seen.append(req.timeout_nano)
        channel.respond(req.stream_id)

    plugin, _ = await _pair(opened, runtime_serve=record)
    await plugin.channel.call("svc", "M", b"", timeout=1.5)
    assert seen == [1_500_000_000]


async def test_handlers_run_concurrently_and_replies_are_read_while_one_waits(
    opened: list[Side],
) -> None:
    second_arrived = asyncio.Event()

    async def runtime_serve(channel: NriChannel, req: RequestReceived) -> None:
        if req.method == "First":  # answers only once the second request is being served
            await asyncio.wait_for(second_arrived.wait(), 2)
        else:
            second_arrived.set()
        channel.respond(req.stream_id, req.method.encode())

    async def plugin_serve(channel: NriChannel, req: RequestReceived) -> None:
        # A handler that calls back and waits: the reply must still be read.
        inner = await channel.call("svc", "Inner", b"", timeout=2)
        channel.respond(req.stream_id, inner.payload)

    plugin, runtime = await _pair(opened, plugin_serve=plugin_serve, runtime_serve=runtime_serve)
    first, second = await asyncio.gather(
        plugin.channel.call("svc", "First", b"", timeout=3),
        plugin.channel.call("svc", "Second", b"", timeout=3),
    )
    assert (first.payload, second.payload) == (b"First", b"Second")
    outer = await runtime.channel.call("svc", "Outer", b"", timeout=3)
    assert outer.payload == b"Inner"


# --- refusals ------------------------------------------------------------------------------


async def test_a_bad_request_is_refused_and_serving_goes_on(opened: list[Side]) -> None:
    plugin, reader, writer = await _raw_peer(opened)
    # The runtime calls the plugin on mux conn 1; client stream ids must be odd.
    writer.write(mux.encode_message(1, ttrpc.encode_request(2, "svc", "Even", b"")))
    refusal = ttrpc.decode_response(await _read_frame(reader, 1))
    assert refusal.status.code == Code.INVALID_ARGUMENT
    assert "must be odd" in refusal.status.message
    assert [(e.stream_id, e.code) for e in plugin.refused] == [(2, Code.INVALID_ARGUMENT)]
    writer.write(mux.encode_message(1, ttrpc.encode_request(3, "svc", "Good", b"p")))
    frame = await _read_frame(reader, 1)
    assert frame.stream_id == 3
    assert ttrpc.decode_response(frame).payload == b"Good:p"
    assert not plugin.channel.closed
    writer.close()


async def test_every_bad_stream_id_is_answered_on_its_own_id_and_serving_goes_on(
    opened: list[Side],
) -> None:
    """Go's ttrpc server answers 0, even and re-used ids with INVALID_ARGUMENT on that id;
    stream id 0 used to end our connection."""
    plugin, reader, writer = await _raw_peer(opened)
    for sid in (0, 2, 1, 1, 0xFFFFFFFE, 3):
        writer.write(mux.encode_message(1, ttrpc.encode_request(sid, "svc", "M", b"x")))
    replies = [await _read_frame(reader, 1) for _ in range(6)]
    # refusals are written as they are read, served requests from their own tasks
    answered = sorted(
        (f.stream_id, ttrpc.decode_response(f).status.code, ttrpc.decode_response(f).status.message)
        for f in replies
    )
    odd, reused = "must be odd for client initiated streams", "cannot be re-used and must increment"
    assert answered == [
        (0, 3, f"StreamID {odd}"),
        (1, 0, ""),
        (1, 3, f"StreamID {reused}"),
        (2, 3, f"StreamID {odd}"),
        (3, 0, ""),
        (0xFFFFFFFE, 3, f"StreamID {odd}"),
    ]
    assert [e.stream_id for e in plugin.refused] == [0, 2, 1, 0xFFFFFFFE]
    assert not plugin.channel.closed
    writer.close()


# --- bounds ----------------------------------------------------------------------------------


def _requests(first: int, count: int, payload: bytes = b"") -> bytes:
    return b"".join(
        mux.encode_message(1, ttrpc.encode_request(sid, "svc", "M", payload))
        for sid in range(first, first + 2 * count, 2)
    )


async def test_requests_beyond_max_handlers_wait_in_order_for_a_free_slot(
    opened: list[Side],
) -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def gated(channel: NriChannel, req: RequestReceived) -> None:
        started.append(req.stream_id)
        await release.wait()
        channel.respond(req.stream_id)

    limits = ChannelLimits(max_handlers=2)
    plugin, reader, writer = await _raw_peer(opened, serve=gated, limits=limits)
    writer.write(_requests(1, 6))
    await plugin.read_until(lambda: plugin.channel.outstanding == 6)  # one read, then paused
    assert started == [1, 3] and plugin.channel.stats.pauses == 1
    release.set()
    replies = [await _read_frame(reader, 1) for _ in range(6)]
    assert sorted(f.stream_id for f in replies) == [1, 3, 5, 7, 9, 11]
    assert started == [1, 3, 5, 7, 9, 11]  # in the order they came
    assert plugin.channel.stats.peak_handlers == 2
    assert not plugin.channel.closed
    writer.close()


async def test_handlers_busy_past_the_stall_bound_close_the_channel(opened: list[Side]) -> None:
    async def stuck(channel: NriChannel, req: RequestReceived) -> None:
        await asyncio.Event().wait()

    limits = ChannelLimits(max_handlers=1, stall_timeout=0.2)
    plugin, _, writer = await _raw_peer(opened, serve=stuck, limits=limits)
    writer.write(_requests(1, 2))
    await asyncio.wait_for(plugin.ended.wait(), 5)
    ((ending, reason),) = plugin.endings
    assert ending is Ending.HANDLERS_STALLED
    assert reason == (
        "1 requests from the runtime still being handled after 0.2s (limit 1), 1 more waiting"
    )
    writer.close()


async def test_unread_replies_pause_reading_then_close_after_the_stall_bound(
    opened: list[Side],
) -> None:
    """A peer that sends and never reads: replies stop at the high-water mark (plus what
    the busy handlers were writing), reading stops, and the channel gives up."""
    reply = b"r" * 4096

    async def big(channel: NriChannel, req: RequestReceived) -> None:
        channel.respond(req.stream_id, reply)

    limits = ChannelLimits(max_handlers=4, write_high_water=8192, stall_timeout=0.3)
    plugin, _, writer = await _raw_peer(opened, serve=big, limits=limits)
    writer.write(_requests(1, 3000))  # about 100 KB of requests, 12 MB of replies
    await asyncio.wait_for(plugin.ended.wait(), 5)
    ((ending, reason),) = plugin.endings
    assert ending is Ending.UNREAD_REPLIES
    assert reason.startswith("the runtime has not read our replies for 0.3s (")
    stats = plugin.channel.stats
    assert stats.peak_write_buffer <= 8192 + 4 * (len(reply) + 64)
    assert stats.peak_handlers <= 4
    served = plugin.channel.conn._last_served_id // 2 + 1
    assert served < 3000  # it stopped reading
    assert plugin.channel.write_buffer_size == 0  # the unsent replies were dropped
    writer.close()


async def test_two_channels_flooding_each_other_do_not_deadlock(opened: list[Side]) -> None:
    """Both sides call with 1 MiB payloads echoed back, far over their high-water mark:
    each keeps reading while its own writes are blocked (the other's requests wait within
    the backlog bound), so both drain."""
    limits = ChannelLimits(max_handlers=16, write_high_water=64 << 10)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    plugin = await _side(a, Role.PLUGIN, limits=limits)
    runtime = await _side(b, Role.RUNTIME, limits=limits)
    opened += [plugin, runtime]
    payload = b"p" * (1 << 20)
    calls = [
        side.channel.call("svc", f"M{i}", payload, timeout=10)
        for i in range(8)
        for side in (plugin, runtime)
    ]
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert all(r.code == 0 and r.payload.endswith(payload) for r in replies)
    assert not plugin.channel.closed and not runtime.channel.closed
    assert max(plugin.channel.stats.peak_write_buffer, runtime.channel.stats.peak_write_buffer) > (
        64 << 10
    )  # it was a flood


async def test_a_write_buffer_over_the_hard_cap_closes_at_once(opened: list[Side]) -> None:
    limits = ChannelLimits(write_high_water=16 << 10, write_buffer_max=64 << 10)
    plugin, _, writer = await _raw_peer(opened, limits=limits)  # the peer never reads
    assert plugin.channel.write(b"\0" * (4 << 20)) is False
    ((ending, reason),) = plugin.endings
    assert ending is Ending.WRITE_BUFFER_FULL
    assert "are unsent (limit 65536): the runtime is not reading" in reason
    writer.close()


# --- endings ---------------------------------------------------------------------------------


async def test_close_fails_pending_calls_with_the_reason(opened: list[Side]) -> None:
    never = asyncio.Event()

    async def silent(channel: NriChannel, req: RequestReceived) -> None:
        await never.wait()

    plugin, runtime = await _pair(opened, runtime_serve=silent)
    call = asyncio.create_task(plugin.channel.call("svc", "M", b"", timeout=5))
    await asyncio.sleep(0.05)
    plugin.channel.close("stopping")
    with pytest.raises(ChannelClosed, match="stopping"):
        await call
    plugin.channel.close("again")  # the first reason stays, the owner hears it once
    assert plugin.endings == [(Ending.LOCAL, "stopping")]
    assert plugin.channel.close_reason == "stopping"
    with pytest.raises(ChannelClosed, match="stopping"):
        plugin.channel.start_call("svc", "M", b"")
    assert plugin.channel.write(b"anything") is False
    with pytest.raises(ChannelClosed, match="stopping"):
        await plugin.channel.drain()
    await _wait_closed(runtime)
    assert runtime.endings == [(Ending.EOF, "plugin closed the connection")]
    await asyncio.wait_for(plugin.channel.wait_closed(), 5)  # the reader has stopped
    # and the handler still waiting was cancelled
    await asyncio.wait_for(runtime.channel.wait_closed(), 5)


async def test_close_stops_reading_even_when_the_peer_reads_nothing(
    opened: list[Side],
) -> None:
    plugin, _, writer = await _raw_peer(opened)  # the peer never reads
    # More than the socket holds: closing the transport now waits for a flush that never
    # comes, so the peer sees no EOF and the reader no end of its own.
    assert plugin.channel.write(b"\0" * (8 << 20))
    plugin.channel.close("giving up")
    await asyncio.wait_for(plugin.channel.wait_closed(), 2)
    assert plugin.endings == [(Ending.LOCAL, "giving up")]
    writer.close()


async def test_the_peer_closing_fails_pending_calls(opened: list[Side]) -> None:
    plugin, reader, writer = await _raw_peer(opened)
    call = asyncio.create_task(plugin.channel.call("svc", "M", b"", timeout=5))
    await _read_frame(reader, 2)
    writer.close()
    with pytest.raises(ChannelClosed, match="runtime closed the connection"):
        await call
    assert plugin.channel.ending is Ending.EOF


async def test_eof_in_the_middle_of_a_message_is_truncated(opened: list[Side]) -> None:
    plugin, _, writer = await _raw_peer(opened)
    message = mux.encode_message(1, ttrpc.encode_request(1, "svc", "M", b"payload"))
    writer.write(message[:-3])
    await asyncio.sleep(0.02)
    writer.close()
    await _wait_closed(plugin)
    assert plugin.endings == [
        (Ending.TRUNCATED, "runtime closed the connection in the middle of a message")
    ]


async def test_eof_between_messages_is_a_clean_end(opened: list[Side]) -> None:
    plugin, reader, writer = await _raw_peer(opened)
    writer.write(mux.encode_message(1, ttrpc.encode_request(1, "svc", "M", b"")))
    await _read_frame(reader, 1)
    writer.close()
    await _wait_closed(plugin)
    assert plugin.endings == [(Ending.EOF, "runtime closed the connection")]


async def test_corrupt_bytes_close_with_a_protocol_error(opened: list[Side]) -> None:
    runtime, _, writer = await _raw_peer(opened, Role.RUNTIME)
    writer.write(b"\xff" * 64)
    await _wait_closed(runtime)
    ((ending, reason),) = runtime.endings
    assert ending is Ending.CORRUPT and reason.startswith("protocol error: ")
    writer.close()


async def test_a_read_error_is_its_own_ending() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=a)
    endings: list[Ending] = []
    channel = NriChannel(
        Role.PLUGIN,
        reader,
        writer,
        lambda req: _echo(channel, req),
        on_close=lambda ending, reason: endings.append(ending),
    )
    channel.start()
    reader.set_exception(ConnectionResetError("reset by peer"))
    await asyncio.wait_for(channel.wait_closed(), 5)
    assert endings == [Ending.READ_FAILED]
    assert channel.close_reason == "read failed: reset by peer"
    b.close()


async def test_the_tap_sees_every_byte_read(opened: list[Side]) -> None:
    plugin, reader, writer = await _raw_peer(opened)
    sent = b"".join(
        mux.encode_message(1, ttrpc.encode_request(sid, "svc", "M", bytes(sid)))
        for sid in (1, 3, 5)
    )
    for i in range(0, len(sent), 7):  # in small pieces, mid-frame
        writer.write(sent[i : i + 7])
        await writer.drain()
    for _ in range(3):
        await _read_frame(reader, 1)
    assert b"".join(plugin.chunks) == sent
    writer.close()


async def test_wait_closed_cancels_handlers_still_running(opened: list[Side]) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(channel: NriChannel, req: RequestReceived) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    plugin, runtime = await _pair(opened, runtime_serve=stuck)
    plugin.channel.start_call("svc", "M", b"")[1].cancel()
    await asyncio.wait_for(started.wait(), 2)
    runtime.channel.close("done")
    await asyncio.sleep(0.01)
    assert not cancelled.is_set()  # close leaves handlers running: they may need to notice
    await asyncio.wait_for(runtime.channel.wait_closed(), 2)
    assert cancelled.is_set()


# --- writes from another thread ------------------------------------------------------------


def _reply_bytes(channel: NriChannel, stream_id: int, payload: bytes) -> bytes:
    return channel.conn.send_response(stream_id, payload)


async def test_a_thread_write_waits_behind_bytes_the_transport_still_holds(
    opened: list[Side],
) -> None:
    """While the transport holds unsent bytes, a thread's reply must not jump the queue
    (its frame would land inside the other one): it goes after them, and a loop write
    made after it goes after it."""
    plugin, reader, writer = await _raw_peer(opened)
    channel = plugin.channel
    big = b"b" * (2 << 20)  # far over a socketpair's buffer: the transport keeps the rest
    assert channel.write(_reply_bytes(channel, 1, big))
    assert channel.write_buffer_size > 0
    # Make room in the socket without letting the loop run (it would refill it): only
    # the transport's buffer now stands between the thread and a torn frame.
    peer = writer.get_extra_info("socket")
    early = os.read(peer.fileno(), 64 << 10)
    results: list[bool] = []
    thread = threading.Thread(
        target=lambda: results.append(
            channel.write_from_thread(_reply_bytes(channel, 3, b"thread"))
        )
    )
    thread.start()
    thread.join()
    assert results == [True]
    assert channel.write(_reply_bytes(channel, 5, b"loop"))
    demux = mux.MuxReader((Role.PLUGIN.serve_conn,))
    frames = ttrpc.FrameReader()
    got: list[ttrpc.Frame | ttrpc.OversizedFrame] = []
    for _, chunk in demux.feed(early):
        got.extend(frames.feed(chunk))
    async with asyncio.timeout(5):
        while len(got) < 3:
            for _, chunk in demux.feed(await reader.read(1 << 16)):
                got.extend(frames.feed(chunk))
    assert [f.stream_id for f in got] == [1, 3, 5]
    replies = [ttrpc.decode_response(f).payload for f in got if isinstance(f, ttrpc.Frame)]
    assert replies == [big, b"thread", b"loop"]
    writer.close()


async def test_a_thread_write_goes_straight_to_the_socket_when_nothing_waits(
    opened: list[Side],
) -> None:
    """The reply reaches the peer while the loop is blocked: no hop back to the loop."""
    plugin, _, writer = await _raw_peer(opened)
    channel = plugin.channel
    peer = writer.get_extra_info("socket")
    arrived: list[bool] = []

    def blocked_loop() -> None:
        import select

        readable, _, _ = select.select([peer.fileno()], [], [], 2.0)
        arrived.append(bool(readable))

    loop = asyncio.get_running_loop()
    loop.call_soon(blocked_loop)
    # the thread writes while blocked_loop() holds the loop
    await asyncio.to_thread(lambda: channel.write_from_thread(_reply_bytes(channel, 1, b"x")))
    assert arrived == [True]
    writer.close()


async def test_a_thread_write_after_close_is_dropped(opened: list[Side]) -> None:
    plugin, _, writer = await _raw_peer(opened)
    channel = plugin.channel
    channel.close("test")
    done = await asyncio.to_thread(channel.write_from_thread, _reply_bytes(channel, 1, b"late"))
    assert done is False
    assert channel._fd == -1  # its own descriptor of the socket is closed with it
    writer.close()


async def test_a_call_cancelled_as_its_reply_lands_stays_cancelled(opened: list[Side]) -> None:
    """A loop cancelled at shutdown while its UpdateContainers reply arrives must end:
    the reply must not swallow the cancel (asyncio.wait_for does on Python 3.11, and the
    loop then waits forever for a runtime that is gone)."""
    plugin, _, writer = await _raw_peer(opened)
    channel = plugin.channel
    reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    channel.start_call = lambda *args, **kwargs: (1, reply)  # type: ignore[method-assign]
    call = asyncio.create_task(channel.call("svc", "M", b"", timeout=5))
    await asyncio.sleep(0)  # the call now waits for its reply
    reply.set_result("the runtime's answer")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    writer.close()
