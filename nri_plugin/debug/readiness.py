"""Readiness: is nri-qos isolating the containers the runtime creates, right now?

The DaemonSet's readiness probe (`nri-qos ready`, over the debug API) asks this. It is
true only while all of these hold:

1. a runtime connection is configured: the plugin registered and answered Configure
   (`NriPlugin.configured`, set by the session, cleared when the connection ends);
2. that same connection's Synchronize was decided by the policy
   (`NriPlugin.synchronized`, set by the session when the final chunk's policy call
   ended without failing, cleared when the connection ends). A Synchronize that failed
   leaves the plugin not ready until the runtime connects again; one that was late is
   ready once the late call ends;
3. no request was answered fail-open (late or failed: a container started without our
   adjustments) in the last `settle_s` seconds (`nri_qos_fail_open_total`).

Not ready is not a liveness failure: the process is fine and waits for its runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReadyState:
    ready: bool
    reason: str  # one line: why (not) ready
    connection: str  # "serving", "connecting", "waiting for the runtime"
    synchronized: bool  # the current connection's Synchronize was applied
    fail_open_recent: int  # requests answered fail-open within the settle window


class Readiness:
    """Tracks the three conditions above; `check()` is cheap (read on the event loop)."""

    def __init__(
        self,
        plugin: Any,
        *,
        settle_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plugin = plugin
        self.settle_s = settle_s
        self._clock = clock
        self._fail_open_seen = self._fail_open_total()
        self._fail_opens: list[tuple[float, int]] = []  # (when noticed, how many)

    def synchronized(self) -> bool:
        """Whether the current connection's Synchronize was decided by the policy."""
        return bool(self.plugin.synchronized.is_set())

    def check(self) -> ReadyState:
        now = self._clock()
        recent = self._recent_fail_opens(now)
        connection = self.plugin.connection
        synced = self.synchronized()

        def state(ready: bool, reason: str) -> ReadyState:
            return ReadyState(ready, reason, connection, synced, recent)

        if connection == "waiting for the runtime":
            return state(False, "not registered with a runtime: no connection to its NRI socket")
        if connection == "connecting":
            return state(False, "connected, but the runtime has not configured the plugin yet")
        runtime = self.plugin.runtime
        name = f"{runtime.name} {runtime.version}".strip() if runtime is not None else "runtime"
        if not synced:
            return state(
                False,
                f"registered with {name}, but its Synchronize has not been applied yet "
                "(or failed: see `nri-qos events`)",
            )
        if recent:
            return state(
                False,
                f"{recent} request(s) answered fail-open in the last {self.settle_s:g} s "
                "(late or failed: containers started without isolation); see "
                "nri_qos_fail_open_total",
            )
        return state(True, f"serving {name}: registered and synchronized")

    def _fail_open_total(self) -> int:
        metrics = getattr(self.plugin, "metrics", None)
        if metrics is None:
            return 0
        total = 0.0
        for family in metrics.fail_open.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return int(total)

    def _recent_fail_opens(self, now: float) -> int:
        total = self._fail_open_total()
        if total > self._fail_open_seen:
            self._fail_opens.append((now, total - self._fail_open_seen))
            self._fail_open_seen = total
        self._fail_opens = [(t, n) for t, n in self._fail_opens if now - t < self.settle_s]
        return sum(n for _, n in self._fail_opens)
