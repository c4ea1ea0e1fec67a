"""Plugin runtime behaviour against a scripted runtime over real unix sockets."""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from nri_plugin import dispatch
from nri_plugin.plugin import (
    Backoff,
    NriPlugin,
    PluginSettings,
    PluginSetupError,
    RuntimeUnavailable,
)
from nri_plugin.policy.api import PolicyBase, RecordingPolicy
from nri_plugin.policy.intents import ContainerRef, Intents, Note, Phase, SetOomScoreAdj
from nri_plugin.protocol import convert, mux, services
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import NriConnection, RequestReceived, ResponseReceived
from nri_plugin.protocol.versions import Event, infer_runtime, valid_event_mask
from qos_model.containers import Adjustment, Container, CpuResources, Pod, Resources, Update
from tests.builders import kubelet_shares
from tests.scripted_runtime import ScriptedRuntime, end_plugin, metric, serve_plugin


def _pod(pid: str = "pod0") -> pb.PodSandbox:
    return convert.pod_to_pb(Pod(id=pid, name=f"name-{pid}", namespace="default", uid="u"))


def _ctr(cid: str = "ctr0", pod: str = "pod0") -> pb.Container:
    """A Burstable container as the runtime sends it: 1 CPU requested, no limit."""
    return convert.container_to_pb(
        Container(
            id=cid,
            pod_id=pod,
            name=f"name-{cid}",
            resources=Resources(cpu=CpuResources(shares=kubelet_shares(1000))),
        )
    )


# --- configuration and subscription ------------------------------------------------------


RUNTIMES = [
    ("containerd", "v1.7.13", "", False, 0x7FF),
    ("containerd", "v1.7.27", "", True, 0x7FF),
    ("containerd", "v2.2.0", "", True, 0x3FFF),
    ("containerd", "v2.3.4", "v0.12.0", True, 0x3FFF),
    ("cri-o", "1.36.3", "", True, 0x3FFF),
    ("cri-o", "1.31.2", "", True, 0x7FF),
    ("someruntime", "9.9", "", False, 0x7FF),
    ("someruntime", "9.9", "0.0.0-unknown", True, 0x3FFF),
]


@pytest.mark.parametrize(
    ("name", "version", "nri", "timeouts", "valid"),
    RUNTIMES,
    ids=[
        f"{name} {version}{f' NRI {nri}' if nri else ''}{'' if timeouts else ', no timeouts'}"
        for name, version, nri, timeouts, _ in RUNTIMES
    ],
)
def test_subscription_fits_the_runtime(
    name: str, version: str, nri: str, timeouts: bool, valid: int
) -> None:
    runtime = infer_runtime(name, version, nri, timeouts)
    assert valid_event_mask(runtime.nri_version) == valid, runtime
    mask = dispatch.subscription_mask(dispatch.wanted_events(RecordingPolicy()), runtime)
    assert mask and mask & ~valid == 0
    assert not mask & Event.VALIDATE_CONTAINER_ADJUSTMENT.bit
    assert bool(mask & Event.UPDATE_POD_SANDBOX.bit) == (valid == 0x3FFF)
    # a policy that wants nothing the runtime knows still never sends 0
    nothing = dispatch.subscription_mask(frozenset({Event.POST_UPDATE_POD_SANDBOX}), runtime)
    assert nothing != 0


def test_settings_are_validated_with_clear_messages() -> None:
    with pytest.raises(PluginSetupError, match="exactly two digits"):
        PluginSettings(idx="5").validate()
    with pytest.raises(PluginSetupError, match="letters, digits"):
        PluginSettings(name="nri qos").validate()


def test_backoff_is_capped_exponential_and_resets() -> None:
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.at_cap
    b.reset()
    assert b.next() == 0.5
    jittery = Backoff(1.0, 8.0, jitter=0.1, rng=lambda: 1.0)
    assert jittery.next() == pytest.approx(1.1)


