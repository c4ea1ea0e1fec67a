"""The debug API server: gRPC (grpc.aio) on a local unix socket, root and one group only.

Who may call. The plan names every pod on the node and `SetDryRun` changes what the
daemon does, so every call is checked against the caller's kernel-reported credentials
(SO_PEERCRED): root, the daemon's own uid, and — when a group is configured — members of
that group (primary or supplementary, from SO_PEERGROUPS); everyone else gets
PERMISSION_DENIED saying what to do. The socket file is the first gate (mode 0600, or
0660 and owned by the group when one is configured); the credential check is the second
and holds even if the file's mode is loosened by hand.

Why a proxy in front of gRPC. grpc.aio gives a handler the peer only as a string
("unix:" for an unnamed client), never the connection's fd, so SO_PEERCRED cannot be
read from inside gRPC. The public socket is therefore ours: an asyncio unix server that
reads each connection's credentials at accept, then splices its bytes to the gRPC server
listening on a private socket (in a fresh 0700 directory only the daemon's uid can
enter). Each upstream leg is bound to its own name in that directory before it
connects, so gRPC's `context.peer()` is "unix:<that name>"; an interceptor looks the name
up on every call and aborts with the verdict recorded at accept (PERMISSION_DENIED, or
RESOURCE_EXHAUSTED past `MAX_CLIENTS` connections). A refused client thus gets a real
gRPC status with a readable message instead of a reset connection. The cost is one copy
of each byte through the event loop — nothing next to building a view.

What a call may cost the runtime. The plan view is built in the policy thread, the one
that also answers the runtime, exactly as the status socket did: at most one build in
flight (concurrent calls share it), and an answer built less than `PLAN_TTL` ago is
served again, so however often people ask, the policy thread spends at most one build
per second on them. Everything else (host state, signals, events, config) is read on
the event loop without touching the policy thread.

`Events(follow=true)` awaits new events: the decision log gets a listener
(`EventFeed`) that wakes the followers through the loop; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import grp
import inspect
import itertools
import json
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_reflection.v1alpha import reflection

from nri_plugin import __version__
from nri_plugin.debug import DEFAULT_SOCKET
from nri_plugin.debug.proto import debug_pb2 as pb
from nri_plugin.debug.proto import debug_pb2_grpc as pb_grpc
from nri_plugin.debug.readiness import Readiness
from nri_plugin.events import DecisionEvent, EventLog
from nri_plugin.plugin import PluginSetupError

log = logging.getLogger("nri_qos.debug")
_R = TypeVar("_R")

View = Callable[[], dict[str, Any]]

SERVICE = pb.DESCRIPTOR.services_by_name["Debug"].full_name  # "nriqos.debug.v1.Debug"
MAX_CLIENTS = 32  # connections open at once (a follower holds one for as long as it follows)
PLAN_TTL = 1.0  # seconds a built plan view is served again
PLAN_TIMEOUT = 10.0  # seconds a call waits for the policy thread
FOLLOW_BACKLOG = 10_000  # events a follower may fall behind before its stream ends
STOP_GRACE = 1.0  # seconds calls in flight get when the server stops
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path: 108 bytes including the NUL
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; 59 on x86 and arm


class DebugSocketError(PluginSetupError):
    """The debug socket cannot be served; the message says why and what to do."""


# --- the socket path ------------------------------------------------------------------------


def check_socket_path(path: Path, flag: str = "--debug-socket") -> bool:
    """Can we listen on `path`? True when a stale socket is there (to be removed).

    Raises DebugSocketError when the path is too long, something other than a socket is
    there (we never delete a file or directory we did not create), or a live server
    answers on it (we never take a running daemon's socket)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise DebugSocketError(
            f"{flag} {path} is {size} bytes long; a unix socket path can have at "
            f"most {MAX_SOCKET_PATH}: choose a shorter path (e.g. {DEFAULT_SOCKET})"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DebugSocketError(
            f"{flag} {path}: cannot check the path: {exc.strerror}; choose a path under a "
            f"directory nri-qos may write (e.g. {DEFAULT_SOCKET})"
        ) from None
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a socket"
        raise DebugSocketError(
            f"{flag} {path} exists and is {kind}; nri-qos only replaces a stale "
            "socket: remove it yourself or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # nobody listens: a socket left behind by a daemon that died
    except OSError as exc:
        raise DebugSocketError(
            f"{flag} {path}: cannot tell whether another process serves it "
            f"({exc.strerror or exc}); stop that process or choose another path"
        ) from None
    finally:
        probe.close()
    raise DebugSocketError(
        f"{flag} {path}: another process is serving on it (another nri-qos?); "
        "stop it or choose another path"
    )


# --- who is calling ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's credentials as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    groups: frozenset[int] = frozenset()
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return Peer(pid, uid, gid, groups)


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call: root, the daemon's uid, and members of `gid` (when set)."""

    uids: frozenset[int]
    gid: int | None = None

    @classmethod
    def default(cls, gid: int | None = None) -> Access:
        return cls(frozenset({0, os.geteuid()}), gid)

    def refusal(self, peer: Peer) -> str:
        """Why `peer` may not call ("" when it may)."""
        if peer.uid in self.uids:
            return ""
        if self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups):
            return ""
        if self.gid is None:
            how = "run the command as root (sudo nri-qos ...)"
        else:
            how = f"run it as root, or join group {_group_name(self.gid)} (then log in again)"
        who = f"uid {peer.uid} (pid {peer.pid})"
        return f"permission denied: {who} may not use the nri-qos debug API; {how}"


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name!r} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


