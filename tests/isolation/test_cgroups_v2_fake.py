"""isolation.cgroups on a pure cgroup v2 host, emulated in pyfakefs.

This CI host cannot give cgroup2 any resource controller (they are bound to v1), so the
v2 code path runs against `FakeCgroup2`: a pyfakefs tree at the production paths
(``/sys/fs/cgroup``, ``/proc/self/mountinfo``) whose files follow
Documentation/admin-guide/cgroup-v2.rst and whose writes, mkdir and rmdir behave like the
kernel's: formats are canonicalised on read-back, values are validated with the kernel's
errno, controllers follow cgroup.subtree_control (top-down and no-internal-process
rules), and a process is in exactly one group.

`CgroupFs()` is built with its production defaults; only the filesystem is fake.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from pyfakefs.fake_file import FakeFile
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.cgroups import (
    CgroupBusy,
    CgroupFs,
    CgroupNotFound,
    CgroupUnsupported,
    CgroupValueRejected,
    CgroupVersion,
    CgroupWrite,
    CpuQuota,
    HostLayout,
    WriteAction,
    resolve_cgroups_path,
    shares_to_weight,
)
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
MIB = 1 << 20

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


POD_UID = "pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
CONTAINER_ID = "3b1c0d5e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"
CGROUPS_PATH = f"kubepods-burstable-{POD_UID}.slice:cri-containerd:{CONTAINER_ID}"
POD = PurePosixPath(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD_UID}.slice")
CONTAINER = POD / f"cri-containerd-{CONTAINER_ID}.scope"


@dataclass
class Host:
    kernel: FakeCgroup2
    container_pid: int


@pytest.fixture
def host(fs: FakeFilesystem) -> Iterator[Host]:
    """A systemd-driver Kubernetes node: kubepods slices down to one container scope."""
    kernel = FakeCgroup2(fs)
    echo(cg("cgroup.subtree_control"), "+cpuset +cpu +io +memory +pids")
    for level in (POD.parents[1], POD.parent, POD):  # kubepods.slice .. pod slice
        os.mkdir(cg(level))
        echo(cg(level) / "cgroup.subtree_control", "+cpuset +cpu +memory +pids")
    os.mkdir(cg(CONTAINER))
    echo(cg(POD) / "cpuset.cpus", "0-3")
    pid = kernel.spawn()
    echo(cg(CONTAINER) / "cgroup.procs", str(pid))
    yield Host(kernel, pid)


def _tree() -> dict[str, str]:
    """Every file and its content: a snapshot to prove dry-run wrote nothing."""
    snapshot: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(cg()):
        snapshot[dirpath] = "<dir>"
        for name in filenames:
            snapshot[os.path.join(dirpath, name)] = Path(dirpath, name).read_text()
    return snapshot


def _file(group: PurePosixPath, name: str) -> str:
    return (cg(group) / name).read_text()


# --------------------------------------------------------------------------- the fake itself


def test_fake_follows_the_documented_formats(host: Host) -> None:
    """Guard the fake: defaults and formats as cgroup-v2.rst documents them."""
    assert _file(CONTAINER, "cpu.max") == "max 100000\n"
    assert _file(CONTAINER, "cpu.weight") == "100\n"
    assert _file(CONTAINER, "memory.max") == "max\n"
    assert _file(CONTAINER, "cpuset.cpus") == "\n"  # empty: inherit
    assert _file(CONTAINER, "cpuset.cpus.effective") == "0-3\n"
    assert _file(CONTAINER, "cgroup.controllers") == "cpuset cpu memory pids\n"
    assert _file(CONTAINER, "cgroup.subtree_control") == "\n"
    assert _file(CONTAINER, "cgroup.procs") == f"{host.container_pid}\n"
    assert _file(CONTAINER, "cpu.stat").startswith("usage_usec 0\nuser_usec 0\nsystem_usec 0\n")
    assert _file(PurePosixPath("/"), "cgroup.controllers") == (
        "cpuset cpu io memory hugetlb pids rdma misc\n"
    )
    assert not cg("cpu.max").exists()  # root has no resource-control files
    echo(cg(CONTAINER) / "cpu.max", "25000")  # one number: $MAX only
    assert _file(CONTAINER, "cpu.max") == "25000 100000\n"
    with pytest.raises(OSError) as info:
        echo(cg(CONTAINER) / "cpu.weight", "0")
    assert info.value.errno == errno.ERANGE
    assert _file(CONTAINER, "cpu.weight") == "100\n"  # a refused write changes nothing


# --------------------------------------------------------------------------- layout, paths


def test_production_defaults_detect_a_unified_host(host: Host) -> None:
    cgroups = CgroupFs()
    assert cgroups.layout is HostLayout.UNIFIED
    assert cgroups.mounts.unified == cg()
    for controller in ("cpuset", "cpu", "memory"):
        assert cgroups.version_of(controller) is CgroupVersion.V2
    group = cgroups.resolve(CGROUPS_PATH)
    assert group == CONTAINER
    assert cgroups.group_dir(group, "cpu").is_dir()
    assert cgroups.exists(group)


# --------------------------------------------------------------------------- operations


def test_cpuset_cpus_and_mems(host: Host) -> None:
    cgroups = CgroupFs()
    group = resolve_cgroups_path(CGROUPS_PATH)
    writes = cgroups.set_cpuset_cpus(group, {2, 3})
    cgroups.set_cpuset_mems(group, {0})
    assert writes == [CgroupWrite(WriteAction.WRITE, cg(CONTAINER) / "cpuset.cpus", "2-3")]
    assert _file(CONTAINER, "cpuset.cpus") == "2-3\n"
    assert cgroups.get_cpuset_cpus(group) == {2, 3}
    assert cgroups.get_effective_cpus(group) == {2, 3}
    assert cgroups.get_cpuset_mems(group) == {0}
    assert cgroups.get_effective_mems(group) == {0}


def test_v2_accepts_cpus_outside_the_parent_and_narrows_the_effective_set(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.set_cpuset_cpus(CONTAINER, {2, 3, 4, 5})  # the pod slice has 0-3
    assert cgroups.get_cpuset_cpus(CONTAINER) == {2, 3, 4, 5}
    assert cgroups.get_effective_cpus(CONTAINER) == {2, 3}


def test_cpus_the_host_lacks_are_einval_with_a_clear_message(host: Host) -> None:
    cgroups = CgroupFs()
    with pytest.raises(CgroupValueRejected) as info:
        cgroups.set_cpuset_cpus(CONTAINER, {6, 8, 9})
    assert info.value.errno == errno.EINVAL
    assert "CPUs 8-9 do not exist or are offline on this host (it has 0-7)" in info.value.message
    assert cgroups.get_cpuset_cpus(CONTAINER) == frozenset()


def test_shares_are_written_as_weight(host: Host) -> None:
    cgroups = CgroupFs()
    for shares in (2, 512, 1024, 4096, 262144):
        writes = cgroups.set_cpu_shares(CONTAINER, shares)
        assert writes[0].path.name == "cpu.weight"
        assert _file(CONTAINER, "cpu.weight") == f"{shares_to_weight(shares)}\n"
        assert shares_to_weight(cgroups.get_cpu_shares(CONTAINER)) == shares_to_weight(shares)
    cgroups.set_cpu_shares(CONTAINER, 1024)
    assert _file(CONTAINER, "cpu.weight") == "100\n"
    assert cgroups.get_cpu_shares(CONTAINER) == 1024
    with pytest.raises(CgroupValueRejected) as info:
        cgroups.set_cpu_shares(CONTAINER, 1)
    assert info.value.errno == errno.EINVAL


def test_cpu_max(host: Host) -> None:
    cgroups = CgroupFs()
    writes = cgroups.set_cpu_quota(CONTAINER, CpuQuota(50_000, 100_000))
    assert [w.value for w in writes] == ["50000 100000"]  # one atomic write
    assert _file(CONTAINER, "cpu.max") == "50000 100000\n"
    assert cgroups.get_cpu_quota(CONTAINER) == CpuQuota(50_000, 100_000)
    cgroups.set_cpu_quota(CONTAINER, CpuQuota(None, 20_000))
    assert _file(CONTAINER, "cpu.max") == "max 20000\n"
    assert cgroups.get_cpu_quota(CONTAINER) == CpuQuota(None, 20_000)


def test_memory_max(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.set_memory_limit(CONTAINER, 64 * MIB)
    assert _file(CONTAINER, "memory.max") == f"{64 * MIB}\n"
    assert cgroups.get_memory_limit(CONTAINER) == 64 * MIB
    cgroups.set_memory_limit(CONTAINER, 1_000_000)
    assert cgroups.get_memory_limit(CONTAINER) == 999_424  # rounded down to a page
    cgroups.set_memory_limit(CONTAINER, None)
    assert _file(CONTAINER, "memory.max") == "max\n"
    assert cgroups.get_memory_limit(CONTAINER) is None


def test_pids_move_and_usage(host: Host) -> None:
    cgroups = CgroupFs()
    other = host.kernel.spawn()
    assert cgroups.list_pids(CONTAINER) == [host.container_pid]
    writes = cgroups.move_pid(CONTAINER, other)
    assert writes == [
        CgroupWrite(WriteAction.WRITE, cg(CONTAINER) / "cgroup.procs",
                    str(other))
    ]  # fmt: skip
    assert cgroups.list_pids(CONTAINER) == [host.container_pid, other]
    assert other not in cgroups.list_pids("/")

    host.kernel.burn(CONTAINER, 1500)
    assert cgroups.cpu_usage_ns(CONTAINER) == 1_500_000
    assert cgroups.cpu_usage_ns(POD) == 1_500_000


# --------------------------------------------------------------------------- groups


def test_create_group_enables_controllers_top_down(host: Host) -> None:
    cgroups = CgroupFs()
    group = PurePosixPath("/nri-qos.slice/reclaimed")
    writes = cgroups.create_group(group)
    top = cg("nri-qos.slice")
    # the root already delegates cpuset/cpu/memory: only the new parent needs enabling
    assert writes == [
        CgroupWrite(WriteAction.MKDIR, top),
        CgroupWrite(WriteAction.WRITE, top / "cgroup.subtree_control", "+cpuset +cpu +memory"),
        CgroupWrite(WriteAction.MKDIR, top / "reclaimed"),
    ]
    assert _file(group, "cgroup.controllers") == "cpuset cpu memory\n"
    for name in ("cpuset.cpus", "cpu.weight", "cpu.max", "memory.max"):
        assert (top / "reclaimed" / name).exists()
    assert cgroups.create_group(group) == []  # idempotent


def test_enable_controllers_on_an_existing_group(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    assert not (cg("plain", "leaf") / "cpu.weight").exists()
    writes = cgroups.enable_controllers("/plain", ("cpu", "memory"))
    assert [w.value for w in writes] == ["+cpu +memory"]
    assert (cg("plain", "leaf") / "cpu.weight").exists()
    assert cgroups.enable_controllers("/plain", ("cpu",)) == []


def test_missing_controller_file_says_enable_it(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    with pytest.raises(CgroupNotFound) as info:
        cgroups.set_cpu_shares("/plain/leaf", 512)
    assert info.value.errno == errno.ENOENT
    assert "cpu.weight does not exist in cgroup /plain/leaf" in info.value.message
    assert "cgroup.subtree_control" in info.value.message


def test_enabling_an_unavailable_controller_is_enoent(host: Host) -> None:
    cgroups = CgroupFs()
    os.mkdir(cg("plain"))
    os.mkdir(cg("plain", "leaf"))
    with pytest.raises(CgroupUnsupported) as info:
        cgroups.enable_controllers("/plain/leaf", ("cpu",))  # /plain delegates nothing
    assert info.value.errno == errno.ENOENT
    assert "not in its cgroup.controllers" in info.value.message


def test_no_internal_process_rule(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.create_group("/busy")
    pid = host.kernel.spawn()
    cgroups.move_pid("/busy", pid)
    # creating a child needs controllers enabled in /busy, which has a process
    with pytest.raises(CgroupBusy) as info:
        cgroups.create_group("/busy/child")
    assert info.value.errno == errno.EBUSY
    assert "move its processes into a child group first" in info.value.message
    # and a group that delegates controllers cannot take processes
    with pytest.raises(CgroupBusy) as moved:
        cgroups.move_pid(POD, pid)
    assert moved.value.errno == errno.EBUSY
    assert "only allows processes in leaf groups" in moved.value.message


def test_missing_container_is_enoent(host: Host) -> None:
    cgroups = CgroupFs()
    gone = POD / "cri-containerd-0000.scope"
    with pytest.raises(CgroupNotFound) as info:
        cgroups.set_memory_limit(gone, 64 * MIB)
    assert info.value.errno == errno.ENOENT
    assert info.value.message == f"cgroup {gone} does not exist; is the container still running?"


def test_remove_group(host: Host) -> None:
    cgroups = CgroupFs()
    cgroups.create_group("/nri-qos.slice/a/b")
    with pytest.raises(CgroupBusy) as info:
        cgroups.remove_group(CONTAINER)  # has a process
    assert info.value.errno == errno.EBUSY
    writes = cgroups.remove_group("/nri-qos.slice", recursive=True)
    assert [w.action for w in writes] == [WriteAction.RMDIR] * 3
    assert [w.path.name for w in writes] == ["b", "a", "nri-qos.slice"]
    assert not cg("nri-qos.slice").exists()
    with pytest.raises(CgroupNotFound):
        cgroups.remove_group("/nri-qos.slice")


def test_dry_run_writes_nothing_and_plans_what_the_real_run_does(host: Host) -> None:
    def operations(cgroups: CgroupFs) -> list[CgroupWrite]:
        group = PurePosixPath("/nri-qos.slice/shared-pool")
        writes = cgroups.create_group(group)
        writes += cgroups.set_cpuset_cpus(group, {4, 5, 6})
        writes += cgroups.set_cpu_shares(group, 2048)
        writes += cgroups.set_cpu_quota(group, CpuQuota(300_000))
        writes += cgroups.set_memory_limit(group, 256 * MIB)
        writes += cgroups.set_cpuset_cpus(CONTAINER, {1})
        return writes

    before = _tree()
    dry = CgroupFs(dry_run=True)
    planned = operations(dry)
    assert _tree() == before
    assert dry.planned == planned
    assert [str(w) for w in planned[:2]] == [
        f"mkdir {ROOT_TEXT}/nri-qos.slice",
        f"write '+cpuset +cpu +memory' > {ROOT_TEXT}/nri-qos.slice/cgroup.subtree_control",
    ]

    real = CgroupFs()
    assert operations(real) == planned
    assert real.planned == []
    assert _file(PurePosixPath("/nri-qos.slice/shared-pool"), "cpu.weight") == "174\n"
