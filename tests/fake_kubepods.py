"""A node's kubepods tree on the real filesystem, in the kernel's formats, for the drift
reconciliation tests and bench/reconcile_cost.py.

Laid out under one host root, as `[host] root` configures:

* ``proc/self/mountinfo``: cgroup v1 (cpuset, cpu,cpuacct, memory, blkio hierarchies,
  the cgroupfs layout of a legacy host) or one cgroup2 mount (a unified host);
* per container, its group in every hierarchy: ``cpuset.cpus`` / ``cpuset.mems`` in the
  kernel's list format ("0-3,8" and a newline), ``cgroup.procs`` (one pid per line), its
  I/O weight: v2 ``io.weight`` ("default N" and a newline, then "MAJ:MIN N" overrides:
  Documentation/admin-guide/cgroup-v2.rst) or v1 ``blkio.bfq.weight`` (a bare number);
* per process, ``proc/<pid>/cgroup`` (``N:cpuset:/path`` lines on v1, ``0::/path`` on
  v2) and ``proc/<pid>/oom_score_adj``;
* with ``resctrl=True``, ``sys/fs/resctrl``: the root's ``tasks`` and one directory per
  control group (``nri-qos-<class>``) with its ``tasks`` (one task id per line, as
  Documentation/arch/x86/resctrl.rst shows it), a task in exactly one group: `rdt_move`
  takes it out of the others, as the kernel's write to ``tasks`` does. Only the files the
  drift loop reads; the full resctrl semantics are tests/isolation/fake_resctrl.py's.

`host(cap_sys_resource=False)` gives an adapter whose oom_score_adj writes the kernel
would refuse without CAP_SYS_RESOURCE (a value below the process's floor, 0 unless a
privileged writer lowered it) fail with EACCES on write(2), as proc(5) says.

`TreeBackend` is an embedded-runtime backend that keeps this tree the way runc does:
a container's group is made at create with the resources the plugins adjusted (the
``unified`` io.weight, the LinuxRdt clos_id), an update rewrites its cpuset, removal
takes the group away.
"""

from __future__ import annotations

import errno
import itertools
import shutil
from pathlib import Path, PurePosixPath

from isolation.cgroups import resolve_cgroups_path
from isolation.host import LinuxHost
from isolation.oom import OomAdjResult, ProcessControls
from qos_model.containers import Container

V1 = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "30 22 0:26 / {cg}/cpuset rw,nosuid,nodev,noexec,relatime shared:7 - cgroup cgroup rw,cpuset\n"
    "31 22 0:27 / {cg}/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup "
    "rw,cpu,cpuacct\n"
    "32 22 0:28 / {cg}/memory rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup "
    "rw,memory\n"
    "33 22 0:29 / {cg}/blkio rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup "
    "rw,blkio\n"
)
V2 = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "25 22 0:23 / {cg} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
)
V1_DIRS = ("cpuset", "cpu,cpuacct", "memory", "blkio")
RESCTRL_GROUP_PREFIX = "nri-qos-"  # the rdt controller's names (isolation.rdt.Resctrl.PREFIX)


class NoCapSysResource(ProcessControls):
    """procfs as the kernel answers a writer without CAP_SYS_RESOURCE: lowering
    oom_score_adj below the process's floor (0 here: nobody privileged lowered it) is
    EACCES on write(2) (fs/proc/base.c __set_oom_adj); everything else as usual."""

    def set_oom_score_adj(
        self, pid: int, value: int, group: PurePosixPath | None = None
    ) -> OomAdjResult:
        if value < 0 and not self.dry_run:
            path = self._path(pid, "oom_score_adj")
            denied = PermissionError(errno.EACCES, "Permission denied", str(path))
            return self._refused(pid, value, path, denied, opened=True)
        return super().set_oom_score_adj(pid, value, group)


