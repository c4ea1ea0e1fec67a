"""isolation.iocost against a faithful fake of the cgroup v2 io files.

This host binds io to cgroup v1 blkio, so iocost cannot be reached for real; the first
tests guard `FakeIoCgroup2` itself against the kernel's documented formats and errnos
(cgroup-v2.rst, blk-iocost.c), the rest drive `IoCost` through `HostWriter` on it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.blockdev import BlockDevice, discover_block_devices
from isolation.errors import HostError
from isolation.iocost import IoCost
from isolation.writes import HostWriter
from tests.isolation.fake_cgroup2 import cg, echo
from tests.isolation.fake_iocost import LOOP0, NVME, VDA, FakeIoCgroup2

HDD_AUTO = (
    "254:0 enable=1 ctrl=auto rpct=0.00 rlat=250000 wpct=0.00 wlat=250000 min=1.00 max=10000.00"
)
HDD_MODEL = (
    "254:0 ctrl=auto model=linear rbps=174019176 rseqiops=41708 rrandiops=370 "
    "wbps=178075866 wseqiops=42705 wrandiops=378"
)


@dataclass
class Host:
    kernel: FakeIoCgroup2
    writer: HostWriter
    iocost: IoCost
    vda: BlockDevice
    nvme: BlockDevice
    group: Path


def _kernel_error(path: Path, value: str) -> int:
    try:
        echo(path, value)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.fixture
def host(fs: FakeFilesystem) -> Host:
    kernel = FakeIoCgroup2(fs, disks=(VDA, NVME, LOOP0))
    echo(cg("cgroup.subtree_control"), "+cpu +io +memory")
    os.mkdir(cg("batch"))
    writer = HostWriter()
    devices = {d.name: d for d in discover_block_devices()}
    return Host(kernel, writer, IoCost(cg(), writer), devices["vda"], devices["nvme0n1"],
                cg("batch"))  # fmt: skip


# --------------------------------------------------------------------------- the fake


def test_fake_qos_and_model_lines_follow_the_kernel(host: Host) -> None:
    qos, model = cg("io.cost.qos"), cg("io.cost.model")
    assert qos.read_text() == "" and model.read_text() == ""  # no device set up yet
    assert not (host.group / "io.cost.qos").exists()  # root only
    assert not cg("io.weight").exists() and (host.group / "io.weight").exists()

    echo(qos, "254:0 enable=1 ctrl=auto")
    assert qos.read_text() == HDD_AUTO + "\n"
    assert model.read_text() == HDD_MODEL + "\n"  # set up by the qos write
    assert (
        "254:0 rbytes=0 wbytes=0 rios=0 wios=0 dbytes=0 dios=0 cost.vrate=100.00 cost.usage=0"
        in (cg("io.stat").read_text())
    )

    echo(qos, "254:0 enable=1 ctrl=user rpct=95 rlat=75000 wpct=95.00 wlat=150000 min=50 max=150")
    assert qos.read_text() == (
        "254:0 enable=1 ctrl=user rpct=95.00 rlat=75000 wpct=95.00 wlat=150000 "
        "min=50.00 max=150.00\n"
    )
    echo(qos, "254:0 ctrl=auto")  # back to the built-in parameters
    assert qos.read_text() == HDD_AUTO + "\n"

    echo(model, "259:0 rbps=1000000000")  # an SSD: its own defaults, and user from now on
    lines = qos.read_text().splitlines()
    assert lines[0] == (
        "259:0 enable=0 ctrl=auto rpct=0.00 rlat=25000 wpct=0.00 wlat=25000 min=1.00 max=10000.00"
    )
    assert model.read_text().splitlines()[0] == (
        "259:0 ctrl=user model=linear rbps=1000000000 rseqiops=8932 rrandiops=8518 "
        "wbps=427891549 wseqiops=28755 wrandiops=21940"
    )


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("254:0 enable=1 bogus=1", errno.EINVAL),
        ("254:0 rpct=101", errno.EINVAL),
        ("254:0 min=200 max=100", errno.EINVAL),
        ("254:0 ctrl=maybe", errno.EINVAL),
        ("254:0 rlat=fast", errno.EINVAL),
        ("vda enable=1", errno.EINVAL),
        ("254:0enable=1", errno.EINVAL),
        ("254:9 enable=1", errno.ENODEV),
        ("254:1 enable=1", errno.ENODEV),  # a partition of vda
        ("8:0 enable=1", errno.ENODEV),
    ],
)
def test_fake_qos_refusals(host: Host, value: str, code: int) -> None:
    assert _kernel_error(cg("io.cost.qos"), value) == code


def test_fake_model_refusals(host: Host) -> None:
    model = cg("io.cost.model")
    assert _kernel_error(model, "254:0 model=quadratic") == errno.EINVAL
    assert _kernel_error(model, "254:0 rbps=-1") == errno.EINVAL
    assert _kernel_error(model, "254:0 xbps=1") == errno.EINVAL
    assert _kernel_error(model, "7:9 ctrl=auto") == errno.ENODEV


def test_fake_io_weight_follows_the_kernel(host: Host) -> None:
    weight = host.group / "io.weight"
    assert weight.read_text() == "default 100\n"
    echo(weight, "50")
    echo(weight, "default 60")
    assert weight.read_text() == "default 60\n"
    for bad in ("0", "10001", "abc", "default", "254:0 0", "254:0 10001"):
        expected = errno.EOPNOTSUPP if bad.startswith("254:0") else errno.EINVAL
        assert _kernel_error(weight, bad) == expected, bad  # no iocost on 254:0 yet
    echo(cg("io.cost.qos"), "254:0 enable=1")
    assert _kernel_error(weight, "254:0 10001") == errno.EINVAL  # iocost: EINVAL, not ERANGE
    assert _kernel_error(weight, "254:1 50") == errno.ENODEV
    echo(weight, "254:0 200")
    assert weight.read_text() == "default 60\n254:0 200\n"
    echo(weight, "254:0 default")
    assert weight.read_text() == "default 60\n"


def test_fake_io_max_follows_the_kernel(host: Host) -> None:
    io_max = host.group / "io.max"
    echo(io_max, "254:0 rbps=1048576 wiops=100")
    assert io_max.read_text() == "254:0 rbps=1048576 wbps=max riops=max wiops=100\n"
    assert _kernel_error(io_max, "254:0 rbps=0") == errno.ERANGE
    assert _kernel_error(io_max, "254:0 xbps=5") == errno.EINVAL
    echo(io_max, "254:0 rbps=max wiops=max")
    assert io_max.read_text() == ""


# --------------------------------------------------------------------------- IoCost


def test_unavailable_says_why(fs: FakeFilesystem) -> None:
    FakeIoCgroup2(fs, iocost=False)
    writer = HostWriter()
    assert "no cgroup2 hierarchy" in IoCost(Path("/nowhere"), writer).unavailable()
    assert "CONFIG_BLK_CGROUP_IOCOST" in IoCost(cg(), writer).unavailable()


def test_unavailable_without_the_io_controller(fs: FakeFilesystem) -> None:
    FakeIoCgroup2(fs, controllers=("cpu", "memory"))
    assert "io controller" in IoCost(cg(), HostWriter()).unavailable()


def test_available_on_a_full_fake(host: Host) -> None:
    assert host.iocost.unavailable() == ""


def test_configure_device_writes_once_and_then_only_reads(host: Host) -> None:
    outcome = host.iocost.configure_device(host.vda)
    assert outcome == "iocost on vda (254:0): io.cost.qos set to enable=1 ctrl=auto"
    assert [str(c) for c in host.writer.recent] == [
        f"write '254:0 enable=1 ctrl=auto' > {cg('io.cost.qos')} (iocost for vda (254:0))"
    ]
    assert host.iocost.read_qos()["254:0"] == dict(
        field.split("=") for field in HDD_AUTO.split()[1:]
    )
    again = host.iocost.configure_device(host.vda)
    assert again == "iocost on vda (254:0): io.cost.qos already enable=1 ctrl=auto"
    assert len(host.writer.recent) == 1


def test_configure_device_compares_in_the_kernels_format(host: Host) -> None:
    qos = "enable=1 ctrl=user rpct=95 rlat=5000 wpct=95 wlat=5000 min=0.5 max=150"
    model = "ctrl=user model=linear rbps=2000000000 rseqiops=400000 rrandiops=300000"
    first = host.iocost.configure_device(host.nvme, qos=qos, model=model)
    assert "io.cost.model set to" in first and "io.cost.qos set to" in first
    assert host.iocost.read_qos()["259:0"]["min"] == "1.00"  # clamped by the kernel
    assert host.iocost.read_model()["259:0"]["rbps"] == "2000000000"
    writes = len(host.writer.recent)
    second = host.iocost.configure_device(host.nvme, qos=qos, model=model)
    assert "io.cost.model already" in second and "io.cost.qos already" in second
    assert len(host.writer.recent) == writes == 2


@pytest.mark.parametrize(
    ("qos", "model", "message"),
    [
        ("enable=1 speed=9", None, "unknown setting 'speed=9'"),
        ("enable=yes", None, "bad value in 'enable=yes'"),
        ("rpct=120", None, "bad value in 'rpct=120'"),
        ("enable=1 ctrl=auto rlat=5000", None, "ctrl=auto with explicit rlat"),
        ("enable=1", "model=quadratic", "bad value in 'model=quadratic'"),
        ("enable=1", "ctrl=auto rbps=5", "ctrl=auto with explicit rbps"),
    ],
)
def test_configure_device_refuses_bad_settings_before_writing(
    host: Host, qos: str, model: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        host.iocost.configure_device(host.vda, qos=qos, model=model)
    assert not host.writer.recent


def test_configure_device_kernel_refusal_is_a_host_error(host: Host) -> None:
    ghost = BlockDevice("ghost", 8, 0, rotational=True, scheduler="")
    with pytest.raises(HostError) as caught:
        host.iocost.configure_device(ghost)
    assert caught.value.errno == errno.ENODEV
    assert "No such device" in str(caught.value)


def test_set_and_read_weight(host: Host) -> None:
    host.iocost.configure_device(host.vda)
    outcome = host.iocost.set_weight(host.group, 50, {"254:0": 200}, reason="batch class")
    assert outcome == f"io.weight in {host.group}: set default 100 -> 50, 254:0 default -> 200"
    assert host.iocost.read_weight(host.group) == (50, {"254:0": 200})
    assert (host.group / "io.weight").read_text() == "default 50\n254:0 200\n"
    writes = len(host.writer.recent)
    again = host.iocost.set_weight(host.group, 50, {"254:0": 200})
    assert again == f"io.weight in {host.group} already default 50, 254:0 200"
    assert len(host.writer.recent) == writes


@pytest.mark.parametrize(
    ("default", "per_device", "message"),
    [
        (0, {}, r"default io.weight must be 1..10000, got 0"),
        (10001, {}, r"must be 1..10000, got 10001"),
        (100, {"vda": 10}, r"device 'vda' is not MAJ:MIN"),
        (100, {"254:0": 0}, r"io.weight for 254:0 must be 1..10000, got 0"),
    ],
)
def test_set_weight_validates(
    host: Host, default: int, per_device: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        host.iocost.set_weight(host.group, default, per_device)
    assert not host.writer.recent


def test_per_device_weight_without_iocost_says_so(host: Host) -> None:
    with pytest.raises(HostError) as caught:
        host.iocost.set_weight(host.group, 100, {"259:0": 300})
    assert caught.value.errno == errno.EOPNOTSUPP
    assert "iocost is not enabled on it" in str(caught.value)


def test_group_without_io_has_no_weight(host: Host) -> None:
    os.mkdir(host.group / "leaf")  # batch does not delegate io
    with pytest.raises(HostError) as caught:
        host.iocost.read_weight(host.group / "leaf")
    assert caught.value.errno == errno.ENOENT
    assert "io controller is not enabled" in str(caught.value)


def test_dry_run_plans_without_touching(host: Host) -> None:
    writer = HostWriter(dry_run=True)
    iocost = IoCost(cg(), writer)
    assert "would be set to" in iocost.configure_device(host.vda)
    assert "would set default 100 -> 70" in iocost.set_weight(host.group, 70)
    assert [c.value for c in writer.planned] == ["254:0 enable=1 ctrl=auto", "default 70"]
    assert cg("io.cost.qos").read_text() == ""
    assert iocost.read_weight(host.group) == (100, {})


def test_this_host_has_no_iocost() -> None:
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified on this host")
    reason = IoCost(unified, HostWriter()).unavailable()
    if "io" in (unified / "cgroup.controllers").read_text().split():
        pytest.skip("io is available in cgroup2 here")
    assert "io controller is not available" in reason
