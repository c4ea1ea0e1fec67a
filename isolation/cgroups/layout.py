"""How cgroups are mounted on the host: mountinfo parsing and layout detection.

Also the default roots and the controller names the policy works with.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from isolation.cgroups.errors import CgroupUnsupported

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
