"""Disk isolation on cgroup v1 blkio, for hosts where io is bound to v1 (no iocost).

Two tools remain there:

* BFQ weights (blkio.bfq.weight, 1..1000, default 100): proportional sharing, but only on
  devices whose active scheduler is BFQ. The group-wide weight applies to every BFQ
  device; blkio.bfq.weight_device pins a per-device weight so that a stale per-device
  override cannot silently win. The kernel refuses per-device weights on other
  schedulers (EOPNOTSUPP), so those devices are skipped and the outcome says so.
* Throttling (blkio.throttle.{read,write}_{bps,iops}_device): hard caps per device.
  "MAJ:MIN 0" removes a cap, as the kernel defines it.

Every write goes through `HostWriter`; each value is read back first and only written
when it differs, so re-applying a policy is cheap and the change log shows real changes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from isolation import inflight
from isolation.blockdev import BlockDevice
from isolation.errors import HostError
from isolation.writes import HostWriter
from isolation.writes import read_file as _read

BFQ_WEIGHT_MIN, BFQ_WEIGHT_MAX = 1, 1000

_THROTTLE_FILES = {
    "read_bps": "blkio.throttle.read_bps_device",
    "write_bps": "blkio.throttle.write_bps_device",
    "read_iops": "blkio.throttle.read_iops_device",
    "write_iops": "blkio.throttle.write_iops_device",
}


@dataclass(frozen=True)
class Throttle:
    """Caps for one device. To `set_throttle`: None leaves a cap as it is, 0 removes it.
    From `read_throttle`: None means no cap."""

    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


class Blkio:
    """BFQ weights and throttle caps of cgroup v1 blkio groups."""

    def __init__(self, writer: HostWriter) -> None:
        self.writer = writer

    def set_bfq_weight(
        self, group_dir: Path, weight: int, devices: Iterable[BlockDevice], reason: str
    ) -> str:
        """Give the group BFQ weight `weight` (1..1000), group-wide and per BFQ device.

        Raises ValueError for a weight out of range, HostError ENOENT when the group does
        not exist and EOPNOTSUPP when it has no blkio.bfq.weight (BFQ not in the kernel).
        """
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"BFQ weight must be an integer, got {weight!r}")
        if not BFQ_WEIGHT_MIN <= weight <= BFQ_WEIGHT_MAX:
            raise ValueError(f"BFQ weight must be {BFQ_WEIGHT_MIN}..{BFQ_WEIGHT_MAX}, got {weight}")
        path = group_dir / "blkio.bfq.weight"
        inflight.touching(path)
        if not path.exists():
            inflight.touching(group_dir)
            if not group_dir.is_dir():
                raise HostError(group_dir, errno.ENOENT, f"no blkio group {group_dir}")
            raise HostError(
                path,
                errno.EOPNOTSUPP,
                f"no blkio.bfq.weight in {group_dir}: BFQ is not available in this kernel "
                "(or this is the blkio root, which has no weight)",
            )
        done: list[str] = []
        text = _read(path).strip()
        if not text.isdigit():
            raise HostError(path, errno.EIO, f"{path}: expected a weight, got {text!r}")
        current = int(text)
        if current != weight:
            self.writer.write(path, str(weight), reason)
            done.append(f"weight {current} -> {weight}")
        else:
            done.append(f"weight already {weight}")

        device_file = group_dir / "blkio.bfq.weight_device"
        skipped: list[str] = []
        for dev in devices:
            if dev.scheduler != "bfq":
                skipped.append(f"{dev.name} ({dev.scheduler or 'no scheduler'})")
                continue
            shown = _device_values(device_file, _read(device_file)).get(dev.devno)
            if shown == weight:
                continue
            self.writer.write(device_file, f"{dev.devno} {weight}", reason)
            done.append(f"{dev.name} {shown if shown is not None else 'default'} -> {weight}")
        if skipped:
            done.append("not BFQ, no per-device weight: " + ", ".join(skipped))
        verb = "would set " if self.writer.dry_run else ""
        return f"BFQ in {group_dir}: {verb}" + "; ".join(done)

    def set_throttle(
        self, group_dir: Path, dev: BlockDevice, throttle: Throttle, reason: str
    ) -> str:
        """Apply the caps in `throttle` to `dev` for the group; returns a one-line outcome."""
        for field in fields(Throttle):
            value = getattr(throttle, field.name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"throttle {field.name} must be an integer >= 0, got {value!r}")
        current = self.read_throttle(group_dir, dev)
        done: list[str] = []
        for field in fields(Throttle):
            wanted = getattr(throttle, field.name)
            if wanted is None:
                continue
            shown = getattr(current, field.name)
            if (shown or 0) == wanted:
                continue
            self.writer.write(
                group_dir / _THROTTLE_FILES[field.name], f"{dev.devno} {wanted}", reason
            )
            done.append(f"{field.name} {_cap(shown)} -> {_cap(wanted or None)}")
        if not done:
            return f"throttle of {dev.name} ({dev.devno}) in {group_dir} already as wanted"
        verb = "would set" if self.writer.dry_run else "set"
        return f"throttle of {dev.name} ({dev.devno}) in {group_dir}: {verb} " + ", ".join(done)

    def read_throttle(self, group_dir: Path, dev: BlockDevice) -> Throttle:
        """The group's caps on `dev` as the kernel shows them (None: no cap)."""
        values: dict[str, int | None] = {}
        for name, file_name in _THROTTLE_FILES.items():
            path = group_dir / file_name
            values[name] = _device_values(path, _read(path)).get(dev.devno)
        return Throttle(**values)


def _cap(value: int | None) -> str:
    return "none" if value is None else str(value)


def _device_values(path: Path, text: str) -> dict[str, int]:
    """ "MAJ:MIN N" lines as {devno: N}; a leading "default N" line is skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "default":
            continue
        if len(parts) != 2 or ":" not in parts[0] or not parts[1].isdigit():
            raise HostError(path, errno.EIO, f"{path}: unexpected line {line!r}")
        values[parts[0]] = int(parts[1])
    return values
