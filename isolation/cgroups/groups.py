"""`CgroupFs` group membership and lifecycle: list/move processes, create/remove groups.

Also v2 controller enablement (cgroup.subtree_control), which creating a group needs.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from isolation.cgroups.access import CgroupWrite, _CgroupAccess
from isolation.cgroups.errors import CgroupNotFound, CgroupPathError, CgroupUnsupported
from isolation.cgroups.layout import (
    RESOURCE_CONTROLLERS,
    V2_RESOURCE_CONTROLLERS,
    CgroupVersion,
    HostLayout,
)
from isolation.cgroups.paths import _relative, normalize_group


class _CgroupGroups(_CgroupAccess):
    """Processes and group directories; mixed into `CgroupFs`."""

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
