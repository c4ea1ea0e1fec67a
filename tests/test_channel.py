"""The asyncio channel alone, over a socketpair: calls, replies, refusals and endings."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from nri_plugin.channel import ChannelClosed, Ending, NriChannel
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


async def _side(sock: socket.socket, role: Role, serve: Serve = _echo) -> Side:
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
        on_close=lambda ending, reason: side.endings.append((ending, reason)),
        tap=lambda data: side.chunks.append(data),
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
    opened: list[Side], role: Role = Role.PLUGIN
) -> tuple[Side, asyncio.StreamReader, asyncio.StreamWriter]:
    """A channel whose peer is raw bytes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    side = await _side(a, role)
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