async def test_configure_before_register_reply_is_served() -> None:
    """containerd may send Configure before its RegisterPlugin reply (protocol doc §3.3)."""
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    reg = await runtime.expect_call("RegisterPlugin")
    cfg = await runtime.call(
        "Configure", pb.ConfigureRequest(runtime_name="containerd", runtime_version="v1.7.13")
    )
    assert cfg.code == 0 and pb.ConfigureResponse.FromString(cfg.payload).events == 0x7FF
    runtime.reply(reg)
    await asyncio.wait_for(plugin.configured.wait(), 2)
    assert plugin.runtime is not None and str(plugin.runtime.nri_version) == "v0.4.0"
    end = await end_plugin(plugin, runtime, task)
    assert end.configured  # type: ignore[attr-defined]


async def test_register_carries_name_index_and_version() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy(), name="qos", idx="07")
    registered, configured = await runtime.handshake()
    assert (registered.plugin_name, registered.plugin_idx, registered.NRI_version) == (
        "qos",
        "07",
        "v0.12.2",
    )
    assert configured.events & Event.CREATE_CONTAINER.bit
    await end_plugin(plugin, runtime, task)


async def test_refused_registration_ends_the_session_with_the_reason() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply_error(reg, 2, 'invalid plugin index "5"')
    end = await asyncio.wait_for(task, 5)
    assert not end.configured and "invalid plugin index" in end.reason
    plugin.close()
    await runtime.close()


async def test_no_configure_within_registration_timeout_ends_session() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy(), registration_timeout=0.2)
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply(reg)
    end = await asyncio.wait_for(task, 5)
    assert not end.configured and "no Configure" in end.reason
    plugin.close()
    await runtime.close()


# --- fail-open ---------------------------------------------------------------------------


class SlowPolicy(RecordingPolicy):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def create_container(self, pod: Pod, container: Container) -> Intents:
        time.sleep(self.delay)
        return Intents(
            adjustment=Adjustment(annotations={"late": "1"}),
            updates=(Update("other", Resources(cpu=CpuResources(cpus="1"))),),
            notes=(Note("plan", "late", "decided late"),),
        )


class BrokenPolicy(RecordingPolicy):
    def create_container(self, pod: Pod, container: Container) -> Intents:
        raise KeyError("boom")


async def test_late_policy_fails_open_inside_the_deadline() -> None:
    plugin, runtime, task = await serve_plugin(SlowPolicy(1.0))
    await runtime.handshake()
    started = time.monotonic()
    reply = await runtime.call(
        "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()), timeout=0.4
    )
    elapsed = time.monotonic() - started
    assert reply.code == 0
    assert pb.CreateContainerResponse.FromString(reply.payload) == pb.CreateContainerResponse()
    assert elapsed < 0.35, elapsed  # budget = half of the 0.4 s the runtime gave us
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="deadline")
        == 1
    )
    await end_plugin(plugin, runtime, task)


async def test_raising_policy_fails_open_logs_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    plugin, runtime, task = await serve_plugin(BrokenPolicy())
    await runtime.handshake()
    with caplog.at_level(logging.ERROR, "nri_qos.plugin"):
        reply = await runtime.call(
            "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr())
        )
    assert reply.code == 0 and reply.payload == b""
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="error") == 1
    )
    assert "policy raised KeyError" in caplog.text
    await end_plugin(plugin, runtime, task)


async def test_undecodable_payload_fails_open() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    sid = runtime.send_payload("nri.pkg.api.v1alpha1.Plugin", "CreateContainer", b"\x0a\xff\xff")
    reply = await runtime.response(sid)
    assert reply.code == 0
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="decode") == 1
    )
    await end_plugin(plugin, runtime, task)


async def test_failed_configure_still_subscribes_safely() -> None:
    class BadConfigure(RecordingPolicy):
        def configure(self, runtime: object, config: str) -> None:  # type: ignore[override]
            raise RuntimeError("bad config")

    plugin, runtime, task = await serve_plugin(BadConfigure())
    _, configured = await runtime.handshake()
    assert configured.events != 0 and configured.events & ~0x3FFF == 0
    assert not configured.events & Event.VALIDATE_CONTAINER_ADJUSTMENT.bit
    await end_plugin(plugin, runtime, task)


async def test_unknown_methods_and_services_get_unimplemented() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    reply = await runtime.call("NoSuchMethod", pb.Empty())
    assert (reply.code, reply.message) == (12, "method NoSuchMethod")
    sid = runtime.send_payload("some.Other", "Configure", b"", timeout=0)
    other = await runtime.response(sid)
    assert (other.code, other.message) == (12, "service some.Other")
    await end_plugin(plugin, runtime, task)


