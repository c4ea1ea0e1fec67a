"""Host faults: a blocked file, failing writes and hostile cgroup paths never stop the rest.

Each test drives the real host code (`isolation.host.LinuxHost` under a host root, the oom
controller, `HostExecutor`) against `HostRoot`, a real directory tree laid out like the
kernel's, where a FIFO stands in for a hung cgroupfs/procfs file and ``/dev/full`` for a
write the kernel refuses with ENOSPC.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from unittest.mock import ANY

import pytest

from embedded_runtime import CONTAINERD_1_7, EmbeddedRuntime, InMemoryBackend
from isolation.ownership import ForeignCgroup, own_group
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor, HostLimits, HostStalled
from nri_plugin.control.oom import OomController
from nri_plugin.events import EventLog
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.intents import ContainerRef, Intents, Phase, SetOomScoreAdj
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.views import host_view
from tests.builders import MiB, container, pod
from tests.faults.hostroot import HostRoot
from tests.policy.sysfs_builder import MachineShape

FAST = HostLimits(deadline=0.2, retries=2, retry_delay=0.05, quarantine=0.3, max_stuck=3)


def ref(container_id: str, cgroups_path: str, pid: int | None = None) -> ContainerRef:
    return ContainerRef(container_id, f"default/pod/{container_id}", "pod-a", cgroups_path, pid)


def oom(r: ContainerRef, value: int) -> SetOomScoreAdj:
    return SetOomScoreAdj(phase=Phase.POST_START, container=r, reason="test band", value=value)


@pytest.fixture
def tree(tmp_path: Path) -> HostRoot:
    return HostRoot(tmp_path / "host")


@pytest.fixture
async def executor(tree: HostRoot) -> AsyncIterator[HostExecutor]:
    ex = HostExecutor(Controllers([OomController(tree.host())]), EventLog(), FAST)
    ex.start()
    try:
        yield ex
    finally:
        ex.close()
        tree.release_all()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition the executor's threads make true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def messages(ex: HostExecutor) -> list[str]:
    return [e.message for e in ex.events.snapshot()]


async def test_a_blocked_file_is_abandoned_at_its_deadline_and_the_rest_goes_on(
    tree: HostRoot, executor: HostExecutor
) -> None:
    stuck = ref("c-stuck", tree.add_container("c-stuck", [101]))
    others = [ref(f"c-{i}", tree.add_container(f"c-{i}", [110 + i])) for i in range(5)]
    fifo = tree.block(101)
    started = time.monotonic()
    executor.submit(Intents(host=(oom(stuck, 500), *(oom(r, 600) for r in others))))
    await executor.drain()
    took = time.monotonic() - started
    assert [tree.oom(110 + i) for i in range(5)] == [600] * 5
    assert took < FAST.deadline + 1.0  # one deadline, not one per container
    status = executor.status()
    assert [s.path for s in status.stuck] == [str(fifo)]
    assert "oom:SetOomScoreAdj:c-stuck" in status.quarantined
    shown = host_view(executor)  # what `health` on the status socket shows
    assert shown["stuck"] == [
        {"path": str(fifo), "job": "oom post-start default/pod/c-stuck", "seconds": ANY}
    ]
    assert any(f"no answer from {fifo} within 0.2 s; abandoned" in m for m in messages(executor))
    # the file answers again: the thread comes back, and the held write is tried again
    written = tree.unblock(101)  # one writer, or two if the back-off already retried
    assert written in ("500", "500500")
    await until(lambda: tree.oom(101) == 500)
    await until(lambda: not executor.status().stuck)
    assert any("answered after" in m for m in messages(executor))


async def test_blocked_files_never_pile_up_threads(tree: HostRoot, executor: HostExecutor) -> None:
    refs = [ref(f"c-{i}", tree.add_container(f"c-{i}", [120 + i])) for i in range(6)]
    for i in range(6):
        tree.block(120 + i)
    healthy = ref("c-ok", tree.add_container("c-ok", [150]))
    threads_before = threading.active_count()
    executor.submit(Intents(host=tuple(oom(r, 300) for r in refs)))
    await until(lambda: executor.status().stalled)
    status = executor.status()
    assert len(status.stuck) == FAST.max_stuck
    assert threading.active_count() - threads_before <= FAST.max_stuck
    assert any("host I/O stalled: 3 threads are blocked" in m for m in messages(executor))
    executor.submit(Intents(host=(oom(healthy, 700),)))
    await asyncio.sleep(FAST.deadline)
    assert tree.oom(150) == 0  # stalled: waits, does not start a fourth thread
    tree.release_all()  # the host recovers: blocked threads return, one takes over
    await until(lambda: tree.oom(150) == 700)
    await until(lambda: not executor.status().stuck)


async def test_a_transient_failure_is_retried_a_bounded_number_of_times(
    tree: HostRoot, executor: HostExecutor
) -> None:
    full = ref("c-full", tree.add_container("c-full", [130]))
    fine = ref("c-fine", tree.add_container("c-fine", [131]))
    tree.fill(130)
    executor.submit(Intents(host=(oom(full, 400), oom(fine, 400))))
    await until(lambda: executor.counts["failed"] == 1 + FAST.retries)
    await executor.drain()
    assert tree.oom(131) == 400
    failures = [m for m in messages(executor) if "ENOSPC" in m]
    assert len(failures) == 1 + FAST.retries
    assert "retry 1 of 2" in failures[0] and "retry" not in failures[-1]
    assert executor.counts["retried"] == FAST.retries


async def test_a_retry_succeeds_once_the_host_recovers(
    tree: HostRoot, executor: HostExecutor
) -> None:
    full = ref("c-full", tree.add_container("c-full", [132]))
    tree.fill(132)
    executor.submit(Intents(host=(oom(full, 450),)))
    await until(lambda: executor.counts["failed"] >= 1)
    tree.heal(132)
    await until(lambda: tree.oom(132) == 450)


async def test_eio_on_one_process_still_writes_the_others_then_retries(
    tree: HostRoot, executor: HostExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = ref("c-eio", tree.add_container("c-eio", [140, 141]))
    bad = str(tree.oom_file(140))
    real_write = os.write
    failing = {"left": 1}

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == bad and failing["left"]:
            failing["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    executor.submit(Intents(host=(oom(r, 350),)))
    await until(lambda: tree.oom(140) == 350 and tree.oom(141) == 350)
    assert any("1 applied, 1 failed" in m and "EIO" in m for m in messages(executor))


HOSTILE = [
    "/",
    "/system.slice",
    "system.slice:cri-containerd:",
    "-.slice:cri-containerd:c-evil",
    "/kubepods",
    "/kubepods/burstable",
    "/kubepods/burstable/pod0123abcd-1111-2222-3333-444455556666",
    "kubepods-burstable-pod0123abcd_1111.slice:cri-containerd:kubepods.slice",
    "/kubepods/pod-a/c-evil\x00",
    "/kubepods/pod-a/../../c-evil",
    "/kubepods/pod-a/other-container",
    "/kubepods/pod-a/crio-conmon-c-evil",
    "kubepods.slice:crio:../../c-evil",
    "",
]


@pytest.mark.parametrize("cgroups_path", HOSTILE)
def test_a_cgroup_that_is_not_the_containers_own_is_refused(cgroups_path: str) -> None:
    with pytest.raises(ForeignCgroup):
        own_group(cgroups_path, "c-evil")


@pytest.mark.parametrize(
    ("cgroups_path", "container_id", "group"),
    [
        ("/kubepods/burstable/pod1/abc123", "abc123", "/kubepods/burstable/pod1/abc123"),
        ("/kubepods/pod1/crio-abc123", "abc123", "/kubepods/pod1/crio-abc123"),
        (
            "kubepods-burstable-pod1.slice:cri-containerd:abc123",
            "abc123",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/"
            "cri-containerd-abc123.scope",
        ),
        ("kubepods-pod1.slice:crio:abc123", "abc123", None),
    ],
)
def test_every_runtimes_container_cgroup_is_accepted(
    cgroups_path: str, container_id: str, group: str | None
) -> None:
    resolved = own_group(cgroups_path, container_id)
    assert resolved.name.removesuffix(".scope").endswith(container_id)
    if group is not None:
        assert resolved == PurePosixPath(group)


@pytest.mark.parametrize("container_id", ["", "a/b", "..", "c\x00d", "-rf", "x" * 300])
def test_an_id_that_is_not_a_plain_token_is_refused(container_id: str) -> None:
    with pytest.raises(ForeignCgroup):
        own_group(f"/kubepods/pod-a/{container_id}", container_id)


async def test_hostile_paths_touch_no_host_process_and_do_not_stop_the_batch(
    tree: HostRoot, executor: HostExecutor
) -> None:
    evil_pids = [1, 2, 3]  # the host's: in the root group of the tree
    hostile = [ref("c-evil", path, 1) for path in HOSTILE]
    good = [ref(f"c-{i}", tree.add_container(f"c-{i}", [160 + i])) for i in range(3)]
    for batch in (hostile[:7], good, hostile[7:]):  # one id: a batch would supersede
        for r in batch:
            executor.submit(Intents(host=(oom(r, 1000),)))
            await executor.drain()
    assert [tree.oom(pid) for pid in evil_pids] == [0, 0, 0]
    assert [tree.oom(160 + i) for i in range(3)] == [1000] * 3
    refused = [e for e in executor.events.snapshot() if e.kind == "refused"]
    assert len(refused) == len(HOSTILE)
    assert executor.counts["refused"] == len(HOSTILE)


async def test_a_pid_the_runtime_names_is_written_only_if_it_is_in_the_group(
    tree: HostRoot, executor: HostExecutor
) -> None:
    # an empty container group, and the runtime's pid is a host process
    tree.add_group(PurePosixPath("/kubepods/pod-a/c-empty"), [])
    liar = ref("c-empty", "/kubepods/pod-a/c-empty", 2)
    executor.submit(Intents(host=(oom(liar, 1000),)))
    await executor.drain()
    assert tree.oom(2) == 0
    assert any("1 not_in_group" in m for m in messages(executor))


async def test_a_read_that_blocks_fails_its_caller_at_the_deadline(
    tree: HostRoot, executor: HostExecutor
) -> None:
    release = threading.Event()
    with pytest.raises(HostStalled):
        await executor.run(release.wait, key="usage")
    with pytest.raises(HostStalled, match="quarantined"):  # not tried again at once
        await executor.run(lambda: True, key="usage")
    assert await executor.run(lambda: 42, key="other") == 42
    release.set()
    await until(lambda: not executor.status().stuck)


async def test_container_starts_stay_fast_and_isolated_while_one_oom_file_hangs(
    tree: HostRoot, executor: HostExecutor, tmp_path: Path
) -> None:
    """The adversarial finding, end to end: a runtime before NRI v0.7 (containerd 1.7), so
    nri-qos writes oom_score_adj itself after each start; the first container's file hangs.
    Before, every later request waited ~1 s and got no change; now each start is answered
    at once with its plan and the other containers get their values."""
    topology = MachineShape(cores_per_l3=8).expected_topology()
    plugin = NriPlugin(
        QosPolicy(Engine(topology)),
        PluginSettings(socket_path=tmp_path / "nri.sock"),
        on_intents=executor.submit,
    )
    backend = InMemoryBackend(first_pid=40000)
    runtime = EmbeddedRuntime(tmp_path / "nri.sock", flavor=CONTAINERD_1_7, backend=backend)
    names = [f"w{i}" for i in range(6)]
    for i, name in enumerate(names):  # InMemoryBackend hands out pids in creation order
        tree.add_container(f"ctr-{name}", [40000 + i], pod=f"pod-{name}")
    tree.block(40000)
    await runtime.start()
    runner = asyncio.create_task(plugin.run())
    try:
        await runtime.wait_for_plugins(1, timeout=10)
        took = []
        for name in names:
            await runtime.run_pod_sandbox(pod(name, "reclaimed_cores"))
            started = time.monotonic()
            await runtime.create_container(f"pod-{name}", container(name, 100, memory=64 * MiB))
            await runtime.start_container(f"ctr-{name}")
            took.append(time.monotonic() - started)
        # the reclaimed band's value (nonzero), on every container but the hung one (not
        # read here: reading the FIFO would release its writer)
        await until(lambda: all(tree.oom(40000 + i) not in (0, None) for i in range(1, 6)))
        assert len({tree.oom(40000 + i) for i in range(1, 6)}) == 1
        assert max(took) < 0.5, took  # was ~1 s per request with the write on the policy path
        assert [s.path for s in executor.status().stuck] == [str(tree.oom_file(40000))]
    finally:
        plugin.stop()
        await runner
        plugin.close()
        await runtime.stop()
