"""Checks `nri-qos run` makes before it starts anything, each failing with one line that
says what is wrong and how to fix it (the command exits with code 2).

What the qos policy needs from the host, all under `[host] root`: procfs (its
`self/mountinfo` locates the cgroup mounts; the oom controller writes
`<pid>/oom_score_adj`), sysfs (the CPU topology) and a cgroup filesystem mounted at
`sys/fs/cgroup`. The host adapters (`isolation`) would fail on the same things later, with
errors worded for their callers; here they are worded for the person starting the daemon.
Also checked: the socket paths (a unix socket path has at most 107 bytes; the status
socket's path must not hold anything but a stale socket) and, for a plugin the runtime
launched, the inherited socket fd.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from isolation.cgroups import CgroupError, detect_cgroup_mounts, parse_mountinfo
from nri_plugin.config import Config
from nri_plugin.debug.server import MAX_SOCKET_PATH, check_socket_path
from nri_plugin.plugin import PluginSetupError

ELSEWHERE = (
    "or, if the host's filesystems are visible elsewhere (e.g. /host in a container), "
    "set [host] root to that directory"
)


class PreflightError(PluginSetupError):
    """The host or the command line cannot work; the message says what to do."""


def check_all(
    config: Config, *, status_socket: Path | None = None, inherited_fd: str | None = None
) -> None:
    """Everything `nri-qos run` checks before it starts; raises PreflightError."""
    if config.policy_name == "qos":
        check_host_root(config.host_root)
    if inherited_fd is not None:
        check_inherited_fd(inherited_fd)
    else:
        check_socket_length(config.plugin.socket_path, "the NRI socket (--socket)")
    if status_socket is not None:
        check_socket_path(status_socket)


def check_host_root(root: Path) -> None:
    """procfs, sysfs and a cgroup mount under `root` (see the module docstring)."""
    if not root.is_absolute():
        raise PreflightError(f"[host] root = {str(root)!r} must be an absolute path")
    if not root.exists():
        raise PreflightError(
            f"[host] root = {str(root)!r} does not exist: set it to the directory where the "
            'host\'s / is visible ("/" unless nri-qos runs in a container)'
        )
    if not root.is_dir():
        raise PreflightError(f"[host] root = {str(root)!r} is not a directory")
    proc = root / "proc"
    mountinfo = proc / "self" / "mountinfo"
    try:
        text = mountinfo.read_text()
    except FileNotFoundError:
        where = f"{proc} does not exist" if not proc.is_dir() else f"there is no {mountinfo}"
        raise PreflightError(
            f"no procfs under {root}: {where}; mount procfs at {proc} "
            f"(mount -t proc proc {proc}), {ELSEWHERE}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise PreflightError(
            f"cannot read {mountinfo}: {reason}; run nri-qos as root, {ELSEWHERE}"
        ) from None
    cpus = root / "sys" / "devices" / "system" / "cpu"
    if not cpus.is_dir():
        sysfs = root / "sys"
        raise PreflightError(
            f"no sysfs under {root}: {cpus} does not exist; mount sysfs at {sysfs} "
            f"(mount -t sysfs sysfs {sysfs}), {ELSEWHERE}"
        )
    cgroup = root / "sys" / "fs" / "cgroup"
    try:
        detect_cgroup_mounts(parse_mountinfo(text), cgroup)
    except ValueError as exc:
        raise PreflightError(f"{mountinfo} cannot be parsed: {exc}") from None
    except CgroupError:
        raise PreflightError(
            f"no cgroup filesystem is mounted at {cgroup} (per {mountinfo}): mount cgroup2 "
            f"there (mount -t cgroup2 none {cgroup}), {ELSEWHERE}"
        ) from None


def check_socket_length(path: Path, what: str) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise PreflightError(
            f"{what} {path} is {size} bytes long; a unix socket path can have at most "
            f"{MAX_SOCKET_PATH}: use a shorter path"
        )


def check_inherited_fd(value: str) -> int:
    """NRI_PLUGIN_SOCKET, set by a runtime that launched us: an open socket's fd."""
    hint = (
        "the runtime sets it when it launches a pre-installed plugin; to connect to a "
        "runtime's socket instead, unset NRI_PLUGIN_SOCKET and pass --socket"
    )
    try:
        fd = int(value)
    except ValueError:
        raise PreflightError(
            f"NRI_PLUGIN_SOCKET={value!r} is not a file descriptor; {hint}"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise PreflightError(
            f"NRI_PLUGIN_SOCKET={value!r} is not an open file descriptor; {hint}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise PreflightError(f"NRI_PLUGIN_SOCKET={value!r} is not a socket; {hint}")
    return fd
