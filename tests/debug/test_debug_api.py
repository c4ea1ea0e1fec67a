"""The debug API over its real socket: answers built from a real engine, the one-build-
at-a-time plan cache, events that are awaited, the dry-run hook, reflection, and the
refusal of a caller whose uid is not allowed (decided from SO_PEERCRED at connect)."""

from __future__ import annotations

import asyncio
import stat
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nri_plugin.debug.client import DebugClient, DebugError
from nri_plugin.debug.server import (
    SERVICE,
    DebugServer,
    DebugSocketError,
    DebugSources,
    check_socket_path,
)
from nri_plugin.policy.workload import SHARED
from tests.debug.conftest import NOBODY, Daemon, Relay


def test_status_and_pods_come_from_the_engine(daemon: Daemon) -> None:
    with DebugClient(daemon.path) as c:
        status = c.status()
        assert status.policy == "qos" and status.connection == "waiting for the runtime"
        assert status.runq_backend == "schedstat" and status.signal_windows == 3
        pods = c.containers()
    names = {x.full_name: x for x in pods.containers}
    assert set(names) == {"prod/web/web", "prod/db/db", "batch/etl/etl", "default/a1/app",
                          "default/a2/app2"}  # fmt: skip
    assert names["prod/db/db"].qos_class == "dedicated_cores"
    assert all(x.reasons["cpus"] for x in names.values())
    assert {p.name for p in pods.pools} >= {SHARED, "reclaimed"}
    assert stat.S_IMODE(daemon.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("query", ["ctr-we", "web", "web/web", "prod/web/web"])
def test_explain_finds_one_container(daemon: Daemon, query: str) -> None:
    with DebugClient(daemon.path) as c:
        reply = c.explain(query)
    assert reply.container.id == "ctr-web"
    assert reply.container.reasons["oom_score_adj"]
    assert [e.subject for e in reply.events] == ["prod/web/web"]


def test_explain_missing_and_ambiguous(daemon: Daemon) -> None:
    with DebugClient(daemon.path) as c:
        with pytest.raises(DebugError) as missing:
            c.explain("nope")
        with pytest.raises(DebugError) as ambiguous:
            c.explain("ctr-ap")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert ambiguous.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "default/a1/app" in str(ambiguous.value) and "default/a2/app2" in str(ambiguous.value)


def test_signals_numa_config(daemon: Daemon) -> None:
    with DebugClient(daemon.path) as c:
        signals = c.signals()
        numa = c.numa()
        toml = c.config(toml=True)
        settings = c.config()
    web = next(x for x in signals.containers if x.id == "ctr-web")
    assert web.cpu_pressure == pytest.approx(0.12) and web.runq_p90_us > 0
    assert web.cpu_cores == pytest.approx(0.5)
    etl = next(x for x in signals.containers if x.id == "ctr-etl")
    assert not etl.HasField("runq_p90_us")  # unknown, not zero
    assert numa.nodes and numa.nodes[0].millicores > 0
    assert toml.text == '[policy]\nname = "qos"\n'
    assert '"policy_name": "qos"' in settings.text


def test_events_follow_receives_a_new_event_without_polling(daemon: Daemon) -> None:
    got: list[str] = []
    seen_history = threading.Event()
    with DebugClient(daemon.path) as c:

        def follow() -> None:
            for e in c.events(follow=True):
                got.append(e.message)
                seen_history.set()
                if e.message == "a new one":
                    return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert seen_history.wait(10)
        daemon.call(
            lambda: threading.Thread(  # added from another thread, as the host's
                target=daemon.executor.events.add, args=("host", "x", "a new one")
            ).start()
        )
        reader.join(10)
    assert not reader.is_alive() and got[-1] == "a new one"


def test_dry_run_switch_calls_the_daemons_hook(daemon: Daemon) -> None:
    with DebugClient(daemon.path) as c:
        on = c.set_dry_run(True)
        off = c.set_dry_run(False)
        assert not c.status().dry_run
    assert daemon.dry_run_calls[-2:] == [True, False]
    assert on.dry_run and not on.previous and off.previous and "uid 0" in on.message


def test_reflection_lists_the_service(daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.path}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert SERVICE == "nriqos.debug.v1.Debug" and SERVICE in names


def test_a_uid_that_is_not_allowed_gets_permission_denied(daemon: Daemon, as_nobody: Relay) -> None:
    with DebugClient(as_nobody.path) as c, pytest.raises(DebugError) as refused:
        c.status()
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(refused.value).startswith(f"permission denied: uid {NOBODY}")
    assert "run the command as root" in str(refused.value)
    before = len(daemon.dry_run_calls)
    with DebugClient(as_nobody.path) as c, pytest.raises(DebugError):
        c.set_dry_run(True)
    assert len(daemon.dry_run_calls) == before


# --- the plan: one build at a time, and a short cache ------------------------------------------


class GatedPlugin:
    def __init__(self) -> None:
        self.configured = asyncio.Event()
        self.runtime = None
        self.channel = None
        self.connection = "waiting for the runtime"
        self.calls = 0
        self.gate = asyncio.Event()

    async def in_policy_thread(self, fn: Any) -> Any:
        self.calls += 1
        await self.gate.wait()
        return fn()


async def test_concurrent_plan_calls_share_one_build_and_a_recent_one_is_reused() -> None:
    now = [100.0]
    plugin = GatedPlugin()
    server = DebugServer(
        Path("/nonexistent"),
        DebugSources(plugin=plugin, plan_view=lambda: {"build": plugin.calls}),
        clock=lambda: now[0],
    )
    calls = [asyncio.ensure_future(server.plan()) for _ in range(50)]
    await asyncio.sleep(0.01)
    plugin.gate.set()
    assert {p["build"] for p in await asyncio.gather(*calls)} == {1}
    now[0] += 0.9
    assert (await server.plan())["build"] == 1 and plugin.calls == 1
    now[0] += 0.2
    assert (await server.plan())["build"] == 2


# --- the socket path --------------------------------------------------------------------------


def test_unusable_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DebugSocketError, match="at most 107") as long_error:
        check_socket_path(tmp_path / ("x" * 120))
    precious = tmp_path / "file"
    precious.write_text("precious")
    with pytest.raises(DebugSocketError, match="exists and is not a socket") as file_error:
        check_socket_path(precious)
    assert precious.read_text() == "precious"
    for error in (long_error, file_error):
        assert "\n" not in str(error.value)


def test_a_running_servers_socket_is_not_taken(daemon: Daemon) -> None:
    with pytest.raises(DebugSocketError, match="another process is serving on it"):
        check_socket_path(daemon.path)
