"""Which resctrl control group holds each task, read-only, for the drift reconciliation
loop (`nri_plugin.reconcile`).

Documentation/arch/x86/resctrl.rst: every directory at the top of the resctrl mount
other than `info`, `mon_groups` and `mon_data` is a control group; its `tasks` file lists
the ids of the tasks in it (one per line), including the tasks of its monitoring groups
(they share its CLOSID); a task is in exactly one control group, and a task listed in no
other group is in the root (default) group. So one read per control group answers for
every container, and the root group's own `tasks` (every other task of the node) is
never read.

Rules: reads only (the rdt controller owns every change); a group that vanishes while
being read is skipped; nothing raises.
"""

from __future__ import annotations

import os
from pathlib import Path

from isolation import inflight

ROOT_GROUP = ""  # how the root (default) control group is named in the answer
_NOT_GROUPS = frozenset({"info", "mon_groups", "mon_data"})
_CHUNK = 65536


def task_groups(mount: Path) -> dict[int, str] | None:
    """task id -> name of the control group holding it, for every control group but the
    root one (a task not in the answer is in the root group). None when resctrl cannot
    be listed at `mount` (not mounted)."""
    inflight.touching(mount)
    try:
        entries = [e.name for e in os.scandir(mount) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    out: dict[int, str] = {}
    for name in sorted(entries):
        if name in _NOT_GROUPS:
            continue
        text = _read_all(mount / name / "tasks")
        if text is None:
            continue  # removed meanwhile, or not a control group
        for word in text.split():
            if word.isdigit():
                out[int(word)] = name
    return out


def _read_all(path: Path) -> str | None:
    """A tasks file, which grows with the group (several reads past 64 KiB)."""
    inflight.touching(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", errors="replace")
