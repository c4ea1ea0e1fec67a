"""A daemon-like debug API server for the tests: a real Engine with a few containers, a
real NriPlugin (its policy thread builds the views), a real HostExecutor and decision log,
served by `start_debug_server` on a temp socket from its own thread and event loop, so a
test can drive it with blocking clients and CLI subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nri_plugin.config import Config
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.debug.server import DebugServer, start_debug_server
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.protect import ProtectState
from nri_plugin.protocol.versions import infer_runtime
from qos_model.signals import (
    RUNQ_BUCKETS,
    Availability,
    ContainerSignals,
    Pressure,
    RunqLatency,
    SignalSnapshot,
)
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

_T = TypeVar("_T")

NOBODY = 65534
CONFIG_TEXT = '[policy]\nname = "qos"\n'


@dataclass
class Daemon:
    path: Path
    loop: asyncio.AbstractEventLoop
    server: DebugServer
    executor: HostExecutor
    protect: ProtectState
    dry_run_calls: list[bool] = field(default_factory=list)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the server's loop (e.g. to add an event the way a thread does)."""
        done: Future[_T] = Future()
        self.loop.call_soon_threadsafe(lambda: done.set_result(fn()))
        return done.result(5)


def _engine() -> Engine:
    e = Engine(MachineShape(cores_per_l3=8).expected_topology())
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    e.synchronize([], [])
    e.container_created(pod("web", "shared_cores", namespace="prod"), container("web", 1000))
    e.container_created(pod("db", "dedicated_cores", namespace="prod"), container("db", 2000))
    e.container_created(pod("etl", "reclaimed_cores", namespace="batch"), container("etl", 100))
    # two containers named "app" in different pods: "app" alone is ambiguous
    e.container_created(pod("a1", "shared_cores"), container("app", 200, pod_name="a1"))
    e.container_created(pod("a2", "shared_cores"), container("app2", 200, pod_name="a2"))
    return e


def _snapshot() -> SignalSnapshot:
    def runq(us: int) -> RunqLatency:
        buckets = [0] * RUNQ_BUCKETS
        buckets[us.bit_length() - 1] = 10
        return RunqLatency(count=10, total_ns=10 * us * 1000, buckets=tuple(buckets))

    return SignalSnapshot(
        end_s=100.0,
        window_s=0.5,
        containers={
            "ctr-web": ContainerSignals(
                cpu_usage_ns=250_000_000, runq=runq(300), cpu_pressure=Pressure(0.12)
            ),
            "ctr-etl": ContainerSignals(cpu_usage_ns=450_000_000, cpu_pressure=Pressure(0.02)),
        },
        sources={"runq": Availability("schedstat", "no BPF in tests")},
    )


@pytest.fixture(scope="package")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    path = tmp_path_factory.mktemp("dbg") / "debug.sock"
    engine = _engine()
    policy = QosPolicy(engine)
    executor = HostExecutor(Controllers([]))
    executor.events.add("classification", "prod/web/web", "shared_cores: from the annotation")
    protect = ProtectState(runq_source="schedstat", runq_reason="no BPF in tests", windows=3)
    protect.last = _snapshot()
    protect.sources = dict(protect.last.sources)
    loop = asyncio.new_event_loop()
    calls: list[bool] = []
    started: Future[tuple[DebugServer, NriPlugin]] = Future()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            plugin = NriPlugin(policy, PluginSettings(socket_path=path.parent / "nri.sock"))
            server = await start_debug_server(
                path,
                plugin,
                policy,
                executor,
                protect=protect,
                config=Config(),
                config_text=CONFIG_TEXT,
                config_source="/etc/nri-qos/config.toml",
                set_dry_run=calls.append,
            )
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result((server, plugin))
        await stop.wait()
        await server.stop()
        plugin.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    server, _plugin = started.result(30)
    d = Daemon(path, loop, server, executor, protect, calls)
    yield d
    loop.call_soon_threadsafe(stop.set)
    thread.join(15)
    executor.close()


def cli_env() -> dict[str, Any]:
    from tests.conftest import REPO

    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}


# --- a caller with another uid --------------------------------------------------------------


def connect_as(uid: int, path: Path) -> socket.socket:
    """A connection to `path` made by a forked child running as `uid`: the kernel records
    the credentials at connect(), so the server sees `uid` whoever uses the socket after."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child: only the socket module, then _exit
        code = 1
        try:
            parent.close()
            os.chdir(path.parent)  # the private temp dirs above are not for `uid` to walk
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path.name)
            socket.send_fds(child, [b"x"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
    finally:
        os.waitpid(pid, 0)
        parent.close()
    assert fds, "the child could not connect"
    return socket.socket(fileno=fds[0])


class Relay:
    """A socket whose every connection is spliced to a fresh connection made as `uid`."""

    def __init__(self, target: Path, uid: int, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._target, self._uid = target, uid
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = connect_as(self._uid, self._target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def as_nobody(daemon: Daemon, tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid")
    # past the first gates (the file's and its directory's modes): the peer check holds
    os.chmod(daemon.path, 0o666)
    os.chmod(daemon.path.parent, 0o711)
    relay = Relay(daemon.path, NOBODY, tmp_path / "nobody.sock")
    yield relay
    relay.close()
    os.chmod(daemon.path.parent, 0o700)
    os.chmod(daemon.path, 0o600)
