"""isolation.cgroups on a pure cgroup v2 host, emulated in pyfakefs.

This CI host cannot give cgroup2 any resource controller (they are bound to v1), so the
v2 code path runs against `FakeCgroup2` (tests/isolation/fake_cgroup2.py): a pyfakefs
tree at the production paths whose files, writes, mkdir and rmdir behave like the
kernel's. The first test here guards the fake itself.

`CgroupFs()` is built with its production defaults; only the filesystem is fake.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.cgroups import (
    CgroupBusy,
    CgroupFs,
    CgroupNotFound,
    CgroupUnsupported,
    CgroupValueRejected,
    CgroupVersion,
    CgroupWrite,
    CpuQuota,
    HostLayout,
    WriteAction,
    resolve_cgroups_path,
    shares_to_weight,
)
from tests.isolation.fake_cgroup2 import ROOT_TEXT, FakeCgroup2, cg, echo

MIB = 1 << 20

POD_UID = "pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
CONTAINER_ID = "3b1c0d5e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"
CGROUPS_PATH = f"kubepods-burstable-{POD_UID}.slice:cri-containerd:{CONTAINER_ID}"
POD = PurePosixPath(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD_UID}.slice")
CONTAINER = POD / f"cri-containerd-{CONTAINER_ID}.scope"


@dataclass
class Host:
    kernel: FakeCgroup2
    container_pid: int


@pytest.fixture
def host(fs: FakeFilesystem) -> Iterator[Host]:
    """A systemd-driver Kubernetes node: kubepods slices down to one container scope."""
    kernel = FakeCgroup2(fs)
    echo(cg("cgroup.subtree_control"), "+cpuset +cpu +io +memory +pids")
    for level in (POD.parents[1], POD.parent, POD):  # kubepods.slice .. pod slice
        os.mkdir(cg(level))
        echo(cg(level) / "cgroup.subtree_control", "+cpuset +cpu +memory +pids")
    os.mkdir(cg(CONTAINER))
    echo(cg(POD) / "cpuset.cpus", "0-3")
    pid = kernel.spawn()
    echo(cg(CONTAINER) / "cgroup.procs", str(pid))
    yield Host(kernel, pid)


def _tree() -> dict[str, str]:
    """Every file and its content: a snapshot to prove dry-run wrote nothing."""
    snapshot: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(cg()):
        snapshot[dirpath] = "<dir>"
        for name in filenames:
            snapshot[os.path.join(dirpath, name)] = Path(dirpath, name).read_text()
    return snapshot


def _file(group: PurePosixPath, name: str) -> str:
    return (cg(group) / name).read_text()


# --------------------------------------------------------------------------- the fake itself


def test_fake_follows_the_documented_formats(host: Host) -> None:
    """Guard the fake: defaults and formats as cgroup-v2.rst documents them."""
    assert _file(CONTAINER, "cpu.max") == "max 100000\n"
    assert _file(CONTAINER, "cpu.weight") == "100\n"
    assert _file(CONTAINER, "memory.max") == "max\n"
    assert _file(CONTAINER, "cpuset.cpus") == "\n"  # empty: inherit
    assert _file(CONTAINER, "cpuset.cpus.effective") == "0-3\n"
    assert _file(CONTAINER, "cgroup.controllers") == "cpuset cpu memory pids\n"
    assert _file(CONTAINER, "cgroup.subtree_control") == "\n"
    assert _file(CONTAINER, "cgroup.procs") == f"{host.container_pid}\n"
    assert _file(CONTAINER, "cpu.stat").startswith("usage_usec 0\nuser_usec 0\nsystem_usec 0\n")
    assert _file(PurePosixPath("/"), "cgroup.controllers") == (
        "cpuset cpu io memory hugetlb pids rdma misc\n"
    )
    assert not cg("cpu.max").exists()  # root has no resource-control files
    echo(cg(CONTAINER) / "cpu.max", "25000")  # one number: $MAX only
    assert _file(CONTAINER, "cpu.max") == "25000 100000\n"
    with pytest.raises(OSError) as info:
        echo(cg(CONTAINER) / "cpu.weight", "0")
    assert info.value.errno == errno.ERANGE
    assert _file(CONTAINER, "cpu.weight") == "100\n"  # a refused write changes nothing


# --------------------------------------------------------------------------- layout, paths


def test_production_defaults_detect_a_unified_host(host: Host) -> None:
    cgroups = CgroupFs()
    assert cgroups.layout is HostLayout.UNIFIED
    assert cgroups.mounts.unified == cg()
    for controller in ("cpuset", "cpu", "memory"):
        assert cgroups.version_of(controller) is CgroupVersion.V2
    group = cgroups.resolve(CGROUPS_PATH)
    assert group == CONTAINER
    assert cgroups.group_dir(group, "cpu").is_dir()
    assert cgroups.exists(group)


# --------------------------------------------------------------------------- operations


def test_cpuset_cpus_and_mems(host: Host) -> None:
    cgroups = CgroupFs()
    group = resolve_cgroups_path(CGROUPS_PATH)
    writes = cgroups.set_cpuset_cpus(group, {2, 3})
    cgroups.set_cpuset_mems(group, {0})
    assert writes == [CgroupWrite(WriteAction.WRITE, cg(CONTAINER) / "cpuset.cpus", "2-3")]
    assert _file(CONTAINER, "cpuset.cpus") == "2-3\n"
    assert cgroups.get_cpuset_cpus(group) == {2, 3}
    assert cgroups.get_effective_cpus(group) == {2, 3}
    assert cgroups.get_cpuset_mems(group) == {0}
    assert cgroups.get_effective_mems(group) == {0}


def test_v2_accepts_cpus_outside_the_parent_and_narrows_the_effective_set(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.set_cpuset_cpus(CONTAINER, {2, 3, 4, 5})  # the pod slice has 0-3
    assert cgroups.get_cpuset_cpus(CONTAINER) == {2, 3, 4, 5}
    assert cgroups.get_effective_cpus(CONTAINER) == {2, 3}


def test_cpus_the_host_lacks_are_einval_with_a_clear_message(host: Host) -> None:
    cgroups = CgroupFs()
    with pytest.raises(CgroupValueRejected) as info:
        cgroups.set_cpuset_cpus(CONTAINER, {6, 8, 9})
    assert info.value.errno == errno.EINVAL
    assert "CPUs 8-9 do not exist or are offline on this host (it has 0-7)" in info.value.message
    assert cgroups.get_cpuset_cpus(CONTAINER) == frozenset()


def test_shares_are_written_as_weight(host: Host) -> None:
    cgroups = CgroupFs()
    for shares in (2, 512, 1024, 4096, 262144):
        writes = cgroups.set_cpu_shares(CONTAINER, shares)
        assert writes[0].path.name == "cpu.weight"
        assert _file(CONTAINER, "cpu.weight") == f"{shares_to_weight(shares)}\n"
        assert shares_to_weight(cgroups.get_cpu_shares(CONTAINER)) == shares_to_weight(shares)
    cgroups.set_cpu_shares(CONTAINER, 1024)
    assert _file(CONTAINER, "cpu.weight") == "100\n"
    assert cgroups.get_cpu_shares(CONTAINER) == 1024
    with pytest.raises(CgroupValueRejected) as info:
        cgroups.set_cpu_shares(CONTAINER, 1)
    assert info.value.errno == errno.EINVAL


def test_cpu_max(host: Host) -> None:
    cgroups = CgroupFs()
    writes = cgroups.set_cpu_quota(CONTAINER, CpuQuota(50_000, 100_000))
    assert [w.value for w in writes] == ["50000 100000"]  # one atomic write
    assert _file(CONTAINER, "cpu.max") == "50000 100000\n"
    assert cgroups.get_cpu_quota(CONTAINER) == CpuQuota(50_000, 100_000)
    cgroups.set_cpu_quota(CONTAINER, CpuQuota(None, 20_000))
    assert _file(CONTAINER, "cpu.max") == "max 20000\n"
    assert cgroups.get_cpu_quota(CONTAINER) == CpuQuota(None, 20_000)


def test_memory_max(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.set_memory_limit(CONTAINER, 64 * MIB)
    assert _file(CONTAINER, "memory.max") == f"{64 * MIB}\n"
    assert cgroups.get_memory_limit(CONTAINER) == 64 * MIB
    cgroups.set_memory_limit(CONTAINER, 1_000_000)
    assert cgroups.get_memory_limit(CONTAINER) == 999_424  # rounded down to a page
    cgroups.set_memory_limit(CONTAINER, None)
    assert _file(CONTAINER, "memory.max") == "max\n"
    assert cgroups.get_memory_limit(CONTAINER) is None


def test_pids_move_and_usage(host: Host) -> None:
    cgroups = CgroupFs()
    other = host.kernel.spawn()
    assert cgroups.list_pids(CONTAINER) == [host.container_pid]
    writes = cgroups.move_pid(CONTAINER, other)
    assert writes == [
        CgroupWrite(WriteAction.WRITE, cg(CONTAINER) / "cgroup.procs",
                    str(other))
    ]  # fmt: skip
    assert cgroups.list_pids(CONTAINER) == [host.container_pid, other]
    assert other not in cgroups.list_pids("/")

    host.kernel.burn(CONTAINER, 1500)
    assert cgroups.cpu_usage_ns(CONTAINER) == 1_500_000
    assert cgroups.cpu_usage_ns(POD) == 1_500_000


# --------------------------------------------------------------------------- groups


def test_create_group_enables_controllers_top_down(host: Host) -> None:
    cgroups = CgroupFs()
    group = PurePosixPath("/nri-qos.slice/reclaimed")
    writes = cgroups.create_group(group)
    top = cg("nri-qos.slice")
    # the root already delegates cpuset/cpu/memory: only the new parent needs enabling
    assert writes == [
        CgroupWrite(WriteAction.MKDIR, top),
        CgroupWrite(WriteAction.WRITE, top / "cgroup.subtree_control", "+cpuset +cpu +memory"),
        CgroupWrite(WriteAction.MKDIR, top / "reclaimed"),
    ]
    assert _file(group, "cgroup.controllers") == "cpuset cpu memory\n"
    for name in ("cpuset.cpus", "cpu.weight", "cpu.max", "memory.max"):
        assert (top / "reclaimed" / name).exists()
    assert cgroups.create_group(group) == []  # idempotent


def test_enable_controllers_on_an_existing_group(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    assert not (cg("plain", "leaf") / "cpu.weight").exists()
    writes = cgroups.enable_controllers("/plain", ("cpu", "memory"))
    assert [w.value for w in writes] == ["+cpu +memory"]
    assert (cg("plain", "leaf") / "cpu.weight").exists()
    assert cgroups.enable_controllers("/plain", ("cpu",)) == []


def test_missing_controller_file_says_enable_it(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    with pytest.raises(CgroupNotFound) as info:
        cgroups.set_cpu_shares("/plain/leaf", 512)
    assert info.value.errno == errno.ENOENT
    assert "cpu.weight does not exist in cgroup /plain/leaf" in info.value.message
    assert "cgroup.subtree_control" in info.value.message


def test_enabling_an_unavailable_controller_is_enoent(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    with pytest.raises(CgroupUnsupported) as info:
        cgroups.enable_controllers("/plain/leaf", ("cpu",))  # /plain delegates nothing
    assert info.value.errno == errno.ENOENT
    assert "not in its cgroup.controllers" in info.value.message


def test_no_internal_process_rule(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.create_group("/busy")
    pid = host.kernel.spawn()
    cgroups.move_pid("/busy", pid)
    # creating a child needs controllers enabled in /busy, which has a process
    with pytest.raises(CgroupBusy) as info:
        cgroups.create_group("/busy/child")
    assert info.value.errno == errno.EBUSY
    assert "move its processes into a child group first" in info.value.message
    # and a group that delegates controllers cannot take processes
    with pytest.raises(CgroupBusy) as moved:
        cgroups.move_pid(POD, pid)
    assert moved.value.errno == errno.EBUSY
    assert "only allows processes in leaf groups" in moved.value.message


def test_missing_container_is_enoent(host: Host) -> None:
    cgroups = CgroupFs()
    gone = POD / "cri-containerd-0000.scope"
    with pytest.raises(CgroupNotFound) as info:
        cgroups.set_memory_limit(gone, 64 * MIB)
    assert info.value.errno == errno.ENOENT
    assert info.value.message == f"cgroup {gone} does not exist; is the container still running?"


def test_remove_group(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.create_group("/nri-qos.slice/a/b")
    with pytest.raises(CgroupBusy) as info:
        cgroups.remove_group(CONTAINER)  # has a process
    assert info.value.errno == errno.EBUSY
    writes = cgroups.remove_group("/nri-qos.slice", recursive=True)
    assert [w.action for w in writes] == [WriteAction.RMDIR] * 3
    assert [w.path.name for w in writes] == ["b", "a", "nri-qos.slice"]
    assert not cg("nri-qos.slice").exists()
    with pytest.raises(CgroupNotFound):
        cgroups.remove_group("/nri-qos.slice")


def test_dry_run_writes_nothing_and_plans_what_the_real_run_does(host: Host) -> None:
    def operations(cgroups: CgroupFs) -> list[CgroupWrite]:
        group = PurePosixPath("/nri-qos.slice/shared-pool")
        writes = cgroups.create_group(group)
        writes += cgroups.set_cpuset_cpus(group, {4, 5, 6})
        writes += cgroups.set_cpu_shares(group, 2048)
        writes += cgroups.set_cpu_quota(group, CpuQuota(300_000))
        writes += cgroups.set_memory_limit(group, 256 * MIB)
        writes += cgroups.set_cpuset_cpus(CONTAINER, {1})
        return writes

    before = _tree()
    dry = CgroupFs(dry_run=True)
    planned = operations(dry)
    assert _tree() == before
    assert dry.planned == planned
    assert [str(w) for w in planned[:2]] == [
        f"mkdir {ROOT_TEXT}/nri-qos.slice",
        f"write '+cpuset +cpu +memory' > {ROOT_TEXT}/nri-qos.slice/cgroup.subtree_control",
    ]

    real = CgroupFs()
    assert operations(real) == planned
    assert real.planned == []
    assert _file(PurePosixPath("/nri-qos.slice/shared-pool"), "cpu.weight") == "174\n"
