"""Pre-installed plugins: launched with fd 3 and nothing but the NRI environment."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from embedded_runtime import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    InvalidOperationError,
    PluginState,
    RuntimeFlavor,
)
from tests.conftest import REPO
from tests.embedded.conftest import MakeRuntime, container, pod

PLUGIN = textwrap.dedent(
    """
    # A tiny pre-installed plugin built on nri_plugin's sans-IO protocol code.
    import json, os, socket, stat, sys
    from nri_plugin.protocol import nri_pb2 as pb
    from nri_plugin.protocol.connection import NriConnection, RequestReceived, Role
    from nri_plugin.protocol.services import PLUGIN_METHODS, RUNTIME_SERVICE

    report = {"fd3_is_socket": stat.S_ISSOCK(os.fstat(3).st_mode), "methods": []}
    sock = socket.socket(fileno=int(os.environ["NRI_PLUGIN_SOCKET"]))
    conn = NriConnection(Role.PLUGIN)
    register = pb.RegisterPluginRequest(plugin_name="ignored", plugin_idx="99")
    sock.sendall(conn.send_request(RUNTIME_SERVICE, "RegisterPlugin",
                                   register.SerializeToString())[1])
    while data := sock.recv(65536):
        for event in conn.receive_data(data):
            if not isinstance(event, RequestReceived):
                continue
            report["methods"].append(event.method)
            reply = PLUGIN_METHODS[event.method].response()
            if event.method == "Configure":
                report["config"] = pb.ConfigureRequest.FromString(event.payload).config
                reply = pb.ConfigureResponse(events=0x8)  # CreateContainer only
            elif event.method == "CreateContainer":
                reply.adjust.annotations["launched-by"] = os.environ["NRI_PLUGIN_NAME"]
            with open(sys.argv[1] + ".tmp", "w") as out:  # before replying: no race
                json.dump(report, out)
            os.replace(sys.argv[1] + ".tmp", sys.argv[1])
            sock.sendall(conn.send_response(event.stream_id, reply.SerializeToString()))
    """
)


@pytest.mark.parametrize(
    ("flavor", "synchronized"),
    [(CONTAINERD_2_3, True), (CONTAINERD_1_7, False)],
    ids=["containerd 2.3.4: synchronized", "containerd 1.7.13: never synchronized"],
)
async def test_launched_plugin_gets_fd_3_and_the_minimal_environment(
    make_runtime: MakeRuntime, tmp_path: Path, flavor: RuntimeFlavor, synchronized: bool
) -> None:
    script, report = tmp_path / "plugin.py", tmp_path / "report.json"
    script.write_text(PLUGIN)
    runtime = await make_runtime(flavor=flavor, registration_timeout=5.0, request_timeout=5.0)
    await runtime.launch_plugin(
        [sys.executable, str(script), str(report)],
        "launched",
        "05",
        config="setting: 1",
        env={"PYTHONPATH": str(REPO)},
    )
    await runtime.wait_for_plugins(1)
    (info,) = runtime.plugins
    assert (info.full_name, info.external, info.state) == ("05-launched", False, PluginState.READY)
    assert info.pid is not None
    environ = Path(f"/proc/{info.pid}/environ").read_bytes().rstrip(b"\0").split(b"\0")
    assert sorted(environ) == [
        b"NRI_PLUGIN_IDX=05",
        b"NRI_PLUGIN_NAME=launched",
        b"NRI_PLUGIN_SOCKET=3",
        f"PYTHONPATH={REPO}".encode(),
    ]
    assert os.readlink(f"/proc/{info.pid}/fd/3").startswith("socket:")
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{info.pid}/fd/{fd}") == os.devnull

    await runtime.run_pod_sandbox(pod())
    created = await runtime.create_container("pod0", container("c0"))
    assert created.annotations["launched-by"] == "launched"
    seen = json.loads(report.read_text())
    assert seen["fd3_is_socket"] and seen["config"] == "setting: 1"
    # NRI v0.4.0 never synchronizes pre-installed plugins.
    expected = ["Configure", *(["Synchronize"] if synchronized else []), "CreateContainer"]
    assert seen["methods"] == expected


async def test_launched_plugin_that_never_registers_is_killed(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(30)\n")
    runtime = await make_runtime(registration_timeout=0.3)
    await runtime.launch_plugin([sys.executable, str(script)], "sleeper", "01")
    pid = runtime.plugins[0].pid
    assert pid is not None
    for _ in range(100):
        if runtime.plugins[0].state is PluginState.CLOSED:
            break
        await asyncio.sleep(0.02)
    assert runtime.plugins[0].close_reason == "plugin registration timed out"
    for _ in range(100):  # killed and reaped long before its 30 s sleep ends
        if not Path(f"/proc/{pid}").exists():
            break
        await asyncio.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()


async def test_launch_of_a_missing_binary_fails(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    runtime = await make_runtime()
    with pytest.raises(FileNotFoundError):
        await runtime.launch_plugin([str(tmp_path / "nope")], "nope", "01")
    with pytest.raises(InvalidOperationError, match="must be 2 digits"):
        await runtime.launch_plugin([sys.executable], "bad-index", "1")
    assert runtime.plugins == []
