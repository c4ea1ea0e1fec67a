"""read_back: a container's cgroup and main process, as the host has them.

Against a hand-made cgroup v1 tree plus procfs in tmp_path (every value chosen so a
mix-up between fields shows), the cgroup v2 fake of tests/isolation, and a real `sleep`
in a real v1 group on this host.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.cgroups import (
    CgroupFs,
    CgroupMounts,
    CpuQuota,
    HostLayout,
    weight_to_shares,
)
from isolation.oom import ProcessControls
from nri_plugin.readback import UNLIMITED, HostView, read_back
from qos_model.containers import Container
from tests.isolation.fake_cgroup2 import FakeCgroup2, cg, echo
from tests.processes import start_process, stop

MIB = 1 << 20
GROUP = "/kubepods/burstable/pod1/c1"
V1_UNLIMITED_MEMORY = "9223372036854771712"


def status_text(cpus: str, mems: str) -> str:
    return (
        "Name:\tsleep\nState:\tS (sleeping)\nTgid:\t4242\nPid:\t4242\n"
        f"Cpus_allowed:\t0c\nCpus_allowed_list:\t{cpus}\n"
        f"Mems_allowed:\t1\nMems_allowed_list:\t{mems}\nvoluntary_ctxt_switches:\t3\n"
    )


class FakeV1Host:
    """cpuset, cpu+cpuacct (co-mounted) and memory hierarchies plus a procfs, in a dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procfs = root / "proc"
        mounts = CgroupMounts(
            layout=HostLayout.LEGACY,
            v1={
                "cpuset": root / "cg/cpuset",
                "cpu": root / "cg/cpu,cpuacct",
                "cpuacct": root / "cg/cpu,cpuacct",
                "memory": root / "cg/memory",
            },
            unified=None,
        )
        self.cgroupfs = CgroupFs(root / "cg", self.procfs, mounts=mounts)
        self.procs = ProcessControls(self.procfs)

    def group(self, controller: str, files: dict[str, str]) -> None:
        directory = self.cgroupfs.group_dir(GROUP, controller)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (directory / name).write_text(content)

    def process(self, pid: int, cpus: str, mems: str, oom: int) -> None:
        directory = self.procfs / str(pid)
        directory.mkdir(parents=True)
        (directory / "status").write_text(status_text(cpus, mems))
        (directory / "oom_score_adj").write_text(f"{oom}\n")


@pytest.fixture
def v1(tmp_path: Path) -> FakeV1Host:
    host = FakeV1Host(tmp_path)
    host.group("cpuset", {"cpuset.cpus": "2-3,6\n", "cpuset.mems": "0-1\n", "cgroup.procs": ""})
    host.group(
        "cpu",
        {
            "cpu.shares": "612\n",
            "cpu.cfs_quota_us": "25000\n",
            "cpu.cfs_period_us": "50000\n",
            "cgroup.procs": "4242\n4243\n4242\n",  # threads' tgids repeat in cgroup.procs
        },
    )
    host.group("memory", {"memory.limit_in_bytes": f"{96 * MIB}\n", "cgroup.procs": ""})
    host.process(4242, cpus="2-3", mems="1", oom=700)
    host.process(4243, cpus="6", mems="0", oom=-5)
    return host


def test_reads_every_field_from_cgroup_files_and_procfs(v1: FakeV1Host) -> None:
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP, pid=4242))
    assert view == HostView(
        id="c1",
        cgroup=GROUP,
        pid=4242,
        pids=(4242, 4243),
        cpus="2-3",  # the kernel's view of the process, not the cgroup's
        mems="1",
        cgroup_cpus="2-3,6",
        cgroup_mems="0-1",
        cpu_shares=612,
        cpu_quota=25_000,
        cpu_period=50_000,
        memory_limit=96 * MIB,
        oom_score_adj=700,
        errors=(),
    )


def test_main_process_defaults_to_the_first_in_the_cgroup(v1: FakeV1Host) -> None:
    # containerd reports no pid before StartContainer; the cgroup still has the process
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP))
    assert view.pid == 4242 and view.oom_score_adj == 700
    other = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP, pid=4243))
    assert (other.cpus, other.mems, other.oom_score_adj) == ("6", "0", -5)


def test_unlimited_values_read_as_minus_one(v1: FakeV1Host) -> None:
    v1.group("cpu", {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
    v1.group("memory", {"memory.limit_in_bytes": f"{V1_UNLIMITED_MEMORY}\n"})
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP, pid=4242))
    assert (view.cpu_quota, view.cpu_period, view.memory_limit) == (UNLIMITED, 100_000, UNLIMITED)
    assert view.errors == ()


