"""Which block devices this host has, read from sysfs under a configurable root.

The disk backends (iocost on cgroup v2, blkio on v1) address devices by "MAJ:MIN" and
need to know each device's active I/O scheduler: BFQ weights only apply where BFQ runs.
`discover_block_devices` reads ``/sys/block`` once into immutable `BlockDevice` values.

Only whole physical disks are returned by default. Partitions cannot carry iocost or
per-device weights (the kernel answers ENODEV), and virtual devices (loop, ram, zram,
dm-*, md*) sit on top of a physical disk whose queue is the one worth controlling; a
caller that wants one anyway (a test's own loop device) names it in `include`.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from isolation import inflight
from isolation.errors import HostError

_DEVNO = re.compile(r"(\d+):(\d+)")
_ACTIVE = re.compile(r"\[([^\]]+)\]")


@dataclass(frozen=True)
class BlockDevice:
    """One whole disk: its name in /sys/block, device number and queue properties."""

    name: str
    major: int
    minor: int
    rotational: bool
    scheduler: str  # the active one ("bfq", "mq-deadline", "none"); "" when unknown

    @property
    def devno(self) -> str:
        """ "MAJ:MIN", the form every cgroup io/blkio file uses."""
        return f"{self.major}:{self.minor}"


def discover_block_devices(
    root: Path = Path("/"), include: Iterable[str] = ()
) -> list[BlockDevice]:
    """The whole disks under `root`/sys/block, sorted by name.

    Devices whose /sys/block link resolves under /sys/devices/virtual are skipped unless
    named in `include`; entries carrying a `partition` file are always skipped. A device
    that disappears while being read (hot unplug) is left out; a `dev` file that cannot
    be parsed raises HostError naming it.
    """
    block = root / "sys" / "block"
    virtual = os.path.realpath(root / "sys" / "devices" / "virtual")
    wanted = frozenset(include)
    try:
        inflight.touching(block)
        names = sorted(os.listdir(block))
    except FileNotFoundError:
        raise HostError(
            block, errno.ENOENT, f"{block} does not exist: is sysfs mounted under {root}?"
        ) from None
    except OSError as exc:
        raise HostError(block, exc.errno or errno.EIO, f"cannot list {block}") from exc

    devices: list[BlockDevice] = []
    for name in names:
        entry = block / name
        if (entry / "partition").exists():
            continue
        target = os.path.realpath(entry)
        if (target == virtual or target.startswith(virtual + os.sep)) and name not in wanted:
            continue
        try:
            devices.append(_read_device(entry, name))
        except FileNotFoundError:
            continue  # removed while we looked
    return devices


def _read_device(entry: Path, name: str) -> BlockDevice:
    dev_file = entry / "dev"
    text = _read(dev_file)
    match = _DEVNO.fullmatch(text)
    if match is None:
        raise HostError(dev_file, errno.EINVAL, f"{dev_file}: expected MAJ:MIN, got {text!r}")
    queue = entry / "queue"
    rotational = _read_optional(queue / "rotational") == "1"
    return BlockDevice(
        name=name,
        major=int(match.group(1)),
        minor=int(match.group(2)),
        rotational=rotational,
        scheduler=active_scheduler(_read_optional(queue / "scheduler")),
    )


def active_scheduler(text: str) -> str:
    """The bracketed entry of a queue/scheduler line ("mq-deadline [bfq] none" -> "bfq")."""
    match = _ACTIVE.search(text)
    return match.group(1) if match else ""


def _read(path: Path) -> str:
    """The stripped text of a sysfs file; FileNotFoundError passes through (the device
    went away), any other failure becomes a HostError naming the file."""
    inflight.touching(path)
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise HostError(path, exc.errno or errno.EIO, f"cannot read {path}") from exc


def _read_optional(path: Path) -> str:
    try:
        return _read(path)
    except FileNotFoundError:
        return ""
