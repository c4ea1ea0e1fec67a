"""The host backend: containers as real cgroups and processes.

Three layers of tests:

* the pure rules (containerd's cgroups_path, exit codes, runc's quota merge);
* the cgroup v2 layout through `FakeCgroup2` (tests/isolation/fake_cgroup2.py,
  imported, not copied) with a fake `Spawner`, because no real pid can enter a fake tree;
* the real thing on this host (root, cgroup v1 hybrid): an `EmbeddedRuntime` with the
  backend and a scripted plugin, checked from /proc and the cgroup files. Every real test
  runs below its own ``/nri-qos-test-<random>`` group, and the fixture kills whatever is
  left there and removes it even when an assertion failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message
from pyfakefs.fake_filesystem import FakeFilesystem

from embedded_runtime import CONTAINERD_2_3
from embedded_runtime.host_backend import (
    DEFAULT_COMMAND,
    DEFAULT_PATH,
    HostBackend,
    HostBackendError,
    HostSpawner,
    Spawned,
    SpawnRequest,
    container_env,
    exit_code_of,
    merge_quota,
    sweep_stale_groups,
)
from embedded_runtime.state import cgroups_path_for
from isolation.cgroups import CgroupFs, CgroupVersion, CpuQuota, HostLayout, shares_to_weight
from isolation.oom import OomAdjOutcome, OomAdjResult, ProcessControls, parse_status
from nri_plugin.protocol import nri_pb2 as pb
from qos_model import containers as model
from tests.builders import kubelet_cpu
from tests.embedded.conftest import MakeRuntime
from tests.embedded.fakeplugin import FakePlugin, Result
from tests.isolation.fake_cgroup2 import FakeCgroup2, cg, echo

MIB = 1 << 20

# --------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        ("/kubepods/burstable/pod1", "/kubepods/burstable/pod1/c1"),
        ("/kubepods/burstable/pod1/", "/kubepods/burstable/pod1/c1"),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
            "kubepods-burstable-pod1.slice:cri-containerd:c1",
        ),
        ("kubepods-pod1.slice", "kubepods-pod1.slice:cri-containerd:c1"),
    ],
    ids=[
        "cgroupfs parent",
        "cgroupfs parent with a trailing slash",
        "systemd parent as a path",
        "systemd parent as a slice name",
    ],
)
def test_cgroups_path_follows_containerd(parent: str, expected: str) -> None:
    assert cgroups_path_for(parent, "c1") == expected


def test_cgroups_path_needs_a_parent() -> None:
    with pytest.raises(ValueError, match="cgroup_parent"):
        cgroups_path_for("", "c1")


@pytest.mark.parametrize(
    ("status", "code"),
    [(0, 0), (3, 3), (-signal.SIGTERM, 143), (-signal.SIGKILL, 137)],
    ids=["exit 0", "exit 3", "SIGTERM", "SIGKILL"],
)
def test_exit_code_is_128_plus_signal(status: int, code: int) -> None:
    assert exit_code_of(status) == code


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        (None, None, None),  # nothing asked
        (0, 0, None),  # runc: 0 = unset
        (20_000, None, CpuQuota(20_000, 50_000)),  # keeps the period
        (None, 100_000, CpuQuota(30_000, 100_000)),  # keeps the quota
        (-1, None, CpuQuota(None, 50_000)),  # negative: no limit
        (40_000, 200_000, CpuQuota(40_000, 200_000)),
    ],
    ids=[
        "nothing asked",
        "0 means unset",
        "a quota alone keeps the period",
        "a period alone keeps the quota",
        "a negative quota lifts the limit",
        "both replaced",
    ],
)
def test_quota_merge_follows_runc(
    quota: int | None, period: int | None, expected: CpuQuota | None
) -> None:
    assert merge_quota(CpuQuota(30_000, 50_000), quota, period) == expected


def test_container_env_gets_a_path_only_when_missing() -> None:
    assert container_env(["A=1", "B=x=y", "junk", "=v"]) == {
        "A": "1",
        "B": "x=y",
        "PATH": DEFAULT_PATH,
    }
    assert container_env(["PATH=/opt/bin"]) == {"PATH": "/opt/bin"}


# --------------------------------------------------------------------------- the real spawner


def spawn_request(tmp_path: Path, **kwargs: object) -> SpawnRequest:
    values: dict[str, object] = {
        "container_id": "c0",
        "argv": ("sleep", "60"),
        "env": {"PATH": DEFAULT_PATH},
        "cgroup_procs": (),
        "oom_score_adj": None,
        "oom_score_adj_file": Path("/proc/self/oom_score_adj"),
    }
    values.update(kwargs)
    return SpawnRequest(**values)  # type: ignore[arg-type]


def reap(spawned: Spawned) -> None:
    spawned.process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while spawned.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_spawner_writes_its_own_pid_and_oom_score_adj_before_exec(tmp_path: Path) -> None:
    # Regular files stand in for cgroup.procs and oom_score_adj: what the child wrote
    # there is exactly what it would write to the kernel.
    procs = (tmp_path / "a.procs", tmp_path / "b.procs")
    oom_file = tmp_path / "oom_score_adj"
    for path in (*procs, oom_file):
        path.write_text("")
    spawned = HostSpawner().spawn(
        spawn_request(tmp_path, cgroup_procs=procs, oom_score_adj=-300, oom_score_adj_file=oom_file)
    )
    try:
        assert [p.read_text() for p in procs] == ["0", "0"]
        assert oom_file.read_text() == "-300"
        assert spawned.oom == OomAdjResult(spawned.process.pid, -300, OomAdjOutcome.APPLIED)
        assert spawned.process.poll() is None
    finally:
        reap(spawned)
    assert spawned.process.poll() == -signal.SIGKILL


def test_spawner_reports_a_failed_join_with_its_errno(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "cgroup.procs"
    with pytest.raises(HostBackendError) as failed:
        HostSpawner().spawn(spawn_request(tmp_path, cgroup_procs=(missing,)))
    assert failed.value.errno == errno.ENOENT
    assert failed.value.path == str(missing)
    assert "writing to" in str(failed.value) and "ENOENT" in str(failed.value)


def test_spawner_fails_on_an_unexpected_oom_error(tmp_path: Path) -> None:
    with pytest.raises(HostBackendError) as failed:
        HostSpawner().spawn(
            spawn_request(tmp_path, oom_score_adj=10, oom_score_adj_file=tmp_path)  # a dir
        )
    assert failed.value.errno == errno.EISDIR


def test_spawner_records_a_refused_negative_oom_score_adj(tmp_path: Path) -> None:
    spawned = HostSpawner().spawn(spawn_request(tmp_path, oom_score_adj=-500))
    try:
        assert spawned.oom is not None and spawned.oom.value == -500
        actual = oom_score_adj(spawned.process.pid)
        if ProcessControls().has_cap_sys_resource():
            assert spawned.oom.outcome is OomAdjOutcome.APPLIED and actual == -500
        else:  # this CI host: EACCES, and the process runs with the inherited value
            assert spawned.oom.outcome is OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE
            assert spawned.oom.errno == errno.EACCES
            assert actual == oom_score_adj("self")
            assert spawned.process.poll() is None
    finally:
        reap(spawned)


def test_spawner_reports_a_missing_command(tmp_path: Path) -> None:
    with pytest.raises(HostBackendError) as failed:
        HostSpawner().spawn(spawn_request(tmp_path, argv=("/nonexistent/nri-qos-cmd",)))
    assert failed.value.errno == errno.ENOENT
    assert "/nonexistent/nri-qos-cmd" in str(failed.value)


# --------------------------------------------------------------------------- cgroup v2 (fake)


@dataclass
class FakeProcess:
    """A process of the fake kernel: exits on the first signal it does not ignore."""

    kernel: FakeCgroup2
    pid: int
    ignores_term: bool = False
    status: int | None = None
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.status

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.status is None and not (sig == signal.SIGTERM and self.ignores_term):
            self.status = -sig
            exit_fake_process(self.kernel, self.pid)


def exit_fake_process(kernel: FakeCgroup2, pid: int) -> None:
    """What the kernel does when a task exits: it leaves its group."""
    for group in kernel.groups.values():
        if pid in group.procs:
            group.procs.remove(pid)
    kernel.live_pids.discard(pid)
    kernel._render_all()  # the fake's own refresh of every interface file


class FakeSpawner:
    """Does what the child does before exec: write its pid into each cgroup.procs, and
    set oom_score_adj, refused below 0 like on a host without CAP_SYS_RESOURCE."""

    def __init__(self, kernel: FakeCgroup2, *, ignores_term: bool = False) -> None:
        self.kernel = kernel
        self.ignores_term = ignores_term
        self.requests: list[SpawnRequest] = []
        self.processes: dict[int, FakeProcess] = {}
        self.killed: list[int] = []

    def spawn(self, request: SpawnRequest) -> Spawned:
        self.requests.append(request)
        pid = self.kernel.spawn()
        for procs in request.cgroup_procs:
            echo(procs, str(pid))
        process = FakeProcess(self.kernel, pid, self.ignores_term)
        self.processes[pid] = process
        oom = None
        if request.oom_score_adj is not None:
            outcome = (
                OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE
                if request.oom_score_adj < 0
                else OomAdjOutcome.APPLIED
            )
            oom = OomAdjResult(pid, request.oom_score_adj, outcome)
        return Spawned(process, oom)

    def kill(self, pid: int, signum: int) -> None:
        self.killed.append(pid)
        if pid in self.processes:
            self.processes[pid].send_signal(signum)
        else:
            exit_fake_process(self.kernel, pid)


def text(group: str | PurePosixPath, name: str) -> str:
    return (cg(group) / name).read_text()


def v2_container(cid: str = "c0", **kwargs: object) -> model.Container:
    values: dict[str, object] = {
        "cgroups_path": f"/lab/pod0/{cid}",
        "args": ("sleep", "60"),
        "oom_score_adj": 700,
        "resources": model.Resources(
            cpu=kubelet_cpu(500, cpus="1", mems="0"),
            memory=model.MemoryResources(limit=64 * MIB),
        ),
    }
    values.update(kwargs)
    return model.Container(id=cid, pod_id="pod0", **values)  # type: ignore[arg-type]


@pytest.fixture
def kernel(fs: FakeFilesystem) -> FakeCgroup2:
    return FakeCgroup2(fs)


async def test_v2_create_update_stop_remove(kernel: FakeCgroup2) -> None:
    spawner = FakeSpawner(kernel)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner, stop_timeout=0.05)
    assert backend.cgroupfs.layout is HostLayout.UNIFIED
    ctr = v2_container()
    group = "/lab/pod0/c0"

    pid = await backend.create(ctr)

    assert pid is not None
    # the controllers were enabled top-down, so the container has the files
    for parent in ("/", "/lab", "/lab/pod0"):
        assert text(parent, "cgroup.subtree_control").split() == ["cpuset", "cpu", "memory"]
    assert text(group, "cpuset.cpus") == "1\n"
    assert text(group, "cpuset.mems") == "0\n"
    assert text(group, "cpu.weight") == "59\n" == f"{shares_to_weight(512)}\n"
    assert text(group, "cpu.max") == "50000 100000\n"
    assert text(group, "memory.max") == f"{64 * MIB}\n"
    assert text(group, "cgroup.procs") == f"{pid}\n"
    (request,) = spawner.requests
    assert request.cgroup_procs == (cg(group) / "cgroup.procs",)  # one tree on v2
    assert request.argv == ("sleep", "60")
    assert request.oom_score_adj == 700
    assert str(request.oom_score_adj_file) == "/proc/self/oom_score_adj"
    assert request.env == {"PATH": DEFAULT_PATH}
    assert await backend.start(ctr) == pid
    info = backend.get("c0")
    assert info.oom is not None and info.oom.outcome is OomAdjOutcome.APPLIED

    # runc update: "" / None / 0 leave a value alone, a negative quota lifts the limit
    update = model.Resources(cpu=model.CpuResources(cpus="0", quota=-1))
    await backend.update(replace(ctr, resources=update))
    assert text(group, "cpuset.cpus") == "0\n"
    assert text(group, "cpuset.mems") == "0\n"
    assert text(group, "cpu.max") == "max 100000\n"
    assert text(group, "cpu.weight") == "59\n"
    assert text(group, "memory.max") == f"{64 * MIB}\n"
    await backend.update(
        replace(ctr, resources=model.Resources(memory=model.MemoryResources(limit=-1)))
    )
    assert text(group, "memory.max") == "max\n"

    assert await backend.stop(ctr) == 143
    assert spawner.processes[pid].signals == [signal.SIGTERM]
    assert text(group, "cgroup.procs") == ""
    assert await backend.stop(ctr) == 143  # idempotent, no second signal
    assert spawner.processes[pid].signals == [signal.SIGTERM]

    await backend.remove(ctr)
    assert not cg(group).exists()
    assert cg("/lab/pod0").is_dir()  # the pod level stays until cleanup, as with kubelet
    assert backend.containers == {}
    await backend.cleanup()
    assert not cg("/lab").exists()
    await backend.cleanup()  # twice is fine


async def test_v2_systemd_cgroups_path(kernel: FakeCgroup2) -> None:
    backend = HostBackend(CgroupFs(), parent="/lab.slice", spawner=FakeSpawner(kernel))
    ctr = v2_container(cgroups_path=cgroups_path_for("/lab.slice/lab-pod0.slice", "c9"))
    assert ctr.cgroups_path == "lab-pod0.slice:cri-containerd:c9"
    await backend.create(ctr)
    scope = "/lab.slice/lab-pod0.slice/cri-containerd-c9.scope"
    assert backend.get("c0").group == PurePosixPath(scope)
    assert text(scope, "cpuset.cpus") == "1\n"
    await backend.cleanup()
    assert not cg("/lab.slice").exists()


async def test_v2_refused_oom_score_adj_is_recorded_and_the_container_runs(
    kernel: FakeCgroup2,
) -> None:
    spawner = FakeSpawner(kernel)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner)
    pid = await backend.create(v2_container(oom_score_adj=-500))
    oom = backend.get("c0").oom
    assert oom is not None and oom.outcome is OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE
    assert oom.value == -500 and not oom.ok
    assert text("/lab/pod0/c0", "cgroup.procs") == f"{pid}\n"
    await backend.cleanup()


async def test_v2_stop_escalates_to_sigkill_and_kills_leftovers(kernel: FakeCgroup2) -> None:
    spawner = FakeSpawner(kernel, ignores_term=True)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner, stop_timeout=0.05)
    ctr = v2_container()
    pid = await backend.create(ctr)
    stray = kernel.spawn()  # e.g. a child the main process forked
    echo(cg("/lab/pod0/c0") / "cgroup.procs", str(stray))

    started = time.monotonic()
    assert await backend.stop(ctr) == 137
    assert time.monotonic() - started >= 0.05
    assert spawner.processes[pid].signals == [signal.SIGTERM, signal.SIGKILL]
    assert spawner.killed == [stray]
    assert text("/lab/pod0/c0", "cgroup.procs") == ""
    await backend.remove(ctr)
    await backend.cleanup()
    assert not cg("/lab").exists()


async def test_v2_cleanup_kills_and_removes_everything(kernel: FakeCgroup2) -> None:
    spawner = FakeSpawner(kernel)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner)
    first = await backend.create(v2_container("c0"))
    second = await backend.create(v2_container("c1", cgroups_path="/lab/pod1/c1"))
    backend.close()  # the loop-less variant, as from a signal handler
    assert spawner.processes[first].signals == [signal.SIGKILL]
    assert spawner.processes[second].signals == [signal.SIGKILL]
    assert not cg("/lab").exists()
    assert backend.containers == {}
    await backend.cleanup()


async def test_v2_refuses_groups_outside_its_parent(kernel: FakeCgroup2) -> None:
    spawner = FakeSpawner(kernel)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner)
    with pytest.raises(HostBackendError) as outside:
        await backend.create(v2_container(cgroups_path="/kubepods/pod0/c0"))
    assert outside.value.errno == errno.EPERM
    with pytest.raises(HostBackendError) as the_parent_itself:
        await backend.create(v2_container(cgroups_path="/lab"))
    assert the_parent_itself.value.errno == errno.EPERM
    with pytest.raises(HostBackendError) as missing:
        await backend.create(v2_container(cgroups_path=""))
    assert missing.value.errno == errno.EINVAL
    assert "cgroups_path_for" in str(missing.value)
    assert not cg("/kubepods").exists() and not cg("/lab").exists()
    assert spawner.requests == []


async def test_v2_failed_create_rolls_back_its_groups(kernel: FakeCgroup2) -> None:
    spawner = FakeSpawner(kernel)
    backend = HostBackend(CgroupFs(), parent="/lab", spawner=spawner)
    bad = model.Resources(cpu=model.CpuResources(cpus="42"))  # the fake host has 0-7
    with pytest.raises(HostBackendError) as refused:
        await backend.create(v2_container(resources=bad))
    assert refused.value.errno == errno.EINVAL
    assert refused.value.path.endswith("cpuset.cpus")
    assert not cg("/lab").exists()
    assert spawner.requests == []
    assert backend.containers == {}
    with pytest.raises(HostBackendError) as unknown:
        await backend.update(v2_container())
    assert unknown.value.errno == errno.ENOENT


async def test_v2_sweep_removes_only_empty_prefixed_groups(kernel: FakeCgroup2) -> None:
    cgroupfs = CgroupFs()
    for group in ("/nri-qos-lab-old/pod/c", "/nri-qos-lab-live/pod/c", "/other/c"):
        cgroupfs.create_group(group)
    pid = kernel.spawn()
    cgroupfs.move_pid("/nri-qos-lab-live/pod/c", pid)

    report = sweep_stale_groups(cgroupfs)

    assert report.removed == (PurePosixPath("/nri-qos-lab-old"),)
    assert report.busy == (PurePosixPath("/nri-qos-lab-live"),)
    assert report.failed == ()
    assert not cg("/nri-qos-lab-old").exists()
    assert cg("/nri-qos-lab-live/pod/c").is_dir() and cg("/other/c").is_dir()
    with pytest.raises(ValueError, match="prefix"):
        sweep_stale_groups(cgroupfs, prefix="")


# --------------------------------------------------------------------------- real host

CGROUP_ROOT = Path("/sys/fs/cgroup")

REAL_HOST_MARKS = (
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups"),
    pytest.mark.skipif(
        not (CGROUP_ROOT / "cpuset" / "cpuset.cpus").exists(),
        reason="no cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset (not a v1/hybrid host)",
    ),
)

Test = TypeVar("Test", bound=Callable[..., Any])


def on_this_host(test: Test) -> Test:
    """Mark a test that needs root and this host's real cgroup v1 hierarchies."""
    for mark in REAL_HOST_MARKS:
        test = mark(test)
    return test