# --- events ------------------------------------------------------------------------------


async def test_notifications_arrive_the_same_via_statechange_and_dedicated_rpcs() -> None:
    policy = RecordingPolicy()
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    await runtime.call("RunPodSandbox", pb.RunPodSandboxRequest(pod=_pod("p1")))
    await runtime.call("StateChange", pb.StateChangeEvent(event=pb.RUN_POD_SANDBOX, pod=_pod("p2")))
    await runtime.call(
        "StartContainer", pb.StartContainerRequest(pod=_pod("p1"), container=_ctr("c1", "p1"))
    )
    await runtime.call(
        "StateChange",
        pb.StateChangeEvent(event=pb.START_CONTAINER, pod=_pod("p2"), container=_ctr("c2", "p2")),
    )
    await runtime.call(
        "RemoveContainer", pb.RemoveContainerRequest(pod=_pod("p1"), container=_ctr("c1", "p1"))
    )
    await plugin.in_policy_thread(lambda: None)  # notifications are decided after the reply
    seen = [
        (o.event, o.pod.id if o.pod else None, o.container.id if o.container else None)
        for o in policy.observations[2:]
    ]
    assert seen == [
        ("RunPodSandbox", "p1", None),
        ("RunPodSandbox", "p2", None),
        ("StartContainer", "p1", "c1"),
        ("StartContainer", "p2", "c2"),
        ("RemoveContainer", "p1", "c1"),
    ]
    await end_plugin(plugin, runtime, task)


class AdjustingPolicy(RecordingPolicy):
    """Pins new containers and asks for a deferred change of an existing one."""

    def create_container(self, pod: Pod, container: Container) -> Intents:
        super().create_container(pod, container)
        return Intents(
            adjustment=Adjustment(
                resources=Resources(cpu=CpuResources(cpus="0", mems="0")), oom_score_adj=900
            ),
            reply_updates=(Update("other", Resources(cpu=CpuResources(shares=2))),),
            updates=(Update("old", Resources(cpu=CpuResources(cpus="1"))),),
        )


