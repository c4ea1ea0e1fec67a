"""A local unix socket that answers "what is the plan, and why?" as JSON.

The seed of the debug API (a later issue grows it into a CLI with why-decisions, events
and dry-run): today `nri-qos lab` uses it to show each container's class and the reason
for every field. The protocol is one command line in, one JSON document out, then close
— trivial to use from `socat` too.

Commands: `plan` (`nri_plugin.views`), `events` (recent decisions), `health`. Every
refusal is a JSON object `{"error": "..."}` followed by close, never a reset.

Who may ask: the socket is created mode 0600, and every accepted connection's peer
credentials (SO_PEERCRED) are checked: root and the daemon's own uid only (the plan names
every pod on the node).

What a query may cost the runtime: the `plan` view is built from the engine's state in
the policy thread — the one thread that also answers the runtime (~30 ms at 1,000
containers). So that a crowd of queries cannot queue up in front of a CreateContainer
(100 concurrent `plan` queries once pushed one to 897 ms; with what follows, a policy
call during such a crowd waits for at most the one build in flight):

* coalescing: at most one plan build is in flight; a query that arrives meanwhile waits
  for that build and shares its answer, instead of queueing another one behind it;
* a short cache: an answer built less than `PLAN_TTL` (1 s) ago is served again as is, so
  the policy thread spends at most one build per second on status queries however often
  they come; the answer is at most that old;
* a cap of `MAX_CLIENTS` (16) open connections: beyond it a client gets an error at once,
  so the loop never holds an unbounded crowd (each connection is also bounded in time:
  `IO_TIMEOUT` to send its command and to read the answer);
* a request line of at most `MAX_LINE` (4 KiB).

The JSON is encoded once per build, off the event loop (an answer at 1,000 containers is
~800 KB), and the cached bytes are what every client gets. Of the simpler choices, a lock
alone still queues one build per query; a cache alone still lets a burst of queries that
all miss it (at start, or once it expires) queue one build each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path

from nri_plugin.events import EventLog
from nri_plugin.plugin import NriPlugin, PluginSetupError

log = logging.getLogger("nri_qos.status")

View = Callable[[], dict[str, object]]

MAX_LINE = 4096  # bytes in one request line
MAX_CLIENTS = 16  # connections open at once
PLAN_TTL = 1.0  # seconds an answered plan is served again
IO_TIMEOUT = 5.0  # seconds for a client to send its command, and to take the answer
PLAN_TIMEOUT = 10.0  # seconds a query waits for the policy thread
LINGER = 1.0  # seconds, and bytes, we take from a client whose request we did not read
LINGER_BYTES = 1 << 20
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class StatusSocketError(PluginSetupError):
    """The status socket path cannot be used; the message says why and what to do."""


def default_allowed_uids() -> frozenset[int]:
    """Root and the uid the daemon runs as."""
    return frozenset({0, os.geteuid()})


def check_socket_path(path: Path) -> bool:
    """Can we listen on `path`? True when a stale socket is there (to be removed).

    Raises StatusSocketError when the path is too long, something other than a socket is
    there (we never delete a file or directory we did not create), or a live server
    answers on it (we never take a running daemon's socket)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise StatusSocketError(
            f"--status-socket {path} is {size} bytes long; a unix socket path can have at "
            f"most {MAX_SOCKET_PATH}: choose a shorter path (e.g. /run/nri-qos/status.sock)"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StatusSocketError(
            f"--status-socket {path}: cannot check the path: {exc.strerror}; "
            "choose a path under a directory nri-qos may write (e.g. /run/nri-qos/status.sock)"
        ) from None
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a socket"
        raise StatusSocketError(
            f"--status-socket {path} exists and is {kind}; nri-qos only replaces a stale "
            "socket: remove it yourself or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # nobody listens: a socket left behind by a daemon that died
    except OSError as exc:
        raise StatusSocketError(
            f"--status-socket {path}: cannot tell whether another process serves it "
            f"({exc.strerror or exc}); stop that process or choose another path"
        ) from None
    finally:
        probe.close()
    raise StatusSocketError(
        f"--status-socket {path}: another process is serving on it (another nri-qos?); "
        "stop it or choose another path"
    )


class StatusServer:
    def __init__(
        self,
        path: Path,
        plugin: NriPlugin,
        plan_view: View,
        events: EventLog | None = None,
        *,
        allowed_uids: Collection[int] | None = None,
        host_view: View | None = None,
        max_clients: int = MAX_CLIENTS,
        plan_ttl: float = PLAN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.plugin = plugin
        self.plan_view = plan_view  # built in the policy thread, from the engine's state
        self.events = events
        self.host_view = host_view  # cheap (a lock held briefly): built on the loop
        self.allowed_uids = (
            frozenset(allowed_uids) if allowed_uids is not None else default_allowed_uids()
        )
        self.max_clients = max_clients
        self.plan_ttl = plan_ttl
        self._clock = clock
        self.clients = 0  # connections being served now
        self.plan_builds = 0  # how many times the plan view was built (for tests, metrics)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._building: asyncio.Future[bytes] | None = None
        self._cached: tuple[float, bytes] | None = None

    async def start(self) -> None:
        """Listen on `path`; raises StatusSocketError (one line) when it cannot."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StatusSocketError(
                f"--status-socket {self.path}: cannot create the directory {parent}: "
                f"{exc.strerror}; create it, or choose a path under an existing directory"
            ) from None
        if check_socket_path(self.path):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket file is created 0600
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            st = self.path.lstat()
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except OSError as exc:
            sock.close()
            raise StatusSocketError(
                f"--status-socket {self.path}: cannot listen there: {exc.strerror or exc}; "
                "choose another path"
            ) from None
        self._inode = (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Remove the socket only if it is still ours.
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        self._inode = None

    # --- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admitted = self.clients < self.max_clients
        if admitted:
            self.clients += 1
        try:
            if not admitted:
                busy = f"busy: {self.clients} status queries are open; try again shortly"
                reply, unread = _error(busy), True
            elif refusal := self._refusal(writer):
                reply, unread = _error(refusal), True
            else:
                reply, unread = await self._request(reader)
            await self._send(reader, writer, reply, unread=unread)
        except Exception:
            log.exception("status socket: serving a query failed")
            writer.transport.abort()
        finally:
            if admitted:
                self.clients -= 1

    def _refusal(self, writer: asyncio.StreamWriter) -> str:
        """Why this peer may not ask ("" when it may)."""
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _gid = _PEERCRED.unpack(raw)
        except (OSError, AttributeError, struct.error) as exc:
            return f"permission denied: cannot read the peer's credentials ({exc})"
        if uid in self.allowed_uids:
            return ""
        allowed = ", ".join(str(u) for u in sorted(self.allowed_uids))
        return (
            f"permission denied: uid {uid} (pid {pid}) may not query nri-qos; "
            f"allowed uids: {allowed} (run the query as root)"
        )

    async def _request(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """The reply, and whether the client may have sent more than we read."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), IO_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # EOF without a newline: the command is what came
        except asyncio.LimitOverrunError:
            return _error(f"request line longer than {MAX_LINE} bytes; send one command"), True
        except (TimeoutError, ConnectionError):
            return _error("no command received"), True
        if not line.strip():
            return _error("no command received"), False
        return await self.answer(line.decode(errors="replace").strip()), False

    async def _send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        data: bytes,
        *,
        unread: bool = False,
    ) -> None:
        """Write the reply and close. When the client's request was not read (a refusal, a
        line too long), first end our side and take what it sends until it closes (at most
        `LINGER` seconds and `LINGER_BYTES`): closing a unix socket with unread input makes
        the peer's next read fail with ECONNRESET, and the client would lose the reply."""
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            if unread and writer.can_write_eof():
                writer.write_eof()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_discard(reader, LINGER_BYTES), LINGER)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # a client that does not read its answer
            return
        writer.close()

    # --- answers ----------------------------------------------------------------------------

    async def answer(self, command: str) -> bytes:
        """The encoded JSON reply (with its newline) to one command."""
        if command == "plan":
            return await self._plan()
        if command == "events":
            log_ = self.events
            return _encode({"events": [asdict(e) for e in log_.snapshot()] if log_ else []})
        if command == "health":
            runtime = self.plugin.runtime
            return _encode(
                {
                    "connected": self.plugin.configured.is_set(),
                    "runtime": None if runtime is None else f"{runtime.name} {runtime.version}",
                    "host": None if self.host_view is None else self.host_view(),
                }
            )
        shown = command if len(command) <= 40 else command[:40] + "…"
        return _error(f"unknown command {shown!r}; use plan, events or health")

    async def _plan(self) -> bytes:
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self.plan_ttl:
            return cached[1]
        building = self._building
        if building is None:
            building = self._building = asyncio.ensure_future(self._build_plan())
        try:
            # shield: a client that goes away must not cancel the build others wait for
            return await asyncio.wait_for(asyncio.shield(building), PLAN_TIMEOUT)
        except TimeoutError:
            return _error(f"the policy is busy: no plan within {PLAN_TIMEOUT:.0f}s; try again")

    async def _build_plan(self) -> bytes:
        try:
            self.plan_builds += 1
            view = await self.plugin.in_policy_thread(self.plan_view)
            data = await asyncio.to_thread(_encode, view)
            self._cached = (self._clock(), data)
            return data
        except Exception as exc:
            log.exception("status socket: building the plan view failed")
            return _error(f"building the plan failed: {type(exc).__name__}: {exc}")
        finally:
            self._building = None


async def _discard(reader: asyncio.StreamReader, budget: int) -> None:
    while budget > 0:
        chunk = await reader.read(65536)
        if not chunk:
            return
        budget -= len(chunk)


def _encode(answer: dict[str, object]) -> bytes:
    return json.dumps(answer, default=str).encode() + b"\n"


def _error(message: str) -> bytes:
    return _encode({"error": message})


async def query(path: Path, command: str, timeout: float = 5.0) -> dict[str, object]:
    """Client side: send one command, read the JSON answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    writer.write(command.encode() + b"\n")
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    answer: dict[str, object] = json.loads(data)
    return answer


__all__ = [
    "MAX_CLIENTS",
    "MAX_LINE",
    "PLAN_TTL",
    "StatusServer",
    "StatusSocketError",
    "check_socket_path",
    "default_allowed_uids",
    "query",
]
