"""CgroupKiller against real cgroups: a container-like group whose process keeps forking.

The group is ``/nriqos-test-<random>/pod<uuid>/<64-hex container id>``, the shape
`own_group` accepts, made in every v1 resource hierarchy and (on this hybrid host) the
cgroup2 tree, so both ways of killing are exercised: ``cgroup.kill`` in the cgroup2
directory, and SIGKILL per member pid when the group has no cgroup2 directory.

The workload runs under a small reaper outside the group (a child subreaper): the
forked children it orphans are reaped there, not left as zombies under this sandbox's
pid 1, which does not reap. Everything is killed and removed at teardown, even when a
test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from isolation.cgroups import CgroupFs
from isolation.evict import CgroupKiller, EvictOutcome
from isolation.host import LinuxHost
from isolation.ownership import ForeignCgroup
from isolation.writes import HostWriter
from tests.processes import start_process, stop

CGROUP_ROOT = Path("/sys/fs/cgroup")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups and kill"),
    pytest.mark.skipif(
        not (CGROUP_ROOT / "cpu" / "cgroup.procs").exists(),
        reason="no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu (not a v1/hybrid host)",
    ),
]

# Forks a child every 20 ms (each child forks one grandchild), up to 60: a container
# that keeps creating processes while it is being killed.
FORKER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
for _ in range(60):
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
        time.sleep(300)
        os._exit(0)
    time.sleep(0.02)
time.sleep(300)
"""