@dataclass(frozen=True, slots=True)
class _Verdict:
    peer: Peer | None
    code: Any  # grpc.StatusCode: OK when admitted
    message: str = ""


# --- events as they come ----------------------------------------------------------------------


class EventFeed:
    """New decision-log events, delivered to followers on the event loop.

    The log is written from the policy and host threads; a listener installed on this
    log instance (its `add` wrapped) hands each new event to the loop with
    call_soon_threadsafe, where every follower's queue gets it. A follower that falls
    `FOLLOW_BACKLOG` events behind is dropped (its stream ends with RESOURCE_EXHAUSTED)
    rather than growing without bound."""

    def __init__(self, events: EventLog, loop: asyncio.AbstractEventLoop) -> None:
        self.events = events
        self._loop = loop
        self._followers: set[asyncio.Queue[DecisionEvent | None]] = set()
        original = events.add

        def add(kind: str, subject: str, message: str) -> DecisionEvent:
            event = original(kind, subject, message)
            # Wake the loop only for a follower: events come from the policy thread
            # between requests, and each wake would take the GIL from it. No race with
            # `follow`: it registers its queue before it reads the history, and the event
            # is in the history before this looks at the followers.
            if self._followers:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self._publish, event)
            return event

        events.add = add  # type: ignore[method-assign]

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            del self.events.add  # back to the class's own method
        for queue in self._followers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._followers.clear()

    def _publish(self, event: DecisionEvent) -> None:
        for queue in list(self._followers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._followers.discard(queue)

    async def follow(self, since: float = 0.0) -> AsyncIterator[DecisionEvent]:
        """The history (from `since`), then each new event; ends if it falls behind."""
        queue: asyncio.Queue[DecisionEvent | None] = asyncio.Queue(FOLLOW_BACKLOG)
        self._followers.add(queue)  # first, so nothing added meanwhile is missed
        try:
            history = self.events.snapshot()
            seen = {id(e) for e in history}
            for event in history:
                if event.time >= since:
                    yield event
            while True:
                if queue not in self._followers and queue.empty():
                    raise OverflowError(f"fell more than {FOLLOW_BACKLOG} events behind")
                item = await queue.get()
                if item is None:
                    return
                if id(item) in seen:
                    seen.discard(id(item))  # added between subscribing and the snapshot
                    continue
                yield item
        finally:
            self._followers.discard(queue)


# --- what the server reads --------------------------------------------------------------------


class PluginLike(Protocol):
    """What the server reads of `nri_plugin.plugin.NriPlugin`."""

    configured: asyncio.Event

    @property
    def runtime(self) -> Any: ...

    @property
    def channel(self) -> Any: ...

    @property
    def connection(self) -> str: ...

    async def in_policy_thread(self, fn: Callable[[], _R]) -> _R: ...


@dataclass
class DebugSources:
    """Where each answer comes from. `plan_view` runs in the policy thread; the rest are
    cheap and read on the event loop."""

    plugin: PluginLike
    plan_view: View  # nri_plugin.views.policy_view(policy)
    policy_name: str = ""
    host_view: View | None = None  # nri_plugin.views.host_view(executor, protect)
    events: EventLog | None = None
    protect: Any = None  # nri_plugin.protect.ProtectState: the latest signal window
    config: Any = None  # nri_plugin.config.Config: the effective settings
    config_text: str | None = None  # the TOML they were parsed from
    config_source: str = "defaults"
    dry_run: bool = False  # in force at start
    # Switches host changes to dry-run (True) or back. Called on the event loop: it must
    # not block. None: this daemon cannot switch at runtime (SetDryRun is UNIMPLEMENTED).
    set_dry_run: Callable[[bool], object] | None = None
    reconnects: Callable[[], int] | None = None
    readiness: Readiness | None = None  # None: Ready answers from the connection alone


class DebugServer:
    def __init__(
        self,
        path: Path,
        sources: DebugSources,
        *,
        allowed_gid: int | None = None,
        max_clients: int = MAX_CLIENTS,
        plan_ttl: float = PLAN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.sources = sources
        self.access = Access.default(allowed_gid)
        self.allowed_gid = allowed_gid
        self.max_clients = max_clients
        self.plan_ttl = plan_ttl
        self.dry_run = sources.dry_run
        self.clients = 0  # connections open now
        self.plan_builds = 0  # times the plan view was built (for tests)
        self._clock = clock
        self._building: asyncio.Future[dict[str, Any]] | None = None
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._verdicts: dict[str, _Verdict] = {}  # upstream leg name -> verdict at accept
        self._legs = itertools.count()
        self._private: Path | None = None
        self._upstream: Path | None = None
        self._grpc: Any = None  # grpc.aio.Server
        self._gate: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.feed: EventFeed | None = None

    # --- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on `path`; raises DebugSocketError (one line) when it cannot."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DebugSocketError(
                f"--debug-socket {self.path}: cannot create the directory {parent}: "
                f"{exc.strerror}; create it, or choose a path under an existing directory"
            ) from None
        stale = check_socket_path(self.path)
        try:
            await self._start_grpc()
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            await self._start_gate()
        except BaseException:
            await self.stop()
            raise
        if self.sources.events is not None:
            self.feed = EventFeed(self.sources.events, asyncio.get_running_loop())
        log.info("debug API on %s", self.path)

    async def _start_grpc(self) -> None:
        self._private = Path(tempfile.mkdtemp(prefix="nri-qos-debug-"))  # 0700
        self._upstream = self._private / "grpc.sock"
        server = grpc.aio.server(interceptors=[_CheckPeer(self._verdict)])
        pb_grpc.add_DebugServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server)
        if not server.add_insecure_port(f"unix:{self._upstream}"):
            raise DebugSocketError(
                f"--debug-socket {self.path}: gRPC cannot listen on its private socket "
                f"{self._upstream}; check that {tempfile.gettempdir()} is writable"
            )
        await server.start()
        self._grpc = server

    async def _start_gate(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177 if self.allowed_gid is None else 0o117)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            if self.allowed_gid is not None:
                os.chown(self.path, -1, self.allowed_gid)
            st = self.path.lstat()
            self._gate = await asyncio.start_unix_server(self._accept, sock=sock)
        except OSError as exc:
            sock.close()
            raise DebugSocketError(
                f"--debug-socket {self.path}: cannot listen there: {exc.strerror or exc}; "
                "choose another path"
            ) from None
        self._inode = (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        if self.feed is not None:
            self.feed.close()
            self.feed = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        if self._grpc is not None:
            await self._grpc.stop(STOP_GRACE)
            self._grpc = None
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        with contextlib.suppress(OSError):  # remove the socket only if it is still ours
            st = self.path.lstat()
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        self._inode = None
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    # --- the gate -----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        self.clients += 1
        leg = ""
        upstream: asyncio.StreamWriter | None = None
        try:
            verdict = self._judge(writer.get_extra_info("socket"))
            assert self._private is not None and self._upstream is not None
            leg = str(self._private / f"leg-{next(self._legs)}")
            self._verdicts[leg] = verdict
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(leg)  # gRPC sees this name as the peer
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, str(self._upstream))
            except OSError:
                sock.close()
                raise
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(leg)  # the bound name stays on the socket
            up_reader, upstream = await asyncio.open_unix_connection(sock=sock)
            await asyncio.gather(_splice(reader, upstream), _splice(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("debug API connection ended: %s", exc)
        finally:
            self.clients -= 1
            self._verdicts.pop(leg, None)
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._pumps.discard(task)

    def _judge(self, sock: socket.socket) -> _Verdict:
        try:
            peer = peer_of(sock)
        except (OSError, AttributeError, struct.error) as exc:
            return _Verdict(
                None,
                grpc.StatusCode.PERMISSION_DENIED,
                f"permission denied: cannot read the caller's credentials ({exc})",
            )
        refusal = self.access.refusal(peer)
        if refusal:
            log.warning("debug API: %s", refusal)
            return _Verdict(peer, grpc.StatusCode.PERMISSION_DENIED, refusal)
        if self.clients > self.max_clients:
            return _Verdict(
                peer,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"busy: {self.clients - 1} debug API connections are open; try again shortly",
            )
        return _Verdict(peer, grpc.StatusCode.OK)

    def _verdict(self, grpc_peer: str) -> _Verdict:
        name = grpc_peer.removeprefix("unix:")
        verdict = self._verdicts.get(name)
        if verdict is None:  # not through the gate: nothing else can reach the private socket
            return _Verdict(None, grpc.StatusCode.PERMISSION_DENIED, "permission denied")
        return verdict

    def peer(self, context: Any) -> Peer | None:
        """The credentials of the caller of `context`'s call."""
        return self._verdict(context.peer()).peer

    # --- the plan view: one build at a time, and a short cache --------------------------------

    async def plan(self) -> dict[str, Any]:
        """The plan view; raises TimeoutError when the policy thread is busy too long."""
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self.plan_ttl:
            return cached[1]
        building = self._building
        if building is None:
            building = self._building = asyncio.ensure_future(self._build_plan())
        # shield: a caller that goes away must not cancel the build others wait for
        return await asyncio.wait_for(asyncio.shield(building), PLAN_TIMEOUT)

    async def _build_plan(self) -> dict[str, Any]:
        try:
            self.plan_builds += 1
            view = await self.sources.plugin.in_policy_thread(self.sources.plan_view)
            self._cached = (self._clock(), view)
            return view
        finally:
            self._building = None

    def switch_dry_run(self, on: bool, who: Peer | None) -> pb.SetDryRunReply:
        setter = self.sources.set_dry_run
        previous = self.dry_run
        if setter is None:
            raise _Refused(
                grpc.StatusCode.UNIMPLEMENTED,
                "this daemon was started without a dry-run switch; set dry_run in its "
                "config and restart it",
            )
        setter(on)
        self.dry_run = on
        state = "on: host changes are recorded and logged, not made" if on else "off"
        by = f"uid {who.uid} (pid {who.pid})" if who is not None else "an unknown caller"
        message = f"dry-run {state} (switched by {by})"
        log.warning("%s", message)
        if self.sources.events is not None:
            self.sources.events.add("host", "dry-run", message)
        return pb.SetDryRunReply(dry_run=on, previous=previous, message=message)


class _Refused(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, at the pace the other side reads (drain)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# --- the per-call check ---------------------------------------------------------------------


class _CheckPeer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks every call (the reflection service's too) against the verdict the gate
    recorded for its connection."""

    def __init__(self, verdict: Callable[[str], _Verdict]) -> None:
        self._verdict = verdict

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return _guarded(handler, self._verdict)


def _guarded(handler: Any, verdict_of: Callable[[str], _Verdict]) -> Any:
    async def check(context: Any) -> None:
        verdict = verdict_of(context.peer())
        if verdict.code != grpc.StatusCode.OK:
            await context.abort(verdict.code, verdict.message)

    io = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await check(context)
            return await _result(inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **io)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await check(context)
            return await _result(inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **io)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        await check(context)
        result = inner(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in await _result(result) or ():
                yield item

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **io)
    return grpc.stream_stream_rpc_method_handler(streaming, **io)


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --- the answers ------------------------------------------------------------------------------


class _Servicer(pb_grpc.DebugServicer):  # type: ignore[misc]
    def __init__(self, server: DebugServer) -> None:
        self.server = server
        self.sources = server.sources

    async def _plan(self, context: Any) -> dict[str, Any]:
        try:
            return await self.server.plan()
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the policy is busy: no plan within {PLAN_TIMEOUT:.0f}s; try again",
            )
        except Exception as exc:
            log.exception("debug API: building the plan view failed")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"building the plan failed: {type(exc).__name__}: {exc}",
            )
        raise AssertionError("unreachable: abort raises")

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        src = self.sources
        plugin = src.plugin
        runtime = plugin.runtime
        reply = pb.StatusReply(
            version=__version__,
            connection=plugin.connection,
            reconnects=src.reconnects() if src.reconnects is not None else 0,
            policy=src.policy_name,
            dry_run=self.server.dry_run,
        )
        if runtime is not None:
            reply.runtime_name = runtime.name
            reply.runtime_version = runtime.version
            reply.nri_version = str(runtime.nri_version)
        host = src.host_view() if src.host_view is not None else {}
        for c in host.get("controllers", []):
            reply.controllers.append(
                pb.Controller(
                    name=c["name"],
                    mode=c["mode"],
                    enabled=c["enabled"],
                    reason=c["reason"],
                    applied=c["applied"],
                    failed=c["failed"],
                    refused=c["refused"],
                    last_error=c["last_error"],
                )
            )
        signals = host.get("signals") or {}
        reply.runq_backend = signals.get("runq_backend", "")
        reply.runq_reason = signals.get("runq_reason", "")
        reply.signal_windows = signals.get("windows", 0)
        reply.signal_sources.extend(_sources(signals.get("sources", {})))
        reply.pod_spec_roles = host.get("pod_spec_roles", "")
        if host:
            ex = reply.executor
            ex.stalled = host.get("stalled", False)
            ex.queued = host.get("queued", 0)
            ex.retries_pending = host.get("retries_pending", 0)
            ex.counts.update(host.get("counts", {}))
            ex.quarantined.update(host.get("quarantined", {}))
            for s in host.get("stuck", []):
                ex.stuck.append(pb.StuckIo(path=s["path"], job=s["job"], seconds=s["seconds"]))
        return reply

    async def Ready(self, request: pb.ReadyRequest, context: Any) -> pb.ReadyReply:
        readiness = self.sources.readiness
        if readiness is None:
            readiness = Readiness(self.sources.plugin)
        state = readiness.check()
        return pb.ReadyReply(
            ready=state.ready,
            reason=state.reason,
            connection=state.connection,
            synchronized=state.synchronized,
            fail_open_recent=state.fail_open_recent,
        )

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Any
    ) -> pb.ListContainersReply:
        plan = await self._plan(context)
        reply = pb.ListContainersReply(policy=str(plan.get("policy", "")))
        for cid, view in (plan.get("containers") or {}).items():
            reply.containers.append(container_message(cid, view))
        pools = plan.get("pools") or {}
        reasons = pools.get("reasons", {})
        for key in ("system", "shared", "reclaimed"):
            if key in pools:
                reply.pools.append(pb.Pool(name=key, cpus=pools[key], reason=reasons.get(key, "")))
        for kind in ("named", "dedicated"):
            for name, cpus in (pools.get(kind) or {}).items():
                label = f"shared:{name}" if kind == "named" else f"dedicated:{name}"
                reason = reasons.get(label, reasons.get(name, ""))
                reply.pools.append(pb.Pool(name=label, cpus=cpus, reason=reason))
        reply.online_demand_millicores = int(pools.get("online_demand_millicores") or 0)
        if request.include_plan_json:
            reply.plan_json = await asyncio.to_thread(json.dumps, plan, default=str)
        return reply

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainReply:
        plan = await self._plan(context)
        containers: dict[str, dict[str, Any]] = plan.get("containers") or {}
        try:
            cid = find_container(containers, request.query)
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
            raise AssertionError("unreachable: abort raises") from None
        view = containers[cid]
        reply = pb.ExplainReply(container=container_message(cid, view))
        name = view.get("name", "")
        if self.sources.events is not None:
            for e in self.sources.events.snapshot():
                if e.subject in (cid, name):
                    reply.events.append(_event(e))
        interference = plan.get("interference") or {}
        for d in interference.get("detections", []):
            if d["victim"] == name or name in (a["name"] for a in d["antagonists"]):
                reply.detections.append(_detection(d))
        for r in _rungs(interference):
            if r.victim == name or name in r.on:
                reply.rungs.append(r)
        return reply

    async def Events(self, request: pb.EventsRequest, context: Any) -> AsyncIterator[pb.Event]:
        events = self.sources.events
        if events is None:
            return
        if not request.follow:
            for e in events.snapshot():
                if e.time >= request.since:
                    yield _event(e)
            return
        feed = self.server.feed
        assert feed is not None
        try:
            async for e in feed.follow(request.since):
                yield _event(e)
        except OverflowError as exc:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; follow again to catch up"
            )

    async def Signals(self, request: pb.SignalsRequest, context: Any) -> pb.SignalsReply:
        plan = await self._plan(context)
        protect = self.sources.protect
        reply = pb.SignalsReply()
        names = {cid: v.get("name", cid) for cid, v in (plan.get("containers") or {}).items()}
        if protect is not None:
            reply.window = protect.windows
            reply.runq_backend = protect.runq_source
            reply.sources.extend(_sources(protect.sources))
            snapshot = protect.last
            if snapshot is not None:
                reply.end_s = snapshot.end_s
                reply.window_s = snapshot.window_s
                for cid, s in sorted(
                    snapshot.containers.items(), key=lambda i: names.get(i[0], i[0])
                ):
                    reply.containers.append(
                        _signals(cid, names.get(cid, cid), s, snapshot.window_s)
                    )
        interference = plan.get("interference") or {}
        reply.detections.extend(_detection(d) for d in interference.get("detections", []))
        reply.rungs.extend(_rungs(interference))
        return reply

    async def Numa(self, request: pb.NumaRequest, context: Any) -> pb.NumaReply:
        plan = await self._plan(context)
        reply = pb.NumaReply()
        for node, r in sorted((plan.get("reclaimable") or {}).items(), key=lambda i: int(i[0])):
            reply.nodes.append(
                pb.NumaNode(
                    node=int(node),
                    cpus=r["cpus"],
                    millicores=r["millicores"],
                    memory_bytes=r["memory_bytes"],
                    reason=r["reason"],
                )
            )
        return reply

    async def Config(self, request: pb.ConfigRequest, context: Any) -> pb.ConfigReply:
        src = self.sources
        reply = pb.ConfigReply(
            format=request.format, source=src.config_source, dry_run=self.server.dry_run
        )
        if request.format == pb.CONFIG_FORMAT_TOML:
            reply.text = src.config_text or ""
        else:
            settings = _plain(src.config) if src.config is not None else {}
            reply.text = json.dumps(settings, indent=2, sort_keys=True, default=str)
        return reply

    async def SetDryRun(self, request: pb.SetDryRunRequest, context: Any) -> pb.SetDryRunReply:
        try:
            return self.server.switch_dry_run(request.on, self.server.peer(context))
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
        except Exception as exc:
            log.exception("debug API: switching dry-run failed")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"switching dry-run failed: {type(exc).__name__}: {exc}"
            )
        raise AssertionError("unreachable: abort raises")


# --- views to messages ------------------------------------------------------------------------


def container_message(cid: str, view: dict[str, Any]) -> pb.Container:
    full = str(view.get("name", ""))
    parts = full.split("/")
    msg = pb.Container(
        id=cid,
        pod="/".join(parts[:-1]),
        name=parts[-1],
        full_name=full,
        qos_class=str(view.get("class", "")),
        pool=str(view.get("pool", "")),
        cpus=str(view.get("cpus", "")),
        mems=str(view.get("mems") or ""),
        oom_score_adj=int(view.get("oom_score_adj") or 0),
        classification=str(view.get("classification", "")),
    )
    if view.get("cpu_shares") is not None:
        msg.cpu_shares = int(view["cpu_shares"])
    if view.get("rdt_class") is not None:
        msg.rdt_class = str(view["rdt_class"])
    if view.get("io_weight") is not None:
        msg.io_weight = int(view["io_weight"])
    if view.get("net_class") is not None:
        msg.net_class = str(view["net_class"])
    msg.reasons.update({k: str(v) for k, v in (view.get("reasons") or {}).items()})
    return msg


def find_container(containers: dict[str, dict[str, Any]], query: str) -> str:
    """The one container `query` names: an exact id or full name first, else every
    container whose id starts with it, whose name is it, or whose "pod/container" or
    "namespace/pod/container" ends with it. Raises _Refused (NOT_FOUND, or
    FAILED_PRECONDITION listing the candidates)."""
    query = query.strip()
    if not query:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "name a container: id prefix, name or pod/container"
        )
    for cid, view in containers.items():
        if query in (cid, view.get("name")):
            return cid
    matches = []
    for cid, view in containers.items():
        full = str(view.get("name", ""))
        if (
            cid.startswith(query)
            or full.split("/")[-1] == query
            or ("/" in query and full.endswith("/" + query))
        ):
            matches.append(cid)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise _Refused(
            grpc.StatusCode.NOT_FOUND,
            f"no container matches {query!r}; `nri-qos pods` lists them",
        )
    shown = ", ".join(f"{containers[c].get('name', '')} ({c[:12]})" for c in sorted(matches)[:10])
    more = f" and {len(matches) - 10} more" if len(matches) > 10 else ""
    raise _Refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{query!r} matches {len(matches)} containers: {shown}{more}; "
        "give more of the id, or pod/container",
    )


def _event(e: DecisionEvent) -> pb.Event:
    return pb.Event(time=e.time, kind=e.kind, subject=e.subject, message=e.message)


def _sources(sources: Any) -> Iterable[pb.SignalSource]:
    for kind, a in sorted(sources.items()):
        if isinstance(a, dict):
            yield pb.SignalSource(kind=kind, source=a.get("source", ""), reason=a.get("reason", ""))
        else:
            yield pb.SignalSource(kind=kind, source=a.source, reason=a.reason)


def _detection(d: dict[str, Any]) -> pb.Detection:
    msg = pb.Detection(
        victim=d["victim"],
        verdict=d["verdict"],
        delay_ms=d["delay_ms"],
        threshold_ms=d["threshold_ms"],
        windows=d["windows"],
        confidence=d["confidence"],
        reason=d["reason"],
    )
    if d.get("cpu_pressure") is not None:
        msg.cpu_pressure = d["cpu_pressure"]
    for a in d.get("antagonists", []):
        msg.antagonists.append(pb.Antagonist(name=a["name"], score=a["score"], reason=a["reason"]))
    return msg


def _rungs(interference: dict[str, Any]) -> list[pb.Rung]:
    return [
        pb.Rung(victim=victim, rung=r["rung"], on=r["on"])
        for victim, rungs in (interference.get("rungs") or {}).items()
        for r in rungs
    ]


def _signals(cid: str, name: str, s: Any, window_s: float) -> pb.ContainerSignals:
    msg = pb.ContainerSignals(id=cid, name=name)
    if s.runq is not None:
        msg.runq_p90_us = s.runq.quantile_ns(0.9) / 1000
        msg.runq_mean_us = s.runq.mean_ns / 1000
    for field, pressure in (
        ("cpu_pressure", s.cpu_pressure),
        ("memory_pressure", s.memory_pressure),
        ("io_pressure", s.io_pressure),
    ):
        if pressure is not None:
            setattr(msg, field, pressure.some)
    if s.cpu_usage_ns is not None and window_s > 0:
        msg.cpu_cores = s.cpu_usage_ns / (window_s * 1e9)
    if s.throttling is not None:
        msg.throttled_ratio = s.throttling.ratio
    if s.memory is not None:
        msg.memory_bytes = s.memory.usage_bytes
    if s.cpi is not None:
        msg.cpi = s.cpi
    return msg


def _plain(value: Any) -> Any:
    """The config's dataclass tree as JSON-ready values (sets sorted, paths as text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --- for the daemon ---------------------------------------------------------------------------


async def start_debug_server(
    path: Path,
    plugin: Any,
    policy: Any,
    executor: Any,
    *,
    protect: Any = None,
    config: Any = None,
    config_text: str | None = None,
    config_source: str = "defaults",
    set_dry_run: Callable[[bool], object] | None = None,
    allowed_gid: int | None = None,
    pod_spec: Any = None,
) -> DebugServer:
    """Serve the debug API on `path` for a running daemon, and return the server (stop it
    with `await server.stop()` at shutdown).

    `plugin` is the NriPlugin (its policy thread builds the plan view), `policy` the
    PolicyBase it runs, `executor` the HostExecutor (controllers, host work, the decision
    log), `protect` the ProtectState of the interference loop, `config` the effective
    Config and `config_text`/`config_source` the TOML it was parsed from and where that
    came from. `set_dry_run(on)` switches host changes to dry-run or back; it is called on
    the event loop and must not block (None: SetDryRun answers UNIMPLEMENTED).
    `allowed_gid`: members of this group may call too (the socket becomes 0660 and owned
    by it). `pod_spec`: the PodSpecStatus of the pod-spec watch (None: not built).
    Raises DebugSocketError (a PluginSetupError, one line) when it cannot listen."""
    from nri_plugin.views import host_view, policy_view

    metrics = getattr(plugin, "metrics", None)

    def reconnects() -> int:
        if metrics is None:
            return 0
        made = metrics.registry.get_sample_value(
            "nri_qos_runtime_connections_total", {"outcome": "connected"}
        )
        return max(0, int(made or 0) - 1)

    readiness = Readiness(plugin)
    sources = DebugSources(
        plugin=plugin,
        plan_view=lambda: policy_view(policy),
        policy_name=str(getattr(policy, "name", "")),
        host_view=lambda: host_view(executor, protect, pod_spec),
        events=executor.events,
        protect=protect,
        config=config,
        config_text=config_text,
        config_source=config_source,
        dry_run=bool(getattr(config, "dry_run", False)),
        set_dry_run=set_dry_run,
        reconnects=reconnects,
        readiness=readiness,
    )
    server = DebugServer(path, sources, allowed_gid=allowed_gid)
    await server.start()
    return server


__all__ = [
    "DEFAULT_SOCKET",
    "MAX_CLIENTS",
    "PLAN_TTL",
    "Access",
    "DebugServer",
    "DebugSocketError",
    "DebugSources",
    "EventFeed",
    "Peer",
    "check_socket_path",
    "find_container",
    "start_debug_server",
]