async def test_adjustment_updates_and_deferred_update_containers_after_reply() -> None:
    plugin, runtime, task = await serve_plugin(AdjustingPolicy())
    await runtime.handshake()
    frames_before = len(runtime.raw_frames)
    sid = runtime.send("CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()))
    first = await runtime.next_event()
    second = await runtime.next_event()
    # the reply is written before the UpdateContainers call starts
    assert isinstance(first, ResponseReceived) and first.stream_id == sid
    assert isinstance(second, RequestReceived) and second.method == "UpdateContainers"
    conns = [conn for conn, _ in runtime.raw_frames[frames_before:]]
    assert conns[:2] == [mux.PLUGIN_SERVICE_CONN, mux.RUNTIME_SERVICE_CONN]
    reply = pb.CreateContainerResponse.FromString(first.payload)
    assert reply.adjust.linux.resources.cpu.cpus == "0"
    assert reply.adjust.linux.resources.cpu.mems == "0"
    assert reply.adjust.linux.oom_score_adj.value == 900
    assert [u.container_id for u in reply.update] == ["other"]
    assert reply.update[0].linux.resources.cpu.shares.value == 2
    req = pb.UpdateContainersRequest.FromString(second.payload)
    assert [(u.container_id, u.linux.resources.cpu.cpus) for u in req.update] == [("old", "1")]
    runtime.reply(second, pb.UpdateContainersResponse())
    await asyncio.sleep(0.05)
    assert metric(plugin.metrics, "nri_qos_update_containers", result="ok") == 1
    await end_plugin(plugin, runtime, task)


class SyncPolicy(RecordingPolicy):
    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        super().synchronize(pods, containers)
        updates = tuple(Update(c.id, Resources(cpu=CpuResources(cpus="0"))) for c in containers)
        return Intents(reply_updates=updates)


async def test_split_synchronize_is_collected_and_answered_once() -> None:
    policy = SyncPolicy()
    plugin, runtime, task = await serve_plugin(policy)
    reg = await runtime.expect_call("RegisterPlugin")
    runtime.reply(reg)
    await runtime.call(
        "Configure",
        pb.ConfigureRequest(
            runtime_name="containerd",
            runtime_version="v2.3.4",
            NRI_version="v0.12.0",
            request_timeout=2000,
            registration_timeout=5000,
        ),
    )
    chunks = [
        pb.SynchronizeRequest(pods=[_pod("p1")], containers=[_ctr("c1", "p1")], more=True),
        pb.SynchronizeRequest(pods=[_pod("p2")], containers=[_ctr("c2", "p2")], more=True),
        pb.SynchronizeRequest(pods=[_pod("p3")], containers=[_ctr("c3", "p3")], more=False),
    ]
    replies = [
        pb.SynchronizeResponse.FromString((await runtime.call("Synchronize", c)).payload)
        for c in chunks
    ]
    assert [r.more for r in replies] == [True, True, False]
    assert [len(r.update) for r in replies] == [0, 0, 3]
    syncs = [o for o in policy.observations if o.event == "Synchronize"]
    assert len(syncs) == 1 and syncs[0].detail == {"pods": 3, "containers": 3}
    await end_plugin(plugin, runtime, task)


async def test_shutdown_is_answered_then_the_session_ends() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    reply = await runtime.call("Shutdown", pb.Empty())
    assert reply.code == 0 and reply.payload == b""
    end = await asyncio.wait_for(task, 5)
    assert "Shutdown" in end.reason  # type: ignore[attr-defined]
    plugin.close()
    await runtime.close()


async def test_policy_runs_in_one_thread_one_call_at_a_time() -> None:
    threads: set[str] = set()

    class ThreadSpy(RecordingPolicy):
        def run_pod(self, pod: Pod) -> None:
            threads.add(threading.current_thread().name)
            super().run_pod(pod)

    plugin, runtime, task = await serve_plugin(ThreadSpy())
    await runtime.handshake()
    sids = [
        runtime.send("RunPodSandbox", pb.RunPodSandboxRequest(pod=_pod(f"p{i}"))) for i in range(20)
    ]
    got = [await runtime.next_event() for _ in sids]
    assert sorted(e.stream_id for e in got) == sids
    await plugin.in_policy_thread(lambda: None)  # notifications are decided after the reply
    assert len(threads) == 1 and next(iter(threads)).startswith("nri-policy")
    await end_plugin(plugin, runtime, task)


# --- connecting and reconnecting ---------------------------------------------------------


async def test_missing_socket_gives_an_actionable_error(tmp_path: Path) -> None:
    plugin = NriPlugin(RecordingPolicy(), PluginSettings(socket_path=tmp_path / "nri.sock"))
    with pytest.raises(RuntimeUnavailable) as info:
        await plugin.run(wait_for_runtime=False)
    text = str(info.value)
    assert "does not exist" in text and 'plugins."io.containerd.nri.v1.nri"' in text
    assert "disable = false" in text
    plugin.close()


async def test_refused_socket_gives_an_actionable_error(tmp_path: Path) -> None:
    import socket as pysocket

    path = tmp_path / "nri.sock"
    s = pysocket.socket(pysocket.AF_UNIX)
    s.bind(str(path))  # bound but not listening: connect() is refused
    plugin = NriPlugin(RecordingPolicy(), PluginSettings(socket_path=path))
    with pytest.raises(RuntimeUnavailable, match="refused"):
        await plugin.run(wait_for_runtime=False)
    s.close()
    plugin.close()


async def test_reconnects_with_backoff_and_resynchronizes(tmp_path: Path) -> None:
    path = tmp_path / "nri.sock"
    sessions: list[ScriptedRuntime] = []
    accepted = asyncio.Queue[ScriptedRuntime]()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rt = ScriptedRuntime(reader, writer)
        sessions.append(rt)
        await accepted.put(rt)

    class Counting(RecordingPolicy):
        disconnects = 0

        def disconnected(self) -> None:
            Counting.disconnects += 1

    policy = Counting()
    plugin = NriPlugin(
        policy, PluginSettings(socket_path=path, backoff_initial=0.05, backoff_max=0.2)
    )
    # The runtime is not up yet: the plugin must keep trying.
    runner = asyncio.create_task(plugin.run())
    await asyncio.sleep(0.15)
    server = await asyncio.start_unix_server(on_connect, path=str(path))
    first = await asyncio.wait_for(accepted.get(), 5)
    await first.handshake(pods=[_pod("p1")], containers=[_ctr("c1", "p1")])
    await first.close()  # runtime restarts
    second = await asyncio.wait_for(accepted.get(), 5)
    reg = await second.expect_call("RegisterPlugin")
    assert reg.stream_id == 1  # a fresh connection starts its stream ids again
    second.reply(reg)
    await second.call(
        "Configure", pb.ConfigureRequest(runtime_name="containerd", runtime_version="v2.3.4")
    )
    await second.call("Synchronize", pb.SynchronizeRequest(pods=[_pod("p1")]))
    syncs = [o for o in policy.observations if o.event == "Synchronize"]
    assert [s.detail["pods"] for s in syncs] == [1, 1]
    assert Counting.disconnects == 1
    assert metric(plugin.metrics, "nri_qos_runtime_connections", outcome="unavailable") >= 1
    plugin.stop()
    await asyncio.wait_for(runner, 5)
    plugin.close()
    for rt in sessions:
        await rt.close()
    server.close()


class HostWriter(RecordingPolicy):
    """Asks for a host write and notes something on every pod start."""

    def run_pod(self, pod: Pod) -> Intents:
        super().run_pod(pod)
        ref = ContainerRef("ctr", "default/p/ctr", pod.id, "/kubepods/ctr", 7)
        intent = SetOomScoreAdj(phase=Phase.POST_UPDATE, container=ref, reason="band", value=9)
        return Intents(host=(intent,), notes=(Note("plan", pod.id, "pod seen"),))


async def test_host_intents_and_notes_go_to_the_sink_after_the_reply() -> None:
    seen: list[Intents] = []
    plugin, runtime, task = await serve_plugin(HostWriter())
    plugin.on_intents = seen.append
    await runtime.handshake()
    await runtime.call("RunPodSandbox", pb.RunPodSandboxRequest(pod=_pod()))
    async with asyncio.timeout(2):  # a notification is decided after its reply
        while not seen:
            await asyncio.sleep(0.005)
    (intents,) = seen  # Configure and Synchronize asked for nothing: not delivered
    assert [h.domain for h in intents.host] == ["oom"]
    assert [n.message for n in intents.notes] == ["pod seen"]
    await end_plugin(plugin, runtime, task)


def test_the_subscription_is_derived_from_the_hooks_a_policy_overrides() -> None:
    class OnlyCreates(PolicyBase):
        def create_container(self, pod: Pod, container: Container) -> Intents:
            return Intents()

    assert dispatch.wanted_events(OnlyCreates()) == {Event.CREATE_CONTAINER}
    assert dispatch.wanted_events(PolicyBase()) == frozenset()
    assert dispatch.wanted_events(RecordingPolicy()) == frozenset(dispatch.HOOK_EVENTS.values())
    assert dispatch.wanted_events(HostWriter()) == dispatch.wanted_events(RecordingPolicy())
    # every hook of PolicyBase is in the table, so a new hook cannot be forgotten
    hooks = {
        name
        for name in vars(PolicyBase)
        if not name.startswith("_")
        and name not in ("configure", "synchronize", "disconnected", "name", "unneeded_hooks")
    }
    assert hooks == set(dispatch.HOOK_EVENTS)


def test_post_start_is_subscribed_only_when_something_happens_after_start() -> None:
    """PostStartContainer costs a round trip on every container start (issue 12): the qos
    policy asks for it only where the runtime cannot do the work at creation."""
    from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
    from nri_plugin.policy.engine import Engine, EngineConfig
    from nri_plugin.policy.qos_policy import QosPolicy
    from nri_plugin.policy.workload import PlannerConfig
    from nri_plugin.protocol.versions import infer_runtime
    from tests.policy.sysfs_builder import MachineShape

    topo = MachineShape().expected_topology()
    new = infer_runtime("containerd", "v2.3.4", "v0.12.0", True)
    old = infer_runtime("containerd", "v1.7.13", "", False)

    def policy(support: HostSupport) -> QosPolicy:
        planner = PlannerConfig(isolation=IsolationConfig(host=support))
        return QosPolicy(Engine(topo, EngineConfig(planner=planner)))

    on = Backend(True, "started")
    quiet = policy(HostSupport(rdt=on, io=on, io_via_runtime=True))
    assert Event.POST_START_CONTAINER not in dispatch.wanted_events(quiet, new)
    assert Event.CREATE_CONTAINER in dispatch.wanted_events(quiet, new)
    assert Event.POST_START_CONTAINER in dispatch.wanted_events(quiet, old)  # oom after start
    shaped = policy(HostSupport(net=on))  # classification needs the running container
    assert Event.POST_START_CONTAINER in dispatch.wanted_events(shaped, new)
    v1_io = policy(HostSupport(io=on))  # blkio written by us after start
    assert Event.POST_START_CONTAINER in dispatch.wanted_events(v1_io, new)


async def test_a_late_policy_call_still_sends_what_it_asked_of_other_containers() -> None:
    notes: list[Intents] = []
    plugin, runtime, task = await serve_plugin(SlowPolicy(0.5))
    plugin.on_intents = notes.append
    await runtime.handshake()
    reply = await runtime.call(
        "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()), timeout=0.4
    )
    assert pb.CreateContainerResponse.FromString(reply.payload) == pb.CreateContainerResponse()
    update = await runtime.expect_call("UpdateContainers", timeout=3)
    request = pb.UpdateContainersRequest.FromString(update.payload)
    assert [u.container_id for u in request.update] == ["other"]
    runtime.reply(update, pb.UpdateContainersResponse())
    assert [n.message for i in notes for n in i.notes] == ["decided late"]
    await end_plugin(plugin, runtime, task)


# --- input errors, internal errors and bounds -------------------------------------------


CONFIGURE = services.PLUGIN_METHODS["Configure"]


def test_an_undecodable_configure_fails_open_to_the_policys_events_for_any_runtime() -> None:
    class CreatesAndUpdatesPods(PolicyBase):
        def create_container(self, pod: Pod, container: Container) -> Intents:
            return Intents()

        def update_pod(
            self, pod: Pod, overhead: Resources | None, resources: Resources | None
        ) -> Intents:
            return Intents()

    outcome = dispatch.fail_open(CONFIGURE, None, CreatesAndUpdatesPods())
    # UPDATE_POD_SANDBOX (v0.10) is left out: a v0.4 runtime would refuse the whole mask
    assert outcome.events == Event.CREATE_CONTAINER.bit
    assert pb.ConfigureResponse.FromString(outcome.reply.SerializeToString()).events == (
        Event.CREATE_CONTAINER.bit
    )
    assert outcome.runtime == dispatch.UNKNOWN_RUNTIME
    assert str(outcome.runtime.nri_version) == "v0.4.0"
    recording = dispatch.fail_open(CONFIGURE, None, RecordingPolicy())
    assert recording.events == valid_event_mask(dispatch.UNKNOWN_RUNTIME.nri_version) == 0x7FF


def test_sync_collector_bounds_drop_the_partial_state() -> None:
    chunk = pb.SynchronizeRequest(pods=[_pod()], containers=[_ctr()], more=True)
    by_chunks = dispatch.SyncCollector(max_chunks=2)
    assert not by_chunks.add(chunk) and not by_chunks.add(chunk)
    with pytest.raises(dispatch.SyncOverflow, match="past 2 chunks") as info:
        by_chunks.add(chunk)
    assert info.value.limit == "sync_chunks"
    assert (by_chunks.chunks, by_chunks.pods, by_chunks.containers) == (0, [], [])
    by_objects = dispatch.SyncCollector(max_objects=3)
    assert not by_objects.add(chunk)
    with pytest.raises(dispatch.SyncOverflow, match="past 3 pods and containers") as info:
        by_objects.add(chunk)
    assert info.value.limit == "sync_objects" and by_objects.chunks == 0
    # within the bounds, the last chunk ends the exchange as before
    assert dispatch.SyncCollector(max_chunks=1).add(pb.SynchronizeRequest())


def test_connection_limits_are_validated() -> None:
    with pytest.raises(PluginSetupError, match="write_high_water"):
        PluginSettings(write_high_water=2 << 20, write_buffer_max=1 << 20).validate()
    with pytest.raises(PluginSetupError, match="max_handlers"):
        PluginSettings(max_requests_in_flight=0).validate()
    with pytest.raises(PluginSetupError, match="sync_max_chunks"):
        PluginSettings(sync_max_chunks=0).validate()


async def test_an_undecodable_request_logs_one_line_and_its_traceback_only_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    with caplog.at_level(logging.INFO, "nri_qos.plugin"):
        sid = runtime.send_payload(services.PLUGIN_SERVICE, "CreateContainer", b"\x0a\xff\xff")
        assert (await runtime.response(sid)).code == 0
    (record,) = [r for r in caplog.records if "not a valid" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        f"CreateContainer on stream {sid}: CreateContainer: payload is not a valid "
        "CreateContainerRequest; replying with no change"
    )
    caplog.clear()
    with caplog.at_level(logging.DEBUG, "nri_qos.plugin"):
        sid = runtime.send_payload(services.PLUGIN_SERVICE, "CreateContainer", b"\x0a\xff\xff")
        assert (await runtime.response(sid)).code == 0
    (record,) = [r for r in caplog.records if "not a valid" in r.getMessage()]
    assert record.exc_info is not None  # the decoder's own words, for whoever debugs it
    await end_plugin(plugin, runtime, task)


async def test_a_policy_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    plugin, runtime, task = await serve_plugin(BrokenPolicy())
    await runtime.handshake()
    with caplog.at_level(logging.ERROR, "nri_qos.plugin"):
        await runtime.call(
            "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr())
        )
    (record,) = [r for r in caplog.records if "policy raised" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    await end_plugin(plugin, runtime, task)


async def test_a_bug_before_the_policy_is_called_still_gets_a_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()

    def broken(self: object, timeout_nano: int) -> float:
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr("nri_plugin.session.Session._budget", broken)
    started = time.monotonic()
    reply = await runtime.call(
        "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr())
    )
    assert reply.code == 0 and reply.payload == b""
    assert time.monotonic() - started < 1.0  # half the runtime's 2 s deadline
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="internal")
        == 1
    )
    await end_plugin(plugin, runtime, task)


