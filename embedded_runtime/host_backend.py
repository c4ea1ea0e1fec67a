"""Containers as real cgroups and real processes: the embedded runtime's host backend.

`InMemoryBackend` proves the NRI side; this backend proves the host side. It does for
nri-qos what containerd + runc do: each container gets its cgroup (``cgroups_path``,
cgroupfs or systemd form) in every controller that matters, the resources the plugins
adjusted are written the way runc writes them, and the container's command runs *inside*
that cgroup from its first instruction, with the requested ``oom_score_adj``. So the lab
and the root tests can read from the kernel what a plugin decision really did.

Choices, each made so the lab behaves like a node while staying safe to run anywhere:

* **The process starts at create** (CRI-O's ``runc create`` moment). containerd creates
  the task only in StartContainer; the runtime models that by reporting the pid from
  start on (`RuntimeFlavor.pid_from_create`), so plugins see the same states either way.
  Holding the process until start would need a shim between fork and exec, and nothing
  nri-qos checks depends on the command not having run yet.
* **Joining the cgroups happens between fork and exec**: the child writes ``0`` (itself)
  into every ``cgroup.procs`` and then sets its own ``oom_score_adj``, like runc's init.
  A failed join fails the container (runc would too).
* **A refused oom_score_adj does not fail the container.** runc fails the create when the
  write is refused; we record the outcome (`HostContainer.oom`) and carry on, because the
  lab must also run on hosts without CAP_SYS_RESOURCE, where any negative value is
  refused with EACCES. The outcome is what the lab reports instead.
* **RDT like runc's intelRdt**: with a resctrl mount (`resctrl`), a container whose
  adjustment named a clos_id gets its process written into that group's ``tasks`` after
  it starts; the group must exist, as runc requires when only the clos_id is given. On a
  host without resctrl the lab points this at a tree laid out like one (runc's
  per-container monitoring group is not simulated: a plain tree cannot remove it).
* **No args means** ``sleep infinity``: a pause-like process that holds the cgroup.
* **Stop** is SIGTERM, a grace period, SIGKILL; the exit code is reported the way
  containerd does (128 + signal for a killed process). What the main process left behind
  in the cgroup is SIGKILLed too, as the kernel does to a pid namespace whose init exits.
* **Cleanup** (`HostBackend.cleanup`, or `close` from a signal handler) kills every
  process it started and removes every cgroup directory it made, ancestors included;
  calling it twice is harmless. `sweep_stale_groups` removes leftovers of a crashed run:
  top-level groups with a known prefix whose whole subtree holds no process.

Everything goes through `isolation.cgroups.CgroupFs` (its cgroupfs and procfs roots), and
the process start is the injectable `Spawner`, so the cgroup v2 layout runs through the
same code against a fake tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_codes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from embedded_runtime.errors import BackendError
from isolation.cgroups import (
    CgroupBusy,
    CgroupError,
    CgroupFs,
    CgroupNotFound,
    CgroupUnsupported,
    CpuQuota,
    HostLayout,
    resolve_cgroups_path,
)
from isolation.errors import HostError
from isolation.oom import (
    OOM_SCORE_ADJ_MAX,
    OOM_SCORE_ADJ_MIN,
    OomAdjOutcome,
    OomAdjResult,
    ProcessControls,
)
from nri_plugin.readback import read_back
from qos_model.containers import Container, Resources
from qos_model.cpulist import parse_cpu_list

log = logging.getLogger("nri_qos.host_backend")

# Where a container's processes are accounted and limited. v1 gets a directory in each
# hierarchy (cpuset first, so a task is never limited by cpu/memory while its cpuset
# move is pending); on v2, CgroupFs enables +cpuset +cpu +memory on the parents.
CONTAINER_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "cpuacct", "memory", "pids")

DEFAULT_COMMAND: tuple[str, ...] = ("sleep", "infinity")
# containerd's default PATH for images that set none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LAB_GROUP_PREFIX = "nri-qos-lab-"  # top-level groups of `nri-qos lab` runs

DEFAULT_STOP_TIMEOUT = 10.0  # SIGTERM grace period, seconds (kubelet's default is 30)
KILL_TIMEOUT = 5.0  # how long a SIGKILLed process may take to disappear
_POLL_INTERVAL = 0.01


class HostBackendError(BackendError, HostError):
    """A host operation for a container failed. ``errno`` says why, ``path`` where.

    A `BackendError` so the runtime passes it through, and a `HostError` so it reads and
    branches like every other host error."""

    def __init__(self, errno: int, message: str, path: str | os.PathLike[str] = "") -> None:
        HostError.__init__(self, path, errno, message)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """Everything needed to start a container's main process inside its cgroup."""

    container_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cgroup_procs: tuple[Path, ...]  # files the child writes "0" to, in order, before exec
    oom_score_adj: int | None
    oom_score_adj_file: Path  # the child's own (<procfs>/self/oom_score_adj)


