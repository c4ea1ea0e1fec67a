"""isolation.cgroups against the real cgroup v1 hierarchies of this host.

Groups are made at the v1 roots as ``/nri-qos-test-<random>`` (never under
``memory:/process_api``, which the sandbox uses) and removed in the fixture's teardown
even when a test fails: processes are killed and reaped first, then children and the
parent are removed in every hierarchy.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from isolation.cgroups import (
    CgroupBusy,
    CgroupFs,
    CgroupNotFound,
    CgroupProcessGone,
    CgroupValueRejected,
    CgroupVersion,
    CpuQuota,
    HostLayout,
    WriteAction,
)
from isolation.oom import ProcessControls
from tests.processes import start_process, stop

CGROUP_ROOT = Path("/sys/fs/cgroup")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups"),
    pytest.mark.skipif(
        not (CGROUP_ROOT / "cpuset" / "cpuset.cpus").exists(),
        reason="no cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset (not a v1/hybrid host)",
    ),
]

MIB = 1 << 20
BUSY_LOOP = "while True: pass"


@dataclass
class Lab:
    """A test parent group, and the processes a test started (killed at teardown)."""

    cgroups: CgroupFs
    parent: PurePosixPath
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def child(self, name: str = "child") -> PurePosixPath:
        group = self.parent / name
        self.cgroups.create_group(group)
        return group

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        process = start_process(*argv)
        self.processes.append(process)
        return process

    def v1_dir(self, group: PurePosixPath, controller: str) -> Path:
        return self.cgroups.group_dir(group, controller)


def _remove_leftovers(cgroups: CgroupFs, parent: PurePosixPath) -> None:
    """Last resort cleanup if remove_group itself failed: rmdir what is left, deepest first."""
    roots = [*cgroups.mounts.v1.values()]
    if cgroups.mounts.unified is not None:
        roots.append(cgroups.mounts.unified)
    for root in dict.fromkeys(roots):
        top = root / parent.relative_to("/")
        if not top.is_dir():
            continue
        for dirpath, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError as exc:  # pragma: no cover - only on a broken teardown
                print(f"could not remove {dirpath}: {exc}", file=sys.stderr)


@pytest.fixture
def lab() -> Iterator[Lab]:
    cgroups = CgroupFs()
    parent = PurePosixPath(f"/nri-qos-test-{secrets.token_hex(4)}")
    state = Lab(cgroups, parent)
    try:
        cgroups.create_group(parent)
        yield state
    finally:
        for process in state.processes:
            stop(process)
        try:
            if cgroups.exists(parent) or any(
                (root / parent.relative_to("/")).is_dir() for root in cgroups.mounts.v1.values()
            ):
                cgroups.remove_group(parent, recursive=True)
        finally:
            _remove_leftovers(cgroups, parent)


def _host_cpus(cgroups: CgroupFs) -> list[int]:
    return sorted(cgroups.get_cpuset_cpus("/"))


def _cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller list: path}; "" is the cgroup2 line."""
    lines: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        lines[controllers] = path
    return lines


# --------------------------------------------------------------------------- layout


def test_host_layout_is_detected_from_mountinfo() -> None:
    cgroups = CgroupFs()
    assert cgroups.layout in (HostLayout.HYBRID, HostLayout.LEGACY)
    for controller in ("cpuset", "cpu", "cpuacct", "memory"):
        assert cgroups.version_of(controller) is CgroupVersion.V1
        assert (cgroups.mounts.v1[controller] / "cgroup.procs").exists()


# --------------------------------------------------------------------------- writes


def test_new_cpuset_gets_the_parents_cpus_and_mems(lab: Lab) -> None:
    cgroups = lab.cgroups
    child = lab.child()
    assert cgroups.get_cpuset_cpus(child) == cgroups.get_cpuset_cpus("/")
    assert cgroups.get_cpuset_mems(child) == cgroups.get_cpuset_mems("/")
    for controller in ("cpuset", "cpu", "cpuacct", "memory"):
        assert lab.v1_dir(child, controller).is_dir()