IGNORES_TERM_AND_FORKS = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
open(sys.argv[1], "w").close()
time.sleep(60)
"""


@dataclass
class RealLab:
    cgroupfs: CgroupFs
    parent: PurePosixPath
    backend: HostBackend

    def dirs(self, group: str | PurePosixPath) -> list[Path]:
        """The group's directory in every hierarchy a container belongs to."""
        relative = PurePosixPath(group).relative_to("/")
        roots = list(dict.fromkeys(self.cgroupfs.mounts.v1.values()))
        if self.cgroupfs.mounts.unified is not None:
            roots.append(self.cgroupfs.mounts.unified)
        return [root / relative for root in roots]

    def leftovers(self) -> list[Path]:
        return [d for d in self.dirs(self.parent) if d.exists()]


def kill_and_remove(cgroupfs: CgroupFs, top: PurePosixPath) -> None:
    """Last resort: SIGKILL whatever is below ``top`` in any hierarchy, then rmdir it."""
    relative = top.relative_to("/")
    roots = [*dict.fromkeys(cgroupfs.mounts.v1.values())]
    if cgroupfs.mounts.unified is not None:
        roots.append(cgroupfs.mounts.unified)
    deadline = time.monotonic() + 5
    for root in roots:
        base = root / relative
        if not base.is_dir():
            continue
        for dirpath, _, _ in os.walk(base, topdown=False):
            directory = Path(dirpath)
            while time.monotonic() < deadline:
                pids = (directory / "cgroup.procs").read_text().split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.01)
            try:
                os.rmdir(directory)
            except OSError as exc:  # pragma: no cover - only when teardown itself fails
                print(f"could not remove {directory}: {exc}", file=sys.stderr)


