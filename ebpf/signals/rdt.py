"""Memory bandwidth (MBM) and LLC occupancy of one container, from its resctrl
monitoring group.

The control plane (`isolation.rdt`) puts each container in a monitoring group under its
class's control group; we only read that group's mon_data through `Resctrl`, which sums
the L3 domains and turns "Unavailable"/"Unassigned" into None. MBM counters are
cumulative bytes (the kernel extends the hardware's narrow counters), so the window's
traffic is a delta; a counter that went backwards means a new group (RMID) under the same
name, and that window has no value. LLC occupancy is a level, reported as read.
"""

from __future__ import annotations

from ebpf.watched import WatchedContainer
from isolation.rdt import MonSample, Resctrl


class NotMonitored(Exception):
    """The container has no monitoring group we may read (not an error: a fact)."""


def class_of(container: WatchedContainer) -> tuple[str, str]:
    """(class name as `Resctrl` takes it, monitoring group) of the container; NotMonitored
    when it has none or its control group is not ours."""
    group, mon = container.rdt_group, container.rdt_mon
    if not group or not mon:
        raise NotMonitored("no resctrl monitoring group")
    if not group.startswith(Resctrl.PREFIX):
        raise NotMonitored(f"resctrl group {group!r} is not ours (no {Resctrl.PREFIX!r} prefix)")
    return group[len(Resctrl.PREFIX) :], mon


def read_rdt(resctrl: Resctrl, container: WatchedContainer) -> MonSample:
    """The container's monitoring counters now. NotMonitored, or HostError/ValueError from
    `Resctrl` (no resctrl mounted, group gone, a name it refuses)."""
    cls, mon = class_of(container)
    return resctrl.read_monitoring(cls, mon)


def between(prev: MonSample | None, cur: MonSample) -> tuple[int | None, int | None, int | None]:
    """(MBM total bytes, MBM local bytes) during the window and LLC occupancy now."""
    return (
        _delta(prev.mbm_total_bytes if prev else None, cur.mbm_total_bytes),
        _delta(prev.mbm_local_bytes if prev else None, cur.mbm_local_bytes),
        cur.llc_occupancy,
    )


def _delta(before: int | None, after: int | None) -> int | None:
    if before is None or after is None or after < before:
        return None
    return after - before
