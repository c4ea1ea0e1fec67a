"""The kernel's CPU/node list format ("0-3,8,10-11"), parsed and printed in one place.

sysfs, cgroupfs, /proc/<pid>/status and NRI's LinuxCPU.cpus/mems all use it, so every
module converts through these two functions instead of rolling its own.
"""

from __future__ import annotations

from collections.abc import Iterable


class CpuListError(ValueError):
    """A CPU list string that the kernel would not accept."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse "0-3,8" (whitespace and a trailing newline allowed; "" is the empty set).

    Remembered: a node's containers report a handful of distinct lists (their pools'), a
    thousand times over at every Synchronize."""
    found = _PARSED.get(text)
    if found is None:
        found = _parse(text)
        if len(_PARSED) >= 4096:
            _PARSED.clear()
        _PARSED[text] = found
    return found


_PARSED: dict[str, frozenset[int]] = {}


def _parse(text: str) -> frozenset[int]:
    result: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise CpuListError(f"bad CPU list element {part!r} in {text!r}") from None
        if lo < 0 or hi < lo:
            raise CpuListError(f"bad CPU range {part!r} in {text!r}")
        result.update(range(lo, hi + 1))
    return frozenset(result)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Print a set of ids as the kernel does (%*pbl): ascending, consecutive runs as "a-b"."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if j == i else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
