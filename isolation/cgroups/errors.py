"""The `CgroupError` hierarchy: cgroup failures as `isolation.errors.HostError`s.

Each carries the errno (the kernel's, or the one it would give) and the path; callers
branch on the class or ``errno``, never on the message.
"""

from __future__ import annotations

import errno as errno_codes

from isolation.errors import HostError


class CgroupError(HostError):
    """A cgroup operation failed. ``errno`` is the kernel's (or the one it would give)."""


class CgroupNotFound(CgroupError):
    """The group (or one of its interface files) does not exist."""


class CgroupValueRejected(CgroupError):
    """The kernel (or our range check, which mirrors it) refused a value."""


class CgroupBusy(CgroupError):
    """The group is in use in a way that forbids the change (EBUSY, ENOSPC)."""


class CgroupPermissionError(CgroupError):
    """EACCES/EPERM opening a file or directory: the agent lacks privileges."""


class CgroupProcessGone(CgroupError):
    """A pid to move exited first (ESRCH). Usually a normal race, not a failure."""


class CgroupUnsupported(CgroupError):
    """The host lacks what the operation needs (no mount, controller not available)."""


class CgroupPathError(CgroupError):
    """A cgroups_path from the runtime that cannot be parsed (errno EINVAL)."""

    def __init__(self, cgroups_path: str, message: str) -> None:
        super().__init__(cgroups_path, errno_codes.EINVAL, message)
