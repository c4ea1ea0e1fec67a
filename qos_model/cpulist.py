"""The kernel's CPU/node list format ("0-3,8,10-11"), parsed and printed in one place.

sysfs, cgroupfs, /proc/<pid>/status and NRI's LinuxCPU.cpus/mems all use it, so every
module converts through these two functions instead of rolling its own.
"""

from __future__ import annotations

from collections.abc import Iterable


class CpuListError(ValueError):
    """A CPU list string that the kernel would not accept."""


# The largest id a list may name: the kernel's largest NR_CPUS (x86 MAXSMP) is 8192, and
# it refuses ids beyond its own count. Lists come from runtimes and pods too, and
# "0-4294967295" must be an error, not four billion ints.
MAX_CPU_ID = 8191
# Lists remembered: a node's containers report a handful of distinct ones; large sets and
# long texts are not kept, so adversarial input cannot make the memo large.
_MEMO_ENTRIES = 512
_MEMO_MAX_SET = 1024
_MEMO_MAX_TEXT = 256


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse "0-3,8" (whitespace and a trailing newline allowed; "" is the empty set).

    Remembered: a node's containers report a handful of distinct lists (their pools'), a
    thousand times over at every Synchronize."""
    found = _PARSED.get(text)
    if found is None:
        found = _parse(text)
        if len(found) <= _MEMO_MAX_SET and len(text) <= _MEMO_MAX_TEXT:
            if len(_PARSED) >= _MEMO_ENTRIES:
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
        if not _is_id(lo_text) or (sep and not _is_id(hi_text)):
            raise CpuListError(f"bad CPU list element {part[:40]!r} in {text[:80]!r}")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
        if lo < 0 or hi < lo:
            raise CpuListError(f"bad CPU range {part[:40]!r} in {text[:80]!r}")
        if hi > MAX_CPU_ID:
            raise CpuListError(
                f"CPU id {hi} in {text[:80]!r} is beyond {MAX_CPU_ID}, the largest any kernel has"
            )
        result.update(range(lo, hi + 1))
    return frozenset(result)


def _is_id(text: str) -> bool:
    """ASCII decimal digits only, as the kernel reads them (int() would also take "1_0",
    " 3" or non-ASCII digits), and short enough to be a CPU id."""
    return 0 < len(text) <= 6 and text.isascii() and text.isdigit()


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