# Outside the group: becomes a child subreaper, starts the forker, prints its pid, and
# reaps every process of the tree until none is left.
REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@dataclass
class Container:
    """A container-like cgroup and the processes the test started."""

    cgroups: CgroupFs
    group: PurePosixPath
    go: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.group.name

    @property
    def cgroups_path(self) -> str:
        return str(self.group)

    def start_forker(self, *, unified: bool = True) -> int:
        """Start the forking workload, put it in the group, let it fork; its pid."""
        reaper = subprocess.Popen(
            [sys.executable, "-c", REAPER, FORKER, str(self.go)], stdout=subprocess.PIPE
        )
        self.processes.append(reaper)
        assert reaper.stdout is not None
        pid = int(reaper.stdout.readline())
        if unified:
            self.cgroups.move_pid(self.group, pid)
        else:
            for directory in self.v1_dirs():
                (directory / "cgroup.procs").write_text(str(pid))
        self.go.touch()
        return pid

    def v1_dirs(self) -> list[Path]:
        dirs = {m / self.group.relative_to("/") for m in self.cgroups.mounts.v1.values()}
        # cpuset first: a process must be allowed its CPUs before the others matter
        return sorted((d for d in dirs if d.is_dir()), key=lambda d: "cpuset" not in str(d))

    def unified_dir(self) -> Path | None:
        return self.cgroups.unified_dir(self.group)

    def members(self) -> list[int]:
        return self.cgroups.list_pids(self.group)

    def wait_for_members(self, at_least: int, timeout_s: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            members = self.members()
            if len(members) >= at_least:
                return members
            time.sleep(0.02)
        raise AssertionError(f"the group never had {at_least} processes: {self.members()}")


def _kill_everything(container: Container) -> None:
    """Teardown: whatever is left in the group, then the reapers; then the directories."""
    for _ in range(20):
        pids: set[int] = set()
        for directory in [*container.v1_dirs(), container.unified_dir()]:
            if directory is not None and (directory / "cgroup.procs").exists():
                pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for process in container.processes:
        stop(process)


def _remove(cgroups: CgroupFs, top: PurePosixPath) -> None:
    roots = {*cgroups.mounts.v1.values()}
    if cgroups.mounts.unified is not None:
        roots.add(cgroups.mounts.unified)
    for root in roots:
        base = root / top.relative_to("/")
        if not base.is_dir():
            continue
        for dirpath, _, _ in os.walk(base, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError as exc:  # pragma: no cover - only on a broken teardown
                print(f"could not remove {dirpath}: {exc}", file=sys.stderr)


@contextmanager
def container_group(tmp_path: Path) -> Iterator[Container]:
    """A fresh container-like group for the block; killed and removed after it."""
    cgroups = CgroupFs()
    top = PurePosixPath(f"/nriqos-test-{secrets.token_hex(4)}")
    group = top / f"pod{uuid.uuid4()}" / secrets.token_hex(32)
    state = Container(cgroups, group, tmp_path / "go")
    try:
        cgroups.create_group(group)
        yield state
    finally:
        try:
            _kill_everything(state)
        finally:
            _remove(cgroups, top)


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    with container_group(tmp_path) as state:
        yield state


def killer(*, dry_run: bool = False) -> tuple[CgroupKiller, HostWriter]:
    writer = HostWriter(dry_run=dry_run)
    return CgroupKiller(LinuxHost(), writer), writer


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_cgroup_kill_empties_a_forking_group_and_spares_the_rest(container: Container) -> None:
    unified = container.unified_dir()
    if unified is None or not (unified / "cgroup.kill").exists():
        pytest.skip("no cgroup.kill here (needs a cgroup2 tree and Linux >= 5.14)")
    bystander = start_process()
    container.processes.append(bystander)
    container.start_forker()
    container.wait_for_members(5)  # still forking while it is killed

    kill, writer = killer()
    result = kill.kill(container.cgroups_path, container.id, "memory pressure")

    assert result.outcome is EvictOutcome.KILLED, result
    assert "(cgroup.kill)" in result.message
    assert container.members() == []
    assert _alive(bystander.pid)
    assert any(c.target.endswith("cgroup.kill") and c.value == "1" for c in writer.recent)
    reaper = container.processes[-1]
    assert reaper.wait(timeout=10) == 0  # every process of the tree is gone and reaped


def test_without_a_cgroup2_directory_each_member_gets_sigkill_until_none_is_left(
    container: Container,
) -> None:
    unified = container.unified_dir()
    if unified is not None and unified.is_dir():
        unified.rmdir()  # the group now lives in the v1 hierarchies only
    bystander = start_process()
    container.processes.append(bystander)
    container.start_forker(unified=False)
    container.wait_for_members(5)

    kill, writer = killer()
    result = kill.kill(container.cgroups_path, container.id, "memory pressure")

    assert result.outcome is EvictOutcome.KILLED, result
    assert "(SIGKILL)" in result.message
    killed = int(result.message.split("killed ")[1].split()[0])
    assert killed >= 5
    assert container.members() == []
    assert _alive(bystander.pid)
    signalled = [c for c in writer.recent if c.action == "kill"]
    assert len(signalled) == killed
    assert all(c.value == "SIGKILL" and c.reason == "memory pressure" for c in signalled)


def test_a_foreign_path_is_refused_and_nothing_is_killed(container: Container) -> None:
    container.start_forker()
    before = container.wait_for_members(3)
    kill, writer = killer()

    # The pod's level, and the right group named with another container's id.
    with pytest.raises(ForeignCgroup, match="kubelet owns"):
        kill.kill(str(container.group.parent), container.id, "memory pressure")
    with pytest.raises(ForeignCgroup, match="does not name container"):
        kill.kill(container.cgroups_path, "0" * 64, "memory pressure")

    assert not writer.recent  # nothing was even attempted
    assert all(_alive(pid) for pid in before)


def test_dry_run_plans_the_kill_and_kills_nothing(container: Container) -> None:
    container.start_forker()
    before = container.wait_for_members(3)
    kill, writer = killer(dry_run=True)

    result = kill.kill(container.cgroups_path, container.id, "memory pressure")

    assert result.outcome is EvictOutcome.DRY_RUN
    assert "would kill" in result.message
    assert writer.planned
    assert all(_alive(pid) for pid in before)


def test_a_group_without_processes_is_gone(container: Container) -> None:
    kill, writer = killer()

    result = kill.kill(container.cgroups_path, container.id, "test")

    assert result.outcome is EvictOutcome.GONE
    assert not writer.recent
