"""The policy thread reads the runtime's socket and answers inline; the loop steps in
only when it is late (the alarm), and hands the socket back when it is free again.

Every test here runs the real plugin against a scripted runtime over a unix socket."""

from __future__ import annotations

import asyncio
import select
import threading
import time

import pytest

from nri_plugin.alarm import Alarm
from nri_plugin.policy.api import RecordingPolicy
from nri_plugin.policy.intents import Intents, Note
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.session import TAKEOVER_AFTER, Session
from qos_model.containers import Adjustment, Container, Pod
from tests.scripted_runtime import end_plugin, metric, serve_plugin


def _pod() -> pb.PodSandbox:
    return convert.pod_to_pb(Pod(id="pod0", name="name-pod0", namespace="default", uid="u"))


def _create(cid: str = "ctr0") -> pb.CreateContainerRequest:
    ctr = convert.container_to_pb(Container(id=cid, pod_id="pod0", name=f"name-{cid}"))
    return pb.CreateContainerRequest(pod=_pod(), container=ctr)


class Annotating(RecordingPolicy):
    """Answers every CreateContainer with an annotation naming the container; waits for
    `hold` (a threading.Event) first when the container is named in `held`."""

    def __init__(self, held: frozenset[str] = frozenset(), hold_for: float = 0.0) -> None:
        super().__init__()
        self.held, self.hold_for = held, hold_for
        self.threads: set[str] = set()

    def create_container(self, pod: Pod, container: Container) -> Intents:
        self.threads.add(threading.current_thread().name)
        super().create_container(pod, container)
        if container.id in self.held:
            time.sleep(self.hold_for)
        return Intents(adjustment=Adjustment(annotations={"by-policy": container.id}))


def _annotation(payload: bytes) -> str | None:
    reply = pb.CreateContainerResponse.FromString(payload)
    return dict(reply.adjust.annotations).get("by-policy")


def _session(plugin: object) -> Session:
    session = plugin._session  # type: ignore[attr-defined]
    assert isinstance(session, Session)
    return session


async def test_a_request_is_answered_while_the_loop_is_blocked() -> None:
    """The policy thread reads, decides and writes on its own: the loop (blocked here
    for the whole exchange) takes no part in a request answered in time."""
    policy = Annotating()
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    fd = runtime.channel._writer.get_extra_info("socket").fileno()
    runtime.send("CreateContainer", _create())  # written to the socket at once
    readable, _, _ = select.select([fd], [], [], 2.0)  # the loop stays blocked meanwhile
    assert readable, "no reply while the event loop was blocked"
    reply = await runtime.next_event()
    assert _annotation(reply.payload) == "ctr0"
    assert policy.threads == {"nri-policy"}
    await end_plugin(plugin, runtime, task)


async def test_a_late_inline_request_fails_open_and_the_next_ones_are_still_served() -> None:
    """The alarm answers the late request with no change inside its budget; the loop
    reads the requests that come meanwhile (each under its own deadline, decided after
    the late call, in order); then the thread gets the socket back and answers inline."""
    policy = Annotating(held=frozenset({"slow"}), hold_for=0.4)
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    started = time.monotonic()
    slow = runtime.send("CreateContainer", _create("slow"), timeout=0.2)  # budget 0.1 s
    reply = await runtime.response(slow)
    assert time.monotonic() - started < 0.3
    assert _annotation(reply.payload) is None  # the no-change reply
    assert not _session(plugin)._thread_reads  # the loop reads while the thread is stuck
    # sent while the policy is stuck: the loop reads it, it waits for the policy thread
    # and is decided in time (its budget is 1 s, the late call ends within 0.4 s)
    queued = runtime.send("CreateContainer", _create("queued"), timeout=2.0)
    assert _annotation((await runtime.response(queued)).payload) == "queued"
    # the thread is free again: it asks for the socket back
    for _ in range(100):
        if _session(plugin)._thread_reads:
            break
        await asyncio.sleep(0.01)
    assert _session(plugin)._thread_reads
    after = runtime.send("CreateContainer", _create("after"))
    assert _annotation((await runtime.response(after)).payload) == "after"
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="deadline")
        == 1
    )
    assert [o.container.id for o in policy.observations if o.container is not None][-3:] == [
        "slow",
        "queued",
        "after",
    ]
    await end_plugin(plugin, runtime, task)


