#!/usr/bin/env python3
"""Plugin memory under a runtime that pipelines requests and never reads the replies.

A real `python3 -m nri_plugin run --socket ...` child connects to a fake runtime socket
served here (tests/scripted_runtime.py). After registration, Configure and an empty
Synchronize, the runtime stops reading and writes `--requests` (10,000) CreateContainer
requests at once, each the payload containerd 2.3.4 sent in the recorded capture
(tests/data/nri-captures). The plugin holds at most its bounds meanwhile: it stops
reading when 256 requests wait, and stops starting requests while more than 1 MiB of its
replies are unsent; if that lasts past its stall bound (30 s by default) it closes the
connection and reconnects. With the no-op policy the replies are tiny (18 bytes), so it
usually answers every request with a few hundred KB unsent and never needs to pause.

After `--observe` seconds (or the plugin's close, if sooner) the runtime reads again: it
counts the replies to the flood and checks the connection (or the plugin's new one) still
serves a CreateContainer.

Printed: the plugin's VmRSS / VmHWM (from /proc/<pid>/status) before the flood, the
largest VmRSS sampled during the observation, and after the replies were read; whether
and why the plugin closed (its log line). `--policy qos` (the default) runs the real
policy; the flood repeats one container, so its table stays small and what is measured
is the protocol runtime's own memory.

`--plugin-repo PATH` runs the plugin child from another checkout (PYTHONPATH=PATH), e.g. a
git worktree of an older commit, to compare in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nri_plugin.protocol import mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from tests.captures import SESSIONS, TO_PLUGIN
from tests.processes import stop
from tests.scripted_runtime import ScriptedRuntime

REPO = Path(__file__).resolve().parent.parent
SAMPLE_EVERY = 0.05  # seconds between RSS samples during the flood
CONNECT_TIMEOUT = 30.0


def recorded_create_container() -> bytes:
    """The first CreateContainer payload containerd 2.3.4 sent in the captures."""
    for session in SESSIONS:
        if session.runtime != "containerd-2.3.4":
            continue
        for message in session.messages:
            if message.direction == TO_PLUGIN and message.ttrpc_type == 1:
                request = ttrpc_pb2.Request.FromString(message.data)
                if request.method == "CreateContainer":
                    return request.payload
    raise SystemExit("no recorded CreateContainer in tests/data/nri-captures")


def pipelined(payload: bytes, count: int, first_sid: int = 101) -> bytes:
    """`count` CreateContainer requests on consecutive odd stream ids, 2 s deadline each."""
    return b"".join(
        mux.encode_message(
            mux.PLUGIN_SERVICE_CONN,
            ttrpc.encode_request(
                sid, services.PLUGIN_SERVICE, "CreateContainer", payload, 2_000_000_000
            ),
        )
        for sid in range(first_sid, first_sid + 2 * count, 2)
    )


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def accept(
    queue: asyncio.Queue[ScriptedRuntime], process: subprocess.Popen[bytes]
) -> ScriptedRuntime:
    """The plugin's next connection; fails if the plugin exits or never connects."""
    try:
        return await asyncio.wait_for(queue.get(), CONNECT_TIMEOUT)
    except TimeoutError:
        state = "exited" if process.poll() is not None else "is still running"
        raise SystemExit(
            f"the plugin did not connect within {CONNECT_TIMEOUT}s ({state})"
        ) from None


async def peak_rss_until(done: asyncio.Event, pid: int, limit: float) -> int:
    # Sampling on a timer is fine here: this is the measuring side, not the plugin.
    """The largest VmRSS (KiB) sampled until `done` or `limit` seconds."""
    peak = memory(pid)["VmRSS"]
    end = time.monotonic() + limit
    while not done.is_set() and time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), SAMPLE_EVERY)
        peak = max(peak, memory(pid)["VmRSS"])
    return peak


@dataclass(frozen=True)
class Result:
    requests: int
    request_bytes: int
    rss_before_kib: int
    rss_peak_during_kib: int
    hwm_during_kib: int
    rss_after_kib: int
    hwm_after_kib: int
    replies_read: int  # replies to the flood the runtime got once it read again
    closed_after_s: float | None  # None: the plugin kept the connection
    close_reason: str | None
    served_afterwards: bool


