"""Which host file each thread is touching right now.

A read or write of cgroupfs or procfs can block in the kernel (a hung cgroup, a file
replaced by a FIFO) and Python cannot interrupt it. The host executor then abandons the
thread and reports which file it was stuck on: the file comes from here. Every raw
host I/O in `isolation` names its path first; the cost is one dict store.
"""

from __future__ import annotations

import os
import threading

_paths: dict[int, str] = {}


def touching(path: str | os.PathLike[str]) -> None:
    """Say that the calling thread is about to read or write `path`."""
    _paths[threading.get_ident()] = os.fspath(path)


def path_of(thread_id: int) -> str:
    """The last path the thread named ("" when none)."""
    return _paths.get(thread_id, "")


def forget(thread_id: int) -> None:
    _paths.pop(thread_id, None)