async def test_a_failure_while_encoding_the_reply_still_gets_a_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin, runtime, task = await serve_plugin(AdjustingPolicy())
    await runtime.handshake()
    original = NriConnection.send_response
    calls: list[int] = []

    def fails_once(self: NriConnection, stream_id: int, payload: bytes = b"") -> bytes:
        calls.append(stream_id)
        if len(calls) == 1:
            raise RuntimeError("a bug of ours")
        return original(self, stream_id, payload)

    monkeypatch.setattr(NriConnection, "send_response", fails_once)
    sid = runtime.send("CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()))
    reply = await runtime.response(sid)
    # the fail-open reply: no adjustment, and the connection goes on
    assert reply.code == 0 and reply.payload == b""
    assert calls == [sid, sid]
    update = await runtime.expect_call("UpdateContainers")  # what it asked of others stands
    runtime.reply(update, pb.UpdateContainersResponse())
    await end_plugin(plugin, runtime, task)


# --- one thread hop: the policy thread writes its own reply ------------------------------


class LoopBlockingPolicy(RecordingPolicy):
    """Blocks the event loop while it decides, and keeps it blocked until the runtime's
    end of the socket becomes readable (or 2 s pass): only a reply written by the
    policy thread itself can arrive while the loop cannot run."""

    def __init__(self, runtime_fd: int) -> None:
        super().__init__()
        self.runtime_fd = runtime_fd
        self.loop: asyncio.AbstractEventLoop | None = None
        self.arrived_while_blocked: bool | None = None

    def create_container(self, pod: Pod, container: Container) -> Intents:
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            readable, _, _ = select.select([self.runtime_fd], [], [], 2.0)
            self.arrived_while_blocked = bool(readable)

        assert self.loop is not None
        self.loop.call_soon_threadsafe(block)
        blocked.wait(2.0)
        return Intents(adjustment=Adjustment(annotations={"decided": "in time"}))


async def test_the_policy_thread_writes_its_reply_without_waiting_for_the_loop() -> None:
    plugin, runtime, task = await serve_plugin(RecordingPolicy())
    await runtime.handshake()
    fd = runtime.channel._writer.get_extra_info("socket").fileno()
    policy = LoopBlockingPolicy(fd)
    policy.loop = asyncio.get_running_loop()
    plugin.policy = policy
    reply = await runtime.call(
        "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr())
    )
    assert dict(pb.CreateContainerResponse.FromString(reply.payload).adjust.annotations) == {
        "decided": "in time"
    }
    assert policy.arrived_while_blocked is True
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="deadline")
        == 0
    )
    await end_plugin(plugin, runtime, task)


