"""One interface over cgroup v1 and v2 for the writes the policy makes outside NRI.

NRI adjusts a container's cgroup when it is created or updated, but pool resizes, the
interference ladder and the lab need to read and write cgroups directly. Hosts come in
three layouts (systemd's names): *unified* (pure v2 at the root), *hybrid* (v1
controllers plus a controller-less cgroup2 mount, e.g. ``unified/``) and *legacy* (pure
v1). Each operation here knows the file it maps to in either version, so callers never
branch on the version.

Every path is built from two configurable roots: the cgroupfs root (default
``/sys/fs/cgroup``) and the procfs root (``/proc``, for ``self/mountinfo``). Tests point
both at a fake tree; production uses the real ones; the code path is the same.

Errors from the kernel become `CgroupError` subclasses that carry the errno and the
path, with a message that says what to do. Callers branch on ``errno``, never on text.

In dry-run mode nothing is written: mutating calls return (and `CgroupFs.planned`
accumulates) the writes they would make, computed from the same reads of the live tree.
"""

from __future__ import annotations

import errno as errno_codes
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from isolation.errors import HostError
from nri_plugin.cpuset import CpuListError, format_cpu_list, parse_cpu_list

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROCFS_ROOT = Path("/proc")

# Controllers the policy writes. Order matters for v1 moves: cpuset first, so a task
# never lands in a cpu/memory group while its cpuset move fails.
RESOURCE_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "cpuacct", "memory")
# v2 has no cpuacct: usage is in cpu.stat, which exists in every group.
V2_RESOURCE_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "memory")

# Controller names the kernel can list in a v1 mount's super options; anything else in
# those options (rw, name=systemd, xattr, clone_children, ...) is not a controller.
V1_CONTROLLER_NAMES = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

# cpu.shares range (kernel MIN_SHARES..MAX_SHARES) and cpu.weight range (cgroup-v2.rst).
CPU_SHARES_MIN = 2
CPU_SHARES_MAX = 262_144
CPU_SHARES_DEFAULT = 1024
CPU_WEIGHT_MIN = 1
CPU_WEIGHT_MAX = 10_000
CPU_WEIGHT_DEFAULT = 100

# CFS bandwidth limits the kernel enforces (1 ms .. 1 s period, quota at least 1 ms).
CFS_PERIOD_MIN_US = 1_000
CFS_PERIOD_MAX_US = 1_000_000
CFS_QUOTA_MIN_US = 1_000
CFS_PERIOD_DEFAULT_US = 100_000

# v1 memory.limit_in_bytes reads PAGE_COUNTER_MAX * PAGE_SIZE when unlimited, i.e.
# 2**63 rounded down to a page (9223372036854771712 with 4 KiB pages). Anything this
# close to 2**63 means "unlimited" for any page size up to 1 MiB.
_V1_UNLIMITED_THRESHOLD = (1 << 63) - (1 << 20)


# --------------------------------------------------------------------------- errors


class CgroupError(HostError):
    """A cgroup operation failed. ``errno`` is the kernel's (or the one it would give)."""


class CgroupNotFound(CgroupError):
    """The group (or one of its interface files) does not exist."""


class CgroupValueRejected(CgroupError):
    """The kernel (or our range check, which mirrors it) refused a value."""


class CgroupBusy(CgroupError):
    """The group is in use in a way that forbids the change (EBUSY, ENOSPC)."""


class CgroupPermissionError(CgroupError):
    """EACCES/EPERM opening a file or directory: the agent lacks privileges."""


class CgroupProcessGone(CgroupError):
    """A pid to move exited first (ESRCH). Usually a normal race, not a failure."""


class CgroupUnsupported(CgroupError):
    """The host lacks what the operation needs (no mount, controller not available)."""


class CgroupPathError(CgroupError):
    """A cgroups_path from the runtime that cannot be parsed (errno EINVAL)."""

    def __init__(self, cgroups_path: str, message: str) -> None:
        super().__init__(cgroups_path, errno_codes.EINVAL, message)


# --------------------------------------------------------------------------- layout


class HostLayout(Enum):
    """How cgroups are mounted; the names are systemd's."""

    UNIFIED = "unified"  # pure cgroup v2 at the root
    HYBRID = "hybrid"  # v1 controllers + a cgroup2 mount without (our) controllers
    LEGACY = "legacy"  # pure cgroup v1


class CgroupVersion(Enum):
    V1 = 1
    V2 = 2


