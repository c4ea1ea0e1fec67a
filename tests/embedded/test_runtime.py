"""The embedded runtime over real unix sockets: registration, events, failures, updates.

Each test drives `EmbeddedRuntime` with `FakePlugin`s (or raw bytes) and checks the
behaviour docs/nri-protocol.md documents for real runtimes, and that the runtime
stays usable for other plugins whatever one plugin does.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from google.protobuf.message import Message

from embedded_runtime import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    CRIO_1_36,
    EmbeddedRuntime,
    InMemoryBackend,
    InvalidOperationError,
    Outcome,
    OwnershipConflictError,
    PluginFailedOperationError,
    PluginState,
    ValidationRejectedError,
)
from embedded_runtime.errors import AdjustmentError
from nri_plugin.protocol import mux
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.versions import VALID_EVENTS_V0_10, Event, event_mask
from qos_model import containers as model
from tests.embedded.conftest import MakeRuntime, container, pod
from tests.embedded.fakeplugin import (
    CORE_EVENTS,
    NO_REPLY,
    Error,
    FakePlugin,
    Result,
    late,
    reply,
)

SHORT = 0.3  # request/registration timeout where a test waits for one to expire


async def connect(
    runtime: EmbeddedRuntime, plugins: list[FakePlugin], plugin: FakePlugin, ready: int = 1
) -> FakePlugin:
    plugins.append(plugin)
    await plugin.connect(runtime.socket_path)
    await runtime.wait_for_plugins(ready, timeout=5)
    return plugin


def adjust(**annotations: str) -> pb.CreateContainerResponse:
    response = pb.CreateContainerResponse()
    response.adjust.annotations.update(annotations)
    return response


def cpu_shares_adjustment(shares: int) -> pb.CreateContainerResponse:
    response = pb.CreateContainerResponse()
    response.adjust.linux.resources.cpu.shares.value = shares
    return response


# --- registration and configuration ------------------------------------------------------


async def test_registered_plugin_is_configured_and_synchronized(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(request_timeout=2.0, registration_timeout=5.0)
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    plugin = await connect(runtime, plugins, FakePlugin())
    assert plugin.register_reply is not None and plugin.register_reply.code == 0
    assert plugin.methods() == ["Configure", "Synchronize"]
    (configure,) = plugin.requests("Configure")
    assert configure == pb.ConfigureRequest(
        runtime_name="containerd",
        runtime_version="v2.3.4",
        registration_timeout=5000,
        request_timeout=2000,
        NRI_version="v0.12.0",
    )
    (sync,) = plugin.requests("Synchronize")
    assert isinstance(sync, pb.SynchronizeRequest)
    assert [p.id for p in sync.pods] == ["pod0"]
    assert [(c.id, c.state) for c in sync.containers] == [("c0", pb.CONTAINER_RUNNING)]
    (info,) = runtime.plugins
    assert (info.full_name, info.state, info.events) == ("10-fake", PluginState.READY, CORE_EVENTS)
    assert info.external and info.pid is not None and info.nri_version == "v0.12.0"


async def test_plugin_that_never_registers_times_out_and_delays_the_next_one(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(registration_timeout=SHORT)
    silent = FakePlugin("silent", "01")
    plugins.append(silent)
    await silent.connect(runtime.socket_path, register=False)
    started = time.monotonic()
    good = await connect(runtime, plugins, FakePlugin("good", "02"))
    # One-at-a-time accept loop: "good" was served only after "silent" timed out.
    assert time.monotonic() - started >= SHORT * 0.9
    await silent.wait_eof()
    states = {p.name or "?": p.state for p in runtime.plugins}
    assert states == {"?": PluginState.CLOSED, "good": PluginState.READY}
    assert "registration timed out" in runtime.plugins[0].close_reason
    assert good.methods() == ["Configure", "Synchronize"]


@pytest.mark.parametrize(
    ("flavor", "name", "idx", "error"),
    [
        (CONTAINERD_2_3, "logger", "1", 'invalid plugin index "1", must be 2 digits'),
        (CONTAINERD_2_3, "logger", "1x", 'invalid plugin index "1x" (not [0-9][0-9])'),
        (CONTAINERD_2_3, "bad name", "10", "contains invalid character ' '"),
        (CONTAINERD_2_3, "", "10", "name is empty"),
        (CONTAINERD_1_7, "", "10", "invalid (empty) plugin name"),
        (CONTAINERD_1_7, "logger", "100", "must be 2 digits"),
    ],
    ids=[
        "containerd 2.3.4: one-digit index",
        "containerd 2.3.4: non-digit index",
        "containerd 2.3.4: space in the name",
        "containerd 2.3.4: empty name",
        "containerd 1.7.13: empty name",
        "containerd 1.7.13: three-digit index",
    ],
)
async def test_invalid_registration_is_refused(
    make_runtime: MakeRuntime,
    plugins: list[FakePlugin],
    flavor: object,
    name: str,
    idx: str,
    error: str,
) -> None:
    runtime = await make_runtime(flavor=flavor)
    bad = FakePlugin(name, idx)
    plugins.append(bad)
    await bad.connect(runtime.socket_path)
    assert bad.register_reply is not None
    assert bad.register_reply.code == Code.UNKNOWN
    assert error in bad.register_reply.message
    await connect(runtime, plugins, FakePlugin("next", "20"))  # the runtime goes on
    assert bad.methods() == []
    assert not bad.eof.is_set()  # like upstream, the refused connection is left open
    assert runtime.plugins[0].state is PluginState.REJECTED


async def test_name_charset_is_only_checked_from_v0_12(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(flavor=CONTAINERD_1_7)
    await connect(runtime, plugins, FakePlugin("odd name!", "10"))
    assert runtime.plugins[0].full_name == "10-odd name!"


MASKS = [
    (CONTAINERD_1_7, 0x800, False),
    (CONTAINERD_2_3, 0x800, True),
    (CRIO_1_36, 0x3FFF, True),
    (CONTAINERD_2_3, 0x4000, False),
]


@pytest.mark.parametrize(
    ("flavor", "mask", "accepted"),
    MASKS,
    ids=[
        f"{flavor.label}: 0x{mask:x} {'accepted' if accepted else 'closes the plugin'}"
        for flavor, mask, accepted in MASKS
    ],
)
async def test_event_mask_outside_the_valid_events_closes_the_plugin(
    make_runtime: MakeRuntime,
    plugins: list[FakePlugin],
    flavor: object,
    mask: int,
    accepted: bool,
) -> None:
    runtime = await make_runtime(flavor=flavor)
    plugin = FakePlugin(events=mask)
    plugins.append(plugin)
    await plugin.connect(runtime.socket_path)
    if accepted:
        await runtime.wait_for_plugins(1)
        assert runtime.plugins[0].events == mask
    else:
        await plugin.wait_eof()
        (info,) = runtime.plugins
        assert info.state is PluginState.CLOSED
        assert info.close_reason == f"invalid plugin events: 0x{mask:x}"
        assert plugin.methods() == ["Configure"]


async def test_mask_zero_subscribes_to_everything_including_validation(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    """§5: answering 0 on v0.10+ makes the plugin a validator, and one that does not
    implement ValidateContainerAdjustment fails every container creation."""
    runtime = await make_runtime()
    unimplemented = reply(Error(Code.UNIMPLEMENTED, "method ValidateContainerAdjustment"))
    await connect(
        runtime,
        plugins,
        FakePlugin(events=0, handlers={"ValidateContainerAdjustment": unimplemented}),
    )
    assert runtime.plugins[0].events == VALID_EVENTS_V0_10
    await runtime.run_pod_sandbox(pod())
    with pytest.raises(ValidationRejectedError, match=r"validator plugin 10-fake failed"):
        await runtime.create_container("pod0", container("c0"))
    assert "c0" not in runtime.containers


# --- events ------------------------------------------------------------------------------


async def test_events_go_to_subscribed_plugins_in_index_order(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    order: list[str] = []

    def tracking(name: str, response: Message) -> dict[str, object]:
        async def handler(plugin: FakePlugin, msg: Message) -> Result:
            order.append(name)
            return response

        return {"CreateContainer": handler}

    late_idx = FakePlugin("b", "20", handlers=tracking("b", cpu_shares_adjustment(300)))  # type: ignore[arg-type]
    early_idx = FakePlugin("a", "05", handlers=tracking("a", adjust(owner="a")))  # type: ignore[arg-type]
    await connect(runtime, plugins, late_idx, ready=1)
    await connect(runtime, plugins, early_idx, ready=2)
    await runtime.run_pod_sandbox(pod())
    created = await runtime.create_container("pod0", container("c0"))
    assert order == ["a", "b"]
    # NRI mutates the request: "b" sees "a"'s annotation.
    (seen_by_b,) = late_idx.requests("CreateContainer")
    assert isinstance(seen_by_b, pb.CreateContainerRequest)
    assert seen_by_b.container.annotations["owner"] == "a"
    assert created.annotations["owner"] == "a"
    assert created.resources is not None and created.resources.cpu is not None
    assert created.resources.cpu.shares == 300
    subset = FakePlugin("c", "30", events=event_mask({Event.REMOVE_CONTAINER}))
    await connect(runtime, plugins, subset, ready=3)
    await runtime.remove_container("c0")
    assert subset.methods() == ["Configure", "Synchronize", "RemoveContainer"]


async def test_state_change_flavors_send_notifications_as_state_change(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(flavor=CRIO_1_36)
    plugin = await connect(runtime, plugins, FakePlugin())
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    assert plugin.methods()[2:] == ["StateChange", "CreateContainer"] + ["StateChange"] * 3
    events = [m.event for m in plugin.requests("StateChange")]  # type: ignore[attr-defined]
    assert events == [
        pb.RUN_POD_SANDBOX,
        pb.POST_CREATE_CONTAINER,
        pb.START_CONTAINER,
        pb.POST_START_CONTAINER,
    ]


async def test_update_pod_sandbox_has_no_state_change_fallback(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    events = event_mask({Event.UPDATE_POD_SANDBOX, Event.POST_UPDATE_POD_SANDBOX})
    plugin = await connect(
        runtime,
        plugins,
        FakePlugin(
            events=events,
            handlers={
                "UpdatePodSandbox": reply(Error(Code.UNIMPLEMENTED, "nope")),
                "PostUpdatePodSandbox": reply(Error(Code.UNIMPLEMENTED, "nope")),
            },
        ),
    )
    await runtime.run_pod_sandbox(pod())
    overhead = model.Resources(cpu=model.CpuResources(shares=10))
    with pytest.raises(PluginFailedOperationError, match="UpdatePodSandbox: UNIMPLEMENTED"):
        await runtime.update_pod_sandbox("pod0", overhead, None)
    plugin.handlers.pop("UpdatePodSandbox")
    await runtime.update_pod_sandbox("pod0", overhead, None)
    assert plugin.methods()[2:] == [
        "UpdatePodSandbox",
        "UpdatePodSandbox",
        "PostUpdatePodSandbox",
        "StateChange",
    ]
    assert runtime.pods["pod0"].overhead == overhead
    old = await make_runtime(flavor=CONTAINERD_1_7)
    await old.run_pod_sandbox(pod())
    with pytest.raises(InvalidOperationError, match=r"needs NRI v0\.10"):
        await old.update_pod_sandbox("pod0", overhead, None)


# --- failing plugins ---------------------------------------------------------------------


async def test_error_status_blocks_creation_but_keeps_the_plugin(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    plugin = await connect(
        runtime,
        plugins,
        FakePlugin(handlers={"CreateContainer": reply(Error(Code.UNKNOWN, "no room"))}),
    )
    await runtime.run_pod_sandbox(pod())
    with pytest.raises(PluginFailedOperationError) as failure:
        await runtime.create_container("pod0", container("c0"))
    assert (failure.value.plugin, failure.value.status_message) == ("10-fake", "no room")
    assert "c0" not in runtime.containers
    assert runtime.plugins[0].state is PluginState.READY
    plugin.handlers.clear()
    await runtime.create_container("pod0", container("c0"))
    assert "PostCreateContainer" in plugin.methods()


async def test_notification_errors_are_only_logged_and_stop_the_relay(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    failing = FakePlugin(
        "a", "10", handlers={"PostStartContainer": reply(Error(Code.INTERNAL, "oops"))}
    )
    other = FakePlugin("b", "20")
    await connect(runtime, plugins, failing, ready=1)
    await connect(runtime, plugins, other, ready=2)
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")  # does not raise
    assert runtime.containers["c0"].state is model.ContainerState.RUNNING
    # NRI's relay loop returns at the first error: "b" never hears of the start.
    assert "PostStartContainer" in failing.methods()
    assert "PostStartContainer" not in other.methods()
    assert "StartContainer" in other.methods()


async def test_late_answer_drops_the_plugin_and_the_operation_continues(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(request_timeout=SHORT)
    slow = FakePlugin(handlers={"CreateContainer": late(adjust(slow="yes"), SHORT * 2)})
    await connect(runtime, plugins, slow)
    await runtime.run_pod_sandbox(pod())
    started = time.monotonic()
    created = await runtime.create_container("pod0", container("c0"))
    assert SHORT * 0.9 <= time.monotonic() - started < SHORT * 3
    assert "slow" not in created.annotations
    await slow.wait_eof()
    (info,) = runtime.plugins
    assert info.state is PluginState.CLOSED and info.counters.timeouts == 1
    (timed_out,) = [r for r in runtime.log if r.method == "CreateContainer"]
    assert timed_out.outcome is Outcome.TIMEOUT
    await runtime.start_container("c0")  # nobody left to ask
    assert runtime.containers["c0"].state is model.ContainerState.RUNNING


async def test_garbage_closes_only_that_plugin(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    garbage = FakePlugin("garbage", "01")
    plugins.append(garbage)
    await garbage.connect(runtime.socket_path, register=False)
    garbage.write(b"\xff" * 64)
    await garbage.wait_eof()
    assert "protocol error" in runtime.plugins[0].close_reason
    await connect(runtime, plugins, FakePlugin("good", "02"))


async def test_disconnect_in_the_middle_of_a_reply(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()

    async def half_reply(plugin: FakePlugin, msg: Message) -> Result:
        sid = 5  # RunPodSandbox is the third call on conn 1 (after Configure, Synchronize)
        frame = mux.encode_message(1, b"\x00\x00\x00\x20" + sid.to_bytes(4, "big") + b"\x02")
        plugin.write(frame[:-3])
        await plugin.close()
        return NO_REPLY

    plugin = await connect(runtime, plugins, FakePlugin(handlers={"RunPodSandbox": half_reply}))
    await runtime.run_pod_sandbox(pod())  # continues as if the plugin had answered nothing
    assert "pod0" in runtime.pods
    (info,) = runtime.plugins
    assert info.state is PluginState.CLOSED
    assert "closed" in info.close_reason
    assert plugin.eof.is_set()
    await connect(runtime, plugins, FakePlugin("next", "11"))


async def test_unknown_runtime_method_is_unimplemented(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    plugin = await connect(runtime, plugins, FakePlugin())
    answer = await plugin.call("NoSuchMethod", pb.Empty())
    assert (answer.code, answer.message) == (Code.UNIMPLEMENTED, "method NoSuchMethod")
    assert runtime.plugins[0].state is PluginState.READY


# --- adjustments, updates, validation ----------------------------------------------------


async def test_conflicting_adjustments_fail_creation_naming_both_plugins(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    a = FakePlugin("a", "10", handlers={"CreateContainer": reply(cpu_shares_adjustment(100))})
    b = FakePlugin("b", "20", handlers={"CreateContainer": reply(cpu_shares_adjustment(200))})
    await connect(runtime, plugins, a, ready=1)
    await connect(runtime, plugins, b, ready=2)
    await runtime.run_pod_sandbox(pod())
    with pytest.raises(OwnershipConflictError) as conflict:
        await runtime.create_container("pod0", container("c0"))
    assert str(conflict.value) == 'plugins "20-b" and "10-a" both tried to set CPUShares'
    old = await make_runtime(flavor=CONTAINERD_1_7)
    a_old = FakePlugin("a", "10", handlers={"CreateContainer": reply(cpu_shares_adjustment(1))})
    b_old = FakePlugin("b", "20", handlers={"CreateContainer": reply(cpu_shares_adjustment(2))})
    await connect(old, plugins, a_old, ready=1)
    await connect(old, plugins, b_old, ready=2)
    await old.run_pod_sandbox(pod())
    with pytest.raises(OwnershipConflictError, match='"20-b" and "10-a" both tried to set CPU'):
        await old.create_container("pod0", container("c0"))


async def test_create_reply_updates_other_containers_but_not_itself(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    backend = InMemoryBackend()
    runtime = await make_runtime(backend=backend)
    update = pb.CreateContainerResponse()
    upd = update.update.add(container_id="c0")
    upd.linux.resources.cpu.cpus = "2-3"
    update.update.add(container_id="ghost").linux.resources.cpu.cpus = "1"  # unknown: skipped
    update.evict.add(container_id="c0", reason="ignored by NRI")
    plugin = FakePlugin(handlers={"CreateContainer": reply(update)})
    await connect(runtime, plugins, plugin)
    await runtime.run_pod_sandbox(pod())
    plugin.handlers.clear()
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    plugin.handlers["CreateContainer"] = reply(update)
    await runtime.create_container("pod0", container("c1"))
    c0 = runtime.containers["c0"]
    assert c0.resources is not None and c0.resources.cpu is not None
    assert c0.resources.cpu.cpus == "2-3"
    assert [(c.operation, c.container.id) for c in backend.history][-2:] == [
        ("update", "c0"),
        ("create", "c1"),
    ]
    assert runtime.plugins[0].counters.evictions_ignored == 1
    assert runtime.containers["c0"].state is model.ContainerState.RUNNING  # not evicted
    self_update = pb.CreateContainerResponse()
    self_update.update.add(container_id="c2").linux.resources.cpu.cpus = "0"
    plugin.handlers["CreateContainer"] = reply(self_update)
    with pytest.raises(AdjustmentError, match='asked update of "c2" during creation'):
        await runtime.create_container("pod0", container("c2"))


async def test_update_reply_is_merged_into_the_requested_resources(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    response = pb.UpdateContainerResponse()
    response.update.add(container_id="c0").linux.resources.cpu.shares.value = 256
    plugin = FakePlugin(handlers={"UpdateContainer": reply(response)})
    await connect(runtime, plugins, plugin)
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    updated = await runtime.update_container(
        "c0", model.Resources(memory=model.MemoryResources(limit=1 << 30))
    )
    assert updated.resources is not None
    assert updated.resources.memory == model.MemoryResources(limit=1 << 30, swap=1 << 30)
    assert updated.resources.cpu == model.CpuResources(shares=256, quota=50000, period=100000)
    (post,) = plugin.requests("PostUpdateContainer")
    assert isinstance(post, pb.PostUpdateContainerRequest)
    assert post.container.linux.resources.cpu.shares.value == 256


async def test_stop_reply_updates_are_applied_to_other_containers(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    response = pb.StopContainerResponse()
    response.update.add(container_id="c1").linux.resources.cpu.cpus = "0-7"
    await connect(runtime, plugins, FakePlugin(handlers={"StopContainer": reply(response)}))
    await runtime.run_pod_sandbox(pod())
    for cid in ("c0", "c1"):
        await runtime.create_container("pod0", container(cid))
        await runtime.start_container(cid)
    await runtime.stop_container("c0")
    c1 = runtime.containers["c1"]
    assert c1.resources is not None and c1.resources.cpu is not None
    assert c1.resources.cpu.cpus == "0-7"
    assert runtime.containers["c0"].state is model.ContainerState.STOPPED


async def test_validator_sees_merged_adjustment_and_can_reject(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    adjuster = FakePlugin("adj", "10", handlers={"CreateContainer": reply(adjust(k="v"))})
    validator = FakePlugin(
        "val",
        "90",
        events=event_mask({Event.VALIDATE_CONTAINER_ADJUSTMENT}),
        handlers={
            "ValidateContainerAdjustment": reply(
                pb.ValidateContainerAdjustmentResponse(reject=True, reason="k is forbidden")
            )
        },
    )
    await connect(runtime, plugins, adjuster, ready=1)
    await connect(runtime, plugins, validator, ready=2)
    await runtime.run_pod_sandbox(pod())
    with pytest.raises(ValidationRejectedError, match="reason: k is forbidden"):
        await runtime.create_container("pod0", container("c0"))
    (request,) = validator.requests("ValidateContainerAdjustment")
    assert isinstance(request, pb.ValidateContainerAdjustmentRequest)
    assert dict(request.adjust.annotations) == {"k": "v"}
    assert "k" not in request.container.annotations  # the pristine container
    owners = request.owners.owners["c0"].compound[pb.Annotations].owners
    assert dict(owners) == {"k": "10-adj"}
    assert [(p.name, p.index) for p in request.plugins] == [("adj", "10"), ("val", "90")]
    assert "c0" not in runtime.containers


# --- UpdateContainers --------------------------------------------------------------------


async def test_update_containers_from_inside_an_event_handler_deadlocks(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    """§7.4: the runtime serves UpdateContainers under the lock it holds while relaying
    an event, so waiting for that reply inside the handler blocks until the event's
    request timeout drops the plugin."""
    runtime = await make_runtime(request_timeout=SHORT)
    outcome: list[str] = []

    async def update_then_answer(plugin: FakePlugin, msg: Message) -> Result:
        request = pb.UpdateContainersRequest()
        request.update.add(container_id="c0").linux.resources.cpu.shares.value = 2
        try:
            await plugin.call("UpdateContainers", request, timeout=SHORT * 4)
            outcome.append("answered")
        except ConnectionError:
            outcome.append("connection lost")
        return pb.CreateContainerResponse()

    plugin = FakePlugin(handlers={"CreateContainer": update_then_answer})
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await connect(runtime, plugins, plugin)
    started = time.monotonic()
    await runtime.create_container("pod0", container("c1"))
    assert SHORT * 0.9 <= time.monotonic() - started < SHORT * 3
    await plugin.wait_eof()
    await asyncio.sleep(0.05)
    assert outcome == ["connection lost"]
    assert runtime.plugins[0].state is PluginState.CLOSED
    c0 = runtime.containers["c0"]
    assert c0.resources is not None and c0.resources.cpu is not None
    assert c0.resources.cpu.shares == 512  # the dropped plugin's update was not applied
    (dropped,) = [r for r in runtime.log if r.method == "UpdateContainers"]
    assert dropped.outcome is Outcome.DROPPED


async def test_update_containers_outside_events_is_applied(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime()
    plugin = await connect(runtime, plugins, FakePlugin())
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    request = pb.UpdateContainersRequest()
    request.update.add(container_id="c0").linux.resources.cpu.cpus = "1"
    request.update.add(container_id="nope").linux.resources.cpu.cpus = "1"
    request.evict.add(container_id="c0", reason="not implemented by NRI")
    answer = await plugin.call("UpdateContainers", request)
    assert answer.code == 0 and answer.payload == b""
    c0 = runtime.containers["c0"]
    assert c0.resources is not None and c0.resources.cpu is not None
    assert c0.resources.cpu.cpus == "1" and c0.state is model.ContainerState.RUNNING
    counters = runtime.plugins[0].counters
    assert (counters.update_requests, counters.updates_applied) == (1, 1)
    assert counters.evictions_ignored == 1


async def test_failed_update_is_reported_as_an_error(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    class FailingUpdates(InMemoryBackend):
        async def update(self, container: model.Container) -> None:
            raise OSError("cgroup write failed")

    runtime = await make_runtime(backend=FailingUpdates())
    plugin = await connect(runtime, plugins, FakePlugin())
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    request = pb.UpdateContainersRequest()
    request.update.add(container_id="c0").linux.resources.cpu.cpus = "1"
    answer = await plugin.call("UpdateContainers", request)
    assert (answer.code, answer.message) == (Code.UNKNOWN, "NRI update of some containers failed")
    c0 = runtime.containers["c0"]
    assert c0.resources is not None and c0.resources.cpu is not None and not c0.resources.cpu.cpus
    request.update[0].ignore_failure = True
    assert (await plugin.call("UpdateContainers", request)).code == 0


# --- synchronization ---------------------------------------------------------------------


async def big_state(runtime: EmbeddedRuntime, pods: int = 10, containers: int = 40) -> None:
    """`containers` containers of ~110 KiB each over `pods` pods: over ttrpc's 4 MiB."""
    for p in range(pods):
        await runtime.run_pod_sandbox(pod(f"pod{p}"))
    for i in range(containers):
        ctr = container(f"c{i:02}", f"pod{i % pods}", annotations={"big": "x" * (110 << 10)})
        await runtime.create_container(f"pod{i % pods}", ctr)
        await runtime.start_container(f"c{i:02}")