@pytest.fixture
async def real_lab() -> AsyncIterator[RealLab]:
    cgroupfs = CgroupFs()
    parent = PurePosixPath(f"/nri-qos-test-{secrets.token_hex(4)}")
    lab = RealLab(cgroupfs, parent, HostBackend(cgroupfs, parent=parent, stop_timeout=2.0))
    try:
        yield lab
    finally:
        try:
            await lab.backend.cleanup()  # the backend the test ended with
        finally:
            kill_and_remove(cgroupfs, parent)


def status(pid: int) -> dict[str, str]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def not_running(pid: int) -> bool:
    try:
        return status(pid)["State"].startswith(("Z", "X"))
    except FileNotFoundError:
        return True


def oom_score_adj(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def read(directory: Path, name: str) -> str:
    return (directory / name).read_text().strip()


def host_cpus(cgroupfs: CgroupFs) -> frozenset[int]:
    return cgroupfs.get_cpuset_cpus("/")


@on_this_host
async def test_plugin_decisions_reach_the_kernel(
    make_runtime: MakeRuntime,
    plugins: list[FakePlugin],
    real_lab: RealLab,
) -> None:
    lab = real_lab
    if not {0, 1} <= host_cpus(lab.cgroupfs):
        pytest.skip("needs CPUs 0 and 1 in the root cpuset")
    if lab.cgroupfs.version_of("cpuset") is not CgroupVersion.V1:
        pytest.skip("the real test drives cgroup v1 files")

    async def on_create(plugin: FakePlugin, msg: Message) -> Result:
        assert isinstance(msg, pb.CreateContainerRequest)
        response = pb.CreateContainerResponse()
        resources = response.adjust.linux.resources
        resources.cpu.cpus = "1"
        resources.cpu.mems = "0"
        resources.cpu.shares.value = 512
        response.adjust.linux.oom_score_adj.value = -500 if msg.container.name == "prot" else 700
        return response

    runtime = await make_runtime(flavor=CONTAINERD_2_3, backend=lab.backend, request_timeout=5.0)
    plugin = FakePlugin(handlers={"CreateContainer": on_create})
    plugins.append(plugin)
    await plugin.connect(runtime.socket_path)
    await runtime.wait_for_plugins(1, timeout=5)
    pod = model.Pod(
        id="pod0", name="p", namespace="ns", uid="u0", cgroup_parent=f"{lab.parent}/pod0"
    )
    await runtime.run_pod_sandbox(pod)
    resources = model.Resources(
        cpu=model.CpuResources(quota=50_000, period=100_000),
        memory=model.MemoryResources(limit=64 * MIB),
    )
    for cid, name in (("c0", "app"), ("c1", "prot")):
        await runtime.create_container(
            "pod0",
            model.Container(
                id=cid,
                pod_id="pod0",
                name=name,
                args=("sleep", "60"),
                cgroups_path=cgroups_path_for(pod.cgroup_parent, cid),
                resources=resources,
            ),
        )
        await runtime.start_container(cid)

    c0 = runtime.containers["c0"]
    pid = c0.pid
    assert pid is not None and pid == lab.backend.get("c0").pid
    group = lab.parent / "pod0" / "c0"
    assert c0.cgroups_path == str(group)
    # what the kernel enforces for the process
    assert status(pid)["Cpus_allowed_list"] == "1"
    assert status(pid)["Mems_allowed_list"] == "0"
    assert os.sched_getaffinity(pid) == {1}
    assert oom_score_adj(pid) == 700  # a raise: allowed without CAP_SYS_RESOURCE
    # what the cgroup files say
    cpuset_dir = lab.cgroupfs.group_dir(group, "cpuset")
    cpu_dir = lab.cgroupfs.group_dir(group, "cpu")
    memory_dir = lab.cgroupfs.group_dir(group, "memory")
    assert read(cpuset_dir, "cpuset.cpus") == "1"
    assert read(cpuset_dir, "cpuset.mems") == "0"
    assert read(cpu_dir, "cpu.shares") == "512"
    assert read(cpu_dir, "cpu.cfs_quota_us") == "50000"
    assert read(cpu_dir, "cpu.cfs_period_us") == "100000"
    assert read(memory_dir, "memory.limit_in_bytes") == str(64 * MIB)
    # it was born there: every hierarchy it belongs to lists it, and only it
    for directory in lab.dirs(group):
        if directory.is_dir():
            assert read(directory, "cgroup.procs") == str(pid)
    cgroup_lines = Path(f"/proc/{pid}/cgroup").read_text()
    assert f":cpuset:{group}\n" in cgroup_lines and f":memory:{group}\n" in cgroup_lines
    if lab.cgroupfs.layout is HostLayout.HYBRID:
        assert f"0::{group}\n" in cgroup_lines

    # a negative value is refused here without CAP_SYS_RESOURCE; the container still runs
    prot = lab.backend.get("c1")
    assert prot.oom is not None and prot.oom.value == -500
    if ProcessControls().has_cap_sys_resource():
        assert prot.oom.outcome is OomAdjOutcome.APPLIED
        assert oom_score_adj(prot.pid) == -500
    else:
        assert prot.oom.outcome is OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE
        assert prot.oom.errno == errno.EACCES
        assert oom_score_adj(prot.pid) == oom_score_adj("self")  # inherited
    assert runtime.containers["c1"].state is model.ContainerState.RUNNING
    assert status(prot.pid)["State"][0] in "RS"  # alive (just exec'd: may still be R)

    # the plugin moves c0 to CPU 0 outside any event
    request = pb.UpdateContainersRequest()
    request.update.add(container_id="c0").linux.resources.cpu.cpus = "0"
    answer = await plugin.call("UpdateContainers", request)
    assert answer.code == 0, answer.message
    assert status(pid)["Cpus_allowed_list"] == "0"
    assert read(cpuset_dir, "cpuset.cpus") == "0"
    assert read(cpu_dir, "cpu.shares") == "512"  # untouched by the update

    await runtime.stop_container("c0")
    assert runtime.containers["c0"].exit_code == 143  # SIGTERM, as containerd reports it
    assert not Path(f"/proc/{pid}").exists()
    await runtime.remove_container("c0")
    assert not any(d.exists() for d in lab.dirs(group))
    await runtime.remove_pod_sandbox("pod0")
    assert not Path(f"/proc/{prot.pid}").exists()
    assert lab.backend.containers == {}

    await lab.backend.cleanup()
    assert lab.leftovers() == []


@on_this_host
async def test_real_stop_escalates_and_kills_what_the_process_forked(
    real_lab: RealLab, tmp_path: Path
) -> None:
    lab = real_lab
    backend = HostBackend(lab.cgroupfs, parent=lab.parent, stop_timeout=0.2)
    lab.backend = backend  # the fixture cleans up this one
    ready = tmp_path / "ready"
    ctr = model.Container(
        id="stubborn",
        cgroups_path=f"{lab.parent}/stubborn",
        args=(sys.executable, "-c", IGNORES_TERM_AND_FORKS, str(ready)),
    )
    pid = await backend.create(ctr)
    assert pid is not None
    deadline = time.monotonic() + 5
    while not ready.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    group = lab.parent / "stubborn"
    members = lab.cgroupfs.list_pids(group)
    assert len(members) == 2 and pid in members
    (child,) = [p for p in members if p != pid]

    assert await backend.stop(ctr) == 137
    assert lab.cgroupfs.list_pids(group) == []
    assert not Path(f"/proc/{pid}").exists()
    assert not_running(child)  # gone, or a zombie its new parent has yet to reap
    await backend.remove(ctr)
    assert not any(d.exists() for d in lab.dirs(group))


@on_this_host
async def test_real_cleanup_and_close_leave_nothing(real_lab: RealLab) -> None:
    lab = real_lab
    pids = []
    for cid in ("a", "b"):
        ctr = model.Container(id=cid, cgroups_path=f"{lab.parent}/pod/{cid}")  # default args
        pid = await lab.backend.create(ctr)
        assert pid is not None
        pids.append(pid)
    assert Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[:2] == [
        c.encode() for c in DEFAULT_COMMAND
    ]
    await lab.backend.cleanup()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert lab.leftovers() == []
    await lab.backend.cleanup()

    pid = await lab.backend.create(model.Container(id="c", cgroups_path=f"{lab.parent}/c"))
    assert pid is not None
    lab.backend.close()
    assert not Path(f"/proc/{pid}").exists()
    assert lab.leftovers() == []


@on_this_host
async def test_real_start_failure_rolls_back(real_lab: RealLab) -> None:
    lab = real_lab
    ctr = model.Container(
        id="nope",
        cgroups_path=f"{lab.parent}/pod/nope",
        args=("/nonexistent/nri-qos-no-such-command",),
    )
    with pytest.raises(HostBackendError) as failed:
        await lab.backend.create(ctr)
    assert failed.value.errno == errno.ENOENT
    assert "nri-qos-no-such-command" in str(failed.value)
    assert lab.leftovers() == []


@on_this_host
async def test_real_sweep_keeps_groups_with_processes(real_lab: RealLab) -> None:
    lab = real_lab
    prefix = f"{lab.parent.name}-stale-"
    stale, live = PurePosixPath(f"/{prefix}a"), PurePosixPath(f"/{prefix}b")
    process = None
    try:
        lab.cgroupfs.create_group(stale / "pod" / "c")
        lab.cgroupfs.create_group(live / "c")
        process = await asyncio.create_subprocess_exec("sleep", "60")
        lab.cgroupfs.move_pid(live / "c", process.pid)

        report = sweep_stale_groups(lab.cgroupfs, prefix)

        assert report.removed == (stale,)
        assert report.busy == (live,)
        for controller in ("cpuset", "cpu", "memory"):
            assert not lab.cgroupfs.group_dir(stale, controller).exists()
            assert lab.cgroupfs.group_dir(live / "c", controller).is_dir()
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        for top in (stale, live):
            kill_and_remove(lab.cgroupfs, top)
