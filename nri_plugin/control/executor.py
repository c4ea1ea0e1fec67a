"""Where the engine's intents are carried out: after the reply, off the request path.

The plugin runtime hands each request's `Intents` to `HostExecutor.submit` once the reply
is written. Notes go straight into the decision log (and the log, warnings as warnings);
host intents go, in order, to one dedicated host thread that runs the controllers — never
the thread that answers the runtime, so a slow or hung host write delays other host
writes, not a pod start. Other host reads (the usage sampler) run on the same thread
through `run`, so host I/O is serialized in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from nri_plugin.control.base import Controllers
from nri_plugin.events import EventLog
from nri_plugin.policy.intents import HostIntent, Intents, Note, Severity

log = logging.getLogger("nri_qos.decisions")
_R = TypeVar("_R")


class HostExecutor:
    def __init__(self, controllers: Controllers, events: EventLog | None = None) -> None:
        self.controllers = controllers
        self.events = events if events is not None else EventLog()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nri-host")
        self._pending: set[Future[None]] = set()

    def start(self) -> None:
        """Start the controllers (raises ControllerStartError for a Required one)."""
        self.record(self.controllers.start())

    def submit(self, intents: Intents) -> None:
        """Carry out `intents` (minus updates, which the plugin sends): never blocks."""
        self.record(intents.notes)
        if intents.host:
            future = self._thread.submit(self._apply, intents.host)
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)

    async def run(self, fn: Callable[[], _R]) -> _R:
        """Run other host I/O (reads) on the host thread, after what is queued."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def drain(self) -> None:
        """Wait until every host intent submitted so far has been applied."""
        await self.run(lambda: None)

    def record(self, notes: Sequence[Note]) -> None:
        for note in notes:
            if note.severity is Severity.ERROR:
                log.error("%s: %s", note.subject, note.message)
            elif note.severity is Severity.WARNING:
                log.warning("%s: %s", note.subject, note.message)
            else:
                log.debug("%s %s: %s", note.kind, note.subject, note.message)
            self.events.add(note.kind, note.subject, note.message)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.controllers.stop()

    def _apply(self, intents: Sequence[HostIntent]) -> None:
        try:
            self.record(self.controllers.apply(intents))
        except Exception:  # the registry catches per intent; this is the last line
            log.exception("applying host intents failed")
