"""Where the embedded runtime's containers "run".

The runtime decides *what* a container looks like (spec, adjustments, updates, state);
a backend makes it happen. The default keeps everything in memory, which is all the
protocol tests and the lab need; a later backend can create real cgroups and processes
behind the same five calls without touching the NRI side.

Every call receives the container as the runtime sees it at that moment, adjustments
and updates applied, including the class-based resources (block I/O, RDT) that NRI
messages never carry back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from qos_model.containers import Container


class ContainerBackend(Protocol):
    async def create(self, container: Container) -> int | None:
        """Create the container; return the pid if a process already exists (the way
        `runc create` does), else None."""

    async def start(self, container: Container) -> int | None:
        """Start it; return the main process's pid (None if the backend has none)."""

    async def update(self, container: Container) -> None:
        """Apply the container's new resources."""

    async def stop(self, container: Container) -> int:
        """Stop it; return its exit code."""

    async def remove(self, container: Container) -> None:
        """Forget it."""


@dataclass(frozen=True, slots=True)
class BackendCall:
    operation: str  # create | start | update | stop | remove
    container: Container


class InMemoryBackend:
    """Pretends to run containers: hands out fake pids and remembers what it was told.

    `history` lists every call in order, so a test can check what reached the
    "execution" layer (e.g. that an update requested by a plugin was applied).
    """

    def __init__(self, first_pid: int = 40000) -> None:
        self._pids = itertools.count(first_pid)
        self.history: list[BackendCall] = []
        self.containers: dict[str, Container] = {}
        self.pids: dict[str, int] = {}

    async def create(self, container: Container) -> int | None:
        self._record("create", container)
        self.pids[container.id] = next(self._pids)
        return self.pids[container.id]

    async def start(self, container: Container) -> int | None:
        self._record("start", container)
        return self.pids.setdefault(container.id, next(self._pids))

    async def update(self, container: Container) -> None:
        self._record("update", container)

    async def stop(self, container: Container) -> int:
        self._record("stop", container)
        return 0

    async def remove(self, container: Container) -> None:
        self.history.append(BackendCall("remove", container))
        self.containers.pop(container.id, None)
        self.pids.pop(container.id, None)

    def _record(self, operation: str, container: Container) -> None:
        self.history.append(BackendCall(operation, container))
        self.containers[container.id] = container