def test_pin_a_real_process_and_read_it_back_from_the_kernel(lab: Lab) -> None:
    cgroups = lab.cgroups
    child = lab.child()
    last_cpu = _host_cpus(cgroups)[-1]
    first_node = min(cgroups.get_cpuset_mems("/"))

    cgroups.set_cpuset_cpus(child, {last_cpu})
    cgroups.set_cpuset_mems(child, {first_node})
    cgroups.set_cpu_shares(child, 512)
    cgroups.set_cpu_quota(child, CpuQuota(50_000, 100_000))
    cgroups.set_memory_limit(child, 64 * MIB)

    sleeper = lab.spawn("sleep", "60")
    writes = cgroups.move_pid(child, sleeper.pid)

    # what the kernel enforces
    placement = ProcessControls().allowed_placement(sleeper.pid)
    assert placement.cpus == {last_cpu}
    assert placement.mems == {first_node}
    assert os.sched_getaffinity(sleeper.pid) == {last_cpu}
    # the files, read back raw
    assert (lab.v1_dir(child, "cpuset") / "cpuset.cpus").read_text().strip() == str(last_cpu)
    assert (lab.v1_dir(child, "cpu") / "cpu.shares").read_text().strip() == "512"
    assert (lab.v1_dir(child, "cpu") / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (lab.v1_dir(child, "cpu") / "cpu.cfs_period_us").read_text().strip() == "100000"
    limit_file = lab.v1_dir(child, "memory") / "memory.limit_in_bytes"
    assert limit_file.read_text().strip() == str(64 * MIB)
    # and through the interface
    assert cgroups.get_cpuset_cpus(child) == {last_cpu}
    assert cgroups.get_effective_cpus(child) == {last_cpu}
    assert cgroups.get_effective_mems(child) == {first_node}
    assert cgroups.get_cpu_shares(child) == 512
    assert cgroups.get_cpu_quota(child) == CpuQuota(50_000, 100_000)
    assert cgroups.get_memory_limit(child) == 64 * MIB
    assert cgroups.list_pids(child) == [sleeper.pid]

    # the process is in the child in every hierarchy the move wrote to
    membership = _cgroup_lines(sleeper.pid)
    for controller in ("cpuset", "cpu", "cpuacct", "memory"):
        assert membership[controller] == str(child)
    moved_into = {write.path.parent for write in writes}
    assert lab.v1_dir(child, "cpuset") in moved_into
    if cgroups.layout is HostLayout.HYBRID:
        assert membership[""] == str(child)
        unified = cgroups.unified_dir(child)
        assert unified is not None
        assert (unified / "cgroup.procs").read_text().split() == [str(sleeper.pid)]


def test_unlimited_values_round_trip(lab: Lab) -> None:
    cgroups = lab.cgroups
    child = lab.child()
    cgroups.set_cpu_quota(child, CpuQuota(20_000, 50_000))
    cgroups.set_memory_limit(child, 32 * MIB)

    cgroups.set_cpu_quota(child, CpuQuota(None))
    cgroups.set_memory_limit(child, None)

    assert (lab.v1_dir(child, "cpu") / "cpu.cfs_quota_us").read_text().strip() == "-1"
    assert cgroups.get_cpu_quota(child) == CpuQuota(None, 100_000)
    assert cgroups.get_memory_limit(child) is None


def test_kernel_rounds_memory_limit_down_to_a_page(lab: Lab) -> None:
    child = lab.child()
    lab.cgroups.set_memory_limit(child, 1_000_000)
    page = os.sysconf("SC_PAGE_SIZE")
    assert lab.cgroups.get_memory_limit(child) == 1_000_000 // page * page


def test_quota_order_is_swapped_when_the_period_first_is_refused(lab: Lab) -> None:
    cgroups = lab.cgroups
    cgroups.set_cpu_quota(lab.parent, CpuQuota(50_000, 100_000))  # parent: 0.5 CPU
    child = lab.child()
    cgroups.set_cpu_quota(child, CpuQuota(50_000, 100_000))  # child: the parent's 0.5
    # Period 50000 first would make the child 50000/50000 = 1 CPU > parent: EINVAL.
    writes = cgroups.set_cpu_quota(child, CpuQuota(25_000, 50_000))
    assert [w.path.name for w in writes] == ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
    assert cgroups.get_cpu_quota(child) == CpuQuota(25_000, 50_000)


def test_cpuacct_usage_grows_for_a_busy_child(lab: Lab) -> None:
    cgroups = lab.cgroups
    child = lab.child()
    before = cgroups.cpu_usage_ns(child)
    busy = lab.spawn(sys.executable, "-c", BUSY_LOOP)
    cgroups.move_pid(child, busy.pid)
    time.sleep(0.5)
    after = cgroups.cpu_usage_ns(child)
    assert before == 0
    assert after - before > 50_000_000  # > 50 ms of CPU in 0.5 s
    assert cgroups.cpu_usage_ns(lab.parent) >= after  # hierarchical


# --------------------------------------------------------------------------- errors


def test_cpus_outside_the_parent_are_refused_with_a_clear_message(lab: Lab) -> None:
    cgroups = lab.cgroups
    cpus = _host_cpus(cgroups)
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to make a parent that excludes one")
    cgroups.set_cpuset_cpus(lab.parent, {cpus[0]})
    child = lab.child()
    with pytest.raises(CgroupValueRejected) as info:
        cgroups.set_cpuset_cpus(child, {cpus[-1]})
    # cgroup v1 answers EACCES here (validate_change: "must be a subset of our parent"),
    # not EINVAL; the errno is passed through unchanged.
    assert info.value.errno == errno.EACCES
    assert f"CPUs {cpus[-1]} are not in the parent's cpuset ({cpus[0]})" in info.value.message
    assert info.value.path == str(lab.v1_dir(child, "cpuset") / "cpuset.cpus")
    assert cgroups.get_cpuset_cpus(child) == {cpus[0]}  # unchanged


def test_cpus_the_host_does_not_have_are_refused(lab: Lab) -> None:
    child = lab.child()
    missing = max(_host_cpus(lab.cgroups)) + 1
    with pytest.raises(CgroupValueRejected) as info:
        lab.cgroups.set_cpuset_cpus(child, {missing})
    assert info.value.errno in (errno.ERANGE, errno.EINVAL)
    assert f"CPUs {missing} do not exist or are offline on this host" in info.value.message


def test_missing_group_is_enoent_with_a_hint(lab: Lab) -> None:
    missing = lab.parent / "no-such-container"
    with pytest.raises(CgroupNotFound) as info:
        lab.cgroups.set_cpu_shares(missing, 512)
    assert info.value.errno == errno.ENOENT
    assert info.value.message == (
        f"cgroup {missing} does not exist; is the container still running?"
    )
    with pytest.raises(CgroupNotFound):
        lab.cgroups.list_pids(missing)
    with pytest.raises(CgroupNotFound):
        lab.cgroups.remove_group(missing)


def test_task_into_an_empty_v1_cpuset_is_enospc(lab: Lab) -> None:
    child = lab.child()
    # A group made by someone who did not copy the parent's cpuset: empty cpus.
    os.rmdir(lab.v1_dir(child, "cpuset"))
    os.mkdir(lab.v1_dir(child, "cpuset"))
    sleeper = lab.spawn("sleep", "60")
    with pytest.raises(CgroupBusy) as info:
        lab.cgroups.move_pid(child, sleeper.pid)
    assert info.value.errno == errno.ENOSPC
    assert "set cpuset.cpus and cpuset.mems before adding tasks" in info.value.message


def test_moving_an_exited_process_is_esrch(lab: Lab) -> None:
    child = lab.child()
    gone = lab.spawn("true")
    gone.wait()
    with pytest.raises(CgroupProcessGone) as info:
        lab.cgroups.move_pid(child, gone.pid)
    assert info.value.errno == errno.ESRCH


def test_removing_a_group_with_a_process_is_ebusy(lab: Lab) -> None:
    child = lab.child()
    sleeper = lab.spawn("sleep", "60")
    lab.cgroups.move_pid(child, sleeper.pid)
    with pytest.raises(CgroupBusy) as info:
        lab.cgroups.remove_group(child)
    assert info.value.errno == errno.EBUSY
    assert "still has processes or child groups" in info.value.message
    sleeper.kill()
    sleeper.wait()
    lab.cgroups.remove_group(child)
    assert not lab.v1_dir(child, "cpu").exists()


# --------------------------------------------------------------------------- dry-run


def test_dry_run_plans_exactly_what_the_real_run_does(lab: Lab) -> None:
    dry = CgroupFs(dry_run=True)
    group = lab.parent / "planned" / "leaf"
    cpu = _host_cpus(dry)[-1]

    planned = dry.create_group(group)
    planned += dry.set_cpuset_cpus(group, {cpu})
    planned += dry.set_cpu_shares(group, 256)
    planned += dry.set_memory_limit(group, 16 * MIB)

    assert not lab.v1_dir(lab.parent / "planned", "cpu").exists()  # nothing written
    assert dry.planned == planned
    mkdirs = [w.path for w in planned if w.action is WriteAction.MKDIR]
    assert lab.v1_dir(group, "cpuset") in mkdirs
    assert lab.v1_dir(group.parent, "memory") in mkdirs

    real = lab.cgroups
    done = real.create_group(group)
    done += real.set_cpuset_cpus(group, {cpu})
    done += real.set_cpu_shares(group, 256)
    done += real.set_memory_limit(group, 16 * MIB)
    assert done == planned
    assert real.planned == []
    assert real.get_cpu_shares(group) == 256
