"""isolation.blockdev: /sys/block discovery, on fake trees and on this host's sysfs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.blockdev import BlockDevice, active_scheduler, discover_block_devices
from isolation.errors import HostError
from tests.isolation.fake_iocost import LOOP0, NVME, VDA, FakeDisk, add_block_devices

ZRAM0 = FakeDisk("zram0", 252, 0, rotational=False, virtual=True, scheduler="none")
DM0 = FakeDisk("dm-0", 253, 0, rotational=False, virtual=True, scheduler="none")


def test_whole_physical_disks_only_by_default(fs: FakeFilesystem) -> None:
    add_block_devices(fs, [VDA, NVME, LOOP0, ZRAM0, DM0], root="/host")
    assert discover_block_devices(Path("/host")) == [
        BlockDevice("nvme0n1", 259, 0, rotational=False, scheduler="none"),
        BlockDevice("vda", 254, 0, rotational=True, scheduler="mq-deadline"),
    ]


def test_include_names_virtual_devices(fs: FakeFilesystem) -> None:
    add_block_devices(fs, [VDA, LOOP0, ZRAM0])
    found = discover_block_devices(include=["loop0"])
    assert [d.name for d in found] == ["loop0", "vda"]
    assert found[0].devno == "7:0" and found[0].scheduler == "none"


def test_partitions_are_skipped_even_when_listed(fs: FakeFilesystem) -> None:
    """Old sysfs layouts list partitions in /sys/block too; their `partition` file tells."""
    add_block_devices(fs, [VDA])
    fs.create_symlink(
        "/sys/block/vda1", "../devices/pci0000:00/0000:00:02.0/virtio0/block/vda/vda1"
    )
    assert [d.name for d in discover_block_devices(include=["vda1"])] == ["vda"]


def test_missing_queue_files_read_as_plain(fs: FakeFilesystem) -> None:
    fs.create_file("/sys/devices/platform/mmc0/block/mmcblk0/dev", contents="179:0\n")
    fs.create_dir("/sys/devices/virtual/block")
    fs.create_symlink("/sys/block/mmcblk0", "../devices/platform/mmc0/block/mmcblk0")
    assert discover_block_devices() == [BlockDevice("mmcblk0", 179, 0, False, "")]


def test_bad_dev_file_names_the_file(fs: FakeFilesystem) -> None:
    add_block_devices(fs, [VDA])
    dev = "/sys/devices/pci0000:00/0000:00:02.0/virtio0/block/vda/dev"
    fs.remove_object(dev)
    fs.create_file(dev, contents="vda\n")
    with pytest.raises(HostError) as caught:
        discover_block_devices()
    assert caught.value.errno == errno.EINVAL
    assert caught.value.path == "/sys/block/vda/dev"
    assert "expected MAJ:MIN, got 'vda'" in str(caught.value)


def test_no_sysfs_is_enoent(fs: FakeFilesystem) -> None:
    with pytest.raises(HostError) as caught:
        discover_block_devices(Path("/empty"))
    assert caught.value.errno == errno.ENOENT
    assert "is sysfs mounted under /empty?" in str(caught.value)


@pytest.mark.parametrize(
    ("line", "active"),
    [
        ("mq-deadline [bfq] none", "bfq"),
        ("[none] mq-deadline kyber bfq ", "none"),
        ("none", ""),
        ("", ""),
    ],
)
def test_active_scheduler(line: str, active: str) -> None:
    assert active_scheduler(line) == active


def test_this_hosts_disks() -> None:
    """On the real sysfs: the virtio disk is found, loop/zram are not (read only)."""
    if not Path("/sys/block/vda").exists():
        pytest.skip("this host has no /sys/block/vda")
    devices = {d.name: d for d in discover_block_devices()}
    vda = devices["vda"]
    assert vda.devno == Path("/sys/block/vda/dev").read_text().strip()
    assert (
        vda.scheduler and f"[{vda.scheduler}]" in Path("/sys/block/vda/queue/scheduler").read_text()
    )
    assert not any(name.startswith(("loop", "zram", "ram")) for name in devices)
