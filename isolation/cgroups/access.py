"""The base of `CgroupFs`: locating groups, raw dry-run-aware I/O, kernel error mapping.

Every host change is a `CgroupWrite`; in dry-run mode it is recorded, not made.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from isolation import inflight
from isolation.cgroups.errors import (
    CgroupBusy,
    CgroupError,
    CgroupNotFound,
    CgroupPermissionError,
    CgroupProcessGone,
    CgroupUnsupported,
    CgroupValueRejected,
)
from isolation.cgroups.layout import (
    DEFAULT_CGROUP_ROOT,
    DEFAULT_PROCFS_ROOT,
    RESOURCE_CONTROLLERS,
    CgroupMounts,
    CgroupVersion,
    HostLayout,
    detect_cgroup_mounts,
    parse_mountinfo,
)
from isolation.cgroups.paths import _relative, normalize_group, resolve_cgroups_path
from isolation.cgroups.values import (
    CFS_PERIOD_MAX_US,
    CFS_PERIOD_MIN_US,
    CFS_QUOTA_MIN_US,
    CPU_WEIGHT_MAX,
    CPU_WEIGHT_MIN,
)
from qos_model.cpulist import CpuListError, format_cpu_list, parse_cpu_list


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


class _CgroupAccess:
    """What every `CgroupFs` operation builds on (see `CgroupFs` for the ``group`` argument)."""

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
        inflight.touching(path)
        try:
            return path.read_text()
        except OSError as exc:
            raise self._error(exc, path, None, stage="read") from exc

    def _write(self, path: Path, value: str) -> CgroupWrite:
        record = CgroupWrite(WriteAction.WRITE, path, value)
        if self.dry_run:
            self.planned.append(record)
            return record
        inflight.touching(path)
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
