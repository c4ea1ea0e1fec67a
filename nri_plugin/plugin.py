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
- bound what a misbehaving runtime can cost (requests in flight, unsent replies, a split
  Synchronize that never ends): past a bound, close with the reason, a log line and
  `nri_qos_connection_overload{limit}`, and start over like after any connection end,
- on EOF or corruption drop all per-connection state and, for an external plugin,
  reconnect with capped exponential back-off; the runtime re-sends Configure and a full
  Synchronize, from which the policy rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nri_plugin import dispatch
from nri_plugin.channel import ChannelLimits, NriChannel
from nri_plugin.metrics import ConnectionState, Metrics
from nri_plugin.policy.api import PolicyBase
from nri_plugin.policy.intents import Intents
from nri_plugin.policy_thread import PolicyThread
from nri_plugin.session import NRI_VERSION as NRI_VERSION
from nri_plugin.session import Session
from nri_plugin.session import SessionEnd as SessionEnd
from nri_plugin.session import hand_over as hand_over
from qos_model.containers import BulkUpdate, Update
from qos_model.runtime import RuntimeInfo

log = logging.getLogger("nri_qos.plugin")
_R = TypeVar("_R")

DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
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
    # Bounds on what one runtime connection may cost (memory, stuck work); past one the
    # connection is closed with the reason and a reconnect starts over. A runtime sends
    # one request at a time, reads every reply at once, and splits Synchronize at ~4 MiB:
    # a real node never comes near these (see ChannelLimits and dispatch.SyncCollector).
    max_requests_in_flight: int = 256
    write_high_water: int = 1 << 20
    write_buffer_max: int = 64 << 20
    stall_timeout: float = 30.0
    sync_max_chunks: int = dispatch.MAX_SYNC_CHUNKS
    sync_max_objects: int = dispatch.MAX_SYNC_OBJECTS
    # How long a thread may hold the GIL while another waits (sys.setswitchinterval).
    # Python's 5 ms default lets a background loop (interference sampling, drift reads)
    # hold up the policy thread, and so a reply, by 5 ms at each handoff; 0.5 ms bounds
    # that wait at a small cost to those loops' throughput.
    gil_switch_interval: float = 0.0005
    # The daemon's CPU priority (see nri_plugin/priority.py): replies go before the busy
    # work of a container start. 0 keeps the default.
    nice: int = -10

    @property
    def channel_limits(self) -> ChannelLimits:
        return ChannelLimits(
            max_handlers=self.max_requests_in_flight,
            write_high_water=self.write_high_water,
            write_buffer_max=self.write_buffer_max,
            stall_timeout=self.stall_timeout,
        )

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
        try:
            self.channel_limits.validate()
        except ValueError as exc:
            raise PluginSetupError(f"connection limits: {exc}") from None
        if self.sync_max_chunks < 1 or self.sync_max_objects < 1:
            raise PluginSetupError("sync_max_chunks and sync_max_objects must be >= 1")
        if not 0 < self.gil_switch_interval <= 1:
            raise PluginSetupError("gil_switch_interval_ms must be > 0 and <= 1000")
        if not -20 <= self.nice <= 19:
            raise PluginSetupError("[plugin] nice must be between -20 and 19")


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


IntentSink = Callable[[Intents], object]
"""Carries out a request's intents after its reply (notes, host intents); must not block.
Called from the policy thread (and from the loop for decisions made outside any event):
thread-safe."""


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
        # Runs every policy call, and reads the runtime's socket while free (policy_thread.py)
        self.policy_thread = PolicyThread()
        self._session: Session | None = None
        self._stopping = asyncio.Event()
        self.configured = asyncio.Event()  # set while a runtime connection is configured
        # set once this connection's (final) Synchronize was decided by the policy, not
        # answered fail-open; cleared with `configured` (readiness reads it)
        self.synchronized = asyncio.Event()
        # set when a connection ends (cleared when the next one starts): what waits for a
        # disconnect awaits this instead of polling `configured`
        self.disconnected = asyncio.Event()

    @property
    def runtime(self) -> RuntimeInfo | None:
        return self._session.runtime if self._session else None

    @property
    def connection(self) -> str:
        """The connection in words, as status and readiness show it."""
        if self.configured.is_set():
            return "serving"
        if self._session is not None:
            return "connecting"
        return "waiting for the runtime"

    @property
    def channel(self) -> NriChannel | None:
        """The current connection, for its bounds and high-water marks (status, tests)."""
        return self._session.channel if self._session else None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SessionEnd:
        """Serve one runtime connection until it ends."""
        session = Session(self, reader, writer)
        self._session = session
        self.disconnected.clear()
        self.metrics.connection_changed(ConnectionState.CONNECTED)
        try:
            return await session.run()
        finally:
            self._session = None
            self.configured.clear()
            self.synchronized.clear()
            self.disconnected.set()
            self.metrics.connection_changed(ConnectionState.DISCONNECTED)
            await asyncio.get_running_loop().run_in_executor(
                self.policy_thread, self.policy.disconnected
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
        return await asyncio.get_running_loop().run_in_executor(self.policy_thread, fn)

    async def update_containers(self, updates: Sequence[Update | BulkUpdate]) -> None:
        """Ask the runtime to change running containers (never call from a policy hook)."""
        session = self._session
        if session is None or not self.configured.is_set():
            raise NotConnected("no configured runtime connection")
        await session.update_containers(updates)

    async def decide(self, decision: Callable[[], Intents], submit: IntentSink) -> Intents:
        """A decision made outside any event (a loop's: rebalance, signals, pod roles), in
        the policy thread, its notes and host intents handed to `submit` (the host
        executor) there, right after it (`hand_over`). Its updates of live containers go
        out with `send_updates`."""
        return await self.in_policy_thread(lambda: hand_over(decision(), submit))

    async def send_updates(self, intents: Intents) -> None:
        """What a loop's decision asks of live containers, in one UpdateContainers call.
        Raises NotConnected while no runtime is configured (the next Synchronize
        re-plans anyway)."""
        if intents.updates:
            await self.update_containers(intents.updates)

    def stop(self) -> None:
        self._stopping.set()
        if self._session is not None:
            self._session.close("stopping")

    def close(self) -> None:
        self.stop()
        self.policy_thread.shutdown(wait=False, cancel_futures=True)

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass or stop() (asyncio.timeout keeps a cancel: see
        NriChannel.call)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