async def test_split_synchronize_answered_correctly(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(request_timeout=5.0)
    await big_state(runtime)
    plugin = await connect(runtime, plugins, FakePlugin())
    chunks = plugin.requests("Synchronize")
    assert len(chunks) >= 2
    assert [c.more for c in chunks] == [True] * (len(chunks) - 1) + [False]  # type: ignore[attr-defined]
    ids = [ctr.id for c in chunks for ctr in c.containers]  # type: ignore[attr-defined]
    assert ids == [f"c{i:02}" for i in range(40)]
    pod_ids = [p.id for c in chunks for p in c.pods]  # type: ignore[attr-defined]
    assert pod_ids == [f"pod{p}" for p in range(10)]
    syncs = [r for r in runtime.log if r.method == "Synchronize"]
    # The whole state was tried first and refused locally, consuming stream id 3.
    assert (syncs[0].outcome, syncs[0].stream_id) == (Outcome.NOT_SENT, 3)
    assert [r.stream_id for r in syncs[1:]] == list(range(5, 5 + 2 * len(chunks), 2))
    # One deadline for the whole exchange.
    assert all(a.timeout_nano > b.timeout_nano for a, b in itertools.pairwise(syncs))
    assert runtime.plugins[0].state is PluginState.READY


async def test_split_synchronize_answered_wrongly_drops_the_plugin(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(request_timeout=5.0)
    await big_state(runtime)
    wrong = FakePlugin(handlers={"Synchronize": reply(pb.SynchronizeResponse())})
    plugins.append(wrong)
    await wrong.connect(runtime.socket_path)
    await wrong.wait_eof()
    (info,) = runtime.plugins
    assert info.state is PluginState.CLOSED
    assert info.close_reason.endswith("plugin does not handle split sync requests")


async def test_split_synchronize_of_one_pod_spins_until_the_deadline(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    """§7.6 upstream quirk, kept: the pods per chunk round down to 0 while a pod is
    left, so the runtime sends empty more=true chunks until the deadline."""
    runtime = await make_runtime(request_timeout=0.5)
    await big_state(runtime, pods=1)
    plugin = FakePlugin()
    plugins.append(plugin)
    await plugin.connect(runtime.socket_path)
    await plugin.wait_eof()
    chunks = plugin.requests("Synchronize")
    empty = [c for c in chunks if not c.pods and not c.containers]  # type: ignore[attr-defined]
    assert len(empty) >= 2 and all(c.more for c in chunks)  # type: ignore[attr-defined]
    assert runtime.plugins[0].state is PluginState.CLOSED


async def test_v0_4_sync_failure_leaves_the_plugin_connected_but_deaf(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(flavor=CONTAINERD_1_7)
    failing = FakePlugin(handlers={"Synchronize": reply(Error(Code.INTERNAL, "sync broke"))})
    plugins.append(failing)
    await failing.connect(runtime.socket_path)
    await connect(runtime, plugins, FakePlugin("next", "20"))
    assert runtime.plugins[0].state is PluginState.UNSYNCED
    await runtime.run_pod_sandbox(pod())
    assert "StateChange" not in failing.methods() and not failing.eof.is_set()
    newer = await make_runtime(flavor=CONTAINERD_2_3)
    dropped = FakePlugin(handlers={"Synchronize": reply(Error(Code.INTERNAL, "sync broke"))})
    plugins.append(dropped)
    await dropped.connect(newer.socket_path)
    await dropped.wait_eof()  # v0.12 closes it


async def test_v0_4_cannot_split_a_big_synchronize(
    make_runtime: MakeRuntime, plugins: list[FakePlugin]
) -> None:
    runtime = await make_runtime(flavor=CONTAINERD_1_7, request_timeout=5.0)
    await big_state(runtime)
    plugin = FakePlugin()
    plugins.append(plugin)
    await plugin.connect(runtime.socket_path)
    await connect(runtime, plugins, FakePlugin("next", "20"), ready=0)
    await asyncio.sleep(0.05)
    assert runtime.plugins[0].state is PluginState.UNSYNCED
    assert plugin.methods() == ["Configure"]


# --- flavors' container states -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "stop_state", "remove_state", "remove_pid"),
    [
        (CONTAINERD_1_7, pb.CONTAINER_RUNNING, pb.CONTAINER_STOPPED, False),
        (CONTAINERD_2_3, pb.CONTAINER_STOPPED, pb.CONTAINER_UNKNOWN, False),
        (CRIO_1_36, pb.CONTAINER_STOPPED, pb.CONTAINER_STOPPED, True),
    ],
    ids=[
        "containerd 1.7.13: stopped while running, removed as stopped",
        "containerd 2.3.4: stopped after the stop, removed as unknown",
        "CRI-O 1.36.3: stopped after the stop, removed as stopped with its pid",
    ],
)
async def test_stop_and_remove_report_the_flavors_states(
    make_runtime: MakeRuntime,
    plugins: list[FakePlugin],
    flavor: object,
    stop_state: int,
    remove_state: int,
    remove_pid: bool,
) -> None:
    runtime = await make_runtime(flavor=flavor)
    plugin = await connect(runtime, plugins, FakePlugin())
    await runtime.run_pod_sandbox(pod())
    await runtime.create_container("pod0", container("c0"))
    await runtime.start_container("c0")
    await runtime.remove_container("c0")  # running: stopped first
    (stop,) = plugin.requests("StopContainer")
    assert stop.container.state == stop_state  # type: ignore[attr-defined]
    removes = plugin.requests("StateChange" if flavor is not CONTAINERD_2_3 else "RemoveContainer")
    remove = removes[-1].container  # type: ignore[attr-defined]
    assert remove.state == remove_state
    assert bool(remove.pid) is remove_pid
