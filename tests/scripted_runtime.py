"""A scripted runtime peer for plugin tests: the test decides every byte it sends.

Unlike the embedded runtime (a full emulation), this is a thin wrapper over an
`NriChannel` in the runtime role that lets a test send requests, await exact replies and
see the plugin's own calls, so protocol corner cases can be staged precisely. Every event
(the plugin's requests, the replies to our calls, requests the channel refused) lands in
one inbox in the order it arrived; every mux frame read is recorded raw, and every reply
on the plugin's service conn is kept as it came (`raw_reply`), also those the channel
drops because we never made that call (stream id 0, even or reused ids sent raw).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from google.protobuf.message import Message

from nri_plugin.channel import ChannelLimits, NriChannel
from nri_plugin.metrics import Metrics
from nri_plugin.plugin import NriPlugin, PluginSettings, SessionEnd
from nri_plugin.policy.api import PolicyBase
from nri_plugin.protocol import mux, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import (
    BadRequest,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.services import PLUGIN_SERVICE


@dataclass
class RawReply:
    """A reply exactly as it came off the wire, for envelope-shape checks."""

    conn: int
    stream_id: int
    ttrpc_type: int
    flags: int
    data: bytes


class ScriptedRuntime:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: ChannelLimits | None = None,
    ) -> None:
        self.inbox: asyncio.Queue[RequestReceived | ResponseReceived | BadRequest] = asyncio.Queue()
        self.raw_frames: list[tuple[int, bytes]] = []  # every mux frame received (conn, payload)
        self.served_replies: list[ttrpc.Frame] = []  # every reply on the plugin's service conn
        self._buf = bytearray()
        self._replies = ttrpc.FrameReader()
        self._replied = asyncio.Event()
        self._writer = writer
        self.ended = asyncio.Event()  # set when the connection closed, for whatever reason
        self.channel = NriChannel(
            Role.RUNTIME,
            reader,
            writer,
            self._queue,
            on_bad_request=self._queue_soon,
            on_close=lambda ending, reason: self.ended.set(),
            tap=self._record_frames,
            limits=limits,
        )
        self.conn = self.channel.conn  # for its stats; send through this class
        self.channel.start()

    @classmethod
    async def pair(
        cls, limits: ChannelLimits | None = None
    ) -> tuple[ScriptedRuntime, asyncio.StreamReader, asyncio.StreamWriter]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r1, w1 = await asyncio.open_unix_connection(sock=a)
        r2, w2 = await asyncio.open_unix_connection(sock=b)
        return cls(r1, w1, limits), r2, w2

    # Arrival order: the channel starts a request's task, settles a reply's future and
    # reports a refusal in the order they were read; each lands in the inbox from the
    # loop's FIFO ready queue (task step, done callback, call_soon), so it keeps that order.

    async def _queue(self, event: RequestReceived) -> None:
        self.inbox.put_nowait(event)

    def _queue_soon(self, event: BadRequest) -> None:
        asyncio.get_running_loop().call_soon(self.inbox.put_nowait, event)

    def _queue_reply(self, reply: asyncio.Future[ResponseReceived]) -> None:
        if not reply.cancelled() and reply.exception() is None:
            self.inbox.put_nowait(reply.result())

    def _record_frames(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 8:
            conn, length = mux.HEADER.unpack_from(self._buf)
            if len(self._buf) < 8 + length:
                break
            payload = bytes(self._buf[8 : 8 + length])
            self.raw_frames.append((conn, payload))
            del self._buf[: 8 + length]
            if conn == mux.PLUGIN_SERVICE_CONN:
                self._record_replies(payload)

    def _record_replies(self, payload: bytes) -> None:
        for frame in self._replies.feed(payload):
            if isinstance(frame, ttrpc.Frame) and frame.type is ttrpc.MessageType.RESPONSE:
                self.served_replies.append(frame)
                self._replied.set()

    async def raw_reply(
        self, stream_id: int, since: int = 0, wait: float = 5.0
    ) -> ttrpc_pb2.Response:
        """The first reply on `stream_id` as it came off the wire, among those after the
        first `since` (what `send_raw_request` returned: a reused id has older replies)."""
        async with asyncio.timeout(wait):
            while True:
                for frame in self.served_replies[since:]:
                    if frame.stream_id == stream_id:
                        return ttrpc.decode_response(frame)
                self._replied.clear()
                await self._replied.wait()

    def send_raw_request(
        self, stream_id: int, method: str, payload: bytes = b"", timeout: float = 2.0
    ) -> int:
        """A request on any stream id, bypassing our own id bookkeeping: for ids the
        protocol forbids. Its reply arrives only through `raw_reply(stream_id, since)`
        with the mark returned here."""
        since = len(self.served_replies)
        message = ttrpc.encode_request(
            stream_id, PLUGIN_SERVICE, method, payload, int(timeout * 1e9)
        )
        self.send_raw(mux.encode_message(mux.PLUGIN_SERVICE_CONN, message))
        return since

    def stop_reading(self) -> None:
        """Take no more bytes from the socket, like a runtime that stopped reading
        replies: the plugin's writes pile up in the socket and then in its transport."""
        self._read_transport().pause_reading()

    def resume_reading(self) -> None:
        self._read_transport().resume_reading()

    def _read_transport(self) -> asyncio.ReadTransport:
        transport = self._writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        return transport

    async def next_event(
        self, timeout: float = 5.0
    ) -> RequestReceived | ResponseReceived | BadRequest:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def expect_call(self, method: str, timeout: float = 5.0) -> RequestReceived:
        event = await self.next_event(timeout)
        assert isinstance(event, RequestReceived), event
        assert event.method == method, (event.method, method)
        return event

    def reply(self, call: RequestReceived, message: Message | None = None) -> None:
        payload = message.SerializeToString() if message is not None else b""
        self.channel.respond(call.stream_id, payload)

    def reply_error(self, call: RequestReceived, code: int, text: str) -> None:
        self.channel.respond_error(call.stream_id, code, text)

    async def call(
        self, method: str, message: Message, timeout: float = 2.0, wait: float = 5.0
    ) -> ResponseReceived:
        sid = self.send(method, message, timeout)
        return await self.response(sid, wait)

    def send(self, method: str, message: Message, timeout: float = 2.0) -> int:
        return self.send_payload(PLUGIN_SERVICE, method, message.SerializeToString(), timeout)

    def send_payload(self, service: str, method: str, payload: bytes, timeout: float = 2.0) -> int:
        """A request with any service and payload bytes; its reply goes to the inbox."""
        sid, reply = self.channel.start_call(service, method, payload, int(timeout * 1e9))
        reply.add_done_callback(self._queue_reply)
        return sid

    async def response(self, sid: int, wait: float = 5.0) -> ResponseReceived:
        event = await self.next_event(wait)
        assert isinstance(event, ResponseReceived), event
        assert event.stream_id == sid
        return event

    def send_raw(self, data: bytes) -> None:
        self.channel.write(data)

    async def handshake(
        self,
        configure: pb.ConfigureRequest | None = None,
        pods: list[pb.PodSandbox] | None = None,
        containers: list[pb.Container] | None = None,
    ) -> tuple[pb.RegisterPluginRequest, pb.ConfigureResponse]:
        """Registration, Configure and Synchronize, the way containerd 2.x does them."""
        reg = await self.expect_call("RegisterPlugin")
        self.reply(reg)
        configure = configure or pb.ConfigureRequest(
            runtime_name="containerd",
            runtime_version="v2.3.4",
            registration_timeout=5000,
            request_timeout=2000,
            NRI_version="v0.12.0",
        )
        cfg = await self.call("Configure", configure)
        assert cfg.code == 0, cfg
        sync = await self.call(
            "Synchronize", pb.SynchronizeRequest(pods=pods or [], containers=containers or [])
        )
        assert sync.code == 0, sync
        return (
            pb.RegisterPluginRequest.FromString(reg.payload),
            pb.ConfigureResponse.FromString(cfg.payload),
        )

    async def close(self) -> None:
        self.channel.close("scripted runtime closed the connection")
        await self.channel.wait_closed()


