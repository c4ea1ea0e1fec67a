"""The cgroup v2 io files and /sys/block, with the kernel's semantics, in pyfakefs.

This CI host binds io to cgroup v1 blkio, so iocost can only be exercised against a fake.
`FakeIoCgroup2` extends `FakeCgroup2` (same tree, same write mechanics) with the files of
the io controller, following Documentation/admin-guide/cgroup-v2.rst and
block/blk-iocost.c, block/blk-throttle.c, block/blk-cgroup.c:

* io.cost.qos and io.cost.model exist only at the root. A device's line appears only once
  iocost was set up on it, which the kernel does lazily on the first write naming it to
  either file (even when the rest of that write is then refused). Lines render every
  key in the kernel's format; with ctrl=auto the values are the built-in ones for the
  device class (rotational: the HDD set; otherwise the default SSD set).
* io.qos values: enable=N, ctrl=auto|user, rpct/wpct 0..100 with two decimals, rlat/wlat
  in usec, min/max vrate percentages clamped to 1.00..10000.00; any explicit parameter
  makes ctrl=user; min > max, unknown keys and malformed values are EINVAL.
* Device numbers: not "MAJ:MIN<space>" -> EINVAL; no such device or a partition ->
  ENODEV; a queue that is not blk-mq -> EOPNOTSUPP.
* io.weight (not at the root): "N", "default N", "MAJ:MIN N", "MAJ:MIN default"; 1..10000
  else EINVAL (unlike cpu.weight, iocost answers EINVAL, not ERANGE); a per-device weight
  on a device without iocost -> EOPNOTSUPP. Reads show "default N" then one line per
  device with its own weight.
* io.max (not at the root): rbps/wbps/riops/wiops = N or "max"; 0 -> ERANGE; a line shows
  only while some limit is set.
* io.stat: one zeroed line per device the group has touched (all devices at the root),
  with cost.vrate/cost.usage while iocost is enabled.

Per-device lines are rendered newest first, as the kernel walks its blkg list; readers
must not depend on the order. The adaptive autop switching between SSD sets is not
modelled (the built-in values stay those of the class chosen at setup).

`add_block_devices` builds /sys/block for `isolation.blockdev`: physical disks linked to
/sys/devices/pci…/block/<name>, virtual ones to /sys/devices/virtual/block/<name>,
partitions as subdirectories with a `partition` file, queue/scheduler as the kernel
prints it ("mq-deadline [bfq] none").
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pyfakefs.fake_filesystem import FakeFilesystem

from tests.isolation.fake_cgroup2 import FakeCgroup2, _oserror

ROOT = PurePosixPath("/")

VRATE_MIN_PPM, VRATE_MAX_PPM = 10_000, 100_000_000
# blk-iocost.c's built-in parameters (rlat/wlat usec; coefficients as io.cost.model shows)
HDD_QOS = {"rlat": 250_000, "wlat": 250_000}
SSD_QOS = {"rlat": 25_000, "wlat": 25_000}
HDD_MODEL = (174019176, 41708, 370, 178075866, 42705, 378)
SSD_MODEL = (488636629, 8932, 8518, 427891549, 28755, 21940)
MODEL_KEYS = ("rbps", "rseqiops", "rrandiops", "wbps", "wseqiops", "wrandiops")
MAX_KEYS = ("rbps", "wbps", "riops", "wiops")

_DEVNO = re.compile(r"(\d+):(\d+)(?=\s|$)")
_FLOAT = re.compile(r"([+-]?\d+)(?:\.(\d*))?")


@dataclass(frozen=True)
class FakeDisk:
    """A disk for /sys/block and the io files. `scheduler` is the queue/scheduler line."""

    name: str
    major: int
    minor: int
    rotational: bool = True
    virtual: bool = False
    scheduler: str = "[mq-deadline] kyber bfq none"
    partitions: tuple[str, ...] = ()  # names; minors follow the disk's
    mq: bool = True

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


VDA = FakeDisk("vda", 254, 0, partitions=("vda1", "vda2"))
NVME = FakeDisk("nvme0n1", 259, 0, rotational=False, scheduler="[none] mq-deadline bfq")
LOOP0 = FakeDisk("loop0", 7, 0, virtual=True, scheduler="[none] mq-deadline bfq")


def add_block_devices(fs: FakeFilesystem, disks: Iterable[FakeDisk], root: str = "/") -> None:
    """Create /sys/block (under `root`) as the kernel lays it out for `disks`."""
    base = PurePosixPath(root) / "sys"
    fs.create_dir(str(base / "block"))
    fs.create_dir(str(base / "devices" / "virtual" / "block"))
    for index, disk in enumerate(disks):
        if disk.virtual:
            relative = PurePosixPath("devices/virtual/block") / disk.name
        else:
            relative = PurePosixPath(f"devices/pci0000:00/0000:00:{index + 2:02x}.0") / (
                f"virtio{index}/block/{disk.name}"
            )
        home = base / relative
        fs.create_file(str(home / "dev"), contents=f"{disk.devno}\n")
        fs.create_file(str(home / "size"), contents="524288\n")
        fs.create_file(str(home / "queue" / "rotational"), contents=f"{int(disk.rotational)}\n")
        fs.create_file(str(home / "queue" / "scheduler"), contents=f"{disk.scheduler}\n")
        for number, part in enumerate(disk.partitions, start=1):
            fs.create_file(str(home / part / "partition"), contents=f"{number}\n")
            fs.create_file(
                str(home / part / "dev"), contents=f"{disk.major}:{disk.minor + number}\n"
            )
        fs.create_symlink(str(base / "block" / disk.name), f"../{relative}")


@dataclass
class _Ioc:
    """iocost state of one device (struct ioc)."""

    rotational: bool
    enabled: bool = False
    user_qos: bool = False
    rppm: int = 0
    rlat: int = 0
    wppm: int = 0
    wlat: int = 0
    min_ppm: int = VRATE_MIN_PPM
    max_ppm: int = VRATE_MAX_PPM
    user_model: bool = False
    coefs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.auto_qos()
        self.auto_model()

    def auto_qos(self) -> None:
        lat = HDD_QOS if self.rotational else SSD_QOS
        self.rppm = self.wppm = 0
        self.rlat, self.wlat = lat["rlat"], lat["wlat"]
        self.min_ppm, self.max_ppm = VRATE_MIN_PPM, VRATE_MAX_PPM

    def auto_model(self) -> None:
        self.coefs = HDD_MODEL if self.rotational else SSD_MODEL


@dataclass
class _IoGroup:
    """Per-cgroup io state: default weight, per-device weights and io.max limits."""

    dfl_weight: int = 100
    weights: dict[str, int] = field(default_factory=dict)  # newest first
    limits: dict[str, list[int | None]] = field(default_factory=dict)  # None = max


def _pct(ppm: int) -> str:
    return f"{ppm // 10000}.{ppm % 10000 // 100:02d}"


def _parse_float(text: str) -> int:
    """cgroup_parse_float(text, 2): the value in hundredths; ValueError if no number."""
    match = _FLOAT.match(text)
    if match is None:
        raise ValueError(text)
    whole, frac_text = int(match.group(1)), match.group(2) or ""
    if len(frac_text) <= 2:
        frac = int(frac_text or "0") * 10 ** (2 - len(frac_text))
    else:
        divisor = 10 ** (len(frac_text) - 2)
        frac = (int(frac_text) + divisor // 2) // divisor
    return int(whole * 100 + frac)


def _leading_uint(text: str) -> int | None:
    """sscanf("%u"): leading whitespace, then digits; None when there are none."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