@dataclass(frozen=True, slots=True)
class MountEntry:
    """The fields of one /proc/<pid>/mountinfo line that cgroup detection needs."""

    mount_point: PurePosixPath
    fs_type: str
    super_options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CgroupMounts:
    """Where each cgroup hierarchy under the root is mounted."""

    layout: HostLayout
    v1: Mapping[str, Path]  # v1 controller name -> its hierarchy's mount point
    unified: Path | None  # the cgroup2 mount point, if any

    def v1_mount(self, controller: str) -> Path | None:
        return self.v1.get(controller)


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (space is \\040, tab \\011, newline \\012, \\ \\134)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and all(c in "01234567" for c in chunk[1:]):
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse /proc/<pid>/mountinfo (proc(5)): fields before " - " then fstype, source, opts.

    The optional fields between the mount options and the "-" separator vary in number,
    so the separator is found by value, not position.
    """
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            sep = fields.index("-", 6)
        except ValueError:
            raise ValueError(f"mountinfo line without ' - ' separator: {line!r}") from None
        if len(fields) < sep + 3:
            raise ValueError(f"mountinfo line too short after separator: {line!r}")
        entries.append(
            MountEntry(
                mount_point=PurePosixPath(_unescape_mountinfo(fields[4])),
                fs_type=fields[sep + 1],
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
            )
        )
    return entries


def _is_within(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def detect_cgroup_mounts(mounts: Iterable[MountEntry], root: Path) -> CgroupMounts:
    """Classify the cgroup mounts at or below ``root`` (mounts elsewhere are ignored).

    Raises CgroupUnsupported (ENOENT) if nothing cgroup-like is mounted there.
    """
    root_pure = PurePosixPath(root)
    v1: dict[str, Path] = {}
    unified: Path | None = None
    unified_at_root = False
    for entry in mounts:
        if not _is_within(entry.mount_point, root_pure):
            continue
        if entry.fs_type == "cgroup2":
            if unified is None or entry.mount_point == root_pure:
                unified = Path(entry.mount_point)
                unified_at_root = entry.mount_point == root_pure
        elif entry.fs_type == "cgroup":
            for option in entry.super_options:
                if option in V1_CONTROLLER_NAMES and option not in v1:
                    v1[option] = Path(entry.mount_point)
    if unified_at_root:
        layout = HostLayout.UNIFIED
        v1 = {}  # nothing can be mounted below a cgroup2 root that we would use
    elif v1:
        layout = HostLayout.HYBRID if unified is not None else HostLayout.LEGACY
    else:
        raise CgroupUnsupported(
            root,
            errno_codes.ENOENT,
            f"no cgroup v1 controller or cgroup2 mount found at or below {root}; "
            "mount cgroupfs there or point the agent's cgroup root at where it is mounted",
        )
    return CgroupMounts(layout=layout, v1=dict(v1), unified=unified)


# --------------------------------------------------------------------------- cgroups_path


def expand_slice(slice_name: str) -> PurePosixPath:
    """Expand a systemd slice unit name into its cgroup path.

    systemd encodes the slice hierarchy in the name: each "-" separates a parent, so
    ``a-b-c.slice`` lives at ``/a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` is the root.
    Same rule and the same rejections as runc's (opencontainers/cgroups) ExpandSlice:
    the name must end in ".slice", contain no "/", and have no empty component
    ("a--b.slice", "-a.slice", "a-.slice").
    """
    suffix = ".slice"
    if len(slice_name) <= len(suffix) or not slice_name.endswith(suffix) or "/" in slice_name:
        raise CgroupPathError(slice_name, f"invalid systemd slice name {slice_name!r}")
    stem = slice_name[: -len(suffix)]
    if stem == "-":
        return PurePosixPath("/")
    path = PurePosixPath("/")
    prefix = ""
    for component in stem.split("-"):
        if not component:
            raise CgroupPathError(
                slice_name, f"invalid systemd slice name {slice_name!r}: empty component"
            )
        path /= f"{prefix}{component}{suffix}"
        prefix += component + "-"
    return path


# runc's default parent slice when the systemd cgroups_path leaves it empty.
SYSTEMD_DEFAULT_SLICE = "system.slice"


def resolve_cgroups_path(cgroups_path: str) -> PurePosixPath:
    """Turn NRI's ``linux.cgroups_path`` into a group path relative to a hierarchy root.

    Two forms exist:

    * cgroupfs driver: a path, ``/kubepods/burstable/pod<uid>/<id>``, used as is;
    * systemd driver: ``slice:prefix:name``, e.g.
      ``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``. The slice is expanded
      (see `expand_slice`; empty means ``system.slice``) and the unit is
      ``<prefix>-<name>.scope``, or ``<name>`` itself when it ends in ".slice" (runc's
      getUnitName). CRI-O uses the prefix ``crio``, containerd ``cri-containerd``.

    Returns an absolute PurePosixPath ("/" is the hierarchy root).
    """
    text = cgroups_path.strip()
    if not text:
        raise CgroupPathError(cgroups_path, "empty cgroups_path")
    if ":" in text and not text.startswith("/"):
        parts = text.split(":")
        if len(parts) != 3:
            raise CgroupPathError(
                cgroups_path,
                f'systemd cgroups_path must look like "slice:prefix:name", got {cgroups_path!r}',
            )
        slice_name, prefix, name = parts
        if not name:
            raise CgroupPathError(
                cgroups_path, f"systemd cgroups_path {cgroups_path!r} has no name"
            )
        parent = expand_slice(slice_name or SYSTEMD_DEFAULT_SLICE)
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
        return parent / unit
    return normalize_group(text)


def normalize_group(group: str | PurePosixPath) -> PurePosixPath:
    """An absolute group path without ".." (which could escape the root); "." is dropped."""
    path = PurePosixPath("/") / str(group)
    if ".." in path.parts:
        raise CgroupPathError(str(group), f"cgroup path {str(group)!r} may not contain '..'")
    return path


def _relative(group: PurePosixPath) -> PurePosixPath:
    return group.relative_to("/")


# --------------------------------------------------------------------------- conversions


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares -> cgroup v2 cpu.weight, as runc/crun convert them today.

    The formula (opencontainers/cgroups ConvertCPUSharesToCgroupV2Value, adopted for
    kubernetes/kubernetes#131216) fits a quadratic in log2 space through the three
    points that matter: min 2 -> 1, default 1024 -> 100, max 262144 -> 10000::

        l = log2(shares);  weight = ceil(10 ** ((l*l + 125*l) / 612 - 7/34))

    Older runc used the linear ``1 + (shares - 2) * 9999 // 262142``, which maps the
    default 1024 to 39 (not 100); systemd's own ``CPUShares=`` conversion is
    ``clamp(shares * 100 // 1024, 1, 10000)``. We follow current runc so our writes match
    what the runtime wrote for the same request. Out-of-range values are clamped like the
    kernel clamps cpu.shares (runc's "0 = unset" is ``None`` at our call sites).
    """
    if shares <= CPU_SHARES_MIN:
        return CPU_WEIGHT_MIN
    if shares >= CPU_SHARES_MAX:
        return CPU_WEIGHT_MAX
    log = math.log2(shares)
    exponent = (log * log + 125 * log) / 612.0 - 7.0 / 34.0
    return math.ceil(math.pow(10.0, exponent))


def weight_to_shares(weight: int) -> int:
    """The largest cpu.shares that `shares_to_weight` maps to ``weight``.

    The forward map rounds up (ceil) and is monotonic with slope below 1, so every weight
    1..10000 is hit by a run of shares values; the top of the run is the one the
    continuous formula gives exactly, so 1 -> 2, 100 -> 1024 and 10000 -> 262144 round-trip.
    Used to report v2 weights in the v1 units NRI speaks.
    """
    target = min(max(weight, CPU_WEIGHT_MIN), CPU_WEIGHT_MAX)
    lo, hi = CPU_SHARES_MIN, CPU_SHARES_MAX
    while lo < hi:  # the largest s with shares_to_weight(s) <= target
        mid = (lo + hi + 1) // 2
        if shares_to_weight(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class CpuQuota:
    """CFS bandwidth: at most ``quota_us`` of CPU time per ``period_us``; None = no limit."""

    quota_us: int | None
    period_us: int = CFS_PERIOD_DEFAULT_US

    def __post_init__(self) -> None:
        if not CFS_PERIOD_MIN_US <= self.period_us <= CFS_PERIOD_MAX_US:
            raise ValueError(
                f"CFS period {self.period_us} us is outside "
                f"{CFS_PERIOD_MIN_US}..{CFS_PERIOD_MAX_US} us"
            )
        if self.quota_us is not None and self.quota_us < CFS_QUOTA_MIN_US:
            raise ValueError(
                f"CFS quota {self.quota_us} us is below the kernel minimum {CFS_QUOTA_MIN_US} us"
            )

    @property
    def cpus(self) -> float | None:
        """The limit in CPUs (quota / period), None when unlimited."""
        return None if self.quota_us is None else self.quota_us / self.period_us


def parse_cpu_max(text: str) -> CpuQuota:
    """Parse v2 ``cpu.max`` ("$MAX $PERIOD", $MAX may be "max")."""
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"cpu.max must hold '$MAX $PERIOD', got {text!r}")
    quota_text, period_text = fields
    try:
        quota = None if quota_text == "max" else int(quota_text)
        return CpuQuota(quota_us=quota, period_us=int(period_text))
    except ValueError as exc:
        raise ValueError(f"bad cpu.max {text!r}: {exc}") from None


def format_cpu_max(quota: CpuQuota) -> str:
    """The v2 ``cpu.max`` line for a quota ("max 100000" when unlimited)."""
    limit = "max" if quota.quota_us is None else str(quota.quota_us)
    return f"{limit} {quota.period_us}"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse a cgroup "flat keyed" file (``KEY VALUE`` per line), e.g. cpu.stat."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        try:
            result[fields[0]] = int(fields[1])
        except ValueError:
            continue
    return result


def parse_v1_memory_limit(text: str) -> int | None:
    value = int(text.strip())
    return None if value >= _V1_UNLIMITED_THRESHOLD or value < 0 else value


def parse_v2_memory_max(text: str) -> int | None:
    value = text.strip()
    return None if value == "max" else int(value)


# --------------------------------------------------------------------------- writes


class WriteAction(Enum):
    WRITE = "write"
    MKDIR = "mkdir"
    RMDIR = "rmdir"


@dataclass(frozen=True, slots=True)
class CgroupWrite:
    """One host change: a value written to a file, or a group directory made/removed."""

    action: WriteAction
    path: Path
    value: str | None = None

    def __str__(self) -> str:
        if self.action is WriteAction.WRITE:
            return f"write {self.value!r} > {self.path}"
        return f"{self.action.value} {self.path}"


# --------------------------------------------------------------------------- CgroupFs

# The sets the kernel actually grants: v1 file name -> v2 file name.
_EFFECTIVE_V1_TO_V2 = {
    "cpuset.effective_cpus": "cpuset.cpus.effective",
    "cpuset.effective_mems": "cpuset.mems.effective",
}


class CgroupFs:
    """Reads and writes cgroups under ``root`` for whichever layout the host has.

    ``group`` arguments are paths relative to a hierarchy root ("/kubepods/pod1/abc"),
    e.g. from `resolve_cgroups_path`; the same group path names the directory in every
    v1 controller's hierarchy and in the v2 hierarchy.
    """

    def __init__(
        self,
        root: Path = DEFAULT_CGROUP_ROOT,
        procfs: Path = DEFAULT_PROCFS_ROOT,
        *,
        dry_run: bool = False,
        mounts: CgroupMounts | None = None,
    ) -> None:
        self.root = root
        self.procfs = procfs
        self.dry_run = dry_run
        self.planned: list[CgroupWrite] = []  # filled only in dry-run mode
        self.mounts = mounts if mounts is not None else self._detect_mounts()
        self._unified_controllers: frozenset[str] | None = None

    def _detect_mounts(self) -> CgroupMounts:
        mountinfo = self.procfs / "self" / "mountinfo"
        try:
            text = mountinfo.read_text()
        except OSError as exc:
            raise CgroupUnsupported(
                mountinfo,
                exc.errno or errno_codes.EIO,
                f"cannot read {mountinfo} to find the cgroup mounts: {exc.strerror}; "
                "check the procfs root the agent is configured with",
            ) from exc
        return detect_cgroup_mounts(parse_mountinfo(text), self.root)

    @property
    def layout(self) -> HostLayout:
        return self.mounts.layout

    # ----------------------------------------------------------------- locations

    @staticmethod
    def resolve(cgroups_path: str) -> PurePosixPath:
        """NRI's cgroups_path -> group path (see `resolve_cgroups_path`)."""
        return resolve_cgroups_path(cgroups_path)

    def version_of(self, controller: str) -> CgroupVersion:
        """Which hierarchy serves ``controller`` on this host."""
        return self._locate(controller)[0]

    def group_dir(self, group: str | PurePosixPath, controller: str) -> Path:
        """The directory of ``group`` in the hierarchy that serves ``controller``."""
        return self._locate(controller)[1] / _relative(normalize_group(group))

    def unified_dir(self, group: str | PurePosixPath) -> Path | None:
        """The group's directory in the cgroup2 tree (PSI, BPF ids), if one is mounted."""
        if self.mounts.unified is None:
            return None
        return self.mounts.unified / _relative(normalize_group(group))

    def _locate(self, controller: str) -> tuple[CgroupVersion, Path]:
        mount = self.mounts.v1_mount(controller)
        if mount is not None:
            return CgroupVersion.V1, mount
        unified = self.mounts.unified
        if unified is not None and (
            self.layout is HostLayout.UNIFIED or controller in self._unified_available()
        ):
            return CgroupVersion.V2, unified
        raise CgroupUnsupported(
            self.root,
            errno_codes.EOPNOTSUPP,
            f"the {controller} controller is neither mounted as cgroup v1 under {self.root} "
            "nor available in the cgroup2 tree; mount it or enable it on this host",
        )

    def _unified_available(self) -> frozenset[str]:
        if self._unified_controllers is None:
            assert self.mounts.unified is not None
            path = self.mounts.unified / "cgroup.controllers"
            try:
                self._unified_controllers = frozenset(path.read_text().split())
            except OSError:
                self._unified_controllers = frozenset()
        return self._unified_controllers

    def _v1_dirs(self, group: PurePosixPath, controllers: Iterable[str]) -> list[tuple[str, Path]]:
        """(controller, dir) for each distinct v1 hierarchy among ``controllers``.

        Controllers co-mounted in one hierarchy (``cpu,cpuacct``) share a directory and
        appear once, under the first controller named.
        """
        seen: set[Path] = set()
        result: list[tuple[str, Path]] = []
        for controller in controllers:
            mount = self.mounts.v1_mount(controller)
            if mount is None or mount in seen:
                continue
            seen.add(mount)
            result.append((controller, mount / _relative(group)))
        return result

    def _membership_dirs(
        self, group: PurePosixPath, controllers: Iterable[str]
    ) -> list[tuple[str, Path]]:
        """Every directory a process of ``group`` must be in: v1 dirs, then the v2 one.

        On hybrid hosts the cgroup2 tree has no resource controllers, but runtimes put
        tasks there too and PSI / BPF cgroup ids come from it, so it is included.
        """
        dirs = self._v1_dirs(group, controllers)
        unified = self.mounts.unified
        if unified is not None and self.layout is not HostLayout.LEGACY:
            dirs.append(("", unified / _relative(group)))
        return dirs

    def exists(self, group: str | PurePosixPath) -> bool:
        """Whether the group exists in every hierarchy it should be in."""
        path = normalize_group(group)
        dirs = self._membership_dirs(path, RESOURCE_CONTROLLERS)
        return bool(dirs) and all(d.is_dir() for _, d in dirs)

    # ----------------------------------------------------------------- raw I/O

    def _read(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise self._error(exc, path, None, stage="read") from exc

    def _write(self, path: Path, value: str) -> CgroupWrite:
        record = CgroupWrite(WriteAction.WRITE, path, value)
        if self.dry_run:
            self.planned.append(record)
            return record
        # One write(2) per value, like `echo v > file`: cgroupfs and procfs ignore the
        # truncation, and without O_CREAT a missing file is ENOENT (O_CREAT gives EACCES).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, path, value, stage="open") from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise self._error(exc, path, value, stage="write") from exc
        finally:
            os.close(fd)
        return record

    def _mkdir(self, path: Path) -> CgroupWrite:
        record = CgroupWrite(WriteAction.MKDIR, path)
        if self.dry_run:
            self.planned.append(record)
            return record
        try:
            os.mkdir(path)
        except FileExistsError:
            pass  # a concurrent creator won; the group exists, which is what we want
        except OSError as exc:
            raise self._error(exc, path, None, stage="mkdir") from exc
        return record

    def _rmdir(self, path: Path) -> CgroupWrite:
        record = CgroupWrite(WriteAction.RMDIR, path)
        if self.dry_run:
            self.planned.append(record)
            return record
        try:
            os.rmdir(path)
        except OSError as exc:
            raise self._error(exc, path, None, stage="rmdir") from exc
        return record

    # ----------------------------------------------------------------- error mapping

    def _group_name(self, directory: Path) -> str:
        """The group path of a directory ("/a/b"), for messages."""
        for mount in [*self.mounts.v1.values(), self.mounts.unified]:
            if mount is not None and (directory == mount or mount in directory.parents):
                return str(PurePosixPath("/") / directory.relative_to(mount))
        return str(directory)

    def _error(self, exc: OSError, path: Path, value: str | None, *, stage: str) -> CgroupError:
        code = exc.errno or errno_codes.EIO
        is_dir_op = stage in ("mkdir", "rmdir")
        # mkdir fails with ENOENT when the parent is missing, so name the parent then
        directory = path if stage == "rmdir" else path.parent
        group = self._group_name(directory)
        name = path.name

        if code in (errno_codes.ENOENT, errno_codes.ENODEV):
            if is_dir_op or not directory.is_dir():
                return CgroupNotFound(
                    path, code, f"cgroup {group} does not exist; is the container still running?"
                )
            return CgroupNotFound(
                path,
                code,
                f"{name} does not exist in cgroup {group}: its controller is not enabled "
                "there (on cgroup v2, enable it in the parent's cgroup.subtree_control)",
            )
        if stage in ("open", "mkdir") and code in (errno_codes.EACCES, errno_codes.EPERM):
            return CgroupPermissionError(
                path,
                code,
                f"permission denied on {path}; the agent must run as root with write access "
                f"to {self.root}",
            )
        if stage == "rmdir" and code in (errno_codes.EBUSY, errno_codes.ENOTEMPTY):
            return CgroupBusy(
                path,
                code,
                f"cgroup {group} still has processes or child groups; stop or move them first",
            )
        if stage == "write":
            specific = self._explain_write(code, path, group, value or "")
            if specific is not None:
                return specific
        if stage == "read":
            return CgroupError(path, code, f"reading {path} failed: {os.strerror(code)}")
        what = f"writing {value!r} to" if value is not None else f"{stage} of"
        return CgroupError(path, code, f"{what} {path} failed: {os.strerror(code)}")

    def _explain_write(self, code: int, path: Path, group: str, value: str) -> CgroupError | None:
        name = path.name
        if name in ("cpuset.cpus", "cpuset.mems"):
            return self._explain_cpuset(code, path, group, value)
        if name == "cgroup.procs":
            if code == errno_codes.ESRCH:
                return CgroupProcessGone(
                    path, code, f"process {value} exited before it could be moved into {group}"
                )
            if code == errno_codes.ENOSPC:
                return CgroupBusy(
                    path,
                    code,
                    f"cgroup {group} has no CPUs or memory nodes in its cpuset; set "
                    "cpuset.cpus and cpuset.mems before adding tasks",
                )
            if code == errno_codes.EBUSY:
                return CgroupBusy(
                    path,
                    code,
                    f"cgroup {group} has controllers enabled for children "
                    "(cgroup.subtree_control); cgroup v2 only allows processes in leaf groups, "
                    "so move the process into a child group instead",
                )
            if code == errno_codes.EINVAL:
                return CgroupValueRejected(path, code, f"{value!r} is not a valid pid")
        if name == "cgroup.subtree_control":
            if code == errno_codes.EBUSY:
                return CgroupBusy(
                    path,
                    code,
                    f"cannot change controllers ({value}) of cgroup {group}: it has processes of "
                    "its own or children still use them; move its processes into a child group "
                    "first (cgroup v2 no-internal-process rule)",
                )
            if code == errno_codes.ENOENT:
                return CgroupUnsupported(
                    path,
                    code,
                    f"cannot enable {value} in cgroup {group}: not listed in its "
                    "cgroup.controllers (enable it in the parent first, or it is bound to a v1 "
                    "hierarchy)",
                )
        if name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.max") and code == (
            errno_codes.EINVAL
        ):
            return CgroupValueRejected(
                path,
                code,
                f"CPU bandwidth {value!r} rejected for cgroup {group}: the period must be "
                f"{CFS_PERIOD_MIN_US}..{CFS_PERIOD_MAX_US} us, the quota at least "
                f"{CFS_QUOTA_MIN_US} us, and a group may not get more CPU than its parent's "
                "quota allows",
            )
        if name == "cpu.weight" and code == errno_codes.ERANGE:
            return CgroupValueRejected(
                path, code, f"cpu.weight {value} is outside {CPU_WEIGHT_MIN}..{CPU_WEIGHT_MAX}"
            )
        if name in ("memory.limit_in_bytes", "memory.max"):
            if code == errno_codes.EBUSY:
                return CgroupBusy(
                    path,
                    code,
                    f"memory usage of cgroup {group} is above the new limit {value} and could "
                    "not be reclaimed; raise the limit or let the container free memory first",
                )
            if code == errno_codes.EINVAL:
                return CgroupValueRejected(
                    path,
                    code,
                    f"memory limit {value!r} rejected for cgroup {group} (on cgroup v1 it may "
                    "not exceed memory.memsw.limit_in_bytes)",
                )
        return None

    def _explain_cpuset(self, code: int, path: Path, group: str, value: str) -> CgroupError:
        """Say which ids were the problem.

        v1 refuses ids outside the parent's cpuset with EACCES (and ids past the last
        possible CPU with ERANGE); v2 accepts them (the effective set just narrows) and
        only refuses ids the host does not have (EINVAL).
        """
        what = "CPUs" if path.name == "cpuset.cpus" else "memory nodes"
        try:
            requested = parse_cpu_list(value)
        except CpuListError:
            return CgroupValueRejected(path, code, f"{value!r} is not a valid list of {what}")
        if code == errno_codes.EBUSY:
            return CgroupBusy(
                path,
                code,
                f"child groups of {group} still use {what} outside {value!r}; shrink the "
                "children first",
            )
        version, mount = self._locate("cpuset")
        host_set = self._cpuset_of(mount, path.name, version)
        if host_set is not None and not requested <= host_set:
            return CgroupValueRejected(
                path,
                code,
                f"{what} {format_cpu_list(requested - host_set)} do not exist or are offline on "
                f"this host (it has {format_cpu_list(host_set)})",
            )
        parent_set = self._cpuset_of(path.parent.parent, path.name, version)
        if parent_set is not None and not requested <= parent_set:
            return CgroupValueRejected(
                path,
                code,
                f"{what} {format_cpu_list(requested - parent_set)} are not in the parent's "
                f"cpuset ({format_cpu_list(parent_set) or 'empty'}); pick {what} from the "
                f"parent's {path.name} or widen the parent first",
            )
        return CgroupValueRejected(
            path,
            code,
            f"the kernel rejected {what} {value!r} for cgroup {group}: they may overlap a "
            "sibling's exclusive set",
        )

    @staticmethod
    def _cpuset_of(directory: Path, name: str, version: CgroupVersion) -> frozenset[int] | None:
        """The set a directory grants its children, or None if unreadable.

        v2 groups may leave cpuset.cpus empty (inherit) and the v2 root has only the
        .effective files, so v2 reads the effective set.
        """
        file_name = name if version is CgroupVersion.V1 else f"{name}.effective"
        try:
            return parse_cpu_list((directory / file_name).read_text())
        except (OSError, CpuListError):
            return None

    # ----------------------------------------------------------------- cpuset

    def _cpuset_file(self, group: str | PurePosixPath, what: str) -> Path:
        _, mount = self._locate("cpuset")
        return mount / _relative(normalize_group(group)) / f"cpuset.{what}"

    def set_cpuset_cpus(self, group: str | PurePosixPath, cpus: Iterable[int]) -> list[CgroupWrite]:
        return [self._write(self._cpuset_file(group, "cpus"), self._nonempty_list(cpus, "CPUs"))]

    def set_cpuset_mems(self, group: str | PurePosixPath, mems: Iterable[int]) -> list[CgroupWrite]:
        nodes = self._nonempty_list(mems, "memory nodes")
        return [self._write(self._cpuset_file(group, "mems"), nodes)]

    @staticmethod
    def _nonempty_list(ids: Iterable[int], what: str) -> str:
        text = format_cpu_list(ids)
        if not text:
            raise CgroupValueRejected(
                "", errno_codes.EINVAL, f"refusing to write an empty set of {what}"
            )
        return text

    def get_cpuset_cpus(self, group: str | PurePosixPath) -> frozenset[int]:
        """The configured cpuset (v2: the requested set; empty means "inherit")."""
        return parse_cpu_list(self._read(self._cpuset_file(group, "cpus")))

    def get_cpuset_mems(self, group: str | PurePosixPath) -> frozenset[int]:
        return parse_cpu_list(self._read(self._cpuset_file(group, "mems")))

    def get_effective_cpus(self, group: str | PurePosixPath) -> frozenset[int]:
        """The CPUs the kernel actually grants (v1 cpuset.effective_cpus, v2 .cpus.effective)."""
        return parse_cpu_list(self._read(self._effective_file(group, "cpus")))

    def get_effective_mems(self, group: str | PurePosixPath) -> frozenset[int]:
        return parse_cpu_list(self._read(self._effective_file(group, "mems")))

    def _effective_file(self, group: str | PurePosixPath, what: str) -> Path:
        version, mount = self._locate("cpuset")
        v1_name = f"cpuset.effective_{what}"
        name = v1_name if version is CgroupVersion.V1 else _EFFECTIVE_V1_TO_V2[v1_name]
        return mount / _relative(normalize_group(group)) / name

    # ----------------------------------------------------------------- cpu

    def set_cpu_shares(self, group: str | PurePosixPath, shares: int) -> list[CgroupWrite]:
        """Set the CPU weight in v1 units (v2: written as cpu.weight, see shares_to_weight)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if not CPU_SHARES_MIN <= shares <= CPU_SHARES_MAX:
            raise CgroupValueRejected(
                directory,
                errno_codes.EINVAL,
                f"cpu shares {shares} are outside {CPU_SHARES_MIN}..{CPU_SHARES_MAX}",
            )
        if version is CgroupVersion.V1:
            return [self._write(directory / "cpu.shares", str(shares))]
        return [self._write(directory / "cpu.weight", str(shares_to_weight(shares)))]

    def get_cpu_shares(self, group: str | PurePosixPath) -> int:
        """The CPU weight in v1 units (v2: the smallest shares that map to cpu.weight)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V1:
            return int(self._read(directory / "cpu.shares"))
        return weight_to_shares(int(self._read(directory / "cpu.weight")))

    def set_cpu_quota(self, group: str | PurePosixPath, quota: CpuQuota) -> list[CgroupWrite]:
        """Set CFS bandwidth (v1 cpu.cfs_quota_us + cpu.cfs_period_us, v2 cpu.max)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V2:
            return [self._write(directory / "cpu.max", format_cpu_max(quota))]
        period = (directory / "cpu.cfs_period_us", str(quota.period_us))
        limit = (
            directory / "cpu.cfs_quota_us",
            "-1" if quota.quota_us is None else str(quota.quota_us),
        )
        # The kernel checks quota/period against the parent's and children's bandwidth
        # after each write, so the intermediate state can be refused: write the period
        # first, and if that is rejected, the quota first (the order runc uses).
        try:
            return [self._write(*period), self._write(*limit)]
        except CgroupValueRejected as exc:
            if exc.path != str(period[0]):
                raise
            return [self._write(*limit), self._write(*period)]

    def get_cpu_quota(self, group: str | PurePosixPath) -> CpuQuota:
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V2:
            return parse_cpu_max(self._read(directory / "cpu.max"))
        quota = int(self._read(directory / "cpu.cfs_quota_us"))
        period = int(self._read(directory / "cpu.cfs_period_us"))
        return CpuQuota(quota_us=None if quota < 0 else quota, period_us=period)

    def cpu_usage_ns(self, group: str | PurePosixPath) -> int:
        """Total CPU time of the group and its descendants, in nanoseconds.

        v1: cpuacct.usage (ns). v2: cpu.stat ``usage_usec`` (exists even without the cpu
        controller, so hybrid hosts without cpuacct still get a number).
        """
        path = normalize_group(group)
        mount = self.mounts.v1_mount("cpuacct")
        if mount is not None:
            return int(self._read(mount / _relative(path) / "cpuacct.usage"))
        if self.mounts.unified is None:
            raise CgroupUnsupported(
                self.root,
                errno_codes.EOPNOTSUPP,
                "neither cpuacct (v1) nor a cgroup2 tree is mounted; CPU usage is unavailable",
            )
        stat_path = self.mounts.unified / _relative(path) / "cpu.stat"
        stats = parse_flat_keyed(self._read(stat_path))
        if "usage_usec" not in stats:
            raise CgroupError(stat_path, errno_codes.EIO, f"{stat_path} has no usage_usec")
        return stats["usage_usec"] * 1000

    # ----------------------------------------------------------------- memory

    def set_memory_limit(self, group: str | PurePosixPath, limit: int | None) -> list[CgroupWrite]:
        """Hard memory limit in bytes; None removes it. The kernel rounds down to a page."""
        version, mount = self._locate("memory")
        directory = mount / _relative(normalize_group(group))
        if limit is not None and limit < 0:
            raise CgroupValueRejected(
                directory, errno_codes.EINVAL, f"memory limit {limit} is negative; use None"
            )
        if version is CgroupVersion.V1:
            return [
                self._write(
                    directory / "memory.limit_in_bytes", "-1" if limit is None else str(limit)
                )
            ]
        return [self._write(directory / "memory.max", "max" if limit is None else str(limit))]

    def get_memory_limit(self, group: str | PurePosixPath) -> int | None:
        version, mount = self._locate("memory")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V1:
            return parse_v1_memory_limit(self._read(directory / "memory.limit_in_bytes"))
        return parse_v2_memory_max(self._read(directory / "memory.max"))

    # ----------------------------------------------------------------- processes

    def list_pids(self, group: str | PurePosixPath) -> list[int]:
        """Processes (thread group ids) directly in the group, without duplicates."""
        path = normalize_group(group)
        if self.layout is HostLayout.UNIFIED:
            assert self.mounts.unified is not None
            procs = self.mounts.unified / _relative(path) / "cgroup.procs"
        else:
            dirs = self._v1_dirs(path, ("cpu", *RESOURCE_CONTROLLERS))
            if not dirs:
                raise CgroupUnsupported(
                    self.root, errno_codes.EOPNOTSUPP, "no v1 resource controller is mounted"
                )
            procs = dirs[0][1] / "cgroup.procs"
        pids: list[int] = []
        for line in self._read(procs).split():
            pid = int(line)
            if pid not in pids:
                pids.append(pid)
        return pids

    def move_pid(
        self,
        group: str | PurePosixPath,
        pid: int,
        controllers: Sequence[str] = RESOURCE_CONTROLLERS,
    ) -> list[CgroupWrite]:
        """Move a process (all its threads) into the group in every hierarchy.

        v1 needs one write per hierarchy (cpuset first); if one fails, the earlier moves
        stay done and the error names the hierarchy that refused.
        """
        path = normalize_group(group)
        return [
            self._write(directory / "cgroup.procs", str(pid))
            for _, directory in self._membership_dirs(path, controllers)
        ]

    # ----------------------------------------------------------------- groups

    def create_group(
        self,
        group: str | PurePosixPath,
        controllers: Sequence[str] = RESOURCE_CONTROLLERS,
    ) -> list[CgroupWrite]:
        """Create the group (and missing ancestors) wherever ``controllers`` live.

        v1: mkdir in each controller's hierarchy. A new v1 cpuset starts with *empty*
        cpus and mems and refuses tasks (ENOSPC) until both are set, so each new level
        copies its parent's (what runc does). v2: before each new level, the parent's
        cgroup.subtree_control gets ``+cpuset +cpu +memory`` (as needed), so the new
        group has those controllers' files. Hybrid hosts also get the group in the
        cgroup2 tree (see `_membership_dirs`). Existing levels are left untouched.
        """
        path = normalize_group(group)
        writes: list[CgroupWrite] = []
        for controller, directory in self._membership_dirs(path, controllers):
            if controller:
                writes += self._create_v1_levels(controller, directory, path)
            else:
                writes += self._create_v2_levels(directory, path, self._v2_served(controllers))
        return writes

    def _v2_served(self, controllers: Sequence[str]) -> list[str]:
        """The resource controllers among ``controllers`` that the cgroup2 tree serves.

        All of them on unified hosts; on hybrid hosts only those not bound to v1 (none,
        usually: the cgroup2 tree then only tracks membership).
        """
        return [
            c
            for c in V2_RESOURCE_CONTROLLERS
            if c in controllers and self.version_of(c) is CgroupVersion.V2
        ]

    @staticmethod
    def _missing_levels(directory: Path, path: PurePosixPath) -> list[Path]:
        """The directories from the first missing ancestor down to ``directory``."""
        missing: list[Path] = []
        current = directory
        for _ in path.parts[1:]:
            if current.is_dir():
                break
            missing.append(current)
            current = current.parent
        missing.reverse()
        return missing

    def _create_v1_levels(
        self, controller: str, directory: Path, path: PurePosixPath
    ) -> list[CgroupWrite]:
        writes: list[CgroupWrite] = []
        levels = self._missing_levels(directory, path)
        is_cpuset = "cpuset" in {
            name for name, mount in self.mounts.v1.items() if mount == self.mounts.v1[controller]
        }
        inherited: tuple[str, str] | None = None
        if is_cpuset and levels:
            parent = levels[0].parent
            inherited = (
                self._read(parent / "cpuset.cpus").strip(),
                self._read(parent / "cpuset.mems").strip(),
            )
        for level in levels:
            writes.append(self._mkdir(level))
            if inherited is not None:
                writes.append(self._write(level / "cpuset.cpus", inherited[0]))
                writes.append(self._write(level / "cpuset.mems", inherited[1]))
        return writes

    def _create_v2_levels(
        self, directory: Path, path: PurePosixPath, controllers: Sequence[str]
    ) -> list[CgroupWrite]:
        writes: list[CgroupWrite] = []
        for level in self._missing_levels(directory, path):
            if controllers:
                writes += self._enable_in(level.parent, controllers)
            writes.append(self._mkdir(level))
        return writes

    def enable_controllers(
        self,
        group: str | PurePosixPath,
        controllers: Sequence[str] = V2_RESOURCE_CONTROLLERS,
    ) -> list[CgroupWrite]:
        """v2: let ``group``'s children use ``controllers`` (cgroup.subtree_control).

        Only controllers not yet enabled are written, in one write (the kernel applies a
        multi-controller write all-or-nothing). A no-op on v1, which has no such switch.
        """
        unified = self.mounts.unified
        served = [c for c in controllers if self.version_of(c) is CgroupVersion.V2]
        if unified is None or not served:
            return []
        return self._enable_in(unified / _relative(normalize_group(group)), served)

    def _enable_in(self, directory: Path, controllers: Sequence[str]) -> list[CgroupWrite]:
        control = directory / "cgroup.subtree_control"
        enabled = self._read_words_if_exists(control)
        missing = [c for c in controllers if c not in enabled]
        if not missing:
            return []
        available_file = directory / "cgroup.controllers"
        available = self._read_words_if_exists(available_file)
        if directory.is_dir():
            unavailable = [c for c in missing if c not in available]
            if unavailable:
                raise CgroupUnsupported(
                    available_file,
                    errno_codes.ENOENT,
                    f"cannot enable {' '.join(unavailable)} in cgroup "
                    f"{self._group_name(directory)}: not in its cgroup.controllers (enable it in "
                    "the parent first, or free it from its cgroup v1 hierarchy)",
                )
        return [self._write(control, " ".join(f"+{c}" for c in missing))]

    def _read_words_if_exists(self, path: Path) -> frozenset[str]:
        """Words of a file; empty when its group does not exist yet (dry-run planning)."""
        if not path.parent.is_dir():
            return frozenset()
        return frozenset(self._read(path).split())

    def remove_group(
        self,
        group: str | PurePosixPath,
        *,
        recursive: bool = False,
        controllers: Sequence[str] = RESOURCE_CONTROLLERS,
    ) -> list[CgroupWrite]:
        """Remove the group from every hierarchy it exists in (children first if recursive).

        The kernel refuses (EBUSY) while the group or a child has processes.
        """
        path = normalize_group(group)
        if path == PurePosixPath("/"):
            raise CgroupPathError("/", "refusing to remove a hierarchy root")
        dirs = [d for _, d in self._membership_dirs(path, controllers) if d.is_dir()]
        if not dirs:
            raise CgroupNotFound(
                path,
                errno_codes.ENOENT,
                f"cgroup {path} does not exist; is the container still running?",
            )
        writes: list[CgroupWrite] = []
        for directory in dirs:
            if recursive:
                for child in self._descendant_dirs(directory):
                    writes.append(self._rmdir(child))
            writes.append(self._rmdir(directory))
        return writes

    @staticmethod
    def _descendant_dirs(directory: Path) -> Iterator[Path]:
        """Child group directories, deepest first (interface files are not directories)."""
        for dirpath, dirnames, _ in os.walk(directory, topdown=False):
            if Path(dirpath) == directory:
                continue
            del dirnames
            yield Path(dirpath)