async def test_back_to_back_requests_share_one_arm_of_the_alarm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests answered in time make no system call for the alarm: the one armed for the
    first still guards the next (none goes off after theirs)."""
    plugin, runtime, task = await serve_plugin(Annotating())
    await runtime.handshake()
    arms: list[float] = []
    original = Alarm.arm_at

    def counting(self: Alarm, when: float) -> None:
        arms.append(when)
        original(self, when)

    monkeypatch.setattr(Alarm, "arm_at", counting)
    for i in range(20):
        reply = await runtime.call("CreateContainer", _create(f"c{i}"))
        assert _annotation(reply.payload) == f"c{i}"
    assert len(arms) <= 1
    await end_plugin(plugin, runtime, task)


async def test_mixed_requests_and_notifications_never_wake_the_loop_with_the_alarm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A notification is decided after its reply under the short takeover alarm; when
    that decision ends the alarm is moved out to a request's budget, so a steady stream
    of requests and notifications (longer than many TAKEOVER_AFTERs) never has the alarm
    wake the loop, and the next request need not arm it: two timerfd calls per pair."""
    went_off: list[float] = []
    timerfd_calls: list[str] = []
    original = Session._alarm_went_off
    arm_at, disarm = Alarm.arm_at, Alarm.disarm

    def counting(self: Session) -> None:
        went_off.append(time.monotonic())
        original(self)

    def counting_arm(self: Alarm, when: float) -> None:
        timerfd_calls.append("arm")
        arm_at(self, when)

    def counting_disarm(self: Alarm) -> None:
        timerfd_calls.append("disarm")
        disarm(self)

    monkeypatch.setattr(Session, "_alarm_went_off", counting)
    monkeypatch.setattr(Alarm, "arm_at", counting_arm)
    monkeypatch.setattr(Alarm, "disarm", counting_disarm)
    plugin, runtime, task = await serve_plugin(Annotating())
    await runtime.handshake()
    went_off.clear()
    timerfd_calls.clear()
    end = time.monotonic() + TAKEOVER_AFTER * 6
    n = 0
    while time.monotonic() < end:
        n += 1
        reply = await runtime.call("CreateContainer", _create(f"c{n}"))
        assert _annotation(reply.payload) == f"c{n}"
        started = pb.StateChangeEvent(
            event=pb.START_CONTAINER, pod=_pod(), container=_create(f"c{n}").container
        )
        assert (await runtime.call("StateChange", started)).code == 0
        await asyncio.sleep(0.005)  # the runtime's own work between two requests
    assert went_off == []
    assert len(timerfd_calls) <= 2 * n + 1, timerfd_calls
    await end_plugin(plugin, runtime, task)


async def test_an_alarm_armed_for_an_earlier_request_does_not_cut_a_later_one_short() -> None:
    """The alarm armed for a quick request goes off while a later one is still within
    its own budget: the loop arms it again for that request, which is answered by the
    policy (not with no change) and keeps the socket with the thread. Then, once the
    thread is free, the alarm going off does nothing."""
    policy = Annotating(held=frozenset({"later"}), hold_for=0.25)
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    quick = runtime.send("CreateContainer", _create("quick"), timeout=0.4)  # budget 0.2 s
    assert _annotation((await runtime.response(quick)).payload) == "quick"
    await asyncio.sleep(0.1)  # the alarm armed for `quick` goes off 0.1 s into `later`
    later = runtime.send("CreateContainer", _create("later"), timeout=1.0)  # budget 0.5 s
    assert _annotation((await runtime.response(later)).payload) == "later"
    session = _session(plugin)
    assert session._thread_reads
    await asyncio.sleep(0.6)  # the alarm armed again for `later` goes off: it is free
    assert session._thread_reads and session._alarm_due == 0.0
    after = runtime.send("CreateContainer", _create("after"))
    assert _annotation((await runtime.response(after)).payload) == "after"
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="deadline")
        == 0
    )
    await end_plugin(plugin, runtime, task)


async def test_a_long_background_task_hands_the_socket_to_the_loop() -> None:
    """A background decision keeps the thread from reading: past TAKEOVER_AFTER the loop
    reads, so a request that arrives meanwhile still gets its own deadline."""
    plugin, runtime, task = await serve_plugin(Annotating())
    await runtime.handshake()
    gate = threading.Event()
    background = asyncio.ensure_future(plugin.in_policy_thread(lambda: gate.wait(5)))
    await asyncio.sleep(TAKEOVER_AFTER * 2)
    assert not _session(plugin)._thread_reads
    started = time.monotonic()
    sid = runtime.send("CreateContainer", _create(), timeout=0.4)  # budget 0.2 s
    reply = await runtime.response(sid)
    assert time.monotonic() - started < 0.35  # answered (no change) though the thread is busy
    assert _annotation(reply.payload) is None
    gate.set()
    assert await background is True
    await end_plugin(plugin, runtime, task)


async def test_a_short_background_task_keeps_the_socket_with_the_thread() -> None:
    plugin, runtime, task = await serve_plugin(Annotating())
    await runtime.handshake()
    for _ in range(20):
        await plugin.in_policy_thread(lambda: None)
    assert _session(plugin)._thread_reads
    reply = await runtime.call("CreateContainer", _create())
    assert _annotation(reply.payload) == "ctr0"
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="deadline")
        == 0
    )
    await end_plugin(plugin, runtime, task)


