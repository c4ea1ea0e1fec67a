"""The daemon's pieces end to end: pre-installed mode with the real plugin, and the
usage-driven rebalance loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ebpf.watched import WatchedContainer
from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend
from nri_plugin import daemon
from nri_plugin.config import Config
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.control.oom import OomController
from nri_plugin.daemon import (
    install_fork_hook,
    rebalance_loop,
    report_status,
    run_daemon,
    setup_logging,
)
from nri_plugin.debug.server import DebugSocketError
from nri_plugin.lab import ask_plugin
from nri_plugin.logsafe import RateLimitFilter, TruncateFilter
from nri_plugin.plugin import NriPlugin, PluginSettings, PluginSetupError
from nri_plugin.policy.api import RecordingPolicy
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.mitigation import LadderConfig
from nri_plugin.policy.protection import ProtectionConfig
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.protect import ProtectState, protection_loop
from qos_model.signals import RUNQ_BUCKETS, ContainerSignals, RunqLatency, SignalSnapshot
from tests.builders import FakeHost, MiB, container, pod
from tests.conftest import REPO
from tests.policy.sysfs_builder import MachineShape, write_sysfs


async def test_real_plugin_launched_by_the_runtime_takes_its_config_from_configure(
    tmp_path: Path,
) -> None:
    status = tmp_path / "debug.sock"
    local = tmp_path / "local.toml"
    local.write_text(f'[log]\ntarget = "{tmp_path / "plugin.log"}"\n')
    # /opt/nri/plugins/50-nri-qos: the runtime execs it with no arguments and an
    # environment of NRI_PLUGIN_NAME / NRI_PLUGIN_IDX / NRI_PLUGIN_SOCKET only.
    wrapper = tmp_path / "50-nri-qos"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from nri_plugin.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(local)!r}, '--debug-socket', {str(status)!r}]))\n"
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
        plan, events = await asyncio.to_thread(ask_plugin, status)
        assert "applied the runtime-provided config" in [e["message"] for e in events]
        assert plan["containers"]["ctr-web"]["class"] == "shared_cores"
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

    def cpu_usage_ns(self, cgroups_path: str, container_id: str) -> int | None:
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


# --- start-up and logging -------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_cuts_and_rate_limits(tmp_path: Path, root_logger: logging.Logger) -> None:
    target = tmp_path / "nri-qos.log"
    assert setup_logging("info", str(target)) == str(target)
    (handler,) = root_logger.handlers
    kinds = [type(f) for f in handler.filters]
    assert kinds == [RateLimitFilter, TruncateFilter]  # this order: see logsafe.install
    for _ in range(20):
        logging.getLogger("nri_qos.test").warning("bad annotation %r", "v" * 100_000)
    handler.flush()
    lines = target.read_text().splitlines()
    assert len(lines) == 5 and all(len(line) < 700 for line in lines)


def test_setup_logging_with_an_unusable_target_is_a_setup_error(
    tmp_path: Path, root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = root_logger.handlers[:]
    with pytest.raises(PluginSetupError, match=r"cannot open .*/missing/x\.log: No such file"):
        setup_logging("info", str(tmp_path / "missing" / "x.log"))
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", tmp_path / "no-dev-log")
    with pytest.raises(PluginSetupError, match=r"no-dev-log \(is syslog running\?\)"):
        setup_logging("info", "syslog")
    assert root_logger.handlers == handlers  # untouched


async def test_run_daemon_refuses_a_status_socket_path_that_is_not_a_socket(
    tmp_path: Path,
) -> None:
    precious = tmp_path / "precious"
    precious.write_text("data")
    config = Config(policy_name="recording", plugin=PluginSettings(socket_path=tmp_path / "s"))
    with pytest.raises(DebugSocketError, match="exists and is not a socket"):
        await run_daemon(config, wait_for_runtime=False, status_socket=precious)
    assert precious.read_text() == "data"


async def test_run_daemon_words_a_host_without_procfs_as_a_setup_error(tmp_path: Path) -> None:
    write_sysfs(MachineShape(), tmp_path)  # a topology, but no /proc and no cgroup mount
    config = Config(host_root=tmp_path, plugin=PluginSettings(socket_path=tmp_path / "s"))
    with pytest.raises(PluginSetupError, match=r"the host under \[host\] root = .* cannot be"):
        await run_daemon(config, wait_for_runtime=False)


# --- systemd status -------------------------------------------------------------------------


class Watched:
    """What report_status reads of the plugin."""

    def __init__(self) -> None:
        self.configured = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.runtime = None


async def settle() -> None:
    """Let every ready task run (no clock involved: only loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_systemd_status_follows_the_connection_by_events_not_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notes: list[str] = []
    monkeypatch.setattr(daemon, "sd_notify", lambda state: notes.append(state) or True)
    plugin = Watched()
    reporter = asyncio.create_task(report_status(plugin))  # type: ignore[arg-type]
    try:
        await settle()
        assert notes == ["READY=1\nSTATUS=waiting for the container runtime"]
        plugin.configured.set()
        await settle()
        assert notes[-1] == "STATUS=serving"
        plugin.configured.clear()
        plugin.disconnected.set()
        await settle()  # a poller asleep for a second would not have noticed yet
        assert notes[-1] == "STATUS=runtime connection lost; reconnecting"
        plugin.disconnected.clear()
        plugin.configured.set()
        await settle()
        assert notes[-1] == "STATUS=serving" and len(notes) == 4
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)


