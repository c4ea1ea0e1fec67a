"""Fault injection from the runtime side: a live plugin against a runtime that breaks the
protocol's rules or floods it.

Each case checks the two promises that matter on a node: every request the plugin reads
is answered (with no change when in doubt) well inside the runtime's deadline, and a
misbehaving runtime costs bounded memory; past a bound the connection is closed with the
reason, a log line and a metric, and the next connection starts clean.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from google.protobuf.message import Message

from nri_plugin import dispatch
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.api import PolicyBase, RecordingPolicy
from nri_plugin.policy.intents import Intents
from nri_plugin.protocol import convert, mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import ResponseReceived
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.versions import Event, event_mask
from qos_model.containers import Container, CpuResources, Pod, Resources, Update
from tests.captures import SESSIONS, TO_PLUGIN
from tests.scripted_runtime import ScriptedRuntime, end_plugin, metric, serve_plugin

# The runtime's request timeout in these tests, as containerd's default; a fail-open reply
# must come well inside it (the plugin's own budget is half of it).
TIMEOUT = 2.0


def _pod(pid: str) -> pb.PodSandbox:
    return convert.pod_to_pb(Pod(id=pid, name=f"name-{pid}", namespace="default", uid=pid))


def _ctr(cid: str, pod: str) -> pb.Container:
    return convert.container_to_pb(Container(id=cid, pod_id=pod, name=f"name-{cid}"))


def _recorded_create_container() -> bytes:
    """A CreateContainer payload exactly as containerd 2.3.4 sent it."""
    for session in SESSIONS:
        if session.runtime != "containerd-2.3.4":
            continue
        for message in session.messages:
            if message.direction != TO_PLUGIN or message.ttrpc_type != 1:
                continue
            request = ttrpc_pb2.Request.FromString(message.data)
            if request.method == "CreateContainer":
                return request.payload
    raise AssertionError("no recorded CreateContainer")


CREATE_CONTAINER = _recorded_create_container()


async def _timed_call(
    runtime: ScriptedRuntime, method: str, message: Message
) -> tuple[float, ResponseReceived]:
    started = time.monotonic()
    reply = await runtime.call(method, message, timeout=TIMEOUT)
    return time.monotonic() - started, reply


# --- protocol edges --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream_id", "words"),
    [
        (0, "StreamID must be odd for client initiated streams"),
        (4, "StreamID must be odd for client initiated streams"),
        (0xFFFFFFFE, "StreamID must be odd for client initiated streams"),
        (3, "StreamID cannot be re-used and must increment"),  # Synchronize used 3
    ],
    ids=["zero", "even", "largest even", "re-used"],
)
async def test_a_bad_stream_id_is_answered_and_the_connection_stays(
    stream_id: int, words: str
) -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    started = time.monotonic()
    since = runtime.send_raw_request(stream_id, "CreateContainer", CREATE_CONTAINER)
    refusal = await runtime.raw_reply(stream_id, since)
    assert time.monotonic() - started < TIMEOUT / 2
    assert (refusal.status.code, refusal.status.message) == (Code.INVALID_ARGUMENT, words)
    assert metric(plugin.metrics, "nri_qos_protocol_errors", kind="bad_request") == 1
    # the same connection goes on serving
    elapsed, reply = await _timed_call(
        runtime, "CreateContainer", pb.CreateContainerRequest.FromString(CREATE_CONTAINER)
    )
    assert reply.code == 0 and elapsed < TIMEOUT / 2
    assert plugin.configured.is_set() and not task.done()
    await end_plugin(plugin, runtime, task)


class HugeReplies(RecordingPolicy):
    """Asks for an update of thousands of containers in one reply: over 4 MiB encoded."""

    CONTAINERS = 5_000
    CPUS = ",".join(str(cpu) for cpu in range(0, 1024, 2))  # ~2.5 KB per update

    def _everyone(self) -> Intents:
        resources = Resources(cpu=CpuResources(cpus=self.CPUS))  # one value, encoded once
        return Intents(
            reply_updates=tuple(Update(f"{i:064x}", resources) for i in range(self.CONTAINERS))
        )

    def create_container(self, pod: Pod, container: Container) -> Intents:
        super().create_container(pod, container)
        return self._everyone()

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        super().synchronize(pods, containers)
        return self._everyone()


async def test_an_oversized_reply_is_answered_with_no_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin, runtime, task = await serve_plugin(HugeReplies())
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply(reg)
    await runtime.call("Configure", pb.ConfigureRequest(runtime_name="containerd"))
    with caplog.at_level(logging.ERROR, "nri_qos.plugin"):
        # the last chunk of a split Synchronize, then a CreateContainer
        chunk = await runtime.call("Synchronize", pb.SynchronizeRequest(more=True))
        assert pb.SynchronizeResponse.FromString(chunk.payload).more
        elapsed, sync = await _timed_call(runtime, "Synchronize", pb.SynchronizeRequest())
        assert sync.code == 0 and sync.payload == b"" and elapsed < TIMEOUT / 2
        request = pb.CreateContainerRequest.FromString(CREATE_CONTAINER)
        elapsed, create = await _timed_call(runtime, "CreateContainer", request)
        assert create.code == 0 and create.payload == b"" and elapsed < TIMEOUT / 2
    lines = [r.getMessage() for r in caplog.records if "over ttrpc's" in r.getMessage()]
    assert len(lines) == 2 and all(
        "4194304-byte limit; replying with no change" in m for m in lines
    )
    assert lines[0].startswith("Synchronize: the reply is ") and "bytes" in lines[0]
    for method in ("Synchronize", "CreateContainer"):
        assert (
            metric(plugin.metrics, "nri_qos_fail_open", method=method, reason="reply_too_large")
            == 1
        )
    assert metric(plugin.metrics, "nri_qos_protocol_errors", kind="reply_too_large") == 2
    assert not task.done()
    await end_plugin(plugin, runtime, task)


class CreatesAndStops(PolicyBase):
    def create_container(self, pod: Pod, container: Container) -> Intents:
        return Intents()

    def stop_container(self, pod: Pod, container: Container) -> Intents:
        return Intents()


async def test_an_undecodable_configure_subscribes_to_exactly_the_policys_events() -> None:
    plugin, runtime, task = await serve_plugin(CreatesAndStops())
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply(reg)
    started = time.monotonic()
    sid = runtime.send_payload(services.PLUGIN_SERVICE, "Configure", b"\x12\xff\xff", TIMEOUT)
    reply = await runtime.response(sid)
    assert time.monotonic() - started < TIMEOUT / 2
    events = pb.ConfigureResponse.FromString(reply.payload).events
    assert events == event_mask({Event.CREATE_CONTAINER, Event.STOP_CONTAINER})
    await asyncio.wait_for(plugin.configured.wait(), 2)  # the runtime goes on: so do we
    assert plugin.runtime == dispatch.UNKNOWN_RUNTIME
    assert metric(plugin.metrics, "nri_qos_fail_open", method="Configure", reason="decode") == 1
    await runtime.call("Synchronize", pb.SynchronizeRequest())
    create = await runtime.call(
        "CreateContainer", pb.CreateContainerRequest.FromString(CREATE_CONTAINER)
    )
    assert create.code == 0
    end = await end_plugin(plugin, runtime, task)
    assert end.configured


# --- bounds ------------------------------------------------------------------------------


def _pipelined(first_sid: int, count: int) -> bytes:
    return b"".join(
        mux.encode_message(
            mux.PLUGIN_SERVICE_CONN,
            ttrpc.encode_request(
                sid,
                services.PLUGIN_SERVICE,
                "CreateContainer",
                CREATE_CONTAINER,
                int(TIMEOUT * 1e9),
            ),
        )
        for sid in range(first_sid, first_sid + 2 * count, 2)
    )


async def test_a_runtime_that_pipelines_10000_requests_and_reads_no_reply_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RecordingPolicy()
    high_water = 4096
    plugin, runtime, task = await serve_plugin(
        policy, write_high_water=high_water, stall_timeout=0.3
    )
    await runtime.handshake()
    channel = plugin.channel
    assert channel is not None
    runtime.stop_reading()
    with caplog.at_level(logging.ERROR, "nri_qos.plugin"):
        runtime.send_raw(_pipelined(101, 10_000))  # 32 MB of requests
        end = await asyncio.wait_for(task, 10)
    assert end.reason.startswith("the runtime has not read our replies for 0.3s (")
    assert f"closing the runtime connection: {end.reason}" in caplog.messages
    assert metric(plugin.metrics, "nri_qos_connection_overload", limit="unread_replies") == 1
    # it stopped reading long before the end, and held little meanwhile
    served = sum(1 for o in policy.observations if o.event == "CreateContainer")
    assert 0 < served < 2_000, served
    settings = plugin.settings
    assert channel.stats.peak_handlers <= settings.max_requests_in_flight
    empty_reply = len(channel.conn.send_response(1))
    assert (
        channel.stats.peak_write_buffer
        <= high_water + settings.max_requests_in_flight * empty_reply
    )
    assert channel.write_buffer_size == 0  # the unsent replies went with the connection
    plugin.close()
    await runtime.close()


async def test_a_stuck_policy_under_a_flood_is_bounded_by_the_requests_in_flight() -> None:
    release = threading.Event()

    class Stuck(RecordingPolicy):
        def create_container(self, pod: Pod, container: Container) -> Intents:
            release.wait(10)
            return Intents()

    plugin, runtime, task = await serve_plugin(
        Stuck(), max_requests_in_flight=16, stall_timeout=0.3, handler_budget=0.05
    )
    await runtime.handshake()
    channel = plugin.channel
    assert channel is not None
    sids = [
        runtime.send("CreateContainer", pb.CreateContainerRequest.FromString(CREATE_CONTAINER))
        for _ in range(1_000)
    ]
    try:
        # the first 16 get the no-change reply inside their budget ...
        for sid in sids[:16]:
            reply = await runtime.response(sid, wait=TIMEOUT / 2)
            assert reply.code == 0 and reply.payload == b""
        # ... then nothing more is read, and the connection is given up
        await asyncio.wait_for(runtime.ended.wait(), 5)
    finally:
        release.set()
    end = await asyncio.wait_for(task, 10)
    assert end.reason.startswith("16 requests from the runtime still being handled after 0.3s")
    assert channel.stats.peak_handlers == 16
    assert metric(plugin.metrics, "nri_qos_connection_overload", limit="requests_in_flight") == 1
    plugin.close()
    await runtime.close()


@pytest.mark.parametrize(
    ("bound", "chunk", "limit", "words"),
    [
        ({"sync_max_chunks": 4}, 1, "sync_chunks", "split Synchronize went past 4 chunks"),
        ({"sync_max_objects": 17}, 2, "sync_objects", "split Synchronize went past 17 pods"),
    ],
    ids=["chunks", "pods and containers"],
)
async def test_a_split_synchronize_past_its_bounds_closes_with_the_reason(
    bound: dict[str, int], chunk: int, limit: str, words: str
) -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy(), **bound)
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply(reg)
    await runtime.call("Configure", pb.ConfigureRequest(runtime_name="containerd"))
    replies = []
    for n in range(5):
        request = pb.SynchronizeRequest(
            pods=[_pod(f"p{n}-{i}") for i in range(chunk)],
            containers=[_ctr(f"c{n}-{i}", f"p{n}-{i}") for i in range(chunk)],
            more=True,
        )
        replies.append(await runtime.call("Synchronize", request))
    assert [r.code for r in replies[:4]] == [0, 0, 0, 0]
    refused = replies[4]
    assert refused.code == Code.RESOURCE_EXHAUSTED and refused.message.startswith(words)
    end = await asyncio.wait_for(task, 5)
    assert end.reason.startswith(words) and end.reason.endswith("; the partial state was dropped")
    assert metric(plugin.metrics, "nri_qos_connection_overload", limit=limit) == 1
    plugin.close()
    await runtime.close()


async def test_a_runtime_gone_mid_split_synchronize_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "nri.sock"
    accepted: asyncio.Queue[ScriptedRuntime] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(ScriptedRuntime(reader, writer))

    server = await asyncio.start_unix_server(on_connect, path=str(path))
    policy = RecordingPolicy()
    plugin = NriPlugin(policy, PluginSettings(socket_path=path, backoff_initial=0.01))
    runner = asyncio.create_task(plugin.run())
    first = await asyncio.wait_for(accepted.get(), 5)
    reg = await first.expect_call("RegisterPlugin")
    first.reply(reg)
    await first.call("Configure", pb.ConfigureRequest(runtime_name="containerd"))
    for n in range(2):
        chunk = pb.SynchronizeRequest(
            pods=[_pod(f"old{n}")], containers=[_ctr(f"old{n}", f"old{n}")], more=True
        )
        assert (await first.call("Synchronize", chunk)).code == 0
    await first.close()  # the runtime goes away before the last chunk
    second = await asyncio.wait_for(accepted.get(), 5)
    await second.handshake(pods=[_pod("new")], containers=[_ctr("new", "new")])
    (sync,) = [o for o in policy.observations if o.event == "Synchronize"]
    assert sync.detail == {"pods": 1, "containers": 1}  # nothing of the first connection
    plugin.stop()
    await asyncio.wait_for(runner, 5)
    plugin.close()
    await second.close()
    server.close()
    await server.wait_closed()
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leaked == []
