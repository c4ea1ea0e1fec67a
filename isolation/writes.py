"""The one place host changes outside cgroupfs go through: resctrl files, iocost and blkio
files, netlink (tc) changes.

Each change is a `HostChange` (what, where, the value) made with the reason it is made.
`HostWriter` logs it ("what we wrote and why"), keeps the last changes for the views, and
in dry-run mode records it without touching the host, so a dry run shows exactly what
production would do. File changes are single `write(2)` calls, like `echo v > file`
(kernel interface files ignore truncation and report a rejected value as the write's
errno); a failure becomes a `HostError` with the errno and path, and `detail` lets a
backend add what the kernel said elsewhere (resctrl's `info/last_cmd_status`).
Changes that are not files (netlink) go through `apply`, with a callable that makes them.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from isolation import inflight
from isolation.errors import HostError

log = logging.getLogger("nri_qos.host.writes")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HostChange:
    """One change: `action` is "write", "mkdir", "rmdir" or a netlink verb ("tc add
    class"); `target` is the file or object; `value` what was written (if anything)."""

    action: str
    target: str
    value: str = ""
    reason: str = ""

    def __str__(self) -> str:
        value = f" {self.value!r}" if self.value else ""
        why = f" ({self.reason})" if self.reason else ""
        if self.action == "write":
            return f"write{value} > {self.target}{why}"
        return f"{self.action} {self.target}{value}{why}"


class HostWriter:
    """Makes (or, in dry-run mode, records) host changes, each logged with its reason."""

    def __init__(self, *, dry_run: bool = False, keep: int = 256) -> None:
        self.dry_run = dry_run
        self.planned: list[HostChange] = []  # dry-run only: everything that was not done
        self.recent: deque[HostChange] = deque(maxlen=keep)  # made (or planned) changes

    def _record(self, change: HostChange) -> bool:
        """Log and keep `change`; True when it must really be made."""
        self.recent.append(change)
        if self.dry_run:
            self.planned.append(change)
            log.info("dry-run: %s", change)
            return False
        log.debug("%s", change)
        return True

    def write(
        self,
        path: Path,
        value: str,
        reason: str,
        *,
        detail: Callable[[], str] | None = None,
    ) -> None:
        """Write `value` to the existing file `path` in one write(2). Raises HostError;
        `detail()` (called only on failure) adds what the kernel reported elsewhere."""
        if not self._record(HostChange("write", str(path), value, reason)):
            return
        inflight.touching(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise _error(exc, path, f"cannot open {path} to write {value!r}", None) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise _error(exc, path, f"the kernel refused {value!r}", detail) from exc
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # some pseudo-files report the rejection at close
                raise _error(exc, path, f"the kernel refused {value!r}", detail) from exc

    def mkdir(self, path: Path, reason: str, *, detail: Callable[[], str] | None = None) -> bool:
        """Create the directory; False when it already existed. Raises HostError."""
        if not self._record(HostChange("mkdir", str(path), "", reason)):
            return True
        inflight.touching(path)
        try:
            os.mkdir(path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _error(exc, path, f"cannot create {path}", detail) from exc
        return True

    def rmdir(self, path: Path, reason: str) -> bool:
        """Remove the directory; False when it was already gone. Raises HostError."""
        if not self._record(HostChange("rmdir", str(path), "", reason)):
            return True
        inflight.touching(path)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _error(exc, path, f"cannot remove {path}", None) from exc
        return True

    def apply(self, change: HostChange, make: Callable[[], T]) -> T | None:
        """Make a non-file change (netlink): `make()` runs unless in dry-run mode."""
        if not self._record(change):
            return None
        return make()


def read_file(path: Path) -> str:
    """A host file's text, read the way the writes are made: the path named first for the
    host executor's stuck-I/O report, every failure a HostError with its errno."""
    inflight.touching(path)
    try:
        # One open and one read(2) per file: kernel interface files are small, and the
        # signal collectors read thousands per window (pathlib's text layer costs 2x).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, 65536)]
            while len(chunks[-1]) == 65536:  # a large file: read on
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise HostError(path, errno_codes.ENOENT, f"{path} does not exist") from None
    except OSError as exc:
        code = exc.errno or errno_codes.EIO
        raise HostError(path, code, f"cannot read {path}: {os.strerror(code)}") from exc
    return b"".join(chunks).decode("ascii", errors="replace")


def _error(exc: OSError, path: Path, message: str, detail: Callable[[], str] | None) -> HostError:
    code = exc.errno or errno_codes.EIO
    text = f"{message}: {exc.strerror or os.strerror(code)}"
    if detail is not None:
        try:
            extra = detail()
        except Exception:  # what the kernel said elsewhere is a bonus, never a new failure
            extra = ""
        if extra:
            text = f"{text}; the kernel says: {extra}"
    return HostError(path, code, text)