class FakeIoCgroup2(FakeCgroup2):
    """`FakeCgroup2` plus the io controller's files (and /sys/block for `disks`)."""

    def __init__(
        self,
        fs: FakeFilesystem,
        disks: Iterable[FakeDisk] = (VDA, NVME),
        *,
        iocost: bool = True,
        sysfs: bool = True,
        **kwargs: Any,
    ) -> None:
        self.disks = list(disks)
        self.iocost = iocost
        self.iocs: dict[str, _Ioc] = {}  # devno -> state, for devices iocost was set up on
        self.io_groups: dict[PurePosixPath, _IoGroup] = {}
        if sysfs:
            add_block_devices(fs, self.disks)
        super().__init__(fs, **kwargs)

    # ------------------------------------------------------------------ files

    def _io(self, group: PurePosixPath) -> _IoGroup:
        return self.io_groups.setdefault(group, _IoGroup())

    def _wanted_files(self, group: PurePosixPath) -> dict[str, bool]:
        files = super()._wanted_files(group)
        if "io" not in self.controllers_of(group):
            return files
        files["io.stat"] = False
        if group == ROOT:
            if self.iocost:
                files |= {"io.cost.qos": True, "io.cost.model": True}
        else:
            files["io.max"] = True
            if self.iocost:
                files["io.weight"] = True
        return files

    def _render(self, group: PurePosixPath) -> dict[str, str]:
        rendered = super()._render(group)
        if group not in self.groups:
            return rendered
        io = self._io(group)
        newest_first = [d for d in reversed(self.disks) if d.devno in self.iocs]
        qos = model = ""
        for disk in newest_first:
            ioc = self.iocs[disk.devno]
            qos += (
                f"{disk.devno} enable={int(ioc.enabled)} "
                f"ctrl={'user' if ioc.user_qos else 'auto'} rpct={_pct(ioc.rppm)} "
                f"rlat={ioc.rlat} wpct={_pct(ioc.wppm)} wlat={ioc.wlat} "
                f"min={_pct(ioc.min_ppm)} max={_pct(ioc.max_ppm)}\n"
            )
            coefs = " ".join(f"{k}={v}" for k, v in zip(MODEL_KEYS, ioc.coefs, strict=True))
            model += (
                f"{disk.devno} ctrl={'user' if ioc.user_model else 'auto'} model=linear {coefs}\n"
            )
        weight = f"default {io.dfl_weight}\n" + "".join(
            f"{devno} {value}\n" for devno, value in io.weights.items()
        )
        limits = ""
        for devno, values in io.limits.items():
            if any(v is not None for v in values):
                shown = " ".join(
                    f"{k}={'max' if v is None else v}"
                    for k, v in zip(MAX_KEYS, values, strict=True)
                )
                limits += f"{devno} {shown}\n"
        if group == ROOT:
            touched = [d.devno for d in reversed(self.disks)]
        else:
            touched = list(dict.fromkeys([*io.weights, *io.limits]))
        stat = ""
        for devno in touched:
            stat += f"{devno} rbytes=0 wbytes=0 rios=0 wios=0 dbytes=0 dios=0"
            state = self.iocs.get(devno)
            if state is not None and state.enabled:
                stat += " cost.vrate=100.00" if group == ROOT else ""
                stat += " cost.usage=0"
            stat += "\n"
        rendered |= {
            "io.cost.qos": qos,
            "io.cost.model": model,
            "io.weight": weight,
            "io.max": limits,
            "io.stat": stat,
        }
        return rendered

    # ------------------------------------------------------------------ writes

    def _apply(self, group: PurePosixPath, name: str, value: str, path: object) -> None:
        if name == "io.cost.qos":
            self._write_qos(value, path)
        elif name == "io.cost.model":
            self._write_model(value, path)
        elif name == "io.weight":
            self._write_weight(group, value, path)
        elif name == "io.max":
            self._write_max(group, value, path)
        else:
            super()._apply(group, name, value, path)

    def _open_bdev(self, value: str, path: object) -> tuple[FakeDisk, str]:
        """blkg_conf_open_bdev: "MAJ:MIN" then whitespace; the disk and the rest."""
        match = _DEVNO.match(value)
        if match is None:
            raise _oserror(errno.EINVAL, path)
        major, minor = int(match.group(1)), int(match.group(2))
        for disk in self.disks:
            if (disk.major, disk.minor) == (major, minor):
                return disk, value[match.end() :].strip()
            if disk.major == major and disk.minor < minor <= disk.minor + len(disk.partitions):
                raise _oserror(errno.ENODEV, path)  # a partition
        raise _oserror(errno.ENODEV, path)

    def _ioc_for(self, value: str, path: object) -> tuple[_Ioc, str]:
        """Open the device and set iocost up on it (lazily, as the kernel does)."""
        disk, body = self._open_bdev(value, path)
        if not disk.mq:
            raise _oserror(errno.EOPNOTSUPP, path)
        ioc = self.iocs.get(disk.devno)
        if ioc is None:
            ioc = self.iocs[disk.devno] = _Ioc(rotational=disk.rotational)
        return ioc, body

    def _write_qos(self, value: str, path: object) -> None:
        ioc, body = self._ioc_for(value, path)
        enable, user = ioc.enabled, ioc.user_qos
        params = {
            "rpct": ioc.rppm, "rlat": ioc.rlat, "wpct": ioc.wppm, "wlat": ioc.wlat,
            "min": ioc.min_ppm, "max": ioc.max_ppm,
        }  # fmt: skip
        for token in body.split():
            key, sep, text = token.partition("=")
            if not sep:
                raise _oserror(errno.EINVAL, path)
            if key == "enable":
                if not text.isdigit():
                    raise _oserror(errno.EINVAL, path)
                enable = int(text) != 0
                continue
            if key == "ctrl":
                if text not in ("auto", "user"):
                    raise _oserror(errno.EINVAL, path)
                user = text == "user"
                continue
            if key in ("rlat", "wlat"):
                if not text.isdigit():
                    raise _oserror(errno.EINVAL, path)
                params[key] = int(text)
            elif key in ("rpct", "wpct", "min", "max"):
                try:
                    hundredths = _parse_float(text)
                except ValueError:
                    raise _oserror(errno.EINVAL, path) from None
                if hundredths < 0 or (key in ("rpct", "wpct") and hundredths > 10000):
                    raise _oserror(errno.EINVAL, path)
                ppm = hundredths * 100
                if key in ("min", "max"):
                    ppm = min(max(ppm, VRATE_MIN_PPM), VRATE_MAX_PPM)
                params[key] = ppm
            else:
                raise _oserror(errno.EINVAL, path)
            user = True
        if params["min"] > params["max"]:
            raise _oserror(errno.EINVAL, path)
        ioc.enabled = enable
        if user:
            ioc.user_qos = True
            ioc.rppm, ioc.rlat, ioc.wppm = params["rpct"], params["rlat"], params["wpct"]
            ioc.wlat, ioc.min_ppm, ioc.max_ppm = params["wlat"], params["min"], params["max"]
        else:
            ioc.user_qos = False
            ioc.auto_qos()

    def _write_model(self, value: str, path: object) -> None:
        ioc, body = self._ioc_for(value, path)
        coefs, user = list(ioc.coefs), ioc.user_model
        for token in body.split():
            key, sep, text = token.partition("=")
            if not sep:
                raise _oserror(errno.EINVAL, path)
            if key == "ctrl":
                if text not in ("auto", "user"):
                    raise _oserror(errno.EINVAL, path)
                user = text == "user"
                continue
            if key == "model":
                if text != "linear":
                    raise _oserror(errno.EINVAL, path)
                continue
            if key not in MODEL_KEYS or not text.isdigit():
                raise _oserror(errno.EINVAL, path)
            coefs[MODEL_KEYS.index(key)] = int(text)
            user = True
        if user:
            ioc.user_model, ioc.coefs = True, tuple(coefs)
        else:
            ioc.user_model = False
            ioc.auto_model()

    def _write_weight(self, group: PurePosixPath, value: str, path: object) -> None:
        io = self._io(group)
        if ":" not in value:
            match = re.match(r"default\s*(\d+)", value)
            weight = int(match.group(1)) if match else _leading_uint(value)
            if weight is None or not 1 <= weight <= 10000:
                raise _oserror(errno.EINVAL, path)
            io.dfl_weight = weight
            return
        disk, body = self._open_bdev(value, path)
        if disk.devno not in self.iocs:
            raise _oserror(errno.EOPNOTSUPP, path)  # policy not enabled on that queue
        if body.startswith("default"):
            io.weights.pop(disk.devno, None)
            return
        weight = _leading_uint(body)
        if weight is None or not 1 <= weight <= 10000:
            raise _oserror(errno.EINVAL, path)
        if disk.devno in io.weights:
            io.weights[disk.devno] = weight
        else:
            io.weights = {disk.devno: weight, **io.weights}

    def _write_max(self, group: PurePosixPath, value: str, path: object) -> None:
        io = self._io(group)
        disk, body = self._open_bdev(value, path)
        values = list(io.limits.get(disk.devno, [None] * 4))
        for token in body.split():
            key, sep, text = token.partition("=")
            if not sep or not (text.isdigit() or text == "max"):
                raise _oserror(errno.EINVAL, path)
            number = None if text == "max" else int(text)
            if number == 0:
                raise _oserror(errno.ERANGE, path)
            if key not in MAX_KEYS:
                raise _oserror(errno.EINVAL, path)
            values[MAX_KEYS.index(key)] = number
        if disk.devno not in io.limits:
            io.limits = {disk.devno: values, **io.limits}
        else:
            io.limits[disk.devno] = values

    # ------------------------------------------------------------------ dirs

    def _makedir(self, dir_path: Any, mode: int = 0o777) -> None:
        group = self._group_of(dir_path)
        if group is not None and group not in self.groups:
            self.io_groups[group] = _IoGroup()
        super()._makedir(dir_path, mode)

    def _rmdir(self, target_directory: Any, allow_symlink: bool = False) -> None:
        group = self._group_of(target_directory)
        super()._rmdir(target_directory, allow_symlink)
        if group is not None and group not in self.groups:
            self.io_groups.pop(group, None)
