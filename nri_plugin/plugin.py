"""The plugin runtime: one asyncio connection to containerd/CRI-O, kept alive.

Responsibilities, in the order a connection lives them:
- connect (external: unix socket path; pre-installed: the fd in NRI_PLUGIN_SOCKET),
- register, and serve Configure even before the RegisterPlugin reply arrives,
- answer every request well inside the runtime's deadline: the policy runs in one
  worker thread under a budget derived from the request's `timeout_nano`; when it is
  late or raises, the runtime gets a reply that changes nothing (fail-open), we log it
  and count it — a pod start is never blocked or failed by us,
- send UpdateContainers only after the reply that produced the updates is written
  (a call from inside an event deadlocks the runtime's NRI lock),
- on EOF or corruption drop all per-connection state and, for an external plugin,
  reconnect with capped exponential back-off; the runtime re-sends Configure and a full
  Synchronize, from which the policy rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from nri_plugin import dispatch
from nri_plugin.channel import Ending, NriChannel
from nri_plugin.metrics import Metrics
from nri_plugin.policy.api import PolicyBase
from nri_plugin.policy.intents import Intents
from nri_plugin.protocol import convert, services
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import BadRequest, RequestReceived, ResponseReceived, Role
from nri_plugin.protocol.errors import Code, ProtocolError, RpcError
from qos_model.containers import BulkUpdate, Update, flat_updates
from qos_model.runtime import RuntimeInfo

log = logging.getLogger("nri_qos.plugin")
_R = TypeVar("_R")

DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
# The protocol level we implement; runtimes log it, none reject on it.
NRI_VERSION = "v0.12.2"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_IDX_RE = re.compile(r"^[0-9]{2}$")

ENABLE_NRI_HINT = """\
Is NRI enabled in the container runtime?
  containerd 1.7 (NRI is off by default): in /etc/containerd/config.toml set
      [plugins."io.containerd.nri.v1.nri"]
        disable = false
        disable_connections = false
        socket_path = "/var/run/nri/nri.sock"
    then `systemctl restart containerd`.
  containerd 2.x: NRI is on by default; check that `disable = true` is not set in the
    same section (plugins."io.containerd.nri.v1.nri") and that the socket path matches.
  CRI-O >= 1.30: on by default; else set `enable_nri = true` in the [crio.nri] table.
Pass --socket PATH if the runtime listens elsewhere."""


class PluginSetupError(Exception):
    """A configuration problem the user must fix; the message says how."""


class RuntimeUnavailable(PluginSetupError):
    """The runtime's NRI socket is missing or refuses connections."""


class NotConnected(Exception):
    """No configured runtime connection to send on right now."""


@dataclass(frozen=True, slots=True)
class PluginSettings:
    name: str = "nri-qos"
    idx: str = "50"
    socket_path: Path = DEFAULT_SOCKET
    # Hard cap on one policy call, and the share of the runtime's remaining deadline we
    # allow ourselves; the rest is margin for the reply to reach the runtime.
    handler_budget: float = 1.0
    deadline_fraction: float = 0.5
    # How long to wait for Configure after connecting (the runtime's registration
    # timeout is 5 s by default).
    registration_timeout: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise PluginSetupError(
                f"plugin name {self.name!r} is invalid: use letters, digits and _ . + - "
                "(NRI v0.12 runtimes refuse anything else)"
            )
        if not _IDX_RE.match(self.idx):
            raise PluginSetupError(
                f"plugin index {self.idx!r} is invalid: it must be exactly two digits, "
                "00-99 (plugins run in ascending index order)"
            )
        if not 0 < self.deadline_fraction <= 1 or self.handler_budget <= 0:
            raise PluginSetupError("handler_budget must be > 0 and deadline_fraction in (0, 1]")