class ContainerProcess(Protocol):
    """The started process as the backend needs it (`subprocess.Popen` fits)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""

    def send_signal(self, sig: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Spawned:
    process: ContainerProcess
    oom: OomAdjResult | None  # None when the container asked for no oom_score_adj


class Spawner(Protocol):
    """Starts processes into cgroups and signals their leftovers.

    The real one forks; a test for the cgroup v2 layout, whose tree is fake, gives one
    that only writes a fake pid where the child would have written itself.
    """

    def spawn(self, request: SpawnRequest) -> Spawned:
        """Start the process; raise `HostBackendError` when it cannot be started."""

    def kill(self, pid: int, signum: int) -> None:
        """Signal a process found in a container's cgroup (not one we forked)."""


class HostSpawner:
    """fork, join the cgroups and set oom_score_adj in the child, then exec.

    The child reports what went wrong (if anything) on a pipe before exec, because
    subprocess turns any exception in ``preexec_fn`` into a bare SubprocessError and the
    errno would be lost. The child-side code only does os.open/os.write/os.close, so the
    usual ``preexec_fn`` hazard (a lock held by another thread at fork) does not bite; the
    embedded runtime is single-threaded anyway.
    """

    def spawn(self, request: SpawnRequest) -> Spawned:
        read_fd, write_fd = os.pipe()  # both close-on-exec: the child's copy dies at exec
        try:
            setup = _child_setup(request, write_fd)
            try:
                process = subprocess.Popen(
                    list(request.argv),
                    env=dict(request.env),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=setup,  # runs only os.open/write/close (see _child_setup)
                    start_new_session=True,  # the lab's Ctrl-C is not the container's
                )
            except subprocess.SubprocessError as exc:
                os.close(write_fd)
                write_fd = -1
                raise _setup_failure(request, _read_report(read_fd)) from exc
            except OSError as exc:  # exec failed: the child is gone, errno is real
                code = exc.errno or errno_codes.EIO
                raise HostBackendError(
                    code,
                    f"cannot start container {request.container_id}: {request.argv[0]!r}: "
                    f"{os.strerror(code)}",
                    request.argv[0],
                ) from exc
            os.close(write_fd)
            write_fd = -1
            report = _read_report(read_fd)
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(read_fd)
        return Spawned(process, _oom_outcome(request, process.pid, report))

    def kill(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _child_setup(request: SpawnRequest, report_fd: int) -> Callable[[], None]:
    """The function run in the child between fork and exec."""
    procs = [os.fsencode(p) for p in request.cgroup_procs]
    oom_file = os.fsencode(request.oom_score_adj_file)
    oom_value = None if request.oom_score_adj is None else str(request.oom_score_adj).encode()

    def write(path: bytes, value: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)

    def setup() -> None:
        for path in procs:
            try:
                write(path, b"0")
            except OSError as exc:
                os.write(report_fd, b"fail %d %s\n" % (exc.errno or 0, path))
                raise
        if oom_value is None:
            return
        try:
            write(oom_file, oom_value)
        except OSError as exc:
            if exc.errno not in (errno_codes.EACCES, errno_codes.EPERM):
                os.write(report_fd, b"fail %d %s\n" % (exc.errno or 0, oom_file))
                raise
            os.write(report_fd, b"oom-refused %d\n" % exc.errno)

    return setup


def _read_report(fd: int) -> list[tuple[str, int, str]]:
    """(kind, errno, path) lines the child wrote; the pipe is complete once exec ran."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    lines: list[tuple[str, int, str]] = []
    for line in data.splitlines():
        kind, _, rest = line.partition(b" ")
        code, _, path = rest.partition(b" ")
        lines.append((kind.decode(), int(code or b"0"), os.fsdecode(path)))
    return lines


def _setup_failure(request: SpawnRequest, report: list[tuple[str, int, str]]) -> HostBackendError:
    for kind, code, path in report:
        if kind == "fail":
            return HostBackendError(
                code,
                f"cannot start container {request.container_id}: writing to {path} in the "
                f"child failed: {os.strerror(code)}",
                path,
            )
    return HostBackendError(
        errno_codes.EIO, f"cannot start container {request.container_id}: child setup failed"
    )


def _oom_outcome(
    request: SpawnRequest, pid: int, report: list[tuple[str, int, str]]
) -> OomAdjResult | None:
    value = request.oom_score_adj
    if value is None:
        return None
    for kind, code, _ in report:
        if kind == "oom-refused":
            return OomAdjResult(
                pid,
                value,
                OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE,
                code,
                f"oom_score_adj {value} refused for container {request.container_id} "
                f"(pid {pid}): lowering it needs CAP_SYS_RESOURCE; the container runs with "
                "the value it inherited (runc would fail the container instead)",
            )
    return OomAdjResult(pid, value, OomAdjOutcome.APPLIED)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class HostContainer:
    """What the backend did for one container."""

    id: str
    group: PurePosixPath
    pid: int
    oom: OomAdjResult | None
    exit_code: int | None  # None while running (or not stopped through the backend)


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What `sweep_stale_groups` found: removed groups, and groups left because busy."""

    removed: tuple[PurePosixPath, ...] = ()
    busy: tuple[PurePosixPath, ...] = ()
    failed: tuple[str, ...] = ()


@dataclass(slots=True)
class _Running:
    info: HostContainer
    process: ContainerProcess


# --------------------------------------------------------------------------- pure helpers


def exit_code_of(status: int) -> int:
    """A subprocess returncode as a runtime reports it: 128 + N when killed by signal N."""
    return 128 - status if status < 0 else status


def merge_quota(current: CpuQuota, quota: int | None, period: int | None) -> CpuQuota | None:
    """The CFS bandwidth after a request, or None when it asks for no change.

    runc's rules: 0 (or unset) leaves a value alone, a negative quota removes the limit.
    """
    if not quota and not period:
        return None
    if not quota:
        new_quota = current.quota_us
    elif quota < 0:
        new_quota = None
    else:
        new_quota = quota
    return CpuQuota(new_quota, period or current.period_us)


def container_env(env: Iterable[str]) -> dict[str, str]:
    """NRI's "KEY=VALUE" list as exec's environment, with a PATH if it has none."""
    result: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key:
            result[key] = value
    result.setdefault("PATH", DEFAULT_PATH)
    return result


# --------------------------------------------------------------------------- the backend


class HostBackend:
    """A `ContainerBackend` that creates real cgroups and runs real processes in them.

    ``parent`` confines the backend: every container group must lie below it (EPERM
    otherwise), so a plugin or a typo can never make the lab create or remove groups of
    the host (kubepods, the sandbox's own groups).
    """

    def __init__(
        self,
        cgroupfs: CgroupFs,
        *,
        parent: str | PurePosixPath | None = None,
        spawner: Spawner | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        controllers: Sequence[str] = CONTAINER_CONTROLLERS,
        resctrl: Path | None = None,
    ) -> None:
        if cgroupfs.dry_run:
            raise ValueError("HostBackend needs a CgroupFs that writes (dry_run is set)")
        self.cgroupfs = cgroupfs
        self.parent = None if parent is None else PurePosixPath("/") / str(parent)
        self.spawner: Spawner = spawner if spawner is not None else HostSpawner()
        self.stop_timeout = stop_timeout
        self.controllers = tuple(controllers)
        self.resctrl = resctrl
        self._running: dict[str, _Running] = {}
        self._ancestor_dirs: list[Path] = []  # made as ancestors of containers, top-down

    # ----------------------------------------------------------------- state

    def get(self, container_id: str) -> HostContainer:
        try:
            return self._running[container_id].info
        except KeyError:
            raise HostBackendError(
                errno_codes.ENOENT, f"the host backend has no container {container_id!r}"
            ) from None

    @property
    def containers(self) -> dict[str, HostContainer]:
        return {cid: rec.info for cid, rec in self._running.items()}

    # ----------------------------------------------------------------- ContainerBackend

    async def create(self, container: Container) -> int:
        if container.id in self._running:
            raise HostBackendError(
                errno_codes.EEXIST, f"container {container.id} already exists on the host"
            )
        group = self._group_of(container)
        request = self._spawn_request(container, group)
        missing = self._missing_dirs(group)
        try:
            try:
                self.cgroupfs.create_group(group, self.controllers)
            except CgroupError as exc:
                raise _wrap(container.id, exc) from exc
            self._apply(container.id, group, container.resources)
            spawned = self.spawner.spawn(request)
        except BaseException:
            self._rmdirs([d for d in missing if d.is_dir()])
            raise
        own = set(request.cgroup_procs)
        self._ancestor_dirs += [d for d in missing if d / "cgroup.procs" not in own]
        self._join_rdt(container, spawned.process.pid)
        if spawned.oom is not None and not spawned.oom.ok:
            log.info("%s", spawned.oom.message)  # recorded in HostContainer.oom
        info = HostContainer(container.id, group, spawned.process.pid, spawned.oom, None)
        self._running[container.id] = _Running(info, spawned.process)
        return info.pid

    def _join_rdt(self, container: Container, pid: int) -> None:
        """What runc does with linux.intelRdt.closID: the task joins that group."""
        clos = container.resources.rdt_class if container.resources is not None else None
        if not clos or self.resctrl is None:
            return
        if "/" in clos or clos in (".", ".."):
            raise HostBackendError(errno_codes.EINVAL, f"invalid clos_id {clos!r}")
        group = self.resctrl / clos
        if not (group / "tasks").exists():
            raise HostBackendError(
                errno_codes.ENOENT, f"intelRdt closID {clos!r}: no such resctrl group", group
            )
        tasks = group / "tasks"
        before = tasks.read_text()
        sep = "\n" if before and not before.endswith("\n") else ""
        with tasks.open("a") as out:  # a plain tree: keep every pid, one per line
            out.write(f"{sep}{pid}\n")

    async def start(self, container: Container) -> int:
        # The process runs since create (see the module docstring); start only reports it.
        return self._record(container.id).info.pid

    async def update(self, container: Container) -> None:
        rec = self._record(container.id)
        self._apply(container.id, rec.info.group, container.resources)

    async def stop(self, container: Container) -> int:
        rec = self._record(container.id)
        if rec.info.exit_code is not None:
            return rec.info.exit_code
        status = rec.process.poll()
        if status is None:
            rec.process.send_signal(signal.SIGTERM)
            status = await _wait_async(rec.process, self.stop_timeout)
        if status is None:
            rec.process.send_signal(signal.SIGKILL)
            status = await _wait_async(rec.process, KILL_TIMEOUT)
        if status is None:
            raise HostBackendError(
                errno_codes.ETIMEDOUT,
                f"container {container.id} (pid {rec.info.pid}) survived SIGKILL for "
                f"{KILL_TIMEOUT}s",
            )
        deadline = time.monotonic() + KILL_TIMEOUT
        while self._kill_members(rec.info.group) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL)
        code = exit_code_of(status)
        rec.info = replace(rec.info, exit_code=code)
        return code

    async def remove(self, container: Container) -> None:
        rec = self._record(container.id)
        if rec.process.poll() is None:
            await self.stop(container)
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            try:
                self._remove_group(rec)
                break
            except CgroupBusy as exc:
                # a killed stray stays listed until its parent (not us) has reaped it
                if time.monotonic() >= deadline:
                    raise _wrap(container.id, exc) from exc
                self._kill_members(rec.info.group)
                await asyncio.sleep(_POLL_INTERVAL)
            except CgroupError as exc:
                raise _wrap(container.id, exc) from exc
        del self._running[container.id]

    # ----------------------------------------------------------------- cleanup

    async def cleanup(self) -> None:
        """Kill every process, remove every cgroup this backend made. Safe to repeat."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while self._kill_everything() and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL)
        self._remove_everything()

    def close(self) -> None:
        """`cleanup` without an event loop: for signal handlers, atexit and finalizers."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while self._kill_everything() and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL)
        self._remove_everything()

    async def __aenter__(self) -> HostBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()

    def _kill_everything(self) -> bool:
        """SIGKILL every process we know of; True while any is still there."""
        alive = False
        for rec in list(self._running.values()):
            if rec.process.poll() is None:
                rec.process.send_signal(signal.SIGKILL)
                alive = True
            if self._kill_members(rec.info.group):
                alive = True
        return alive

    def _remove_everything(self) -> None:
        for cid, rec in list(self._running.items()):
            try:
                self._remove_group(rec)
            except CgroupError as exc:  # kept, so that a second cleanup tries again
                log.warning("cleanup: cannot remove the cgroup of %s: %s", cid, exc)
            else:
                del self._running[cid]
        self._ancestor_dirs = self._rmdirs(self._ancestor_dirs)

    # ----------------------------------------------------------------- internals

    def _record(self, container_id: str) -> _Running:
        rec = self._running.get(container_id)
        if rec is None:
            raise HostBackendError(
                errno_codes.ENOENT,
                f"container {container_id} was not created through this host backend",
            )
        return rec

    def _group_of(self, container: Container) -> PurePosixPath:
        if not container.cgroups_path:
            raise HostBackendError(
                errno_codes.EINVAL,
                f"container {container.id} has no cgroups_path; set it the way containerd "
                "does (cgroups_path_for(pod.cgroup_parent, container.id))",
            )
        try:
            group = resolve_cgroups_path(container.cgroups_path)
        except CgroupError as exc:
            raise HostBackendError(exc.errno, str(exc), exc.path) from exc
        if self.parent is not None and self.parent not in group.parents:
            raise HostBackendError(
                errno_codes.EPERM,
                f"container {container.id}: cgroup {group} is outside this backend's parent "
                f"{self.parent}; refusing to touch groups it does not own",
            )
        return group

    def _apply(self, container_id: str, group: PurePosixPath, resources: Resources | None) -> None:
        """Write the resources the way runc does; None, "" and 0 leave a value alone."""
        if resources is None:
            return
        cgroupfs = self.cgroupfs
        try:
            cpu = resources.cpu
            if cpu is not None:
                if cpu.cpus:
                    cgroupfs.set_cpuset_cpus(group, parse_cpu_list(cpu.cpus))
                if cpu.mems:
                    cgroupfs.set_cpuset_mems(group, parse_cpu_list(cpu.mems))
                if cpu.shares:
                    cgroupfs.set_cpu_shares(group, cpu.shares)
                if cpu.quota or cpu.period:
                    quota = merge_quota(cgroupfs.get_cpu_quota(group), cpu.quota, cpu.period)
                    if quota is not None:
                        cgroupfs.set_cpu_quota(group, quota)
            memory = resources.memory
            if memory is not None and memory.limit:
                cgroupfs.set_memory_limit(group, None if memory.limit < 0 else memory.limit)
        except CgroupError as exc:
            raise _wrap(container_id, exc) from exc
        except ValueError as exc:  # a bad CPU list, CpuQuota's range checks
            raise HostBackendError(
                errno_codes.EINVAL, f"container {container_id}: {exc}", str(group)
            ) from exc

    def _spawn_request(self, container: Container, group: PurePosixPath) -> SpawnRequest:
        value = container.oom_score_adj
        if value is not None and not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
            raise HostBackendError(
                errno_codes.EINVAL,
                f"container {container.id}: oom_score_adj {value} is outside "
                f"{OOM_SCORE_ADJ_MIN}..{OOM_SCORE_ADJ_MAX}",
            )
        return SpawnRequest(
            container_id=container.id,
            argv=tuple(container.args) or DEFAULT_COMMAND,
            env=container_env(container.env),
            cgroup_procs=tuple(d / "cgroup.procs" for d in self._membership_dirs(group)),
            oom_score_adj=value,
            oom_score_adj_file=self.cgroupfs.procfs / "self" / "oom_score_adj",
        )

    def _membership_dirs(self, group: PurePosixPath) -> list[Path]:
        """The group's directory in every hierarchy a container process belongs to."""
        dirs: dict[Path, None] = {}
        for controller in self.controllers:
            with contextlib.suppress(CgroupUnsupported):
                dirs.setdefault(self.cgroupfs.group_dir(group, controller))
        unified = self.cgroupfs.unified_dir(group)
        if unified is not None and self.cgroupfs.layout is not HostLayout.LEGACY:
            dirs.setdefault(unified)  # hybrid: runtimes place tasks there too
        return list(dirs)

    def _members(self, group: PurePosixPath) -> list[int]:
        try:
            return self.cgroupfs.list_pids(group)
        except CgroupNotFound:
            return []

    def _kill_members(self, group: PurePosixPath) -> bool:
        """SIGKILL whatever is left in the group; True if something was there."""
        pids = self._members(group)
        for pid in pids:
            self.spawner.kill(pid, signal.SIGKILL)
        return bool(pids)

    def _remove_group(self, rec: _Running) -> None:
        with contextlib.suppress(CgroupNotFound):
            self.cgroupfs.remove_group(rec.info.group, recursive=True, controllers=self.controllers)

    def _missing_dirs(self, group: PurePosixPath) -> list[Path]:
        """The directories `create_group` is about to make (ancestors first)."""
        missing: list[Path] = []
        for directory in self._membership_dirs(group):
            levels: list[Path] = []
            for level in [directory, *directory.parents][: len(group.parts) - 1]:
                if level.is_dir():
                    break
                levels.append(level)
            missing += reversed(levels)
        return missing

    @staticmethod
    def _rmdirs(dirs: Sequence[Path]) -> list[Path]:
        """rmdir deepest first, best effort; returns what could not be removed (logged)."""
        left: list[Path] = []
        for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove cgroup %s, left in place: %s", directory, exc)
                left.append(directory)
        return left