async def test_the_daemons_plugin_signals_each_connection_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes: asyncio.Queue[str] = asyncio.Queue()
    monkeypatch.setattr(daemon, "sd_notify", lambda state: notes.put_nowait(state) or True)
    settings = PluginSettings(socket_path=tmp_path / "nri.sock", backoff_initial=30)
    plugin = NriPlugin(RecordingPolicy(), settings)
    runtime = EmbeddedRuntime(
        tmp_path / "nri.sock", flavor=CONTAINERD_2_3, backend=InMemoryBackend()
    )
    await runtime.start()
    reporter = asyncio.create_task(report_status(plugin))
    runner = asyncio.create_task(plugin.run())
    try:
        assert (await asyncio.wait_for(notes.get(), 10)).startswith("READY=1")
        serving = await asyncio.wait_for(notes.get(), 10)
        assert serving.startswith("STATUS=serving containerd")
        await runtime.stop()
        lost = await asyncio.wait_for(notes.get(), 10)
        assert lost == "STATUS=runtime connection lost; reconnecting"
        assert plugin.disconnected.is_set() and not plugin.configured.is_set()
    finally:
        plugin.stop()
        reporter.cancel()
        await asyncio.gather(reporter, runner, return_exceptions=True)
        plugin.close()


def _fork_and_terminate_child() -> int:
    pid = os.fork()
    if pid == 0:  # the child: what pyroute2's netns helper gets when it is stopped
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_a_forked_child_that_gets_sigterm_never_stops_the_daemon() -> None:
    """pyroute2 forks a helper to open a netlink socket in a pod's network namespace and
    stops it with SIGTERM; the child shares the loop's signal wakeup pipe, so without the
    fork hook the parent's SIGTERM handler ran and the daemon stopped (seen in the lab)."""

    async def main() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        got: list[str] = []
        loop.add_signal_handler(signal.SIGTERM, lambda: got.append("TERM"))
        try:
            install_fork_hook()
            status = await asyncio.to_thread(_fork_and_terminate_child)
            await asyncio.sleep(0.3)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
        return got, status

    got, status = asyncio.run(main())
    assert got == []
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


class ScriptedSignals:
    """Stands in for the collectors: the web container suffers behind the batch one in
    every window while `bad` is set (what the real sampler reports is tested with real
    processes in tests/ebpf and by the interference lab)."""

    def __init__(self) -> None:
        self.bad = True
        self.seen: list[list[str]] = []

    def sample(self, containers: Sequence[WatchedContainer], now_s: float) -> SignalSnapshot:
        self.seen.append(sorted(c.id for c in containers))
        wait = 8_000_000 if self.bad else 50_000
        buckets = [0] * RUNQ_BUCKETS
        buckets[max(0, (wait // 1000).bit_length() - 1)] = 100
        web = ContainerSignals(runq=RunqLatency(100, 100 * wait, tuple(buckets)))
        blame = {("ctr-web", "ctr-batch"): 90 * wait} if self.bad else {}
        return SignalSnapshot(now_s, 0.05, {"ctr-web": web}, blame)


async def test_the_interference_loop_caps_the_antagonist_through_update_containers(
    tmp_path: Path,
) -> None:
    topology = MachineShape(cores_per_l3=4).expected_topology()
    config = EngineConfig(
        planner=PlannerConfig(reclaimed_overlap_shared=True),
        protection=ProtectionConfig(ladder=LadderConfig(escalate_after_s=10.0)),
    )
    policy = QosPolicy(Engine(topology, config))
    host = FakeHost()
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
    signals = ScriptedSignals()
    state = ProtectState()
    loop = asyncio.create_task(
        protection_loop(plugin, policy, host, executor, signals, 0.05, state)  # type: ignore[arg-type]
    )
    try:
        await runtime.wait_for_plugins(1, timeout=10)
        await runtime.run_pod_sandbox(pod("web", "shared_cores"))
        await runtime.create_container("pod-web", container("web", 1000, memory=64 * MiB))
        await runtime.run_pod_sandbox(pod("batch", "reclaimed_cores"))
        await runtime.create_container("pod-batch", container("batch", 0, memory=64 * MiB))

        def batch_quota() -> int | None:
            res = runtime.containers["ctr-batch"].resources
            return res.cpu.quota if res is not None and res.cpu is not None else None

        for _ in range(100):
            await asyncio.sleep(0.05)
            if batch_quota() == 20_000:
                break
        assert batch_quota() == 20_000  # capped at 0.2 CPU, from outside any event
        assert any(r.method == "UpdateContainers" for r in runtime.log)
        assert state.windows >= 3 and ["ctr-batch", "ctr-web"] in signals.seen
        view = policy.engine.protection.ladder.in_force()
        assert [r for r, _ in view["ctr-web"]][-1] == "cap-cpu"
    finally:
        loop.cancel()
        plugin.stop()
        await asyncio.gather(loop, runner, return_exceptions=True)
        plugin.close()
        executor.close()
        await runtime.stop()


@pytest.mark.parametrize(
    ("text", "sets"),
    [
        ("", False),
        ("# only a comment\n", False),
        ("[policy]\n# name = 'qos'\n", False),
        ("[rdt.classes.reclaimed]\n", False),
        ('[policy]\nname = "qos"\n', True),
        ("[rdt.classes.reclaimed]\nl3_percent = 20\n", True),
        ("not toml = = =", True),  # let the parser report it
    ],
)
def test_a_runtime_config_that_sets_nothing_keeps_the_local_one(text: str, sets: bool) -> None:
    """containerd hands a pre-installed plugin its conf.d file verbatim; one holding only
    comments must not reset the local [policy] to the defaults."""
    assert daemon._sets_anything(text) is sets