class Backoff:
    """Capped exponential back-off with jitter, so a fleet does not reconnect in lockstep."""

    def __init__(
        self,
        initial: float,
        cap: float,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self._rng = rng
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay * (1 + self.jitter * (2 * self._rng() - 1))

    @property
    def at_cap(self) -> bool:
        return self._next >= self.cap

    def reset(self) -> None:
        self._next = self.initial


@dataclass(frozen=True, slots=True)
class SessionEnd:
    configured: bool  # did the runtime get as far as Configure?
    reason: str


async def connect_unix(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(path))
    except FileNotFoundError:
        raise RuntimeUnavailable(f"NRI socket {path} does not exist.\n{ENABLE_NRI_HINT}") from None
    except ConnectionRefusedError:
        raise RuntimeUnavailable(
            f"NRI socket {path} refused the connection (is the runtime running?).\n"
            f"{ENABLE_NRI_HINT}"
        ) from None
    except PermissionError:
        raise RuntimeUnavailable(
            f"no permission to connect to {path}: run nri-qos as root"
        ) from None


IntentSink = Callable[[Intents], None]
"""Carries out a request's intents after its reply (notes, host intents); must not block."""


class NriPlugin:
    def __init__(
        self,
        policy: PolicyBase,
        settings: PluginSettings,
        metrics: Metrics | None = None,
        on_intents: IntentSink | None = None,
    ) -> None:
        settings.validate()
        self.policy = policy
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_intents = on_intents
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nri-policy")
        self._session: _Session | None = None
        self._stopping = asyncio.Event()
        self.configured = asyncio.Event()  # set while a runtime connection is configured

    @property
    def runtime(self) -> RuntimeInfo | None:
        return self._session.runtime if self._session else None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SessionEnd:
        """Serve one runtime connection until it ends."""
        session = _Session(self, reader, writer)
        self._session = session
        try:
            return await session.run()
        finally:
            self._session = None
            self.configured.clear()
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.policy.disconnected
            )

    async def run(self, wait_for_runtime: bool = True) -> None:
        """External mode: connect, serve, and reconnect with back-off until stop()."""
        s = self.settings
        backoff = Backoff(s.backoff_initial, s.backoff_max)
        first_failure = True
        while not self._stopping.is_set():
            try:
                reader, writer = await connect_unix(s.socket_path)
            except RuntimeUnavailable as exc:
                self.metrics.connections.labels("unavailable").inc()
                if not wait_for_runtime:
                    raise
                delay = backoff.next()
                if first_failure or backoff.at_cap:
                    log.error("%s\nRetrying in %.1fs.", exc, delay)
                else:
                    log.info(
                        "runtime still unavailable at %s; retry in %.1fs", s.socket_path, delay
                    )
                first_failure = False
                await self._sleep(delay)
                continue
            first_failure = True
            self.metrics.connections.labels("connected").inc()
            end = await self.serve(reader, writer)
            if end.configured:
                backoff.reset()
            if self._stopping.is_set():
                break
            delay = backoff.next()
            log.warning("runtime connection ended (%s); reconnecting in %.1fs", end.reason, delay)
            await self._sleep(delay)

    async def run_inherited(self, fd: int) -> SessionEnd:
        """Pre-installed mode: serve the socket the runtime handed us, once.

        The fd cannot be re-established, so when it ends the plugin exits (the runtime
        starts pre-installed plugins only at its own start-up)."""
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.metrics.connections.labels("inherited").inc()
        return await self.serve(reader, writer)

    async def in_policy_thread(self, fn: Callable[[], _R]) -> _R:
        """Run `fn` in the policy thread, serialized with every request handler, so
        out-of-band work (e.g. rebalancing on usage) sees a consistent policy state."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def update_containers(self, updates: Sequence[Update | BulkUpdate]) -> None:
        """Ask the runtime to change running containers (never call from a policy hook)."""
        session = self._session
        if session is None or not self.configured.is_set():
            raise NotConnected("no configured runtime connection")
        await session.update_containers(updates)

    def stop(self) -> None:
        self._stopping.set()
        if self._session is not None:
            self._session.close("stopping")

    def close(self) -> None:
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


class _Session:
    """State of one connection; dropped entirely when the connection ends."""

    def __init__(
        self, plugin: NriPlugin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.plugin = plugin
        self.channel = NriChannel(
            Role.PLUGIN,
            reader,
            writer,
            self._received,
            on_bad_request=self._refused,
            on_close=self._closed,
        )
        self.conn = self.channel.conn
        self.sync = dispatch.SyncCollector()
        self.runtime: RuntimeInfo | None = None
        self.request_timeout = 0.0  # seconds, from Configure (v0.7+)
        self.tasks: set[asyncio.Task[None]] = set()  # deferred updates; the channel has handlers
        self.end_reason = "runtime closed the connection"
        self.configured = False

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> SessionEnd:
        settings = self.plugin.settings
        read_task = self.channel.start()
        register = asyncio.create_task(self._register())
        configured = asyncio.create_task(self.plugin.configured.wait())
        # Configure may arrive before the RegisterPlugin reply: the read loop serves it
        # meanwhile. Wait for both, unless the connection ends first.
        both: asyncio.Future[Any] = asyncio.gather(register, configured)
        try:
            watched: set[asyncio.Future[Any]] = {read_task, both}
            done, _ = await asyncio.wait(
                watched,
                timeout=settings.registration_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                self.end_reason = (
                    "no Configure from the runtime within "
                    f"{settings.registration_timeout:.1f}s of connecting"
                )
            elif not read_task.done():
                register.result()
                rt = self.runtime
                assert rt is not None
                log.info(
                    "registered as %s-%s with %s %s (NRI %s: %s)",
                    settings.idx,
                    settings.name,
                    rt.name,
                    rt.version,
                    rt.nri_version,
                    rt.reason,
                )
                await read_task
        except RpcError as exc:
            self.end_reason = f"runtime refused registration: {exc}"
            log.error("the runtime refused to register %s-%s: %s", settings.idx, settings.name, exc)
        except (ConnectionError, TimeoutError, ProtocolError) as exc:
            self.end_reason = f"registration failed: {exc or type(exc).__name__}"
        finally:
            self.close(self.end_reason)
            for task in (register, configured, both, *self.tasks):
                task.cancel()
            await asyncio.gather(both, return_exceptions=True)
            await self.channel.wait_closed()
        return SessionEnd(self.configured, self.end_reason)

    def close(self, reason: str) -> None:
        self.channel.close(reason)

    async def _register(self) -> None:
        s = self.plugin.settings
        request = pb.RegisterPluginRequest(
            plugin_name=s.name, plugin_idx=s.idx, NRI_version=NRI_VERSION
        )
        reply = await self.call("RegisterPlugin", request, s.registration_timeout)
        if reply.code != Code.OK:
            raise RpcError(reply.code, reply.message)

    # --- reading ---------------------------------------------------------------------------

    def _received(self, event: RequestReceived) -> Coroutine[Any, Any, None]:
        return self._serve(event, time.monotonic())

    def _refused(self, event: BadRequest) -> None:
        """The channel answers it; we count and log it."""
        self.plugin.metrics.protocol_errors.labels("bad_request").inc()
        log.warning("refusing request on stream %d: %s", event.stream_id, event.message)

    def _closed(self, ending: Ending, reason: str) -> None:
        """The first reason the connection ended is the session's; a broken stream counts."""
        self.end_reason = reason
        if ending is Ending.TRUNCATED:
            self.plugin.metrics.protocol_errors.labels("truncated").inc()
        elif ending is Ending.CORRUPT:
            self.plugin.metrics.protocol_errors.labels("corrupt").inc()
            log.error("runtime sent corrupt data, dropping the connection (%s)", reason)

    # --- serving ---------------------------------------------------------------------------

    def _budget(self, timeout_nano: int) -> float:
        s = self.plugin.settings
        remaining = timeout_nano / 1e9 if timeout_nano > 0 else self.request_timeout
        if remaining <= 0:
            return s.handler_budget
        return max(0.001, min(s.handler_budget, remaining * s.deadline_fraction))

    async def _serve(self, event: RequestReceived, received: float) -> None:
        plugin = self.plugin
        metrics = plugin.metrics
        method = services.lookup(event.service, event.method)
        if method is None or event.service != services.PLUGIN_SERVICE:
            # Go's wording; NRI v0.12 runtimes fall back to StateChange on this code.
            what = (
                f"method {event.method}"
                if event.service == services.PLUGIN_SERVICE
                else f"service {event.service}"
            )
            self._write(self.conn.send_error(event.stream_id, Code.UNIMPLEMENTED, what))
            return
        name = method.name
        metrics.requests.labels(name).inc()
        budget = self._budget(event.timeout_nano)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(plugin._executor, self._handle, method, event.payload)
        request: Message | None = None
        try:
            done, _ = await asyncio.wait({job}, timeout=budget)
            if not done:
                raise TimeoutError
            request, outcome = job.result()
        except TimeoutError:
            # The call goes on in the policy thread and its state change stands: carry out
            # what it asked of others when it ends (its own reply is gone).
            job.add_done_callback(functools.partial(self._late, name))
            metrics.fail_open.labels(name, "deadline").inc()
            log.warning(
                "%s: policy did not answer within %.0f ms; replying with no change "
                "(the runtime's deadline is %.0f ms)",
                name,
                budget * 1000,
                event.timeout_nano / 1e6,
            )
            request = _decode_quietly(method, event.payload)
            outcome = dispatch.fail_open(method, request, plugin.policy)
        except _HandlerFailed as exc:
            request = exc.request
            reason = "decode" if request is None else "error"
            metrics.fail_open.labels(name, reason).inc()
            log.error("%s: %s; replying with no change", name, exc.message, exc_info=exc.__cause__)
            outcome = dispatch.fail_open(method, request, plugin.policy)
        self._after_configure(outcome, request)
        self._write(self.conn.send_response(event.stream_id, outcome.reply.SerializeToString()))
        metrics.request_seconds.labels(name).observe(time.monotonic() - received)
        self._carry_out(outcome.intents)
        if name == "Shutdown":
            self.close("runtime sent Shutdown")

    def _handle(self, method: services.Method, payload: bytes) -> tuple[Message, dispatch.Outcome]:
        """Runs in the policy thread: decode, call the policy, build the reply."""
        try:
            request = services.decode(method.request, payload, method.name)
        except ProtocolError as exc:
            raise _HandlerFailed(None, str(exc)) from exc
        try:
            return request, dispatch.handle(self.plugin.policy, method, request, self.sync)
        except Exception as exc:
            raise _HandlerFailed(request, f"policy raised {type(exc).__name__}: {exc}") from exc

    def _carry_out(self, intents: Intents) -> None:
        """After the reply: updates of live containers go out with UpdateContainers (never
        from inside the event), the rest to the sink (notes, host intents)."""
        if intents.updates:
            task = asyncio.create_task(self._send_deferred(intents.updates))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        sink = self.plugin.on_intents
        if sink is not None and (intents.host or intents.notes):
            try:
                sink(intents)
            except Exception:
                log.exception("carrying out intents failed")

    def _late(self, name: str, job: asyncio.Future[tuple[Message, dispatch.Outcome]]) -> None:
        """A policy call that missed its deadline ended: carry out its other intents."""
        if job.cancelled() or job.exception() is not None or self.channel.closed:
            return
        _, outcome = job.result()
        log.info("%s: the late policy call ended; carrying out its other intents", name)
        self._carry_out(outcome.intents)

    def _after_configure(self, outcome: dispatch.Outcome, request: Message | None) -> None:
        if outcome.runtime is None:
            return
        if isinstance(request, pb.ConfigureRequest) and request.request_timeout > 0:
            self.request_timeout = request.request_timeout / 1000
        self.runtime = outcome.runtime
        self.configured = True
        self.plugin.configured.set()

    def _write(self, data: bytes) -> None:
        self.channel.write(data)

    # --- calling the runtime ---------------------------------------------------------------

    async def call(self, method: str, message: Message, timeout: float) -> ResponseReceived:
        payload = message.SerializeToString()
        return await self.channel.call(services.RUNTIME_SERVICE, method, payload, timeout)

    async def update_containers(self, updates: Sequence[Update | BulkUpdate]) -> None:
        request = pb.UpdateContainersRequest()
        convert.updates_to_pb(updates, request.update)
        # The runtime serializes this with event processing; allow for one event ahead.
        timeout = 2 * (self.request_timeout or 2.0) + 1.0
        metrics = self.plugin.metrics
        try:
            reply = await self.call("UpdateContainers", request, timeout)
        except (TimeoutError, ConnectionError):
            metrics.update_containers.labels("no_reply").inc()
            raise
        if reply.code != Code.OK:
            metrics.update_containers.labels("failed").inc()
            raise RpcError(reply.code, reply.message)
        metrics.update_containers.labels("ok").inc()

    async def _send_deferred(self, updates: Sequence[Update | BulkUpdate]) -> None:
        try:
            await self.update_containers(updates)
        except (RpcError, TimeoutError, ConnectionError) as exc:
            ids = ", ".join(u.container_id for u in flat_updates(updates))
            log.warning("UpdateContainers for %s failed: %s", ids, exc or type(exc).__name__)


class _HandlerFailed(Exception):
    def __init__(self, request: Message | None, message: str) -> None:
        super().__init__(message)
        self.request = request
        self.message = message


def _decode_quietly(method: services.Method, payload: bytes) -> Message | None:
    try:
        return services.decode(method.request, payload, method.name)
    except ProtocolError:
        return None
