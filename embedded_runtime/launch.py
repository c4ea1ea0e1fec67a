"""Starting a pre-installed plugin the way containerd and CRI-O do (nri-protocol.md §3.2).

The child gets one end of a socketpair as fd 3, stdin/stdout/stderr on /dev/null, no
arguments beyond the caller's argv, and an environment of exactly NRI_PLUGIN_NAME,
NRI_PLUGIN_IDX and NRI_PLUGIN_SOCKET=3 (plus whatever the caller adds for tests, e.g.
PYTHONPATH). `posix_spawn` can place the socket at fd 3 without running Python code in
the child; the exit is watched through a pidfd, so no SIGCHLD handler is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
from collections.abc import Mapping, Sequence

PLUGIN_SOCKET_FD = 3
ENV_NAME = "NRI_PLUGIN_NAME"
ENV_IDX = "NRI_PLUGIN_IDX"
ENV_SOCKET = "NRI_PLUGIN_SOCKET"


def plugin_environment(
    name: str, idx: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = dict(extra or {})
    env.update({ENV_NAME: name, ENV_IDX: idx, ENV_SOCKET: str(PLUGIN_SOCKET_FD)})
    return env


class LaunchedProcess:
    """A spawned plugin process, reaped asynchronously."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exit.done():
            self._exit.set_result(os.waitstatus_to_exitcode(status))

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def kill(self) -> None:
        if not self._exit.done():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


def spawn_plugin(
    argv: Sequence[str], env: Mapping[str, str], peer: socket.socket
) -> LaunchedProcess:
    """Exec argv[0] (a path) with `peer` as fd 3. Raises OSError when it cannot start."""
    if not argv:
        raise ValueError("launch_plugin needs a command")
    # Keep the socket off fds 0-3 in the parent so the dup2 below is a real copy.
    fd = fcntl.fcntl(peer.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    try:
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, PLUGIN_SOCKET_FD),
            ],
        )
    finally:
        os.close(fd)
    return LaunchedProcess(pid)
