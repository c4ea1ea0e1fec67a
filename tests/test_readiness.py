"""Readiness (the DaemonSet's readiness probe): true only while nri-qos is registered with
a runtime and that connection's Synchronize was applied, and no request failed open
lately; false before the runtime is there and after it goes away.

The real plugin, engine, host executor and debug server against the embedded runtime;
`nri-qos ready` is run as the probe runs it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend
from nri_plugin.cli import main as cli_main
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.debug.readiness import Readiness, ReadyState
from nri_plugin.debug.server import DebugServer, start_debug_server
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.api import RecordingPolicy
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.intents import Intents
from nri_plugin.policy.qos_policy import QosPolicy
from qos_model.containers import Container, Pod
from tests.policy.sysfs_builder import MachineShape


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class BrokenSync(QosPolicy):
    """A policy whose Synchronize raises: the session answers it fail-open."""

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        raise RuntimeError("a bug in the engine")


@dataclass
class Node:
    tmp: Path
    plugin: NriPlugin
    executor: HostExecutor
    server: DebugServer
    readiness: Readiness
    clock: Clock
    runner: asyncio.Task[None]
    runtime: EmbeddedRuntime | None = None

    async def start_runtime(self) -> EmbeddedRuntime:
        self.runtime = EmbeddedRuntime(
            self.tmp / "nri.sock", flavor=CONTAINERD_2_3, backend=InMemoryBackend()
        )
        await self.runtime.start()
        return self.runtime

    async def until(self, ready: bool, timeout: float = 10.0) -> ReadyState:
        async with asyncio.timeout(timeout):
            while (state := self.readiness.check()).ready is not ready:
                await asyncio.sleep(0.01)
        return state

    async def probe(self, *extra: str) -> int:
        """`nri-qos ready --socket ...` as the readiness probe runs it (in a thread:
        its client blocks, and the server answers on this loop)."""
        args = ["ready", "--socket", str(self.tmp / "debug.sock"), *extra]
        return await asyncio.to_thread(cli_main, args)


async def make_node(tmp_path: Path, policy: QosPolicy | RecordingPolicy) -> Node:
    executor = HostExecutor(Controllers([]))
    executor.start()
    settings = PluginSettings(
        socket_path=tmp_path / "nri.sock", backoff_initial=0.05, backoff_max=0.1
    )
    plugin = NriPlugin(policy, settings, on_intents=executor.submit)
    server = await start_debug_server(tmp_path / "debug.sock", plugin, policy, executor)
    clock = Clock()
    # the one the server made, with a clock the test moves
    readiness = server.sources.readiness
    assert readiness is not None
    readiness._clock = clock
    runner = asyncio.create_task(plugin.run())
    return Node(tmp_path, plugin, executor, server, readiness, clock, runner)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    topology = MachineShape(cores_per_l3=4).expected_topology()
    n = await make_node(tmp_path, QosPolicy(Engine(topology)))
    yield n
    await close(n)


async def close(n: Node) -> None:
    n.plugin.stop()
    await asyncio.gather(n.runner, return_exceptions=True)
    await n.server.stop()
    n.plugin.close()
    n.executor.close()
    if n.runtime is not None:
        await n.runtime.stop()


async def test_not_ready_before_register_ready_after_sync_not_ready_after_disconnect(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    before = node.readiness.check()
    assert not before.ready and before.connection == "waiting for the runtime"
    assert before.reason.startswith("not registered with a runtime")
    assert await node.probe() == 1
    assert capsys.readouterr().out.startswith("not ready: not registered with a runtime")

    runtime = await node.start_runtime()
    await runtime.wait_for_plugins(1)
    after = await node.until(ready=True)
    assert after.synchronized and after.connection == "serving"
    assert after.reason.startswith("serving containerd")
    assert await node.probe() == 0
    assert capsys.readouterr().out.startswith("ready: serving containerd")

    await runtime.stop()
    node.runtime = None
    gone = await node.until(ready=False)
    assert not gone.synchronized
    assert await node.probe("--json") == 1
    reply = json.loads(capsys.readouterr().out)
    assert reply["ready"] is False and "reason" in reply

    # the runtime comes back: ready again only after the new connection's Synchronize
    runtime = await node.start_runtime()
    await runtime.wait_for_plugins(1)
    assert (await node.until(ready=True)).synchronized


async def test_a_request_answered_fail_open_makes_it_not_ready_for_the_settle_window(
    node: Node,
) -> None:
    runtime = await node.start_runtime()
    await runtime.wait_for_plugins(1)
    await node.until(ready=True)
    node.plugin.metrics.fail_open.labels("CreateContainer", "deadline").inc()
    state = node.readiness.check()
    assert not state.ready and state.fail_open_recent == 1
    assert "fail-open" in state.reason and state.synchronized
    node.clock.now += node.readiness.settle_s
    assert node.readiness.check().ready


async def test_a_synchronize_that_failed_is_never_ready(tmp_path: Path) -> None:
    topology = MachineShape(cores_per_l3=4).expected_topology()
    n = await make_node(tmp_path, BrokenSync(Engine(topology)))
    try:
        runtime = await n.start_runtime()
        await runtime.wait_for_plugins(1)  # the runtime got its (fail-open) reply
        await asyncio.sleep(0.2)
        state = n.readiness.check()
        assert state.connection == "serving" and not state.synchronized and not state.ready
        assert "Synchronize has not been applied" in state.reason
        n.clock.now += 3600  # the fail-open long past: still not synchronized
        assert not n.readiness.check().ready
    finally:
        await close(n)


async def test_a_policy_without_an_engine_is_ready_once_configured(tmp_path: Path) -> None:
    n = await make_node(tmp_path, RecordingPolicy())
    try:
        assert not n.readiness.check().ready
        runtime = await n.start_runtime()
        await runtime.wait_for_plugins(1)
        assert (await n.until(ready=True)).synchronized
    finally:
        await close(n)