async def test_pipelined_requests_read_at_once_are_all_answered_in_order() -> None:
    """One read can hold many requests; a late one among them leaves the rest to the
    loop, which answers each (none is lost with the thread's read)."""
    policy = Annotating(held=frozenset({"c1"}), hold_for=0.3)
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    sids = [runtime.send("CreateContainer", _create(f"c{i}"), timeout=0.4) for i in range(6)]
    replies = [await runtime.response(sid) for sid in sids]
    assert all(r.code == 0 for r in replies)
    assert _annotation(replies[0].payload) == "c0"
    assert _annotation(replies[1].payload) is None  # late: answered with no change
    decided = [o.container.id for o in policy.observations if o.container is not None]
    assert decided[-6:] == [f"c{i}" for i in range(6)]  # all decided, in order
    await end_plugin(plugin, runtime, task)


async def test_the_runtime_sees_the_end_while_the_policy_thread_is_stuck() -> None:
    """The thread holds a descriptor of the socket; closing must not wait for it."""
    release = threading.Event()

    class Stuck(RecordingPolicy):
        def create_container(self, pod: Pod, container: Container) -> Intents:
            release.wait(10)
            return Intents()

    plugin, runtime, task = await serve_plugin(Stuck())
    await runtime.handshake()
    try:
        sid = runtime.send("CreateContainer", _create(), timeout=0.2)
        await runtime.response(sid)
        plugin.stop()
        await asyncio.wait_for(runtime.ended.wait(), 2)
    finally:
        release.set()
    await asyncio.wait_for(task, 5)
    plugin.close()
    await runtime.close()


class Noting(RecordingPolicy):
    """Each CreateContainer notes its container; `rebalance` notes a loop's decision."""

    def create_container(self, pod: Pod, container: Container) -> Intents:
        super().create_container(pod, container)
        return Intents(notes=(Note("plan", container.id, "created"),))

    def rebalance(self) -> Intents:
        return Intents(notes=(Note("plan", "node", "rebalanced"),))


async def test_notes_go_to_the_sink_from_the_policy_thread_in_decision_order() -> None:
    """No loop wakeup for what the host executor takes, and a request's and a loop's
    decisions reach it in the order the policy made them."""
    policy = Noting()
    plugin, runtime, task = await serve_plugin(policy)
    seen: list[tuple[str, str]] = []
    plugin.on_intents = lambda i: seen.extend(
        (n.subject, threading.current_thread().name) for n in i.notes
    )
    await runtime.handshake()
    await runtime.call("CreateContainer", _create("a"))
    await plugin.decide(policy.rebalance, plugin.on_intents)
    await runtime.call("CreateContainer", _create("b"))
    for _ in range(100):
        if len(seen) == 3:
            break
        await asyncio.sleep(0.01)
    assert seen == [("a", "nri-policy"), ("node", "nri-policy"), ("b", "nri-policy")]
    await end_plugin(plugin, runtime, task)


async def test_without_a_timerfd_the_loop_reads_and_a_late_request_still_fails_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose seccomp profile refuses timerfd_create: round 1's path, one hop."""

    def refuse() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("nri_plugin.session.Alarm", refuse)
    policy = Annotating(held=frozenset({"slow"}), hold_for=0.4)
    plugin, runtime, task = await serve_plugin(policy)
    await runtime.handshake()
    assert not _session(plugin)._thread_reads
    reply = await runtime.call("CreateContainer", _create("fast"))
    assert _annotation(reply.payload) == "fast"
    started = time.monotonic()
    slow = runtime.send("CreateContainer", _create("slow"), timeout=0.2)
    assert _annotation((await runtime.response(slow)).payload) is None
    assert time.monotonic() - started < 0.3
    await asyncio.sleep(0.5)
    assert not _session(plugin)._thread_reads  # never handed to the thread
    await end_plugin(plugin, runtime, task)


async def test_a_bug_before_the_policy_on_the_loop_path_still_gets_a_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path a request takes when the loop reads (here: no timerfd): a bug in working
    out its budget is answered with no change, as on the inline path."""

    def refuse() -> None:
        raise PermissionError(1, "Operation not permitted")

    def broken(self: object, timeout_nano: int) -> float:
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr("nri_plugin.session.Alarm", refuse)
    plugin, runtime, task = await serve_plugin(Annotating())
    await runtime.handshake()
    monkeypatch.setattr("nri_plugin.session.Session._budget", broken)
    reply = await runtime.call("CreateContainer", _create(), timeout=1)
    assert reply.code == 0 and reply.payload == b""
    assert (
        metric(plugin.metrics, "nri_qos_fail_open", method="CreateContainer", reason="internal")
        == 1
    )
    await end_plugin(plugin, runtime, task)
