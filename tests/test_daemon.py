"""The daemon's pieces end to end: pre-installed mode with the real plugin, and the
usage-driven rebalance loop."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.control.oom import OomController
from nri_plugin.daemon import rebalance_loop
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.status import query
from tests.builders import FakeHost, MiB, container, pod
from tests.conftest import REPO
from tests.policy.sysfs_builder import MachineShape


async def test_real_plugin_launched_by_the_runtime_takes_its_config_from_configure(
    tmp_path: Path,
) -> None:
    status = tmp_path / "status.sock"
    local = tmp_path / "local.toml"
    local.write_text(f'[log]\ntarget = "{tmp_path / "plugin.log"}"\n')
    # /opt/nri/plugins/50-nri-qos: the runtime execs it with no arguments and an
    # environment of NRI_PLUGIN_NAME / NRI_PLUGIN_IDX / NRI_PLUGIN_SOCKET only.
    wrapper = tmp_path / "50-nri-qos"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from nri_plugin.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(local)!r}, '--status-socket', {str(status)!r}]))\n"
    )
    wrapper.chmod(0o755)
    conf_d = '[policy]\nname = "qos"\nreclaimed_min_cpus = 0\nrebalance_interval_ms = 0\n'
    runtime = EmbeddedRuntime(
        tmp_path / "nri.sock", flavor=CONTAINERD_2_3, backend=InMemoryBackend()
    )
    await runtime.start()
    try:
        await runtime.launch_plugin([str(wrapper)], name="nri-qos", idx="50", config=conf_d)
        await runtime.wait_for_plugins(1, timeout=30)
        info = runtime.plugins[0]
        assert (info.name, info.idx) == ("nri-qos", "50")
        await runtime.run_pod_sandbox(pod("web", "shared_cores"))
        created = await runtime.create_container("pod-web", container("web", memory=64 * MiB))
        assert created.resources is not None and created.resources.cpu is not None
        assert created.resources.cpu.cpus  # the plugin pinned it
        events = await query(status, "events")
        messages = [e["message"] for e in events["events"]]  # type: ignore[union-attr]
        assert "applied the runtime-provided config" in messages
        plan = await query(status, "plan")
        assert plan["containers"]["ctr-web"]["class"] == "shared_cores"  # type: ignore[index]
        pid = info.pid
    finally:
        await runtime.stop()
    # a pre-installed plugin cannot reconnect: when the runtime goes, it exits
    assert pid is not None
    for _ in range(100):
        if (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the launched plugin did not exit after the runtime went away")
    assert "registered as 50-nri-qos" in (tmp_path / "plugin.log").read_text()


class MeteredHost(FakeHost):
    """Reports CPU time that grows at a rate the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.rate_cores = 0.0
        self._ns: dict[str, float] = {}
        self._last = time.monotonic()

    def tick(self, now: float) -> None:
        for key in self._ns:
            self._ns[key] += self.rate_cores * (now - self._last) * 1e9
        self._last = now

    def cpu_usage_ns(self, cgroups_path: str) -> int | None:
        self.tick(time.monotonic())
        return int(self._ns.setdefault(cgroups_path, 0.0))


async def test_rising_online_usage_shrinks_the_reclaimed_pool_via_update_containers(
    tmp_path: Path,
) -> None:
    topology = MachineShape(cores_per_l3=8).expected_topology()
    host = MeteredHost()
    policy = QosPolicy(Engine(topology))
    executor = HostExecutor(Controllers([OomController(host)]))  # type: ignore[arg-type]
    executor.start()
    plugin = NriPlugin(
        policy, PluginSettings(socket_path=tmp_path / "nri.sock"), on_intents=executor.submit
    )
    runtime = EmbeddedRuntime(
        tmp_path / "nri.sock", flavor=CONTAINERD_2_3, backend=InMemoryBackend()
    )
    await runtime.start()
    runner = asyncio.create_task(plugin.run())
    loop = asyncio.create_task(rebalance_loop(plugin, policy, host, executor, 0.05))  # type: ignore[arg-type]
    try:
        await runtime.wait_for_plugins(1, timeout=10)
        await runtime.run_pod_sandbox(pod("web", "shared_cores"))
        await runtime.create_container("pod-web", container("web", 1000, memory=64 * MiB))
        await runtime.run_pod_sandbox(pod("batch", "reclaimed_cores"))
        await runtime.create_container("pod-batch", container("batch", 100, memory=64 * MiB))
        await asyncio.sleep(0.3)

        def reclaimed_cpus() -> str:
            res = runtime.containers["ctr-batch"].resources
            assert res is not None and res.cpu is not None
            return res.cpu.cpus

        quiet = reclaimed_cpus()
        assert quiet == "2-7"  # 1000m + 20% headroom -> 2 online CPUs, 6 reclaimed
        host.rate_cores = 4.5  # the web container starts using 4.5 cores
        for _ in range(60):
            await asyncio.sleep(0.05)
            if reclaimed_cpus() != quiet:
                break
        assert reclaimed_cpus() == "6-7"  # 4.5 cores + 20% -> 6 online, 2 reclaimed
        assert any(r.method == "UpdateContainers" for r in runtime.log)
        web = runtime.containers["ctr-web"].resources
        assert web is not None and web.cpu is not None and web.cpu.cpus == "0-5"
        # quiet again: batch gets its CPUs back, but only after the usage window passes
        host.rate_cores = 0.0
        await asyncio.sleep(0.06)
        assert reclaimed_cpus() == "6-7"
        for _ in range(60):
            await asyncio.sleep(0.05)
            if reclaimed_cpus() == quiet:
                break
        assert reclaimed_cpus() == quiet
    finally:
        loop.cancel()
        plugin.stop()
        await asyncio.gather(loop, runner, return_exceptions=True)
        plugin.close()
        executor.close()
        await runtime.stop()
