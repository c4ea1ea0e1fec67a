"""CPU time and CFS bandwidth throttling of one container, from cgroup v2 or v1 files.

Sources, best first, chosen per counter because a hybrid host splits them:

* usage: the cgroup2 group's cpu.stat `usage_usec`. The kernel keeps it for every v2
  group even when the cpu controller is bound to v1 (it is the rstat base). Else the v1
  `cpuacct.usage` (ns) in the container's cpu directory (a `cpu,cpuacct` mount).
* throttling: the cgroup2 cpu.stat `nr_periods`/`nr_throttled`/`throttled_usec`, which
  exist only when the v2 cpu controller is enabled for the group. Else the v1 cpu.stat
  `nr_periods`/`nr_throttled`/`throttled_time` (ns), where CFS quotas live on a hybrid
  host.

Counters are cumulative; `between` makes window deltas and refuses to make any when one
went backwards (the container was restarted in a new group under the same path).
"""

from __future__ import annotations

import errno as errno_codes
from dataclasses import dataclass
from pathlib import Path

from ebpf.watched import WatchedContainer
from isolation.errors import HostError
from isolation.writes import read_file
from qos_model.signals import CpuThrottling


def parse_keyed(text: str) -> dict[str, int]:
    """A flat keyed file ("key value" per line: cpu.stat, memory.events); lines that are
    not a name and an integer are skipped (the kernel adds keys over time)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


@dataclass(frozen=True, slots=True)
class CpuCounters:
    """Cumulative counters of one container; None where no source has them."""

    usage_ns: int | None
    periods: int | None = None
    throttled_periods: int | None = None
    throttled_ns: int | None = None
    usage_source: str = "none"  # "cgroup2" or "cgroup1"
    throttling_source: str = "none"


def _optional(path: Path) -> str | None:
    """The file's text, None when it does not exist (any other failure raises)."""
    try:
        return read_file(path)
    except HostError as exc:
        if exc.errno == errno_codes.ENOENT:
            return None
        raise


def read_cpu(container: WatchedContainer) -> CpuCounters:
    """The container's CPU counters. HostError when a file exists but cannot be read, or
    when neither tree has anything (the message names both places looked at)."""
    usage_ns: int | None = None
    usage_source = throttling_source = "none"
    throttling: tuple[int, int, int] | None = None
    if container.cgroup2_dir is not None:
        text = _optional(container.cgroup2_dir / "cpu.stat")
        if text is not None:
            v2 = parse_keyed(text)
            if "usage_usec" in v2:
                usage_ns, usage_source = v2["usage_usec"] * 1000, "cgroup2"
            if {"nr_periods", "nr_throttled", "throttled_usec"} <= v2.keys():
                throttling = (v2["nr_periods"], v2["nr_throttled"], v2["throttled_usec"] * 1000)
                throttling_source = "cgroup2"
    if container.cpu_dir is not None:
        if throttling is None:
            text = _optional(container.cpu_dir / "cpu.stat")
            v1 = parse_keyed(text) if text is not None else {}
            if {"nr_periods", "nr_throttled", "throttled_time"} <= v1.keys():
                throttling = (v1["nr_periods"], v1["nr_throttled"], v1["throttled_time"])
                throttling_source = "cgroup1"
        if usage_ns is None:
            text = _optional(container.cpu_dir / "cpuacct.usage")
            if text is not None and text.strip().isdigit():
                usage_ns, usage_source = int(text.strip()), "cgroup1"
    if usage_ns is None and throttling is None:
        places = [str(d) for d in (container.cgroup2_dir, container.cpu_dir) if d is not None]
        where = " or ".join(places) or "no cgroup directory given"
        raise HostError(where, errno_codes.ENOENT, "no cpu.stat or cpuacct.usage")
    periods, throttled, throttled_ns = throttling if throttling else (None, None, None)
    return CpuCounters(
        usage_ns=usage_ns,
        periods=periods,
        throttled_periods=throttled,
        throttled_ns=throttled_ns,
        usage_source=usage_source,
        throttling_source=throttling_source,
    )


def between(prev: CpuCounters | None, cur: CpuCounters) -> tuple[int | None, CpuThrottling | None]:
    """(CPU time used, throttling) over the window; None for each part that has no
    previous reading from the same source or whose counters went backwards."""
    if prev is None:
        return None, None
    usage: int | None = None
    if (
        cur.usage_ns is not None
        and prev.usage_ns is not None
        and prev.usage_source == cur.usage_source
        and cur.usage_ns >= prev.usage_ns
    ):
        usage = cur.usage_ns - prev.usage_ns
    return usage, _throttling(prev, cur)


def _throttling(prev: CpuCounters, cur: CpuCounters) -> CpuThrottling | None:
    if prev.throttling_source != cur.throttling_source:
        return None
    deltas = []
    for before, after in (
        (prev.periods, cur.periods),
        (prev.throttled_periods, cur.throttled_periods),
        (prev.throttled_ns, cur.throttled_ns),
    ):
        if before is None or after is None or after < before:
            return None
        deltas.append(after - before)
    return CpuThrottling(periods=deltas[0], throttled_periods=deltas[1], throttled_ns=deltas[2])
