"""The one shape every host error has: what failed (message), the errno, and the path.

Callers branch on `errno`, never on message text; `str()` reads like a kernel error with
its path, e.g. "CPUs 4-7 are not in the parent's cpuset [EACCES: /sys/fs/cgroup/...]".
"""

from __future__ import annotations

import errno as errno_codes
import os


class HostError(Exception):
    def __init__(self, path: str | os.PathLike[str], errno: int, message: str) -> None:
        self.path = str(path)
        self.errno = errno
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        name = errno_codes.errorcode.get(self.errno, str(self.errno))
        where = f": {self.path}" if self.path else ""
        return f"{self.message} [{name}{where}]"


class RefusedAction(Exception):
    """We chose not to act (the target is not provably the container's): not a failure
    to retry, a decision to report. The message says why."""


# Errnos after which the same operation may succeed later: the kernel was busy or out of
# something, or the operation timed out. ENOENT/ESRCH (gone), EACCES/EPERM and EINVAL
# (refused for good) are not retried.
TRANSIENT_ERRNOS = frozenset(
    {
        errno_codes.EIO,
        errno_codes.ENOSPC,
        errno_codes.EAGAIN,
        errno_codes.EBUSY,
        errno_codes.EINTR,
        errno_codes.ENOMEM,
        errno_codes.ETIMEDOUT,
    }
)
