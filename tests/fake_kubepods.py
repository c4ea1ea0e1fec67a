"""A node's kubepods tree on the real filesystem, in the kernel's formats, for the drift
reconciliation tests and bench/reconcile_cost.py.

Laid out under one host root, as `[host] root` configures:

* ``proc/self/mountinfo``: cgroup v1 (cpuset, cpu,cpuacct, memory hierarchies, the
  cgroupfs layout of a legacy host) or one cgroup2 mount (a unified host);
* per container, its group in every hierarchy: ``cpuset.cpus`` / ``cpuset.mems`` in the
  kernel's list format ("0-3,8" and a newline), ``cgroup.procs`` (one pid per line);
* per process, ``proc/<pid>/cgroup`` (``N:cpuset:/path`` lines on v1, ``0::/path`` on
  v2) and ``proc/<pid>/oom_score_adj``.

`TreeBackend` is an embedded-runtime backend that keeps this tree the way runc does:
a container's group is made at create with the resources the plugins adjusted, an
update rewrites its cpuset, removal takes the group away.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path, PurePosixPath

from isolation.cgroups import resolve_cgroups_path
from isolation.host import LinuxHost
from qos_model.containers import Container

V1 = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "30 22 0:26 / {cg}/cpuset rw,nosuid,nodev,noexec,relatime shared:7 - cgroup cgroup rw,cpuset\n"
    "31 22 0:27 / {cg}/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup "
    "rw,cpu,cpuacct\n"
    "32 22 0:28 / {cg}/memory rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup "
    "rw,memory\n"
)
V2 = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "25 22 0:23 / {cg} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
)
V1_DIRS = ("cpuset", "cpu,cpuacct", "memory")


class KubepodsTree:
    def __init__(self, root: Path, *, v2: bool = False) -> None:
        self.root = root
        self.v2 = v2
        self.cg = root / "sys/fs/cgroup"
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

    def host(self) -> LinuxHost:
        return LinuxHost.at(self.root)

    def dirs(self, group: PurePosixPath) -> list[Path]:
        rel = str(group).lstrip("/")
        if self.v2:
            return [self.cg / rel]
        return [self.cg / d / rel for d in V1_DIRS]

    def cpuset_dir(self, group: PurePosixPath) -> Path:
        return self.dirs(group)[0]

    def add(
        self, cgroups_path: str, cpus: str, mems: str = "0", oom: int = 0, key: str = ""
    ) -> int:
        """A container group with one process; returns the pid."""
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
        cpu = container.resources.cpu if container.resources else None
        return self.tree.add(
            container.cgroups_path,
            cpu.cpus if cpu is not None and cpu.cpus else "0-7",
            cpu.mems if cpu is not None and cpu.mems else "0",
            container.oom_score_adj or 0,
            key=container.id,
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
