"""A bounded log of decisions and problems, for people asking "why?".

The engine's notes (what it decided, and what it could not honour: a bad annotation, a
refused dedicated allocation) and the controllers' outcomes (an oom_score_adj the host
would not take) land here, stamped with the time, through `control.executor.HostExecutor`.
The status socket serves it (the debug API next). Bounded, so a node that runs for months
does not grow without limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    time: float  # unix seconds
    kind: str  # "classification", "allocation", "host", "pool", ...
    subject: str  # the container or pool it is about
    message: str


class EventLog:
    def __init__(self, capacity: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self._events: deque[DecisionEvent] = deque(maxlen=capacity)
        self._clock = clock
        self._lock = threading.Lock()  # the policy thread writes, the debug API reads

    def add(self, kind: str, subject: str, message: str) -> DecisionEvent:
        event = DecisionEvent(self._clock(), kind, subject, message)
        with self._lock:
            self._events.append(event)
        return event

    def snapshot(self) -> list[DecisionEvent]:
        with self._lock:
            return list(self._events)