def frame_shape(data: bytes) -> tuple[int, int, int]:
    """(stream id, type, flags) of one whole ttrpc message."""
    _, sid, mtype, flags = ttrpc.HEADER.unpack_from(data)
    return sid, mtype, flags


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """A counter's value, read the way a scraper would: through the registry."""
    value = metrics.registry.get_sample_value(f"{name}_total", labels)
    return 0.0 if value is None else value


def metric_total(metrics: Metrics, name: str) -> float:
    """The sum of a counter over all its label sets."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == f"{name}_total"
    )


async def serve_plugin(
    policy: PolicyBase, **settings: object
) -> tuple[NriPlugin, ScriptedRuntime, asyncio.Task[SessionEnd]]:
    """A real NriPlugin serving one connection whose other end is a ScriptedRuntime."""
    runtime, reader, writer = await ScriptedRuntime.pair()
    plugin = NriPlugin(policy, PluginSettings(**settings))  # type: ignore[arg-type]
    return plugin, runtime, asyncio.create_task(plugin.serve(reader, writer))


async def end_plugin(
    plugin: NriPlugin, runtime: ScriptedRuntime, task: asyncio.Task[SessionEnd]
) -> SessionEnd:
    """Close the runtime's side; the plugin's session ends (within 5 s) and says why."""
    await runtime.close()
    end = await asyncio.wait_for(task, 5)
    plugin.close()
    return end
