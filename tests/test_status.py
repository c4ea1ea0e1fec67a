"""The status socket under abuse: long lines, crowds of queries, foreign uids, paths that
are not ours to delete."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.status import MAX_LINE, StatusServer, StatusSocketError, query


class FakePlugin:
    """What the status server uses of NriPlugin; `gate` holds the policy thread."""

    def __init__(self) -> None:
        self.configured = asyncio.Event()
        self.runtime = None
        self.calls = 0
        self.started = asyncio.Event()  # a plan build reached the "policy thread"
        self.gate = asyncio.Event()
        self.gate.set()

    async def in_policy_thread(self, fn: Callable[[], Any]) -> Any:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        return fn()


def counting_view() -> Callable[[], dict[str, object]]:
    built = 0

    def view() -> dict[str, object]:
        nonlocal built
        built += 1
        return {"policy": "test", "build": built}

    return view


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports as unhandled (e.g. an exception in a client callback)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


def server(path: Path, plugin: FakePlugin | None = None, **kwargs: Any) -> StatusServer:
    return StatusServer(path, plugin or FakePlugin(), counting_view(), **kwargs)  # type: ignore[arg-type]


async def raw(path: Path, data: bytes, eof: bool = False) -> dict[str, object]:
    """Send `data` as is (then EOF if `eof`), and read the answer to EOF."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    if eof:
        writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    result: dict[str, object] = json.loads(answer)
    return result


# --- request lines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [MAX_LINE + 1, 100_000, 1 << 20], ids=["4 KiB", "100 KiB", "1 MiB"]
)
async def test_a_too_long_line_gets_an_error_object_not_a_reset(
    tmp_path: Path, size: int, loop_errors: list[dict[str, Any]]
) -> None:
    status = server(tmp_path / "s.sock")
    await status.start()
    try:
        answer = await raw(status.path, b"p" * size + b"\n")
        assert answer == {"error": f"request line longer than {MAX_LINE} bytes; send one command"}
        assert (await query(status.path, "health"))["connected"] is False  # still serving
    finally:
        await status.stop()
    assert loop_errors == []


async def test_a_command_without_newline_and_an_unknown_one(tmp_path: Path) -> None:
    status = server(tmp_path / "s.sock")
    await status.start()
    try:
        assert "connected" in await raw(status.path, b"health", eof=True)  # EOF ends it
        answer = await query(status.path, "x" * 1000)
        error = str(answer["error"])
        assert error.startswith("unknown command 'xxx") and len(error) < 120
        assert await raw(status.path, b"\n") == {"error": "no command received"}
    finally:
        await status.stop()


# --- the plan: one build at a time, and a short cache ----------------------------------------


async def test_concurrent_plan_queries_share_one_build() -> None:
    plugin = FakePlugin()
    plugin.gate.clear()
    status = server(Path("/nonexistent"), plugin)
    queries = [asyncio.create_task(status.answer("plan")) for _ in range(50)]
    await plugin.started.wait()  # every query has started and found the build in flight
    assert plugin.calls == 1
    plugin.gate.set()
    answers = await asyncio.gather(*queries)
    assert plugin.calls == 1 and status.plan_builds == 1
    assert {json.loads(a)["build"] for a in answers} == {1}


async def test_a_plan_answered_less_than_a_second_ago_is_reused() -> None:
    now = [100.0]
    plugin = FakePlugin()
    status = server(Path("/nonexistent"), plugin, clock=lambda: now[0])
    assert json.loads(await status.answer("plan"))["build"] == 1
    now[0] += 0.9
    assert json.loads(await status.answer("plan"))["build"] == 1
    assert plugin.calls == 1
    now[0] += 0.2
    assert json.loads(await status.answer("plan"))["build"] == 2
    assert plugin.calls == 2


async def test_a_failed_build_is_an_error_and_not_cached() -> None:
    plugin = FakePlugin()
    attempts = 0

    def view() -> dict[str, object]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("engine exploded")
        return {"ok": True}

    status = StatusServer(Path("/nonexistent"), plugin, view)  # type: ignore[arg-type]
    first = json.loads(await status.answer("plan"))
    assert first == {"error": "building the plan failed: RuntimeError: engine exploded"}
    assert json.loads(await status.answer("plan")) == {"ok": True}


async def test_beyond_the_connection_cap_a_client_is_told_busy(tmp_path: Path) -> None:
    plugin = FakePlugin()
    plugin.gate.clear()
    status = server(tmp_path / "s.sock", plugin, max_clients=1)
    await status.start()
    try:
        first = asyncio.create_task(query(status.path, "plan"))
        await plugin.started.wait()  # the first client holds the only slot
        busy = await query(status.path, "health")
        assert str(busy["error"]).startswith("busy: 1 status queries are open")
        plugin.gate.set()
        assert (await first)["build"] == 1
        assert "connected" in await query(status.path, "health")  # the slot is free again
    finally:
        await status.stop()


# --- who may ask ----------------------------------------------------------------------------


async def test_a_peer_whose_uid_is_not_allowed_is_refused(tmp_path: Path) -> None:
    me = os.geteuid()
    status = server(tmp_path / "s.sock", allowed_uids={me + 4242})
    await status.start()
    try:
        answer = await query(status.path, "plan")
        error = str(answer["error"])
        assert error.startswith(f"permission denied: uid {me} (pid {os.getpid()})")
        assert status.plugin.calls == 0  # type: ignore[attr-defined]
    finally:
        await status.stop()


async def test_by_default_root_and_the_daemons_uid_may_ask(tmp_path: Path) -> None:
    status = server(tmp_path / "s.sock")
    assert status.allowed_uids == {0, os.geteuid()}
    await status.start()
    try:
        assert (await query(status.path, "plan"))["build"] == 1
        assert stat.S_IMODE(status.path.stat().st_mode) == 0o600
    finally:
        await status.stop()
    assert not status.path.exists()


# --- the socket path ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_a_path_that_is_not_a_socket_is_never_deleted(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "status.sock"
    if kind == "file":
        path.write_text("precious")
    else:
        path.mkdir()
    with pytest.raises(StatusSocketError, match=r"exists and is (not a socket|a directory)"):
        await server(path).start()
    assert path.exists() and (kind != "file" or path.read_text() == "precious")


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a daemon that died: the file stays, nobody listens
    status = server(path)
    await status.start()
    try:
        assert "connected" in await query(path, "health")
    finally:
        await status.stop()


async def test_a_running_servers_socket_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    running = server(path)
    await running.start()
    try:
        second = server(path)
        with pytest.raises(StatusSocketError, match="another process is serving on it"):
            await second.start()
        await second.stop()  # never started: leaves the running one's socket alone
        assert (await query(path, "plan"))["build"] == 1
    finally:
        await running.stop()


async def test_stop_removes_only_its_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    status = server(path)
    await status.start()
    path.unlink()
    path.write_text("someone else's")
    await status.stop()
    assert path.read_text() == "someone else's"


async def test_unusable_paths_are_one_line_errors(tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 120)
    with pytest.raises(StatusSocketError, match="at most 107") as long_error:
        await server(too_long).start()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StatusSocketError, match="cannot create the directory") as dir_error:
        await server(blocker / "sub" / "s.sock").start()
    for error in (long_error, dir_error):
        assert "\n" not in str(error.value)
