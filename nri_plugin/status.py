"""A local unix socket that answers "what is the plan, and why?" as JSON.

The seed of the debug API (a later issue grows it into a CLI with why-decisions, events
and dry-run): today `nri-qos lab` uses it to show each container's class and the reason
for every field. The protocol is one command line in, one JSON document out, then close
— trivial to use from `socat` too. The socket is created mode 0600 (root only): the plan
names every pod on the node.

Commands: `plan` (`nri_plugin.views`), `events` (recent decisions), `health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from nri_plugin.events import EventLog
from nri_plugin.plugin import NriPlugin

View = Callable[[], dict[str, object]]

MAX_REQUEST = 256


class StatusServer:
    def __init__(
        self, path: Path, plugin: NriPlugin, plan_view: View, events: EventLog | None = None
    ) -> None:
        self.path = path
        self.plugin = plugin
        self.plan_view = plan_view  # built in the policy thread, from the engine's state
        self.events = events
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            reply = await self._answer(line[:MAX_REQUEST].decode(errors="replace").strip())
        except (TimeoutError, ConnectionError):
            reply = {"error": "no command received"}
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _answer(self, command: str) -> dict[str, object]:
        if command == "plan":
            return await self.plugin.in_policy_thread(self.plan_view)
        if command == "events":
            log = self.events
            return {"events": [asdict(e) for e in log.snapshot()] if log else []}
        if command == "health":
            runtime = self.plugin.runtime
            return {
                "connected": self.plugin.configured.is_set(),
                "runtime": None if runtime is None else f"{runtime.name} {runtime.version}",
            }
        return {"error": f"unknown command {command!r}; use plan, events or health"}


async def query(path: Path, command: str, timeout: float = 5.0) -> dict[str, object]:
    """Client side: send one command, read the JSON answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    writer.write(command.encode() + b"\n")
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    answer: dict[str, object] = json.loads(data)
    return answer
