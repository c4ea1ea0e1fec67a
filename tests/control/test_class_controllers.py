"""The rdt and io controllers against faithful fakes of resctrl and the cgroup v2 io
files: what they set up at start, what they do per container, and how they degrade."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.cgroups import CgroupFs
from isolation.host import LinuxHost
from isolation.oom import ProcessControls
from isolation.rdt import RdtClassConfig, Resctrl
from isolation.writes import HostWriter
from nri_plugin.control.base import Controllers, ControllerUnavailable
from nri_plugin.control.io import IoController, IoSettings
from nri_plugin.control.rdt import RdtController, RdtSettings
from nri_plugin.control.support import host_support, with_support
from nri_plugin.policy.engine import EngineConfig
from nri_plugin.policy.intents import (
    ContainerRef,
    Phase,
    PlaceInRdtClass,
    ReleaseRdt,
    SetIoWeight,
)
from nri_plugin.policy.workload import SHARED
from tests.isolation.fake_cgroup2 import echo
from tests.isolation.fake_iocost import VDA, FakeIoCgroup2
from tests.isolation.fake_resctrl import FakeResctrl

GROUP = PurePosixPath("/kubepods/besteffort/podetl/ctr-etl")
REF = ContainerRef("ctr-etl", "batch/etl/spark", "pod-etl", str(GROUP), None)


@pytest.fixture
def hosts(fs: FakeFilesystem) -> tuple[FakeIoCgroup2, FakeResctrl, LinuxHost]:
    cg = FakeIoCgroup2(fs, disks=(VDA,))
    rc = FakeResctrl(fs, l3_domains=(0, 1), num_closids=4)
    host = LinuxHost(
        CgroupFs(Path("/sys/fs/cgroup"), Path("/proc")), ProcessControls(Path("/proc"))
    )
    return cg, rc, host


def _container_with_processes(cg: FakeIoCgroup2, rc: FakeResctrl, count: int) -> list[int]:
    """The container's cgroup with `count` processes, known to both fakes and to /proc."""
    root = Path("/sys/fs/cgroup")
    path = root
    for part in GROUP.parts[1:]:
        echo(path / "cgroup.subtree_control", "+io")  # as the kubelet's driver does
        path /= part
        if not path.exists():
            os.mkdir(path)
    pids = []
    for _ in range(count):
        pid = rc.spawn()
        cg.live_pids.add(pid)
        cg.groups[PurePosixPath("/")].procs.append(pid)
        echo(path / "cgroup.procs", str(pid))
        Path(f"/proc/{pid}").mkdir(parents=True, exist_ok=True)
        Path(f"/proc/{pid}/cgroup").write_text(f"0::{GROUP}\n")
        pids.append(pid)
    return pids


def test_rdt_sets_up_classes_most_protective_first_and_degrades_when_closids_run_out(
    hosts: tuple[FakeIoCgroup2, FakeResctrl, LinuxHost],
) -> None:
    _cg, rc, host = hosts
    rdt = RdtController(Resctrl(Path("/"), HostWriter()), host, RdtSettings())
    controllers = Controllers([rdt])
    controllers.start()
    # 4 CLOSIDs, the root holds one: reclaimed, shared and dedicated get a group
    assert set(rdt.ready) == {"reclaimed", SHARED, "dedicated"}
    assert "out of CLOSIDs" in rdt.degraded["system"]
    assert rdt.ready["reclaimed"] == "L3 ways 0x3f of 0xfffff, MB 30 %"
    schemata = Resctrl(Path("/")).read_schemata("reclaimed")
    # the kernel shows masks zero-padded to the width of cbm_mask
    assert {d: int(m, 16) for d, m in schemata["L3"].items()} == {0: 0x3F, 1: 0x3F}
    assert {d: int(v) for d, v in schemata["MB"].items()} == {0: 30, 1: 30}
    assert rc.last_cmd_status == "ok"

    # the engine is told: system_cores plans no RDT class, and says why
    config = with_support(EngineConfig(), host_support(controllers, rdt, _io_off()), rdt)
    assert "out of CLOSIDs" in config.planner.isolation.rdt_degraded["system"]
    assert config.planner.isolation.host.rdt.available


