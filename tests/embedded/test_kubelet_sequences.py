"""Kubelet-shaped sequences through a real runtime stack: the embedded runtime (containerd
1.7 / 2.3 and CRI-O flavors) relays NRI to the real plugin (NriPlugin + QosPolicy + Engine)
over a unix socket, and the test reads back what the runtime applied.

The container annotations are the kubelet's (`io.kubernetes.container.type`, as recent
kubelets write it); the runtime passes them on as NRI container annotations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from embedded_runtime import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    CRIO_1_36,
    EmbeddedRuntime,
    InMemoryBackend,
    RuntimeFlavor,
)
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.intents import Intents, Severity
from nri_plugin.policy.kube_qos import kubelet_quota, kubelet_shares
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.roles import KUBELET_TYPE_ANNOTATION, ROLES_ANNOTATION
from nri_plugin.policy.workload import DEDICATED, SHARED
from qos_model.containers import Container, ContainerState, MemoryResources, Resources
from qos_model.cpulist import parse_cpu_list
from tests.builders import MiB, container, kubelet_cpu, pod
from tests.policy.sysfs_builder import MachineShape

TWO_NODES = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)  # 16 CPUs
ALL = frozenset(range(16))
FLAVORS = [CONTAINERD_1_7, CONTAINERD_2_3, CRIO_1_36]


@dataclass
class Stack:
    runtime: EmbeddedRuntime
    engine: Engine
    intents: list[Intents]

    def cpus(self, container_id: str) -> frozenset[int]:
        """The cpuset the runtime holds for the container now."""
        res = self.runtime.containers[container_id].resources
        assert res is not None and res.cpu is not None
        return parse_cpu_list(res.cpu.cpus)

    def notes(self) -> list[str]:
        return [n.message for i in self.intents for n in i.notes]


@pytest.fixture(params=FLAVORS, ids=lambda f: f.label)
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    flavor: RuntimeFlavor = request.param
    engine = Engine(TWO_NODES.expected_topology())
    seen: list[Intents] = []
    socket = tmp_path / "nri.sock"
    plugin = NriPlugin(
        QosPolicy(engine), PluginSettings(socket_path=socket), on_intents=seen.append
    )
    runtime = EmbeddedRuntime(socket, flavor=flavor, backend=InMemoryBackend())
    await runtime.start()
    runner = asyncio.create_task(plugin.run())
    try:
        await runtime.wait_for_plugins(1, timeout=10)
        yield Stack(runtime, engine, seen)
    finally:
        plugin.stop()
        await runner
        plugin.close()
        await runtime.stop()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what UpdateContainers (sent after a reply) makes true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def kubelet_made(name: str, pod_name: str, millicores: int, kind: str) -> Container:
    c = container(name, millicores, pod_name=pod_name)
    return replace(c, annotations={KUBELET_TYPE_ANNOTATION: kind})


def resized(millicores: int) -> Resources:
    return Resources(cpu=kubelet_cpu(millicores), memory=MemoryResources(limit=256 * MiB))


@pytest.mark.parametrize("exit_reported", [True, False], ids=["stop-event", "silent-exit"])
async def test_an_init_container_runs_on_the_shared_pool_then_the_app_gets_its_cpus(
    stack: Stack, exit_reported: bool
) -> None:
    rt = stack.runtime
    db_pod = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    await rt.run_pod_sandbox(db_pod)
    await rt.create_container(db_pod.id, kubelet_made("migrate", "db", 4000, "init"))
    await rt.start_container("ctr-migrate")
    assert stack.cpus("ctr-migrate") == ALL  # nothing is exclusive: the whole shared pool
    assert stack.engine.plan.containers["ctr-migrate"].pool == SHARED
    if exit_reported:
        await rt.stop_container("ctr-migrate")
    # the kubelet creates the app once the init container exited (reported or not)
    await rt.create_container(db_pod.id, kubelet_made("db", "db", 4000, "container"))
    await rt.start_container("ctr-db")
    app = stack.cpus("ctr-db")
    assert len(app) == 4 and len({stack.engine.topology.node_of(c) for c in app}) == 1
    assert stack.engine.plan.containers["ctr-db"].pool == DEDICATED
    if not exit_reported:  # still there as far as the runtime knows: moved off the app's CPUs
        await until(lambda: not stack.cpus("ctr-migrate") & app)
    await rt.remove_container("ctr-migrate")  # the kubelet's garbage collection, much later
    assert stack.cpus("ctr-db") == app
    await until(lambda: any("init container" in n for n in stack.notes()))


async def test_a_sidecar_starts_first_keeps_running_and_stays_off_the_apps_cpus(
    stack: Stack,
) -> None:
    rt = stack.runtime
    db_pod = pod("db", "dedicated_cores", **{ROLES_ANNOTATION: '{"proxy": "sidecar"}'})
    await rt.run_pod_sandbox(db_pod)
    await rt.create_container(db_pod.id, kubelet_made("proxy", "db", 1000, "init"))
    await rt.start_container("ctr-proxy")
    await rt.create_container(db_pod.id, kubelet_made("db", "db", 2000, "container"))
    await rt.start_container("ctr-db")
    app = stack.cpus("ctr-db")
    assert len(app) == 2
    await until(lambda: stack.cpus("ctr-proxy") == ALL - app)
    assert rt.containers["ctr-proxy"].state is ContainerState.RUNNING
    proxy = stack.engine.plan.containers["ctr-proxy"]
    assert (proxy.role, proxy.pool) == ("sidecar", SHARED)


async def test_resize_up_and_down_keeps_the_cpus_and_the_kubelets_values(stack: Stack) -> None:
    rt = stack.runtime
    db_pod = pod("db", "dedicated_cores")
    await rt.run_pod_sandbox(db_pod)
    await rt.create_container(db_pod.id, kubelet_made("db", "db", 2000, "container"))
    await rt.start_container("ctr-db")
    held = stack.cpus("ctr-db")
    for size in (6000, 2000):
        after = await rt.update_container("ctr-db", resized(size))
        res = after.resources
        assert res is not None and res.cpu is not None and res.memory is not None
        new = parse_cpu_list(res.cpu.cpus)
        assert len(new) == size // 1000
        assert held < new if size == 6000 else new < held  # kept what it had / a part
        # what the kubelet reads back is what it asked for (kubernetes#130598)
        assert res.cpu.shares == kubelet_shares(size)
        assert res.cpu.quota == kubelet_quota(size)
        assert res.memory.limit == 256 * MiB
        held = new


async def test_a_resize_that_does_not_fit_keeps_the_old_cpus_and_says_why(stack: Stack) -> None:
    rt = stack.runtime
    db_pod = pod("db", "dedicated_cores")
    await rt.run_pod_sandbox(db_pod)
    await rt.create_container(db_pod.id, kubelet_made("db", "db", 4000, "container"))
    await rt.start_container("ctr-db")
    before = stack.cpus("ctr-db")
    after = await rt.update_container("ctr-db", resized(16000))
    assert after.resources is not None and after.resources.cpu is not None
    assert parse_cpu_list(after.resources.cpu.cpus) == before
    assert after.resources.cpu.shares == kubelet_shares(16000)

    def warned() -> bool:  # the notes reach the sink after the reply
        warnings = [
            n.message for i in stack.intents for n in i.notes if n.severity is Severity.WARNING
        ]
        return any("asked for 16 CPU(s) but keeps its 4" in w for w in warnings)

    await until(warned)
