"""Online CPU usage from cumulative cgroup counters, for sizing the reclaimed pool.

The cheapest signal there is (cpuacct.usage / cpu.stat usage_usec): two readings of a
container's CPU time, divided by the wall time between them, give the cores it used.
The pool grows back only slowly: the reported usage is the peak of the last few samples,
so a burst shrinks the reclaimed pool at once, and it is returned to batch only after
the online side has stayed quiet for the whole window (no flapping).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping


class UsageMeter:
    def __init__(self, window: int = 3) -> None:
        if window < 1:
            raise ValueError("the usage window must hold at least one sample")
        self._last: dict[str, tuple[float, int]] = {}
        self._recent: deque[float] = deque(maxlen=window)

    def sample(self, now: float, counters: Mapping[str, int | None]) -> float:
        """Feed cumulative CPU-ns per container at time `now` (seconds); return the
        smoothed online usage in cores. Containers seen for the first time count from
        the next sample; a counter that went backwards (a re-created cgroup) restarts."""
        used = 0.0
        seen: dict[str, tuple[float, int]] = {}
        for key, value in counters.items():
            if value is None:
                continue
            seen[key] = (now, value)
            last = self._last.get(key)
            if last is None:
                continue
            elapsed, delta = now - last[0], value - last[1]
            if elapsed > 0 and delta >= 0:
                used += delta / 1e9 / elapsed
        self._last = seen
        self._recent.append(used)
        return max(self._recent)
