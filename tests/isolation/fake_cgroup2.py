"""A cgroup v2 hierarchy with the kernel's semantics, in pyfakefs.

This CI host cannot give cgroup2 any resource controller (they are bound to v1), so the
v2 code paths run against `FakeCgroup2`: a pyfakefs tree at the production paths
(``/sys/fs/cgroup``, ``/proc/self/mountinfo``) whose files follow
Documentation/admin-guide/cgroup-v2.rst and whose writes, mkdir and rmdir behave like the
kernel's: formats are canonicalised on read-back, values are validated with the kernel's
errno, controllers follow cgroup.subtree_control (top-down and no-internal-process
rules), and a process is in exactly one group.

Used by tests/isolation/test_cgroups_v2_fake.py (which also guards the fake itself),
tests/test_readback.py and tests/embedded/test_host_backend.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pyfakefs.fake_file import FakeFile
from pyfakefs.fake_filesystem import FakeFilesystem

from qos_model.cpulist import CpuListError, format_cpu_list, parse_cpu_list

ROOT_TEXT = "/sys/fs/cgroup"


def cg(*parts: str | PurePosixPath) -> Path:
    """A path under the cgroup root, made at run time.

    Under pyfakefs, Path is pyfakefs's class and never equals a real Path made at import,
    so nothing here builds paths at import time.
    """
    path = Path(ROOT_TEXT)
    for part in parts:
        path /= str(part).lstrip("/")
    return path


PAGE_SIZE = 4096

# cgroup.controllers lists controllers in the kernel's subsystem order.
CONTROLLER_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""  # noqa: E501


def _oserror(code: int, path: object) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@dataclass
class _Group:
    subtree_control: set[str] = field(default_factory=set)
    procs: list[int] = field(default_factory=list)
    cpus: frozenset[int] = frozenset()  # requested; empty = inherit
    mems: frozenset[int] = frozenset()
    weight: int = 100
    quota_us: int | None = None
    period_us: int = 100_000
    memory_max: int | None = None
    usage_usec: int = 0


class FakeCgroup2:
    """A cgroup2 hierarchy with kernel semantics for the files the agent touches."""

    def __init__(
        self,
        fs: FakeFilesystem,
        cpus: frozenset[int] = frozenset(range(8)),
        mems: frozenset[int] = frozenset({0}),
        controllers: tuple[str, ...] = CONTROLLER_ORDER,
    ) -> None:
        self.fs = fs
        self.host_cpus = cpus
        self.host_mems = mems
        self.available = [c for c in CONTROLLER_ORDER if c in controllers]
        self.groups: dict[PurePosixPath, _Group] = {PurePosixPath("/"): _Group()}
        self._files: dict[PurePosixPath, dict[str, FakeFile]] = {}
        self.live_pids: set[int] = set()
        self._next_pid = 4000
        fs.create_file("/proc/self/mountinfo", contents=MOUNTINFO)
        fs.create_dir(ROOT_TEXT)
        self._original_makedir = fs.makedir
        self._original_rmdir = fs.rmdir
        fs.makedir = self._makedir  # type: ignore[method-assign]
        fs.rmdir = self._rmdir  # type: ignore[method-assign]
        self._render_all(structure_changed=True)

    # ------------------------------------------------------------------ model

    def _dir(self, group: PurePosixPath) -> Path:
        return cg(group)

    @staticmethod
    def _group_of(path: object) -> PurePosixPath | None:
        # Compare pure paths: under pyfakefs, Path() made at run time is pyfakefs's own
        # class and never equals the real Path ROOT was made with at import.
        pure, root = PurePosixPath(os.fspath(path)), PurePosixPath(ROOT_TEXT)  # type: ignore[call-overload]
        if pure != root and root not in pure.parents:
            return None
        return PurePosixPath("/") / pure.relative_to(root)

    def _children(self, group: PurePosixPath) -> list[PurePosixPath]:
        return [g for g in self.groups if g != group and g.parent == group]

    def controllers_of(self, group: PurePosixPath) -> list[str]:
        if group == PurePosixPath("/"):
            return list(self.available)
        parent = self.groups[group.parent].subtree_control
        return [c for c in CONTROLLER_ORDER if c in parent]

    def effective(self, group: PurePosixPath, what: str) -> frozenset[int]:
        host = self.host_cpus if what == "cpus" else self.host_mems
        if group == PurePosixPath("/"):
            return host
        parent = self.effective(group.parent, what)
        state = self.groups[group]
        if "cpuset" not in self.controllers_of(group):
            return parent
        requested = state.cpus if what == "cpus" else state.mems
        granted = requested & parent
        return granted or parent

    def _wanted_files(self, group: PurePosixPath) -> dict[str, bool]:
        """Interface file name -> whether writes are handled (cgroup-v2.rst)."""
        root = group == PurePosixPath("/")
        files = {
            "cgroup.procs": True,
            "cgroup.threads": False,
            "cgroup.controllers": False,
            "cgroup.subtree_control": True,
            "cgroup.max.depth": False,
            "cgroup.max.descendants": False,
            "cgroup.stat": False,
            "cgroup.pressure": False,
            "cpu.stat": False,
            "cpu.stat.local": False,
            "cpu.pressure": False,
            "io.pressure": False,
            "memory.pressure": False,
        }
        if not root:
            files |= {"cgroup.type": False, "cgroup.events": False, "cgroup.freeze": False,
                      "cgroup.kill": False}  # fmt: skip
        enabled = self.controllers_of(group)
        if "cpuset" in enabled:
            files |= {"cpuset.cpus.effective": False, "cpuset.mems.effective": False}
            if not root:
                files |= {"cpuset.cpus": True, "cpuset.mems": True,
                          "cpuset.cpus.partition": False, "cpuset.cpus.exclusive": False,
                          "cpuset.cpus.exclusive.effective": False}  # fmt: skip
        if "cpu" in enabled and not root:
            files |= {"cpu.weight": True, "cpu.weight.nice": False, "cpu.max": True,
                      "cpu.max.burst": False, "cpu.idle": False}  # fmt: skip
        if "memory" in enabled and not root:
            files |= {"memory.max": True, "memory.high": False, "memory.low": False,
                      "memory.min": False, "memory.current": False, "memory.events": False,
                      "memory.stat": False, "memory.swap.max": False, "memory.peak": False,
                      "memory.oom.group": False}  # fmt: skip
        return files

    def _render(self, group: PurePosixPath) -> dict[str, str]:
        """The content of every interface file of the group, as the kernel prints it."""
        state = self.groups[group]
        enabled = self.controllers_of(group)
        cpu_on = "cpu" in enabled and group != PurePosixPath("/")
        procs = "".join(f"{pid}\n" for pid in state.procs)
        populated = int(
            any(self.groups[g].procs for g in self.groups if g == group or group in g.parents)
        )
        user = state.usage_usec - state.usage_usec // 4
        cpu_stat = (
            f"usage_usec {state.usage_usec}\nuser_usec {user}\n"
            f"system_usec {state.usage_usec // 4}\n"
        )
        if cpu_on:
            cpu_stat += (
                "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"
            )
        psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        return {
            "cgroup.procs": procs,
            "cgroup.threads": procs,
            "cgroup.controllers": " ".join(enabled) + "\n",
            "cgroup.subtree_control": " ".join(
                c for c in CONTROLLER_ORDER if c in state.subtree_control
            )
            + "\n",
            "cgroup.max.depth": "max\n",
            "cgroup.max.descendants": "max\n",
            "cgroup.stat": f"nr_descendants {sum(1 for g in self.groups if group in g.parents)}\n"
            "nr_dying_descendants 0\n",
            "cgroup.pressure": "1\n",
            "cgroup.type": "domain\n",
            "cgroup.events": f"populated {populated}\nfrozen 0\n",
            "cgroup.freeze": "0\n",
            "cgroup.kill": "",
            "cpu.stat": cpu_stat,
            "cpu.stat.local": "throttled_usec 0\n" if cpu_on else "",
            "cpu.pressure": psi + psi.replace("some", "full"),
            "io.pressure": psi + psi.replace("some", "full"),
            "memory.pressure": psi + psi.replace("some", "full"),
            "cpuset.cpus": format_cpu_list(state.cpus) + "\n",
            "cpuset.mems": format_cpu_list(state.mems) + "\n",
            "cpuset.cpus.effective": format_cpu_list(self.effective(group, "cpus")) + "\n",
            "cpuset.mems.effective": format_cpu_list(self.effective(group, "mems")) + "\n",
            "cpuset.cpus.partition": "member\n",
            "cpuset.cpus.exclusive": "\n",
            "cpuset.cpus.exclusive.effective": "\n",
            "cpu.weight": f"{state.weight}\n",
            "cpu.weight.nice": "0\n",
            "cpu.max": f"{'max' if state.quota_us is None else state.quota_us} {state.period_us}\n",
            "cpu.max.burst": "0\n",
            "cpu.idle": "0\n",
            "memory.max": f"{'max' if state.memory_max is None else state.memory_max}\n",
            "memory.high": "max\n",
            "memory.low": "0\n",
            "memory.min": "0\n",
            "memory.current": "0\n",
            "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
            "memory.stat": "anon 0\nfile 0\n",
            "memory.swap.max": "max\n",
            "memory.peak": "0\n",
            "memory.oom.group": "0\n",
        }

    def _sync_files(self, group: PurePosixPath) -> None:
        """Create/remove interface files to match the controllers enabled for the group."""
        directory = self._dir(group)
        wanted = self._wanted_files(group)
        files = self._files.setdefault(group, {})
        for name in [n for n in files if n not in wanted]:
            self.fs.remove_object(str(directory / name))
            del files[name]
        for name, writable in wanted.items():
            if name not in files:
                side_effect = self._handler(group, name) if writable else None
                files[name] = self.fs.create_file(str(directory / name), side_effect=side_effect)

    def _render_all(self, *, structure_changed: bool = False) -> None:
        """Bring every file up to date with the model (after any change)."""
        for group in sorted(self.groups, key=lambda g: len(g.parts)):
            if structure_changed:
                self._sync_files(group)
            rendered = self._render(group)
            for name, fake in self._files[group].items():
                text = rendered[name]
                if fake.contents != text:
                    fake.set_initial_contents(text)

    # ------------------------------------------------------------------ writes

    def _handler(self, group: PurePosixPath, name: str) -> Callable[[FakeFile], None]:
        def on_write(fake: FakeFile) -> None:
            raw = fake.contents or ""
            if raw == "":  # the O_TRUNC at open; the value comes with write(2)
                return
            try:
                self._apply(group, name, raw.strip(), fake.path)
            finally:
                # read-back is always the kernel's canonical form, refused or not
                self._render_all(structure_changed=name == "cgroup.subtree_control")

        return on_write

    def _apply(self, group: PurePosixPath, name: str, value: str, path: object) -> None:
        state = self.groups[group]
        if name == "cgroup.procs":
            if not value.isdigit():
                raise _oserror(errno.EINVAL, path)
            pid = int(value)
            if pid not in self.live_pids:
                raise _oserror(errno.ESRCH, path)
            if group != PurePosixPath("/") and state.subtree_control:
                raise _oserror(errno.EBUSY, path)  # no internal processes
            for other in self.groups.values():
                if pid in other.procs:
                    other.procs.remove(pid)
            state.procs.append(pid)
        elif name == "cgroup.subtree_control":
            self._apply_subtree_control(group, value, path)
        elif name == "cpu.weight":
            if not value.isdigit():
                raise _oserror(errno.EINVAL, path)
            if not 1 <= int(value) <= 10000:
                raise _oserror(errno.ERANGE, path)
            state.weight = int(value)
        elif name == "cpu.max":
            fields = value.split()
            if not 1 <= len(fields) <= 2:
                raise _oserror(errno.EINVAL, path)
            try:
                quota = None if fields[0] == "max" else int(fields[0])
                period = int(fields[1]) if len(fields) == 2 else state.period_us
            except ValueError:
                raise _oserror(errno.EINVAL, path) from None
            if not 1000 <= period <= 1_000_000 or (quota is not None and quota < 1000):
                raise _oserror(errno.EINVAL, path)
            state.quota_us, state.period_us = quota, period
        elif name in ("cpuset.cpus", "cpuset.mems"):
            host = self.host_cpus if name == "cpuset.cpus" else self.host_mems
            try:
                requested = parse_cpu_list(value)
            except CpuListError:
                raise _oserror(errno.EINVAL, path) from None
            if not requested <= host:  # v2 only refuses ids the host does not have
                raise _oserror(errno.EINVAL, path)
            if name == "cpuset.cpus":
                state.cpus = requested
            else:
                state.mems = requested
        elif name == "memory.max":
            if value == "max":
                state.memory_max = None
            elif value.isdigit():
                state.memory_max = int(value) // PAGE_SIZE * PAGE_SIZE
            else:
                raise _oserror(errno.EINVAL, path)

    def _apply_subtree_control(self, group: PurePosixPath, value: str, path: object) -> None:
        state = self.groups[group]
        available = self.controllers_of(group)
        changes: dict[str, bool] = {}
        for token in value.split():
            if token[:1] not in ("+", "-"):
                raise _oserror(errno.EINVAL, path)
            if token[1:] not in available:
                raise _oserror(errno.ENOENT, path)
            changes[token[1:]] = token[0] == "+"
        enabling = [c for c, on in changes.items() if on and c not in state.subtree_control]
        disabling = [c for c, on in changes.items() if not on and c in state.subtree_control]
        if enabling and group != PurePosixPath("/") and state.procs:
            raise _oserror(errno.EBUSY, path)
        for child in self._children(group):
            if any(c in self.groups[child].subtree_control for c in disabling):
                raise _oserror(errno.EBUSY, path)
        state.subtree_control |= set(enabling)
        state.subtree_control -= set(disabling)

    # ------------------------------------------------------------------ dirs

    def _makedir(self, dir_path: Any, mode: int = 0o777) -> None:
        group = self._group_of(dir_path)
        self._original_makedir(dir_path, mode)
        if group is None or group in self.groups:
            return
        self.groups[group] = _Group()
        self._render_all(structure_changed=True)

    def _rmdir(self, target_directory: Any, allow_symlink: bool = False) -> None:
        path = Path(os.fspath(target_directory))
        group = self._group_of(target_directory)
        if group is None or group not in self.groups:
            self._original_rmdir(target_directory, allow_symlink)
            return
        if group == PurePosixPath("/") or self.groups[group].procs or self._children(group):
            raise _oserror(errno.EBUSY, path)
        for entry in os.listdir(path):
            self.fs.remove_object(str(path / entry))
        self._original_rmdir(target_directory, allow_symlink)
        del self.groups[group]
        del self._files[group]
        self._render_all()

    # ------------------------------------------------------------------ processes

    def spawn(self) -> int:
        """A new process, born in the root group."""
        self._next_pid += 1
        self.live_pids.add(self._next_pid)
        self.groups[PurePosixPath("/")].procs.append(self._next_pid)
        self._render_all()
        return self._next_pid

    def burn(self, group: PurePosixPath, usec: int) -> None:
        """Account CPU time to a group; cpu.stat is hierarchical."""
        for g in (group, *group.parents):
            self.groups[g].usage_usec += usec
        self._render_all()


def echo(path: Path, value: str) -> None:
    """What `echo value > path` does: one write(2) after an O_TRUNC open."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