async def test_a_late_policy_reply_is_dropped_after_the_fail_open_one() -> None:
    """The deadline and the policy thread race for the same request: exactly one reply."""
    plugin, runtime, task = await serve_plugin(SlowPolicy(0.3))
    await runtime.handshake()
    sid = runtime.send(
        "CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()), timeout=0.2
    )
    reply = await runtime.response(sid)
    assert pb.CreateContainerResponse.FromString(reply.payload) == pb.CreateContainerResponse()
    update = await runtime.expect_call("UpdateContainers", timeout=3)  # the late call ended
    runtime.reply(update, pb.UpdateContainersResponse())
    # a second reply on the same stream (written before the update) counts as late
    assert runtime.conn.stats.late_responses == 0
    await end_plugin(plugin, runtime, task)


class GatedStartPolicy(RecordingPolicy):
    """Decides StartContainer only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def start_container(self, pod: Pod, container: Container) -> Intents:
        assert self.gate.wait(5)
        super().start_container(pod, container)
        return Intents(updates=(Update("other", Resources(cpu=CpuResources(cpus="1"))),))


async def test_a_notification_is_answered_before_the_policy_decides_it() -> None:
    """Its reply is empty whatever the policy decides: written at once, decided after,
    in order with the requests that follow; what it asks of others still goes out."""
    policy = GatedStartPolicy()
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    reply = await runtime.call(
        "StartContainer", pb.StartContainerRequest(pod=_pod(), container=_ctr("c1")), timeout=1
    )
    assert reply.code == 0 and reply.payload == b""
    assert [o.event for o in policy.observations[2:]] == []  # not decided yet
    sid = runtime.send("CreateContainer", pb.CreateContainerRequest(pod=_pod(), container=_ctr()))
    policy.gate.set()
    # Start's UpdateContainers goes out when Start is decided: before or after the reply
    # to the CreateContainer queued behind it
    first, second = await runtime.next_event(3), await runtime.next_event(3)
    (reply_event,) = [e for e in (first, second) if isinstance(e, ResponseReceived)]
    (update,) = [e for e in (first, second) if isinstance(e, RequestReceived)]
    assert reply_event.stream_id == sid and update.method == "UpdateContainers"
    runtime.reply(update, pb.UpdateContainersResponse())
    assert [o.event for o in policy.observations[2:]] == ["StartContainer", "CreateContainer"]
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="StartContainer", reason="deadline") == 0
    )
    await end_plugin(plugin, runtime, task)


def test_every_event_the_qos_policy_subscribes_to_says_why() -> None:
    """A subscribed event is a synchronous round trip on a pod's path: each hook the qos
    policy overrides names the decision that needs it, and no reason is left over."""
    from nri_plugin.policy.qos_policy import QosPolicy

    overridden = {
        hook
        for hook in dispatch.HOOK_EVENTS
        if getattr(QosPolicy, hook) is not getattr(PolicyBase, hook)
    }
    assert overridden == set(QosPolicy.EVENT_REASONS)
    assert all(len(why) > 40 for why in QosPolicy.EVENT_REASONS.values())


def test_the_recording_policy_keeps_its_latest_observations_only() -> None:
    """As a daemon's no-op policy it sees every container of the node for as long as the
    node runs: its record is bounded, newest last."""
    policy = RecordingPolicy(keep=5)
    for i in range(23):
        policy.run_pod(Pod(id=f"p{i}"))
    kept = [o.pod.id for o in policy.observations if o.pod is not None]
    assert 5 <= len(kept) <= 10
    assert kept == [f"p{i}" for i in range(23 - len(kept), 23)]