def _wrap(container_id: str, exc: CgroupError) -> HostBackendError:
    return HostBackendError(exc.errno, f"container {container_id}: {exc.message}", exc.path)


async def _wait_async(process: ContainerProcess, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (status := process.poll()) is None and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_INTERVAL)
    return status


def _hierarchy_roots(cgroupfs: CgroupFs) -> list[Path]:
    roots = list(dict.fromkeys(cgroupfs.mounts.v1.values()))
    if cgroupfs.mounts.unified is not None:
        roots.append(cgroupfs.mounts.unified)
    return roots


# --------------------------------------------------------------------------- stale groups


def sweep_stale_groups(cgroupfs: CgroupFs, prefix: str = LAB_GROUP_PREFIX) -> SweepReport:
    """Remove top-level groups named ``<prefix>*`` that hold no process anywhere below.

    A crashed lab run leaves its parent group behind; one with processes may be a lab
    that is still running (or whose processes outlived it), so it is reported as busy
    and left alone. Every hierarchy is looked at, not only those the backend uses.
    """
    if not prefix or "/" in prefix or prefix in (".", ".."):
        raise ValueError(f"refusing to sweep with prefix {prefix!r}: it must name groups")
    roots = _hierarchy_roots(cgroupfs)
    names = sorted(
        {entry.name for root in roots if root.is_dir() for entry in _subdirs(root, prefix)}
    )
    removed: list[PurePosixPath] = []
    busy: list[PurePosixPath] = []
    failed: list[str] = []
    for name in names:
        group = PurePosixPath("/") / name
        if any(_holds_processes(root / name) for root in roots):
            busy.append(group)
            continue
        try:
            cgroupfs.remove_group(group, recursive=True, controllers=tuple(cgroupfs.mounts.v1))
        except CgroupError as exc:
            failed.append(f"{group}: {exc}")
        else:
            removed.append(group)
    return SweepReport(tuple(removed), tuple(busy), tuple(failed))


