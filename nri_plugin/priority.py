"""The daemon's CPU priority (`[plugin] nice`).

Every NRI request is a synchronous step of a pod's start: the runtime waits for our
reply. A container start is also when the node is busiest (runc, the shim, the new
process), and at the default priority the scheduler lets those run out their slice
before it runs the thread that has our reply: measured with a busy loop on each of the
2 CPUs, 1-3 % of requests then took 2-5 ms inside the plugin instead of 0.3 ms. A
higher priority (nice -10 by default) lets the reply go first; the daemon uses little
CPU, so the others lose next to nothing. On Linux nice is per thread and a new thread
inherits its creator's: setting it on the main thread before any other starts covers
them all.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PriorityChange:
    before: int
    after: int
    warning: str = ""  # set when the change was refused; the daemon logs it once


def set_nice(nice: int) -> PriorityChange:
    """This thread (and every thread it starts from now on) to `nice`."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if nice == before:
        return PriorityChange(before, before)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        return PriorityChange(
            before,
            before,
            f"cannot run at nice {nice} ({exc.strerror}): it needs CAP_SYS_NICE; replies "
            f"to the runtime keep the default CPU priority (grant CAP_SYS_NICE, or set "
            f"[plugin] nice = {before} to silence this)",
        )
    return PriorityChange(before, nice)


def restore(change: PriorityChange) -> None:
    """Back to the priority before `set_nice` (an in-process daemon that stops)."""
    if change.after != change.before:
        # raising it back needs the capability that lowered it: nothing else to try
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, change.before)