def test_an_exited_container_gives_errors_not_an_exception(v1: FakeV1Host) -> None:
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP, pid=4999))
    assert view.pid == 4999
    assert (view.cpus, view.mems, view.oom_score_adj) == (None, None, None)
    assert view.cpu_shares == 612  # what could be read still is
    assert [e.split(":")[0] for e in view.errors] == ["cpus", "oom_score_adj"]
    assert "no longer exists" in view.errors[0]

    gone = read_back(
        v1.cgroupfs, v1.procs, Container(id="c2", cgroups_path="/kubepods/burstable/pod1/c2")
    )
    assert gone.cgroup == "/kubepods/burstable/pod1/c2"
    assert gone.pids == () and gone.pid is None
    assert gone.cpu_shares is None and gone.memory_limit is None and gone.cpu_quota is None
    fields = [e.split(":")[0] for e in gone.errors]
    assert fields == [
        "pids",
        "cgroup_cpus",
        "cgroup_mems",
        "cpu_shares",
        "cpu_quota",
        "memory_limit",
        "pid",
    ]
    assert "does not exist" in gone.errors[0]


def test_a_bad_cgroups_path_is_reported(v1: FakeV1Host) -> None:
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path="", pid=4242))
    assert view.errors[0].startswith("cgroup: empty cgroups_path")
    assert view.cgroup == "" and view.cpu_shares is None
    assert view.cpus == "2-3"  # the process side is still read


def test_as_dict_has_the_plain_names_the_lab_prints(v1: FakeV1Host) -> None:
    view = read_back(v1.cgroupfs, v1.procs, Container(id="c1", cgroups_path=GROUP, pid=4242))
    data = view.as_dict()
    for name in (
        "cpus",
        "mems",
        "oom_score_adj",
        "pids",
        "cpu_shares",
        "cpu_quota",
        "cpu_period",
        "memory_limit",
        "cgroup",
    ):
        assert name in data
    assert json.loads(json.dumps(data)) == data
    assert data["pids"] == [4242, 4243]


# --------------------------------------------------------------------------- cgroup v2 (fake)


def test_v2_weight_is_reported_as_shares(fs: FakeFilesystem) -> None:
    kernel = FakeCgroup2(fs)
    cgroupfs = CgroupFs()
    group = PurePosixPath("/kubepods/pod1/c1")
    cgroupfs.create_group(group)
    echo(cg(group) / "cpu.weight", "59")
    echo(cg(group) / "cpu.max", "max 100000")
    echo(cg(group) / "memory.max", str(32 * MIB))
    pid = kernel.spawn()
    cgroupfs.move_pid(group, pid)
    fs.create_file(f"/proc/{pid}/status", contents=status_text("0-7", "0"))
    fs.create_file(f"/proc/{pid}/oom_score_adj", contents="300\n")

    view = read_back(cgroupfs, ProcessControls(), Container(id="c1", cgroups_path=str(group)))

    assert view.pids == (pid,) and view.pid == pid
    assert view.cpu_shares == weight_to_shares(59) == 521  # lossy: 512 was asked
    assert (view.cpu_quota, view.cpu_period) == (UNLIMITED, 100_000)
    assert view.memory_limit == 32 * MIB
    assert view.cgroup_cpus == ""  # v2: empty means the parent's set
    assert (view.cpus, view.mems, view.oom_score_adj) == ("0-7", "0", 300)
    assert view.errors == ()


# --------------------------------------------------------------------------- real host


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups")
@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists(),
    reason="no cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset (not a v1/hybrid host)",
)
def test_real_sleep_in_a_real_v1_group() -> None:
    cgroupfs = CgroupFs()
    procs = ProcessControls()
    parent = PurePosixPath(f"/nri-qos-test-{secrets.token_hex(4)}")
    group = parent / "rb"
    last_cpu = max(cgroupfs.get_cpuset_cpus("/"))
    node = min(cgroupfs.get_cpuset_mems("/"))
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        cgroupfs.create_group(group)
        cgroupfs.set_cpuset_cpus(group, {last_cpu})
        cgroupfs.set_cpuset_mems(group, {node})
        cgroupfs.set_cpu_shares(group, 300)
        cgroupfs.set_cpu_quota(group, CpuQuota(30_000, 100_000))
        cgroupfs.set_memory_limit(group, 48 * MIB)
        sleeper = start_process()
        cgroupfs.move_pid(group, sleeper.pid)
        procs.set_oom_score_adj(sleeper.pid, 321)
        container = Container(id="rb", cgroups_path=str(group), pid=sleeper.pid)

        view = read_back(cgroupfs, procs, container)

        assert view.errors == ()
        assert view.pids == (sleeper.pid,)
        assert view.cpus == view.cgroup_cpus == str(last_cpu)
        assert view.mems == view.cgroup_mems == str(node)
        assert view.cpu_shares == 300
        assert (view.cpu_quota, view.cpu_period) == (30_000, 100_000)
        assert view.memory_limit == 48 * MIB
        assert view.oom_score_adj == 321

        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        after = read_back(cgroupfs, procs, container)
        assert after.pids == () and after.cpus is None and after.oom_score_adj is None
        assert after.cpu_shares == 300
        assert {e.split(":")[0] for e in after.errors} == {"cpus", "oom_score_adj"}
    finally:
        if sleeper is not None:
            stop(sleeper)
        if any(cgroupfs.group_dir(parent, c).exists() for c in ("cpuset", "cpu", "memory")):
            cgroupfs.remove_group(parent, recursive=True)
