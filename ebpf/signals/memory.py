"""Memory use of one container (cgroup v2 or v1) and of the node (whole and per NUMA node).

Container, best first:

* cgroup v2: memory.current, memory.max ("max" = no limit), memory.events `high` and
  `oom_kill` (cumulative; Documentation/admin-guide/cgroup-v2.rst). Present only when the
  v2 memory controller is enabled for the group.
* cgroup v1: memory.usage_in_bytes, memory.limit_in_bytes (the kernel's "unlimited" is
  PAGE_COUNTER_MAX pages, a number near 2^63), memory.oom_control `oom_kill` (cumulative).
  v1 has no "high" events: those stay 0.

Node: /proc/meminfo MemAvailable and MemTotal (the kernel's own estimate of what can be
allocated without swapping). Per NUMA node, /sys/devices/system/node/node<N>/meminfo has
no MemAvailable, so we estimate it as

    MemFree + (Active(file) + Inactive(file)) / 2 + SReclaimable / 2

i.e. free pages plus half of the page cache and of the reclaimable slab. The kernel's
formula (si_mem_available) counts the page cache and reclaimable slab minus at most half
of each (the low watermark); without the per-node watermarks we take the half, so the
estimate errs low: eviction decisions see less room, never more.
"""

from __future__ import annotations

import errno as errno_codes
import re
from dataclasses import dataclass
from pathlib import Path

from ebpf.signals.cpustat import parse_keyed
from ebpf.watched import WatchedContainer
from isolation import inflight
from isolation.errors import HostError
from isolation.writes import read_file
from qos_model.signals import MemoryUse, NodeMemory, Pressure

# Limits at or above this are "no limit" (v1 writes PAGE_COUNTER_MAX * PAGE_SIZE).
UNLIMITED = 1 << 62
KIB = 1024
_NODE_DIR = re.compile(r"node(\d+)")


@dataclass(frozen=True, slots=True)
class MemCounters:
    """One reading: usage and limit now, events since the group was made."""

    usage_bytes: int
    limit_bytes: int | None
    oom_kills_total: int
    high_total: int
    source: str  # "cgroup2" or "cgroup1"


def _int_file(path: Path) -> int | None:
    """An integer file; None for "max"; HostError when unreadable, ValueError if garbled."""
    text = read_file(path).strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path} is not a number: {text[:40]!r}") from None
    return None if value >= UNLIMITED else value


def read_memory(container: WatchedContainer) -> MemCounters:
    """The container's memory counters, from v2 when its memory controller is on, else
    v1. HostError when neither tree has them (the message names where we looked)."""
    v2 = container.cgroup2_dir
    if v2 is not None and (v2 / "memory.current").exists():
        usage = _int_file(v2 / "memory.current") or 0
        limit = _int_file(v2 / "memory.max")
        events = parse_keyed(read_file(v2 / "memory.events"))
        return MemCounters(
            usage_bytes=usage,
            limit_bytes=limit,
            oom_kills_total=events.get("oom_kill", 0),
            high_total=events.get("high", 0),
            source="cgroup2",
        )
    v1 = container.memory_dir
    if v1 is not None:
        usage = _int_file(v1 / "memory.usage_in_bytes") or 0
        limit = _int_file(v1 / "memory.limit_in_bytes")
        control = parse_keyed(read_file(v1 / "memory.oom_control"))
        return MemCounters(
            usage_bytes=usage,
            limit_bytes=limit,
            oom_kills_total=control.get("oom_kill", 0),
            high_total=0,
            source="cgroup1",
        )
    where = str(v2) if v2 is not None else "no cgroup directory given"
    raise HostError(
        where,
        errno_codes.ENOENT,
        f"no memory controller for the container: no memory.current in {where} and no "
        "cgroup v1 memory directory",
    )


def between(prev: MemCounters | None, cur: MemCounters) -> MemoryUse:
    """Usage and limit now, events during the window. With no previous reading from the
    same source, or events that went backwards (a new group under the same path), the
    event counts are 0: unknown is reported as "none seen", never as the group's lifetime
    totals, so a restart cannot look like a burst of OOM kills."""
    oom = high = 0
    if prev is not None and prev.source == cur.source:
        oom = max(0, cur.oom_kills_total - prev.oom_kills_total)
        high = max(0, cur.high_total - prev.high_total)
        if cur.oom_kills_total < prev.oom_kills_total or cur.high_total < prev.high_total:
            oom = high = 0
    return MemoryUse(
        usage_bytes=cur.usage_bytes, limit_bytes=cur.limit_bytes, oom_kills=oom, high_events=high
    )


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo or a node's meminfo ("Node 0 MemFree:  123 kB") as {key: bytes}
    (HugePages_* counts are pages, kept as they are)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if not sep:
            continue
        key = head.split()[-1] if head.split() else ""
        parts = tail.split()
        if not key or not parts or not parts[0].isdigit():
            continue
        scale = KIB if len(parts) > 1 and parts[1] == "kB" else 1
        values[key] = int(parts[0]) * scale
    return values


def estimate_available(info: dict[str, int]) -> int:
    """The module docstring's estimate, capped by MemTotal."""
    file_lru = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
    estimate = info.get("MemFree", 0) + file_lru // 2 + info.get("SReclaimable", 0) // 2
    total = info.get("MemTotal")
    return min(estimate, total) if total is not None else estimate


def read_node(root: Path, pressure: Pressure | None = None) -> NodeMemory:
    """The node's memory from root/proc/meminfo (the estimate when the kernel predates
    MemAvailable). HostError when unreadable, ValueError when MemTotal is missing."""
    info = parse_meminfo(read_file(root / "proc/meminfo"))
    if "MemTotal" not in info:
        raise ValueError(f"no MemTotal in {root / 'proc/meminfo'}")
    available = info.get("MemAvailable")
    if available is None:
        available = estimate_available(info)
    return NodeMemory(available_bytes=available, total_bytes=info["MemTotal"], pressure=pressure)


def read_numa(root: Path) -> dict[int, NodeMemory]:
    """Per NUMA node memory ({} on a kernel without NUMA sysfs). HostError when a node's
    meminfo cannot be read."""
    base = root / "sys/devices/system/node"
    inflight.touching(base)
    try:
        names = [p.name for p in base.iterdir()]
    except FileNotFoundError:
        return {}
    except OSError as exc:
        code = exc.errno or errno_codes.EIO
        raise HostError(base, code, f"cannot list {base}") from exc
    nodes: dict[int, NodeMemory] = {}
    for name in names:
        match = _NODE_DIR.fullmatch(name)
        if match is None:
            continue
        info = parse_meminfo(read_file(base / name / "meminfo"))
        if "MemTotal" not in info:
            continue
        nodes[int(match.group(1))] = NodeMemory(
            available_bytes=estimate_available(info), total_bytes=info["MemTotal"]
        )
    return dict(sorted(nodes.items()))
