"""A host root on the real filesystem (not pyfakefs), for faults only a real file can give.

A FIFO blocks open(2) for writing until a reader comes, the way a hung cgroupfs or procfs
file blocks a write in the kernel; ``/dev/full`` fails every write with ENOSPC. Both need
real files, so this tree lives in a temporary directory, laid out as the kernel lays out
the files `isolation` reads (everything under one root, as `[host] root` configures):

* ``proc/self/mountinfo`` with one cgroup2 mount at ``<root>/sys/fs/cgroup`` (a unified
  host: the production default);
* ``sys/fs/cgroup/<group>/cgroup.procs``: one pid per line;
* ``proc/<pid>/cgroup``: ``0::<group>`` (cgroup v2's one line) and
  ``proc/<pid>/oom_score_adj``: the value and a newline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from isolation.host import LinuxHost

MOUNTINFO = (
    "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "25 22 0:23 / {cgroup} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
)


@dataclass
class HostRoot:
    root: Path

    def __post_init__(self) -> None:
        (self.root / "proc/self").mkdir(parents=True)
        cgroup = self.root / "sys/fs/cgroup"
        cgroup.mkdir(parents=True)
        (self.root / "proc/self/mountinfo").write_text(MOUNTINFO.format(cgroup=cgroup))
        (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        # the host's own processes, in the root group: nothing may ever touch them
        self.add_group(PurePosixPath("/"), [1, 2, 3])

    def host(self) -> LinuxHost:
        return LinuxHost.at(self.root)

    def add_group(self, group: PurePosixPath, pids: list[int]) -> None:
        directory = self.root / "sys/fs/cgroup" / str(group).lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
        for pid in pids:
            proc = self.root / "proc" / str(pid)
            proc.mkdir(parents=True, exist_ok=True)
            (proc / "cgroup").write_text(f"0::{group}\n")
            (proc / "oom_score_adj").write_text("0\n")

    def add_container(self, container_id: str, pids: list[int], pod: str = "pod-a") -> str:
        """A container of the cgroupfs driver; returns its cgroups_path."""
        group = PurePosixPath(f"/kubepods/{pod}/{container_id}")
        self.add_group(group, pids)
        return str(group)

    def oom(self, pid: int) -> int | None:
        """The value, or None while a failed write left the plain file empty (O_TRUNC on a
        regular file empties it; procfs would keep the old value)."""
        text = (self.root / "proc" / str(pid) / "oom_score_adj").read_text()
        return int(text) if text.strip() else None

    def oom_file(self, pid: int) -> Path:
        return self.root / "proc" / str(pid) / "oom_score_adj"

    def block(self, pid: int) -> Path:
        """Make writing the pid's oom_score_adj hang: a FIFO nobody reads."""
        path = self.oom_file(pid)
        path.unlink()
        os.mkfifo(path)
        return path

    def unblock(self, pid: int) -> str:
        """Let the blocked writer finish (returns what it wrote), then make the file a
        plain one again."""
        path = self.oom_file(pid)
        with path.open("rb") as fifo:  # the writer's open returns; read until it closes
            written = fifo.read().decode()
        path.unlink()
        path.write_text("0\n")
        return written

    def release_all(self) -> None:
        """At the end of a test: let every writer still blocked on a FIFO go (without
        waiting for writers that never came) and remove the FIFOs."""
        for path in (self.root / "proc").glob("*/oom_score_adj"):
            if path.is_fifo():
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                path.unlink()
                os.close(fd)

    def fill(self, pid: int) -> None:
        """Make writing the pid's oom_score_adj fail with ENOSPC (the kernel's /dev/full)."""
        path = self.oom_file(pid)
        path.unlink()
        path.symlink_to("/dev/full")

    def heal(self, pid: int) -> None:
        path = self.oom_file(pid)
        path.unlink()
        path.write_text("0\n")
