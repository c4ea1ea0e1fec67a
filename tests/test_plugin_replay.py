"""Replay what real runtimes sent to a Go plugin, byte for byte, at our plugin.

For every recorded runtime->plugin message the plugin must answer the way a real
runtime accepts: a Response on the same mux conn and stream id, flags 0, no error status,
the right message type, a Configure mask that is non-zero and within the runtime's valid
events, Synchronize `more` echoed. The policy must see the pods and containers exactly
as the runtime described them.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.api import RecordingPolicy
from nri_plugin.protocol import mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.versions import VALID_EVENTS_LEGACY, VALID_EVENTS_V0_10
from qos_model.containers import ContainerState
from tests.captures import SESSIONS, TO_PLUGIN, Session, session_id
from tests.scripted_runtime import metric_total

VALID = {
    "containerd-1.7.13": VALID_EVENTS_LEGACY,
    "containerd-2.3.4": VALID_EVENTS_V0_10,
    "cri-o-1.36.3": VALID_EVENTS_V0_10,
}


class _Wire:
    """Test-side reader of the plugin's output: whole ttrpc messages per mux conn."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.mux = mux.MuxReader([1, 2])
        self.frames = {1: ttrpc.FrameReader(), 2: ttrpc.FrameReader()}
        self.queue: list[tuple[int, ttrpc.Frame]] = []

    async def next(self, timeout: float = 5.0) -> tuple[int, ttrpc.Frame]:
        while not self.queue:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            assert data, "plugin closed the connection"
            for conn, chunk in self.mux.feed(data):
                for frame in self.frames[conn].feed(chunk):
                    assert isinstance(frame, ttrpc.Frame)
                    self.queue.append((conn, frame))
        return self.queue.pop(0)


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
async def test_plugin_answers_recorded_runtime_traffic(session: Session) -> None:
    a, b = socket.socketpair()
    policy = RecordingPolicy()
    plugin = NriPlugin(policy, PluginSettings(name="nri-qos", idx="50"))
    p_reader, p_writer = await asyncio.open_unix_connection(sock=b)
    serving = asyncio.create_task(plugin.serve(p_reader, p_writer))
    r_reader, r_writer = await asyncio.open_unix_connection(sock=a)
    wire = _Wire(r_reader)

    conn, reg = await wire.next()
    assert conn == mux.RUNTIME_SERVICE_CONN and reg.stream_id == 1
    env = ttrpc_pb2.Request.FromString(reg.data)
    assert (env.service, env.method) == (services.RUNTIME_SERVICE, "RegisterPlugin")
    assert 0 < env.timeout_nano <= 5_000_000_000
    registered = pb.RegisterPluginRequest.FromString(env.payload)
    assert (registered.plugin_name, registered.plugin_idx) == ("nri-qos", "50")

    answered = 0
    for msg in session.messages:
        if msg.direction != TO_PLUGIN:
            continue
        r_writer.write(mux.encode_message(msg.conn, msg.raw))
        if msg.ttrpc_type != ttrpc.MessageType.REQUEST:
            continue  # the runtime's reply to RegisterPlugin
        conn, frame = await wire.next()
        assert conn == msg.conn == mux.PLUGIN_SERVICE_CONN
        assert (frame.stream_id, frame.type, frame.flags) == (msg.stream_id, 2, 0)
        req = ttrpc_pb2.Request.FromString(msg.data)
        resp = ttrpc_pb2.Response.FromString(frame.data)
        assert not resp.HasField("status"), f"{req.method}: {resp.status}"
        method = services.lookup(req.service, req.method)
        assert method is not None
        reply = method.response.FromString(resp.payload)
        if isinstance(reply, pb.ConfigureResponse):
            assert reply.events != 0
            assert reply.events & ~VALID[session.runtime] == 0, hex(reply.events)
            assert reply.events & pb.CREATE_CONTAINER
        if isinstance(reply, pb.SynchronizeResponse):
            assert reply.more == pb.SynchronizeRequest.FromString(req.payload).more
        if isinstance(reply, pb.CreateContainerResponse):
            assert not reply.HasField("adjust") and not reply.update  # recording policy
        answered += 1

    assert answered == sum(
        1 for m in session.messages if m.direction == TO_PLUGIN and m.ttrpc_type == 1
    )
    assert metric_total(plugin.metrics, "nri_qos_fail_open") == 0  # nothing failed open
    assert metric_total(plugin.metrics, "nri_qos_requests") == answered
    r_writer.close()
    end = await asyncio.wait_for(serving, 5)
    assert end.configured
    plugin.close()
    _check_observations(session, policy)


def _check_observations(session: Session, policy: RecordingPolicy) -> None:
    seen = [o.event for o in policy.observations]
    assert seen[0] == "Configure" and seen[1] == "Synchronize"
    assert policy.observations[1].detail == {"pods": 1, "containers": 1}
    runtime = policy.observations[0].detail
    assert runtime["runtime"] == session.runtime.rsplit("-", 1)[0]
    creates = [o for o in policy.observations if o.event == "CreateContainer"]
    assert len(creates) == 1
    create = creates[0]
    assert create.pod is not None and create.container is not None
    assert (create.pod.name, create.pod.namespace) == ("nri-demo", "nri-test")
    assert create.pod.uid == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert create.pod.annotations["harness.test/unicode"] == "héllo ✓"
    assert create.pod.annotations["harness.test/empty"] == ""
    ctr = create.container
    assert ctr.name == "workload"
    assert ctr.annotations["harness.test/ctr-annotation"] == "world"
    assert ctr.resources is not None and ctr.resources.cpu is not None
    assert (ctr.resources.cpu.shares, ctr.resources.cpu.quota, ctr.resources.cpu.period) == (
        512,
        50_000,
        100_000,
    )
    assert ctr.resources.memory is not None and ctr.resources.memory.limit == 128 << 20
    assert ctr.oom_score_adj == 500
    assert ctr.cgroups_path.startswith("/harness/pod")
    updates = [o for o in policy.observations if o.event == "UpdateContainer"]
    if updates:
        requested = updates[0].detail["requested"]
        assert requested.cpu.shares == 256 and requested.cpu.quota == 25_000  # type: ignore[attr-defined]
        assert requested.memory.limit == 96 << 20  # type: ignore[attr-defined]
    stops = [o for o in policy.observations if o.event == "StopContainer"]
    assert stops and all(o.container is not None for o in stops)
    if session.runtime != "containerd-1.7.13":
        assert all(o.container.state is ContainerState.STOPPED for o in stops)  # type: ignore[union-attr]
    # every container event names a container of a pod we were told about
    for o in policy.observations:
        if o.container is not None:
            assert o.pod is not None and o.container.pod_id == o.pod.id