class KubepodsTree:
    def __init__(self, root: Path, *, v2: bool = False, resctrl: bool = False) -> None:
        self.root = root
        self.v2 = v2
        self.cg = root / "sys/fs/cgroup"
        self.resctrl = root / "sys/fs/resctrl" if resctrl else None
        if self.resctrl is not None:
            self.resctrl.mkdir(parents=True, exist_ok=True)
            (self.resctrl / "tasks").write_text("")
        (root / "proc/self").mkdir(parents=True, exist_ok=True)
        self.cg.mkdir(parents=True, exist_ok=True)
        (root / "proc/self/mountinfo").write_text((V2 if v2 else V1).format(cg=self.cg))
        if v2:
            (self.cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        else:
            for d in V1_DIRS:
                (self.cg / d).mkdir(exist_ok=True)
        self._pids = itertools.count(10_000)
        self.pids: dict[str, int] = {}  # container id -> its process

    def host(self, *, cap_sys_resource: bool = True) -> LinuxHost:
        host = LinuxHost.at(self.root)
        if not cap_sys_resource:
            host.procs = NoCapSysResource(self.root / "proc")
        return host

    def dirs(self, group: PurePosixPath) -> list[Path]:
        rel = str(group).lstrip("/")
        if self.v2:
            return [self.cg / rel]
        return [self.cg / d / rel for d in V1_DIRS]

    def cpuset_dir(self, group: PurePosixPath) -> Path:
        return self.dirs(group)[0]

    def add(
        self,
        cgroups_path: str,
        cpus: str,
        mems: str = "0",
        oom: int = 0,
        key: str = "",
        io_weight: int = 100,
        rdt_group: str = "",
    ) -> int:
        """A container group with one process (in resctrl group `rdt_group`, "" for the
        root group); returns the pid. I/O weight 100 is the kernel's default."""
        group = resolve_cgroups_path(cgroups_path)
        pid = next(self._pids)
        for d in self.dirs(group):
            d.mkdir(parents=True, exist_ok=True)
            (d / "cgroup.procs").write_text(f"{pid}\n")
        cs = self.cpuset_dir(group)
        (cs / "cpuset.cpus").write_text(f"{cpus}\n")
        (cs / "cpuset.mems").write_text(f"{mems}\n")
        if self.v2:
            (cs / "cpuset.cpus.effective").write_text(f"{cpus}\n")
            (cs / "cpuset.mems.effective").write_text(f"{mems}\n")
        self.set_io_weight(cgroups_path, io_weight)
        if self.resctrl is not None:
            self.rdt_move(pid, rdt_group)
        proc = self.root / "proc" / str(pid)
        proc.mkdir(parents=True, exist_ok=True)
        lines = (
            f"0::{group}\n"
            if self.v2
            else "".join(f"{i}:{d}:{group}\n" for i, d in enumerate(V1_DIRS, 1))
        )
        (proc / "cgroup").write_text(lines)
        (proc / "oom_score_adj").write_text(f"{oom}\n")
        self.pids[key or group.name] = pid
        return pid

    def remove(self, cgroups_path: str) -> None:
        group = resolve_cgroups_path(cgroups_path)
        for d in self.dirs(group):
            shutil.rmtree(d, ignore_errors=True)

    def set_cpus(self, cgroups_path: str, cpus: str) -> None:
        (self.cpuset_dir(resolve_cgroups_path(cgroups_path)) / "cpuset.cpus").write_text(
            f"{cpus}\n"
        )

    def cpus(self, cgroups_path: str) -> str:
        path = self.cpuset_dir(resolve_cgroups_path(cgroups_path)) / "cpuset.cpus"
        return path.read_text().strip()

    def io_weight_file(self, cgroups_path: str) -> Path:
        group = resolve_cgroups_path(cgroups_path)
        if self.v2:
            return self.dirs(group)[0] / "io.weight"
        return self.dirs(group)[V1_DIRS.index("blkio")] / "blkio.bfq.weight"

    def set_io_weight(self, cgroups_path: str, weight: int) -> None:
        """As the kernel shows it: v2 "default N" (no device overrides), v1 "N"."""
        text = f"default {weight}\n" if self.v2 else f"{weight}\n"
        self.io_weight_file(cgroups_path).write_text(text)

    def io_weight(self, cgroups_path: str) -> int | None:
        text = self.io_weight_file(cgroups_path).read_text().split()
        return int(text[-1]) if text else None  # None while a write is half-way

    def rdt_group(self, group: str) -> Path:
        """A control group's directory ("" for the root), made on first use."""
        assert self.resctrl is not None, "KubepodsTree(resctrl=True)"
        path = self.resctrl / group if group else self.resctrl
        if not (path / "tasks").exists():
            path.mkdir(exist_ok=True)
            (path / "tasks").write_text("")
        return path

    def rdt_move(self, pid: int, group: str) -> None:
        """Writing `pid` to a group's tasks: it leaves the group it was in."""
        assert self.resctrl is not None, "KubepodsTree(resctrl=True)"
        target = self.rdt_group(group)
        for tasks in [self.resctrl / "tasks", *self.resctrl.glob("*/tasks")]:
            pids = [int(p) for p in tasks.read_text().split() if int(p) != pid]
            if tasks.parent == target:
                pids.append(pid)
            tasks.write_text("".join(f"{p}\n" for p in sorted(pids)))

    def rdt_group_of(self, pid: int) -> str | None:
        """The control group holding `pid` ("" for the root), None when in none."""
        assert self.resctrl is not None, "KubepodsTree(resctrl=True)"
        for tasks in [self.resctrl / "tasks", *self.resctrl.glob("*/tasks")]:
            if str(pid) in tasks.read_text().split():
                return "" if tasks.parent == self.resctrl else tasks.parent.name
        return None

    def set_oom(self, pid: int, value: int) -> None:
        (self.root / "proc" / str(pid) / "oom_score_adj").write_text(f"{value}\n")

    def oom(self, pid: int) -> int | None:
        """The value; None while a write is half-way (a plain file is truncated first,
        where procfs would keep the old value)."""
        text = (self.root / "proc" / str(pid) / "oom_score_adj").read_text()
        return int(text) if text.strip() else None


class TreeBackend:
    """An embedded-runtime backend writing what runc would into a `KubepodsTree`."""

    def __init__(self, tree: KubepodsTree) -> None:
        self.tree = tree

    async def create(self, container: Container) -> int | None:
        res = container.resources
        cpu = res.cpu if res else None
        weight = res.unified.get("io.weight", "") if res is not None else ""
        rdt = res.rdt_class if res is not None else None  # the merged clos_id, as runc gets it
        return self.tree.add(
            container.cgroups_path,
            cpu.cpus if cpu is not None and cpu.cpus else "0-7",
            cpu.mems if cpu is not None and cpu.mems else "0",
            container.oom_score_adj or 0,
            key=container.id,
            io_weight=int(weight.split()[-1]) if weight and self.tree.v2 else 100,
            rdt_group=(rdt or "") if self.tree.resctrl is not None else "",
        )

    async def start(self, container: Container) -> int | None:
        return self.tree.pids.get(container.id)

    async def update(self, container: Container) -> None:
        cpu = container.resources.cpu if container.resources else None
        if cpu is not None and cpu.cpus:
            self.tree.set_cpus(container.cgroups_path, cpu.cpus)

    async def stop(self, container: Container) -> int:
        return 0

    async def remove(self, container: Container) -> None:
        self.tree.remove(container.cgroups_path)
