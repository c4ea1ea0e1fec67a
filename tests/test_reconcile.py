"""The drift reconciliation loop (nri_plugin.reconcile): host reads against a fake kubepods
tree in the kernel's formats (v1 cgroupfs, v2 systemd), the real v1 cpuset hierarchy where
this host has one, and the whole loop against the embedded runtime: a cpuset and an
oom_score_adj changed behind our back, the kubelet's static CPU manager, a container the
runtime never delivered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from prometheus_client import CollectorRegistry
from pyfakefs.fake_filesystem import FakeFilesystem

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime
from embedded_runtime.state import ContainerRecord, container_spec
from isolation.host import LinuxHost
from isolation.kubelet import read_cpu_manager_state
from isolation.kubepods import container_dirs, container_names
from isolation.rdt import RdtClassConfig, Resctrl
from isolation.rdt.membership import task_groups
from isolation.writes import HostWriter
from nri_plugin.config import ConfigError, parse_config
from nri_plugin.control.base import Controller, Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.control.io import IoController, IoSettings
from nri_plugin.control.oom import OomController
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.class_intents import rdt_clos_id
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.drift import Planned, Target
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import ContainerRef, HostIntent, PlaceInRdtClass
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.workload import SHARED, PlannerConfig
from nri_plugin.protocol import convert
from nri_plugin.reconcile import (
    HostReader,
    ReconcileState,
    new_metrics,
    read_host,
    reconcile_loop,
)
from nri_plugin.views import policy_view
from qos_model.containers import ContainerState, CpuResources, Resources
from qos_model.cpulist import format_cpu_list
from tests.builders import MiB, container, pod
from tests.fake_kubepods import KubepodsTree, TreeBackend
from tests.isolation.fake_resctrl import FakeResctrl
from tests.policy.sysfs_builder import MachineShape

PERIOD = 0.05

# --- host reads -------------------------------------------------------------------------------


def target(cid: str, path: str, cpus: str = "0-3") -> Target:
    ref = ContainerRef(cid, f"default/{cid}/{cid}", "pod-x", path, None)
    return Target(ref, Planned(frozenset(range(4)), None, 0))


def test_read_host_v1_cgroupfs(tmp_path: Path) -> None:
    tree = KubepodsTree(tmp_path)
    pid = tree.add("/kubepods/burstable/pod1234abcd/ctr-a", "0-3,8", "0", oom=300)
    tree.add("/kubepods/burstable/pod1234abcd/pod-x", "0-7")  # the sandbox
    tree.add("/kubepods/besteffort/pod9999abcd/crio-gap", "0-7")  # unknown to us
    tree.add("/kubepods/besteffort/pod9999abcd/crio-conmon-gap", "0-7")  # CRI-O's monitor
    reader = HostReader(tmp_path)
    obs = read_host(tree.host(), [target("ctr-a", "/kubepods/burstable/pod1234abcd/ctr-a")], reader)
    seen = obs.containers["ctr-a"]
    assert seen.cpus == frozenset({0, 1, 2, 3, 8}) and seen.mems == frozenset({0})
    assert seen.oom_score_adj == ((pid, 300),)
    assert obs.groups is not None
    assert [g.group for g in obs.groups] == ["/kubepods/besteffort/pod9999abcd/crio-gap"]
    assert obs.groups[0].names[0] == "gap"
    assert obs.read_seconds > 0 and obs.cpu_manager_policy is None


def test_read_host_v2_systemd_driver(tmp_path: Path) -> None:
    tree = KubepodsTree(tmp_path, v2=True)
    path = "kubepods-burstable-pod1234abcd.slice:cri-containerd:abc123"
    tree.add(path, "2-3", "0", oom=-997)
    reader = HostReader(tmp_path)
    obs = read_host(tree.host(), [target("abc123", path)], reader)
    seen = obs.containers["abc123"]
    assert seen.cpus == frozenset({2, 3}) and [v for _, v in seen.oom_score_adj] == [-997]
    assert obs.groups == ()  # the one container there is ours


def test_read_host_skips_what_it_cannot_read(tmp_path: Path) -> None:
    tree = KubepodsTree(tmp_path)
    reader = HostReader(tmp_path, unknown_containers=False)
    obs = read_host(
        tree.host(), [target("ctr-gone", "/kubepods/pod1/ctr-gone"), target("x", "/")], reader
    )
    assert {cid: (s.cpus, s.mems, s.oom_score_adj) for cid, s in obs.containers.items()} == {
        "ctr-gone": (None, None, ()),
        "x": (None, None, ()),  # not provably the container's: not read at all
    }
    assert obs.groups is None


def test_container_names_by_driver() -> None:
    assert container_names("abc") == ("abc",)
    assert container_names("crio-abc") == ("abc", "crio-abc")
    assert container_names("cri-containerd-abc.scope")[0] == "abc"
    assert container_names("crio-abc.scope")[0] == "abc"
    assert container_names("crio-conmon-abc.scope") == ()
    assert container_names("kubepods-besteffort.slice") == ()


def test_kubepods_scan_walks_qos_levels_and_systemd_slices(tmp_path: Path) -> None:
    tree = KubepodsTree(tmp_path, v2=True)
    tree.add("kubepods-pod11111111.slice:cri-containerd:g1", "0")
    tree.add("kubepods-besteffort-pod22222222.slice:crio:b1", "0")
    found = {d.names[0]: str(d.group) for d in container_dirs(tmp_path / "sys/fs/cgroup")}
    assert found == {
        "g1": "/kubepods.slice/kubepods-pod11111111.slice/cri-containerd-g1.scope",
        "b1": "/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-pod22222222.slice/crio-b1.scope",
    }


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ('{"policyName":"none","defaultCpuSet":"","checksum":3242152201}', "none"),
        (
            '{"policyName":"static","defaultCpuSet":"0,2-12,14-23","entries":'
            '{"235148fe":{"app":"1,13"}},"checksum":1552716370}',
            "static",
        ),
        ("not json", None),
        ('{"entries": {}}', None),
    ],
)
def test_cpu_manager_checkpoint(tmp_path: Path, text: str, policy: str | None) -> None:
    state = tmp_path / "var/lib/kubelet/cpu_manager_state"
    state.parent.mkdir(parents=True)
    state.write_text(text)
    read = read_cpu_manager_state(tmp_path)
    assert (read.policy if read else None) == policy
    if policy == "static":
        assert read is not None and read.exclusive == 1 and read.default_cpuset == "0,2-12,14-23"


def test_no_checkpoint_is_no_conclusion(tmp_path: Path) -> None:
    assert read_cpu_manager_state(tmp_path) is None


CPUSET_V1 = Path("/sys/fs/cgroup/cpuset")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (CPUSET_V1 / "cpuset.cpus").exists(),
    reason="needs root and a cgroup v1 cpuset hierarchy",
)
def test_read_back_from_the_real_v1_cpuset_hierarchy() -> None:
    parent = CPUSET_V1 / f"nri-qos-drift-{os.getpid()}"
    leaf = parent / "ctr-real"
    try:
        parent.mkdir()
        for d in (parent,):
            (d / "cpuset.mems").write_text((CPUSET_V1 / "cpuset.mems").read_text())
            (d / "cpuset.cpus").write_text((CPUSET_V1 / "cpuset.cpus").read_text())
        leaf.mkdir()
        (leaf / "cpuset.mems").write_text((CPUSET_V1 / "cpuset.mems").read_text())
        (leaf / "cpuset.cpus").write_text("0")
        cpus, mems = LinuxHost().cpuset_of(f"/{parent.name}/ctr-real", "ctr-real")
        assert cpus == frozenset({0}) and mems is not None and 0 in mems
    finally:
        for d in (leaf, parent):
            if d.exists():
                d.rmdir()


def test_config_section() -> None:
    c = parse_config("[reconcile]\nperiod_s = 2\nconflict_after = 3\n")
    assert c.reconcile.period_s == 2.0 and c.reconcile.drift.conflict_after == 3
    assert parse_config("").reconcile.period_s == 10.0
    for bad in ("period_s = 0", "period_s = true", "enabled = 1", "nope = 1", "max_pids = 0"):
        with pytest.raises(ConfigError, match=r"\[reconcile\]"):
            parse_config(f"[reconcile]\n{bad}\n")


# --- the loop against the embedded runtime ----------------------------------------------------


@dataclass
class Node:
    runtime: EmbeddedRuntime
    tree: KubepodsTree
    policy: QosPolicy
    plugin: NriPlugin
    executor: HostExecutor
    state: ReconcileState
    registry: CollectorRegistry

    def planned_cpus(self, cid: str) -> str:
        return format_cpu_list(self.policy.engine.plan.containers[cid].cpus.value)

    def events(self, kind: str) -> list[tuple[str, str]]:
        return [(e.subject, e.message) for e in self.executor.events.snapshot() if e.kind == kind]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def view(self) -> dict[str, object]:
        return await self.plugin.in_policy_thread(lambda: policy_view(self.policy))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class TreeRdt(Controller):
    """The rdt domain on the fake tree's resctrl: what the rdt controller does for a
    running container (its own processes into the class's group). The controller itself
    runs against the kernel-semantics fake in tests/control/test_class_controllers.py."""

    name = domain = "rdt"

    def __init__(self, tree: KubepodsTree, host: LinuxHost) -> None:
        self.tree, self.host = tree, host

    def post_update(self, intent: HostIntent) -> str:
        assert isinstance(intent, PlaceInRdtClass) and intent.rdt_class is not None
        ref = intent.container
        _, pids = self.host.member_pids(ref.cgroups_path, ref.id, ref.pid)
        for pid in pids:
            self.tree.rdt_move(pid, rdt_clos_id(intent.rdt_class))
        return f"RDT class {intent.rdt_class}: {len(pids)} process(es) moved"


@contextlib.asynccontextmanager
async def running_node(
    tmp_path: Path, *, isolation: bool = False, cap_sys_resource: bool = True
) -> AsyncIterator[Node]:
    """Two pods (web: shared_cores, batch: reclaimed_cores) on a v1 tree; with
    `isolation`, the rdt (on the tree's resctrl) and io (blkio) controllers run too, and
    "sys" (system_cores) joins them."""
    tree = KubepodsTree(tmp_path / "host", resctrl=isolation)
    host = tree.host(cap_sys_resource=cap_sys_resource)
    controllers: list[Controller] = [OomController(host)]
    config = EngineConfig()
    if isolation:
        (tree.root / "sys/block").mkdir(parents=True)  # no disks: weights only
        controllers += [
            TreeRdt(tree, host),
            IoController(host, tree.root, HostWriter(), IoSettings()),
        ]
        for cls in ("system", SHARED, "reclaimed"):
            tree.rdt_group(rdt_clos_id(cls))
        on = Backend(True, "started")
        support = IsolationConfig(host=HostSupport(rdt=on, io=on))
        config = EngineConfig(planner=PlannerConfig(isolation=support))
    policy = QosPolicy(Engine(MachineShape(cores_per_l3=8).expected_topology(), config))
    executor = HostExecutor(Controllers(controllers))
    executor.start()
    registry = CollectorRegistry()
    state = ReconcileState(metrics=new_metrics(registry))
    executor.observe(state.observe_intents)
    settings = PluginSettings(socket_path=tmp_path / "nri.sock", backoff_initial=0.05)
    plugin = NriPlugin(policy, settings, on_intents=executor.submit)
    runtime = EmbeddedRuntime(
        tmp_path / "nri.sock", flavor=CONTAINERD_2_3, backend=TreeBackend(tree)
    )
    await runtime.start()
    runner = asyncio.create_task(plugin.run())
    reader = HostReader(tree.root, cpu_manager_state="/var/lib/kubelet/cpu_manager_state")
    loop = asyncio.create_task(
        reconcile_loop(plugin, policy, host, executor, reader, PERIOD, state)
    )
    try:
        await runtime.wait_for_plugins(1, timeout=10)
        pods = [("web", "shared_cores"), ("batch", "reclaimed_cores")]
        if isolation or not cap_sys_resource:
            pods.append(("sys", "system_cores"))
        for name, cls in pods:
            await runtime.run_pod_sandbox(pod(name, cls))
            await runtime.create_container(f"pod-{name}", container(name, 1000, memory=64 * MiB))
            await runtime.start_container(f"ctr-{name}")
        yield Node(runtime, tree, policy, plugin, executor, state, registry)
    finally:
        loop.cancel()
        plugin.stop()
        await asyncio.gather(loop, runner, return_exceptions=True)
        plugin.close()
        executor.close()
        await runtime.stop()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(tmp_path) as n:
        yield n


def web_path() -> str:
    return "/kubepods/pod-web/ctr-web"


async def test_a_cpuset_changed_behind_our_back_is_repaired_within_one_period(node: Node) -> None:
    planned = node.planned_cpus("ctr-web")
    await until(lambda: node.state.periods >= 2)  # the plan held a period: judged from now
    assert node.tree.cpus(web_path()) == planned and node.events("drift") == []
    node.tree.set_cpus(web_path(), "7")  # someone else writes the cgroup
    changed = time.monotonic()
    start = node.state.periods
    await until(lambda: node.tree.cpus(web_path()) == planned)
    assert node.state.periods - start <= 2  # the period it was found in (+1 in flight)
    assert time.monotonic() - changed < 2 * PERIOD + 1.0
    ((subject, message),) = node.events("drift")
    assert subject == "default/web/web"
    assert message == f"cpus is 7 on the host, planned {planned}: re-applied"
    assert node.metric("nri_qos_drift_repairs_total", field="cpus") == 1
    await until(lambda: node.state.periods >= start + 4)
    assert node.events("drift-conflict") == []  # it held: nobody fights over it
    view = (await node.view())["reconcile"]
    assert isinstance(view, dict) and view["repairs"] == {"cpus": 1}


async def test_an_oom_score_adj_changed_behind_our_back_is_repaired(node: Node) -> None:
    pid = node.tree.pids["ctr-batch"]
    planned = node.policy.engine.plan.containers["ctr-batch"].oom_score_adj.value
    await until(lambda: node.state.periods >= 2)
    assert node.tree.oom(pid) == planned
    node.tree.set_oom(pid, -998)
    await until(lambda: node.tree.oom(pid) == planned)
    ((subject, message),) = node.events("drift")
    assert subject == "default/batch/batch"
    assert message == (
        f"oom_score_adj is -998 (1 process(es)) on the host, planned {planned}: re-applied"
    )


async def test_another_agent_rewriting_a_cpuset_is_reported_as_a_conflict(node: Node) -> None:
    await until(lambda: node.state.periods >= 2)
    fights = 0
    while not node.events("drift-conflict"):
        node.tree.set_cpus(web_path(), "7")  # after every repair, again
        fights += 1
        assert fights < 200
        await asyncio.sleep(PERIOD / 2)
    ((_, message),) = node.events("drift-conflict")
    assert message.startswith("cpus changed again right after its repair")
    await until(lambda: node.metric("nri_qos_drift_conflicts", field="cpus") == 1)
    await until(lambda: node.metric("nri_qos_cpu_manager_conflict", evidence="cpuset_drift") == 1)


async def test_static_cpu_manager_updates_are_answered_with_ours_and_reported(node: Node) -> None:
    planned = node.planned_cpus("ctr-web")
    kubelet_file = node.tree.root / "var/lib/kubelet/cpu_manager_state"
    kubelet_file.parent.mkdir(parents=True)
    kubelet_file.write_text(json.dumps({"policyName": "static", "defaultCpuSet": "0-7"}))
    await until(lambda: node.state.periods >= 2)  # the set-up's pool moves went out
    before = sum(1 for r in node.runtime.log if r.method == "UpdateContainers")
    for _ in range(4):  # the kubelet's reconcile, with its own cpuset, again and again
        kubelet = Resources(cpu=CpuResources(shares=1024, quota=100_000, cpus="0-7"))
        updated = await node.runtime.update_container("ctr-web", kubelet)
        assert updated.resources is not None and updated.resources.cpu is not None
        assert updated.resources.cpu.cpus == planned  # we keep ours
        assert node.tree.cpus(web_path()) == planned
        await asyncio.sleep(PERIOD)
    assert node.planned_cpus("ctr-web") == planned  # the plan did not move: no flapping
    after = sum(1 for r in node.runtime.log if r.method == "UpdateContainers")
    assert after == before  # nothing had to be pushed back
    assert len(node.events("cpu-manager")) >= 5  # 4 requests + the node warning
    warnings = [m for s, m in node.events("cpu-manager") if s == "node"]
    assert len(warnings) == 1 and "cpuManagerPolicy: none" in warnings[0]
    assert node.metric("nri_qos_cpu_manager_overridden_requests_total") == 4
    await until(lambda: node.metric("nri_qos_cpu_manager_conflict", evidence="state_file") == 1)
    assert node.metric("nri_qos_cpu_manager_conflict", evidence="update_request") == 1
    view = (await node.view())["reconcile"]
    assert isinstance(view, dict)
    cm = view["cpu_manager"]
    assert cm["fighting"] and "cpuManagerPolicy: none" in cm["fix"]
    assert set(cm["evidence"]) == {"update_request", "state_file"}
    assert node.events("drift") == []


async def test_a_container_created_during_synchronize_is_flagged_then_picked_up(
    node: Node,
) -> None:
    # containerd#13698 / cri-o#10090: the runtime creates a container while it
    # synchronizes us and never relays it. The embedded runtime does not lose events,
    # so the test puts the container into its state (and the host) without relaying.
    gap = container("gap", 1000, memory=64 * MiB, state=ContainerState.RUNNING)
    await node.runtime.run_pod_sandbox(pod("gap", "shared_cores"))
    rec = ContainerRecord(container_spec(convert.container_to_pb(gap), "pod-gap"))
    rec.state = ContainerState.RUNNING
    node.runtime._state.containers[gap.id] = rec  # the runtime's bug, on purpose
    node.tree.add(gap.cgroups_path, "0-7", key=gap.id)
    await until(lambda: bool(node.events("unknown-container")))
    ((subject, message),) = node.events("unknown-container")
    assert subject == "ctr-gap" and "never delivered" in message
    assert "/kubepods/pod-gap/ctr-gap" in message
    await until(lambda: node.metric("nri_qos_unknown_containers") == 1)
    view = (await node.view())["reconcile"]
    assert isinstance(view, dict) and view["unknown_containers"] == {
        "ctr-gap": "/kubepods/pod-gap/ctr-gap"
    }
    assert gap.id not in node.policy.engine.plan.containers
    # the next Synchronize (here: the runtime restarts) delivers it
    await node.runtime.stop()
    await node.runtime.start()
    await until(lambda: gap.id in node.policy.engine.plan.containers, timeout=10)
    await until(lambda: len(node.events("unknown-container")) == 2)
    assert node.events("unknown-container")[1] == (
        "ctr-gap",
        "picked up (/kubepods/pod-gap/ctr-gap)",
    )
    plan = node.policy.engine.plan.containers[gap.id]
    assert plan.pool == SHARED
    await until(lambda: node.tree.cpus(gap.cgroups_path) == format_cpu_list(plan.cpus.value))
    await until(lambda: node.metric("nri_qos_unknown_containers") == 0)


def test_groups_of_a_kubepods_tree_are_paths_below_the_hierarchy(tmp_path: Path) -> None:
    tree = KubepodsTree(tmp_path)
    tree.add("/kubepods/podabcdef12/ctr-q", "1")
    (d,) = container_dirs(tmp_path / "sys/fs/cgroup/cpuset")
    assert d.group == PurePosixPath("/kubepods/podabcdef12/ctr-q")


# --- RDT, I/O weight and refused repairs -------------------------------------------------------


def test_rdt_task_groups_read_from_the_resctrl_fake(fs: FakeFilesystem) -> None:
    """The reader against the kernel-semantics fake: a control group's tasks include its
    monitoring groups'; the root group's tasks are not listed (the default)."""
    fake = FakeResctrl(fs)
    resctrl = Resctrl(Path("/"))
    info = resctrl.probe()
    for cls in (SHARED, "reclaimed"):
        resctrl.ensure_class(cls, RdtClassConfig(), info)
    a, b, c = fake.spawn(), fake.spawn(), fake.spawn()
    resctrl.assign_tasks(SHARED, [a], "test")
    resctrl.ensure_mon_group("reclaimed", "ctr-b", "test")
    resctrl.assign_tasks("reclaimed", [b], "test", mon="ctr-b")
    groups = task_groups(Path("/sys/fs/resctrl"))
    assert groups is not None
    assert groups.get(a) == "nri-qos-shared" and groups.get(b) == "nri-qos-reclaimed"
    assert c not in groups  # in the root group
    assert task_groups(Path("/nowhere")) is None


def test_read_host_reads_rdt_and_io_only_for_started_controllers(tmp_path: Path) -> None:
    for v2 in (False, True):
        tree = KubepodsTree(tmp_path / str(v2), v2=v2, resctrl=True)
        path = "/kubepods/pod1234abcd/ctr-a"
        pid = tree.add(path, "0-3", io_weight=250, rdt_group="nri-qos-shared")
        t = Target(
            ContainerRef("ctr-a", "default/a/a", "pod-x", path, None),
            Planned(frozenset(range(4)), None, 0, SHARED, 100),
        )
        reader = HostReader(tree.root, unknown_containers=False)
        seen = read_host(tree.host(), [t], reader, started=frozenset({"rdt", "io"}))
        got = seen.containers["ctr-a"]
        assert got.rdt == ((pid, "nri-qos-shared"),) and got.io_weight == 250
        assert got.io_weight_max == (10000 if v2 else 1000)
        bare = read_host(tree.host(), [t], reader).containers["ctr-a"]
        assert bare.rdt == () and bare.io_weight is None  # not started: not read


async def test_a_task_moved_out_of_its_rdt_group_is_moved_back_within_one_period(
    tmp_path: Path,
) -> None:
    async with running_node(tmp_path, isolation=True) as node:
        pid = node.tree.pids["ctr-batch"]
        assert node.tree.rdt_group_of(pid) == "nri-qos-reclaimed"  # runc, from clos_id
        await until(lambda: node.state.periods >= 2)
        assert node.events("drift") == []
        node.tree.rdt_move(pid, "nri-qos-system")  # behind our back
        start = node.state.periods
        await until(lambda: node.tree.rdt_group_of(pid) == "nri-qos-reclaimed")
        assert node.state.periods - start <= 2
        ((subject, message),) = node.events("drift")
        assert subject == "default/batch/batch"
        assert message == (
            "rdt_class is nri-qos-system (1 process(es)) on the host, planned "
            "nri-qos-reclaimed: re-applied"
        )
        await until(lambda: node.metric("nri_qos_drift_repairs_total", field="rdt_class") == 1)


async def test_an_io_weight_changed_behind_our_back_is_rewritten(tmp_path: Path) -> None:
    async with running_node(tmp_path, isolation=True) as node:
        path = "/kubepods/pod-web/ctr-web"
        planned = node.policy.engine.plan.containers["ctr-web"].io_weight.value
        assert planned == 100
        await until(lambda: node.state.periods >= 2)
        node.tree.set_io_weight(path, 900)
        await until(lambda: node.tree.io_weight(path) == planned)
        ((subject, message),) = node.events("drift")
        assert subject == "default/web/web"
        assert message == f"io_weight is 900 on the host, planned {planned}: re-applied"


async def test_an_oom_score_adj_the_kernel_refuses_is_said_once_and_not_retried(
    tmp_path: Path,
) -> None:
    async with running_node(tmp_path, cap_sys_resource=False) as node:
        pid = node.tree.pids["ctr-sys"]
        planned = node.policy.engine.plan.containers["ctr-sys"].oom_score_adj.value
        assert planned < 0 and node.tree.oom(pid) == planned  # the runtime may
        await until(lambda: node.state.periods >= 2)
        node.tree.set_oom(pid, 0)  # someone raised it; we cannot lower it again
        await until(lambda: bool(node.events("drift-refused")))
        ((subject, message),) = node.events("drift-refused")
        assert subject == "default/sys/sys"
        assert message.startswith(
            f"oom_score_adj is 0 (1 process(es)) on the host, planned {planned}"
        )
        assert "refuses the write" in message and "CAP_SYS_RESOURCE" in message
        assert "securityContext" in message and "Not retried until the plan changes" in message
        tries = oom_writes(node)
        periods = node.state.periods
        await until(lambda: node.state.periods >= periods + 5)
        assert oom_writes(node) == tries  # stopped retrying
        assert len(node.events("drift")) == 1  # the one repair that was refused
        assert len(node.events("drift-refused")) == 1
        assert node.events("drift-conflict") == []  # no "another agent"
        assert node.tree.oom(pid) == 0


def oom_writes(node: Node) -> int:
    (oom,) = [s for s in node.executor.controllers.status() if s.domain == "oom"]
    return oom.applied + oom.failed
