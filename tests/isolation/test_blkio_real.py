"""isolation.blkio against this host's real cgroup v1 blkio, on a loop device of our own.

Each test gets a fresh sparse file in tmp attached with `losetup -f --show`, and a blkio
group ``/sys/fs/cgroup/blkio/nri-qos-test-blkio-<random>`` at the v1 root (never under
process_api). Teardown detaches the loop device, restores its scheduler and removes the
group even when a test fails. vda is never written to: it only appears as a device the
BFQ code must skip.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolation.blkio import Blkio, Throttle
from isolation.blockdev import BlockDevice, active_scheduler, discover_block_devices
from isolation.errors import HostError
from isolation.writes import HostWriter

BLKIO = Path("/sys/fs/cgroup/blkio")
MIB = 1 << 20

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and cgroups"),
    pytest.mark.skipif(
        not (BLKIO / "blkio.throttle.read_bps_device").exists(),
        reason="no cgroup v1 blkio hierarchy with throttling at /sys/fs/cgroup/blkio",
    ),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup is not installed"),
]


@dataclass
class Lab:
    writer: HostWriter
    blkio: Blkio
    loop: BlockDevice
    group: Path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(64 * MIB)
    attach = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {attach.stderr.strip() or attach.returncode}")
    loop_path = attach.stdout.strip()
    name = Path(loop_path).name
    scheduler_file = Path("/sys/block") / name / "queue" / "scheduler"
    original = active_scheduler(scheduler_file.read_text())
    group = BLKIO / f"nri-qos-test-blkio-{secrets.token_hex(4)}"
    try:
        os.mkdir(group)
        loop = _device(name)
        writer = HostWriter()
        yield Lab(writer, Blkio(writer), loop, group)
    finally:
        try:
            if group.is_dir():
                os.rmdir(group)
        finally:
            if original and active_scheduler(scheduler_file.read_text()) != original:
                scheduler_file.write_text(original)
            subprocess.run(["losetup", "-d", loop_path], check=False)


def _device(name: str) -> BlockDevice:
    (found,) = [d for d in discover_block_devices(include=[name]) if d.name == name]
    return found


def _dd_in_group(group: Path, device: str) -> tuple[float, str]:
    """Read 20 MiB with O_DIRECT from `device` in a process that joins `group` first;
    the rate in MiB/s from dd's own byte count and elapsed time."""
    script = (
        f"echo $$ > {group / 'cgroup.procs'} && "
        f"exec dd if={device} of=/dev/null bs=1M count=20 iflag=direct"
    )
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    assert match, done.stderr
    seconds = float(match.group(2)) or wall
    return int(match.group(1)) / MIB / seconds, done.stderr.strip().splitlines()[-1]


def test_read_bps_throttle_limits_a_real_reader(lab: Lab) -> None:
    device = f"/dev/{lab.loop.name}"
    limit = Throttle(read_bps=10 * MIB)
    outcome = lab.blkio.set_throttle(lab.group, lab.loop, limit, reason="test cap")
    assert f"read_bps none -> {10 * MIB}" in outcome
    assert lab.blkio.read_throttle(lab.group, lab.loop) == limit
    assert "already" in lab.blkio.set_throttle(lab.group, lab.loop, limit, reason="again")
    assert len(lab.writer.recent) == 1

    rate, line = _dd_in_group(lab.group, device)
    print(f"throttled at 10 MiB/s: {rate:.2f} MiB/s ({line})")
    assert 6 <= rate <= 14, line
    served = (lab.group / "blkio.throttle.io_service_bytes").read_text()
    assert f"{lab.loop.devno} Read {20 * MIB}" in served  # the reads were the group's

    lab.blkio.set_throttle(lab.group, lab.loop, Throttle(read_bps=0), reason="lift")
    assert lab.blkio.read_throttle(lab.group, lab.loop) == Throttle()
    assert (lab.group / "blkio.throttle.read_bps_device").read_text() == ""
    rate, line = _dd_in_group(lab.group, device)
    print(f"after removing the cap: {rate:.2f} MiB/s ({line})")
    assert rate > 30, line


def test_all_four_caps_read_back(lab: Lab) -> None:
    caps = Throttle(read_bps=5 * MIB, write_bps=3 * MIB, read_iops=500, write_iops=300)
    lab.blkio.set_throttle(lab.group, lab.loop, caps, reason="test")
    assert lab.blkio.read_throttle(lab.group, lab.loop) == caps
    lab.blkio.set_throttle(lab.group, lab.loop, Throttle(write_bps=0), reason="test")
    assert lab.blkio.read_throttle(lab.group, lab.loop) == Throttle(5 * MIB, None, 500, 300)


def test_throttle_errors(lab: Lab) -> None:
    with pytest.raises(ValueError, match="read_iops must be an integer >= 0"):
        lab.blkio.set_throttle(lab.group, lab.loop, Throttle(read_iops=-1), reason="test")
    ghost = BlockDevice("ghost", lab.loop.major, 1000 + lab.loop.minor, True, "")
    with pytest.raises(HostError) as caught:
        lab.blkio.set_throttle(lab.group, ghost, Throttle(read_bps=MIB), reason="test")
    assert caught.value.errno == errno.ENODEV
    print(caught.value)


def test_bfq_weight_on_the_loop_device(lab: Lab) -> None:
    scheduler_file = Path("/sys/block") / lab.loop.name / "queue" / "scheduler"
    if "bfq" not in scheduler_file.read_text().replace("[", " ").replace("]", " ").split():
        pytest.skip(f"bfq is not offered for {lab.loop.name}: {scheduler_file.read_text()}")
    if not (lab.group / "blkio.bfq.weight").exists():
        pytest.skip("no blkio.bfq.weight in a v1 group on this kernel")
    scheduler_file.write_text("bfq")
    loop = _device(lab.loop.name)
    assert loop.scheduler == "bfq"
    not_bfq = BlockDevice("vda", 254, 0, True, "mq-deadline")  # skipped, never written
    outcome = lab.blkio.set_bfq_weight(lab.group, 500, [loop, not_bfq], reason="test weight")
    print(outcome)
    assert "weight 100 -> 500" in outcome
    assert f"{loop.name} default -> 500" in outcome
    assert "not BFQ, no per-device weight: vda (mq-deadline)" in outcome
    assert (lab.group / "blkio.bfq.weight").read_text().strip() == "500"
    assert f"{loop.devno} 500" in (lab.group / "blkio.bfq.weight_device").read_text()
    writes = len(lab.writer.recent)
    assert "weight already 500" in lab.blkio.set_bfq_weight(lab.group, 500, [loop], "again")
    assert len(lab.writer.recent) == writes == 2

    with pytest.raises(ValueError, match=r"1\.\.1000, got 1001"):
        lab.blkio.set_bfq_weight(lab.group, 1001, [loop], reason="test")
    with pytest.raises(HostError) as caught:  # what the range check protects from
        lab.writer.write(lab.group / "blkio.bfq.weight", "2000", "out of range on purpose")
    assert caught.value.errno == errno.ERANGE


def test_bfq_weight_needs_the_file(lab: Lab) -> None:
    with pytest.raises(HostError) as caught:
        lab.blkio.set_bfq_weight(BLKIO, 200, [], reason="root has no weight")
    assert caught.value.errno == errno.EOPNOTSUPP
    assert "no blkio.bfq.weight in /sys/fs/cgroup/blkio" in str(caught.value)
    with pytest.raises(HostError) as caught:
        lab.blkio.set_bfq_weight(lab.group / "missing", 200, [], reason="no such group")
    assert caught.value.errno == errno.ENOENT