def _subdirs(root: Path, prefix: str) -> list[Path]:
    return [e for e in root.iterdir() if e.name.startswith(prefix) and e.is_dir()]


def _holds_processes(top: Path) -> bool:
    """Whether any group at or below ``top`` lists a process (unreadable counts as yes)."""
    if not top.is_dir():
        return False
    for dirpath, _, _ in os.walk(top):
        try:
            if (Path(dirpath) / "cgroup.procs").read_text().split():
                return True
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- the lab


def lab_backend(
    lab_id: str, *, root: Path | None = None, resctrl: Path | None = None
) -> tuple[HostBackend, bool, str, Callable[[Container], dict[str, Any]]]:
    """The backend `nri-qos lab` runs containers with, and how to read them back.

    Containers live below ``/<LAB_GROUP_PREFIX><lab_id>``; empty leftovers of earlier runs
    are swept first. Raises `isolation.cgroups.CgroupError` when the host's cgroups are
    unusable (nothing mounted), so the caller can fall back to simulated containers.
    """
    host = Path("/") if root is None else root
    cgroupfs = CgroupFs(host / "sys/fs/cgroup", host / "proc")
    procs = ProcessControls(host / "proc")
    swept = sweep_stale_groups(cgroupfs)
    parent = PurePosixPath("/") / f"{LAB_GROUP_PREFIX}{lab_id}"
    controllers = CONTAINER_CONTROLLERS
    if cgroupfs.mounts.v1_mount("blkio") is not None:
        controllers += ("blkio",)  # the io controller's v1 path writes there
    backend = HostBackend(cgroupfs, parent=parent, controllers=controllers, resctrl=resctrl)
    note = f"real processes in real cgroups below {parent} ({cgroupfs.layout.value} cgroups)"
    if swept.removed:
        note += f"; removed {len(swept.removed)} stale lab group(s)"
    if swept.busy:
        note += f"; {len(swept.busy)} earlier lab group(s) still hold processes"

    def reader(container: Container) -> dict[str, Any]:
        return {**read_back(cgroupfs, procs, container).as_dict(), "source": "host"}

    return backend, True, note, reader