def test_rdt_places_the_containers_processes_and_its_monitoring_group(
    hosts: tuple[FakeIoCgroup2, FakeResctrl, LinuxHost],
) -> None:
    cg, rc, host = hosts
    rdt = RdtController(Resctrl(Path("/"), HostWriter()), host, RdtSettings())
    rdt.start()
    pids = _container_with_processes(cg, rc, 2)
    outsider = rc.spawn()  # listed by nobody: must stay in the root group
    intent = PlaceInRdtClass(
        phase=Phase.POST_START, container=REF, reason="test", rdt_class="reclaimed"
    )
    outcome = rdt.post_start(intent)
    assert outcome == "RDT class reclaimed: 2 of 2 process(es) moved into nri-qos-reclaimed"
    assert all(rc.group_of(p) == ("nri-qos-reclaimed", "ctr-etl") for p in pids)
    assert rc.group_of(outsider) == ("", None)
    assert rdt.post_start(intent) == ""  # a recheck with everyone in place writes nothing
    late = rc.spawn()  # forked after the first pass
    cg.live_pids.add(late)
    cg.groups[PurePosixPath("/")].procs.append(late)
    echo(Path("/sys/fs/cgroup", *GROUP.parts[1:], "cgroup.procs"), str(late))
    Path(f"/proc/{late}").mkdir()
    Path(f"/proc/{late}/cgroup").write_text(f"0::{GROUP}\n")
    assert rdt.post_start(intent).endswith("1 of 1 process(es) moved into nri-qos-reclaimed")
    assert rc.group_of(late) == ("nri-qos-reclaimed", "ctr-etl")

    released = rdt.post_stop(
        ReleaseRdt(phase=Phase.POST_STOP, container=REF, reason="gone", rdt_class="reclaimed")
    )
    assert "removed" in released
    assert Resctrl(Path("/")).mon_groups("reclaimed") == []


def test_rdt_leaves_a_degraded_class_in_the_root_group(
    hosts: tuple[FakeIoCgroup2, FakeResctrl, LinuxHost],
) -> None:
    cg, rc, host = hosts
    rdt = RdtController(Resctrl(Path("/"), HostWriter()), host, RdtSettings())
    rdt.start()
    pid = _container_with_processes(cg, rc, 1)[0]
    intent = PlaceInRdtClass(phase=Phase.POST_START, container=REF, reason="t", rdt_class="system")
    assert "unavailable (out of CLOSIDs" in rdt.post_start(intent)
    assert rc.group_of(pid) == ("", None)


def test_rdt_refuses_to_start_where_nothing_can_be_set_up(fs: FakeFilesystem) -> None:
    FakeIoCgroup2(fs)
    FakeResctrl(fs, mounted=False)
    rdt = RdtController(Resctrl(Path("/")), _host(), RdtSettings())
    with pytest.raises(ControllerUnavailable, match="no resctrl"):
        rdt.start()

    # a mask the hardware refuses (holes) for the only class: nothing to run with
    fs.reset()
    FakeIoCgroup2(fs)
    FakeResctrl(fs)
    bad = RdtSettings(classes={"reclaimed": RdtClassConfig(l3_mask=0x5)})
    rdt = RdtController(Resctrl(Path("/")), _host(), bad)
    with pytest.raises(ControllerUnavailable, match="no RDT class could be set up"):
        rdt.start()


def test_io_enables_iocost_per_disk_and_writes_weights_of_running_containers(
    hosts: tuple[FakeIoCgroup2, FakeResctrl, LinuxHost],
) -> None:
    cg, rc, host = hosts
    io = IoController(host, Path("/"), HostWriter(), IoSettings())
    io.start()
    assert io.via_runtime  # new containers get io.weight from the runtime
    qos = Path("/sys/fs/cgroup/io.cost.qos").read_text()
    assert qos.startswith(f"{VDA.devno} enable=1 ctrl=auto")
    _container_with_processes(cg, rc, 1)
    intent = SetIoWeight(
        phase=Phase.POST_UPDATE, container=REF, reason="t", weight=10, qos_class="reclaimed_cores"
    )
    io.post_update(intent)
    assert (
        Path("/sys/fs/cgroup", *GROUP.parts[1:], "io.weight").read_text().startswith("default 10")
    )


def test_io_is_unavailable_without_iocost_rather_than_failing_container_starts(
    fs: FakeFilesystem,
) -> None:
    FakeIoCgroup2(fs, disks=(VDA,), iocost=False)
    host = LinuxHost(
        CgroupFs(Path("/sys/fs/cgroup"), Path("/proc")), ProcessControls(Path("/proc"))
    )
    io = IoController(host, Path("/"), HostWriter(), IoSettings())
    with pytest.raises(ControllerUnavailable, match="no iocost"):
        io.start()
    assert not io.via_runtime


def test_dry_run_sets_up_nothing(hosts: tuple[FakeIoCgroup2, FakeResctrl, LinuxHost]) -> None:
    _cg, rc, host = hosts
    writer = HostWriter(dry_run=True)
    RdtController(Resctrl(Path("/"), writer), host, RdtSettings()).start()
    assert rc.closids_in_use() == {0}
    assert any(c.action == "mkdir" for c in writer.planned)


def _io_off() -> IoController:
    return IoController(LinuxHost.at(Path("/")), Path("/"), HostWriter(), IoSettings(enabled=False))


def _host() -> LinuxHost:
    return LinuxHost(
        CgroupFs(Path("/sys/fs/cgroup"), Path("/proc")), ProcessControls(Path("/proc"))
    )