async def run(requests: int, observe: float, policy: str, repo: Path = REPO) -> Result:
    payload = recorded_create_container()
    first_sid = 101
    flood = pipelined(payload, requests, first_sid)
    last_sid = first_sid + 2 * (requests - 1)
    with tempfile.TemporaryDirectory(prefix="nri-qos-rss-") as tmp:
        sock = Path(tmp) / "nri.sock"
        config = Path(tmp) / "config.toml"
        config.write_text(f'[policy]\nname = "{policy}"\n')
        log = Path(tmp) / "plugin.log"
        accepted: asyncio.Queue[ScriptedRuntime] = asyncio.Queue()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.put_nowait(ScriptedRuntime(reader, writer))

        server = await asyncio.start_unix_server(on_connect, path=str(sock))
        argv = [sys.executable, "-m", "nri_plugin", "run", "--socket", str(sock)]
        argv += ["--config", str(config), "--log-level", "warning"]
        with log.open("wb") as stderr:
            env = {**os.environ, "PYTHONPATH": str(repo)}
            process = subprocess.Popen(argv, cwd=repo, env=env, stderr=stderr)
        runtimes: list[ScriptedRuntime] = []
        try:
            first = await accept(accepted, process)
            runtimes.append(first)
            await first.handshake()
            before = memory(process.pid)
            mark = len(first.served_replies)
            first.stop_reading()
            started = time.monotonic()
            first.send_raw(flood)
            peak = await peak_rss_until(first.ended, process.pid, observe)
            during = memory(process.pid)
            closed_after = time.monotonic() - started if first.ended.is_set() else None
            first.resume_reading()
            if closed_after is None:
                await first.raw_reply(last_sid, mark, wait=120)
                serving = first
            else:
                serving = await accept(accepted, process)
                runtimes.append(serving)
                await serving.handshake()
            replies = len(first.served_replies) - mark
            if serving is first:  # its stream ids went on past the flood's
                since = first.send_raw_request(last_sid + 2, "CreateContainer", payload)
                served = (await first.raw_reply(last_sid + 2, since)).status.code == 0
            else:
                request = pb.CreateContainerRequest.FromString(payload)
                served = (await serving.call("CreateContainer", request)).code == 0
            after = memory(process.pid)
        finally:
            for runtime in runtimes:
                await runtime.close()
            stop(process)
            server.close()
        marker = "closing the runtime connection: "
        reasons = [
            line.split(marker, 1)[1]
            for line in log.read_text(errors="replace").splitlines()
            if marker in line
        ]
    return Result(
        requests=requests,
        request_bytes=len(flood),
        rss_before_kib=before["VmRSS"],
        rss_peak_during_kib=peak,
        hwm_during_kib=during["VmHWM"],
        rss_after_kib=after["VmRSS"],
        hwm_after_kib=after["VmHWM"],
        replies_read=replies,
        closed_after_s=None if closed_after is None else round(closed_after, 2),
        close_reason=reasons[0] if reasons else None,
        served_afterwards=served,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument(
        "--observe",
        type=float,
        default=5.0,
        help="seconds the runtime reads nothing (the plugin's stall bound is 30 s)",
    )
    parser.add_argument(
        "--policy",
        choices=["qos", "recording"],
        default="qos",
        help="qos: the real policy on this machine's topology (the flood repeats one "
        "container, so its table stays small); recording keeps every event it sees, "
        "which is its memory, not the protocol's",
    )
    parser.add_argument("--plugin-repo", type=Path, default=REPO, help="checkout to run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(run(args.requests, args.observe, args.policy, args.plugin_repo))
    if args.json:
        print(json.dumps(asdict(result)))
        return

    def mib(kib: int) -> str:
        return f"{kib / 1024:8.1f} MiB"

    print(
        f"pipelined {result.requests} recorded CreateContainer requests "
        f"({result.request_bytes} bytes); the runtime read no reply"
    )
    print(f"plugin VmRSS before:        {mib(result.rss_before_kib)}")
    print(f"plugin VmRSS peak during:   {mib(result.rss_peak_during_kib)}")
    print(f"plugin VmHWM during:        {mib(result.hwm_during_kib)}")
    print(f"plugin VmRSS after:         {mib(result.rss_after_kib)}")
    print(f"plugin VmHWM after:         {mib(result.hwm_after_kib)}")
    print(f"replies read afterwards:    {result.replies_read} of {result.requests}")
    if result.closed_after_s is None:
        print("connection:                 kept (never paused past its stall bound)")
    else:
        print(f"connection:                 closed after {result.closed_after_s} s")
        print(f"close reason (plugin log):  {result.close_reason}")
    print(f"served a request afterwards: {result.served_afterwards}")


if __name__ == "__main__":
    main()
