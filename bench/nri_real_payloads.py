#!/usr/bin/env python3
"""Per-request cost of the plugin on real NRI payloads, idle and under CPU contention
(issue 12).

The runtime side is this process: it listens on a unix socket like containerd does and
speaks NRI with the project's own NriChannel (runtime role). A real `nri-qos run` child
(`python3 -m nri_plugin run` through bench/real_payloads.py, which adds a timing tap)
connects to it, registers and is configured with the recorded ConfigureRequest of the
chosen runtime. Then every request is one recorded from that runtime
(tests/data/nri-captures: containerd 1.7.13, 2.3.4, CRI-O 1.36.3; full container specs with
mounts, env, hooks, labels, ~1-5 KB), with the pod id, container id and pod uid rewritten
byte for byte so that each lifecycle is a new container. Only the events the plugin
subscribed to in its ConfigureResponse are sent, as the runtime would: per-event RPCs on
containerd 2.3 (NRI v0.12), StateChange for the notifications on containerd 1.7 and CRI-O.

Per level of live containers (`--live`, default 0,110): the live containers are started
(RunPodSandbox .. PostStartContainer, not timed), then 20 warm-up lifecycles, then
`--pairs` measured lifecycles (create .. remove: Run, Create, PostCreate, Start,
PostStart, Update, PostUpdate, Stop, RemoveContainer, StopPodSandbox, RemovePodSandbox,
each if subscribed), so `level` other containers are live during each.

The targets (the floor, the no-op and qos policies, and their `--baseline-repo`
counterparts) are measured one after another, each running its lifecycles back to back:
its code and data stay in the CPU caches from one request to the next. With
`--interleave`, every target is connected at once, each to its own runtime socket, and
the lifecycles go round them one at a time, in an order that rotates. Then all of them
run in the same seconds of the machine (whose speed drifts by 20-50 % over tens of
seconds on a shared VM), which makes a before/after comparison fairer. Each plugin also
meets every request with caches the other processes have used in between, as on a node
where containerd, runc and the workloads run between two container events: that is
slower than back to back, and probably closer to production.

`--gap-ms N` leaves the machine idle for N ms after each measured lifecycle of each
target, as between two pods' starts on a node (tens of ms at least). Nothing runs in the
gap on this guest, yet a plugin whose request touches more code and data finds less of
it in the caches afterwards: on this VM, 5 ms made the qos CreateContainer 0.13 ms slower
and the no-op's 0.04 (docs/benchmarks.md, issue 12 round 4).

Figures per method, p50 / p99 in ms:
- in-plugin: received -> reply written, the exact value the plugin observes into its own
  `nri_qos_request_duration_seconds` histogram (captured by a tap around that observation;
  the histogram's buckets, 0.2/0.5/1 ms, are too coarse for a 0.3 ms target). The
  histogram itself is scraped from the child's /metrics (`--metrics-address`) before and
  after each block and its count and sum are checked against the tap ("hist mean").
  "Received" is when the plugin's channel has split the ttrpc envelope out of the read;
  the read itself and the envelope parsing are outside it (they are in the round trip).
- round trip: the runtime side, request written -> reply decoded (NriChannel.start_call
  until the reply future is resolved).
- floor: the same runtime side against a bare socket loop (bench/real_payloads.py floor:
  a tiny Python process answering every request with a canned empty reply without
  decoding anything), in the same run; "CreateContainer round trip - floor" is reported.

Targets (issue 12): in-plugin p50 <= 0.3 ms (no-op policy) / <= 0.4 ms (qos), p99 <= 1 ms,
CreateContainer round trip <= floor + 0.3 ms.

Contention (`--contention [on|off|both]`, bare flag = on): one busy-loop process pinned
to each CPU while measuring (warm-up included), as when runc and the shim start a
container on the same CPUs. `both` measures idle and contended back to back at each
level, for every target, in the same run.

`--profile [qos|recording]`: one more child (qos by default) with perf_counter_ns
wrappers around each step of the request path (bench/real_payloads.py STAGES;
monkeypatched in the child, nothing under nri_plugin/ is edited), at the highest `--live`
level, and the per-stage breakdown of CreateContainer (and the other methods' totals);
with `--interleave`, that child runs interleaved with the floor and the other policy.
With the runtime side's send and reply times, the breakdown covers the whole round trip:
`to_wake` (written -> the plugin's policy thread woke), `read`, `envelope` (-> the
histogram's "received"), the in-plugin stages, and `back` (reply written -> decoded here).
`--cprofile N` adds the top N functions (cumulative) of the qos policy's
create_container, from cProfile in the policy thread.

Safety: the plugin's `[host] root` is a temp dir holding a copy of this machine's CPU
topology from /sys, an empty cgroup2 tree and a procfs with only a mountinfo, so no
recorded pid or cgroups path can reach a real process or cgroup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from real_payloads import (
    FLAVORS,
    LIFECYCLE,
    LIVE_PART,
    OWN_RPC,
    STAGES,
    Templates,
    load_templates,
    stage_breakdown,
)

from nri_plugin.channel import NriChannel
from nri_plugin.plugin import PluginSettings
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol import services, ttrpc_pb2
from nri_plugin.protocol.connection import NriConnection, RequestReceived, Role
from tests.snapshots import _READ_BY_DISCOVERY

REPO = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "real_payloads.py"
WARMUP = 20
READY_TIMEOUT = 30.0
TARGETS = ("floor", "recording", "qos")
STAGE_ORDER = STAGES  # the order of the breakdown's rows
ROUND_TRIP_BEFORE = ("to_wake", "read", "envelope")  # before the plugin's "received"
ROUND_TRIP_AFTER = ("after_reply", "back", "round_trip")


class BenchError(RuntimeError):
    pass


# --- host root and contention ----------------------------------------------------------------


def this_machine_root(target: Path) -> Path:
    """A host root with this machine's CPU topology (the files topology discovery reads,
    copied from /sys), an empty cgroup2 tree and a procfs with only its mountinfo."""
    base = Path("/sys/devices/system")
    for top in ("cpu", "node"):
        for dirpath, dirnames, filenames in os.walk(base / top):
            here = Path(dirpath)
            rel = here.relative_to("/")
            for name in [*dirnames, *filenames]:
                src = here / name
                relpath = "/" + str(rel / name)
                if not _READ_BY_DISCOVERY.search(relpath):
                    continue
                dst = target / rel / name
                if src.is_symlink():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(FileExistsError):
                        os.symlink(os.readlink(src), dst)
                elif src.is_file():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        dst.write_bytes(src.read_bytes())
            dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    cgroup = target / "sys" / "fs" / "cgroup"
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (target / "proc" / "self").mkdir(parents=True, exist_ok=True)
    mount_point = "".join(f"\\{ord(ch):03o}" if ch in " \t\n\\" else ch for ch in str(cgroup))
    (target / "proc" / "self" / "mountinfo").write_text(
        f"35 24 0:30 / {mount_point} rw,nosuid,nodev,noexec,relatime shared:9 - "
        "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    )
    return target


@contextlib.contextmanager
def burners(on: bool) -> Iterator[None]:
    """One busy loop pinned to each CPU we may run on, while the block runs."""
    if not on:
        yield
        return
    code = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(cpu)])
        for cpu in sorted(os.sched_getaffinity(0))
    ]
    time.sleep(0.2)  # let them start spinning
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- /metrics --------------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"^nri_qos_request_duration_seconds_(sum|count|bucket)\{([^}]*)\} ([0-9.eE+-]+|\+Inf)$"
)


def scrape(port: int) -> dict[str, dict[str, Any]]:
    """method -> {"count", "sum", "buckets": {le: cumulative count}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        kind, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        entry = out.setdefault(lab["method"], {"count": 0.0, "sum": 0.0, "buckets": {}})
        if kind == "bucket":
            entry["buckets"][lab["le"]] = float(value)
        else:
            entry[kind] = float(value)
    return out


def hist_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for method, a in after.items():
        b = before.get(method, {"count": 0.0, "sum": 0.0, "buckets": {}})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        buckets = {le: a["buckets"][le] - b["buckets"].get(le, 0.0) for le in a["buckets"]}
        out[method] = {"count": int(n), "mean_ms": (a["sum"] - b["sum"]) / n * 1000}
        out[method]["p50_bucket_ms"] = _bucket_quantile(buckets, n, 0.5)
        out[method]["p99_bucket_ms"] = _bucket_quantile(buckets, n, 0.99)
    return out


def _bucket_quantile(buckets: dict[str, float], n: float, q: float) -> str:
    """The upper bound of the bucket holding quantile q (what the histogram can tell)."""
    for le, cum in sorted(buckets.items(), key=lambda kv: float(kv[0])):
        if cum >= q * n:
            return "+Inf" if le == "+Inf" else f"<= {float(le) * 1000:g}"
    return "?"


# --- children --------------------------------------------------------------------------------


@dataclass
class Child:
    kind: str  # floor | recording | qos
    process: subprocess.Popen[bytes]
    log: Path
    dump: Path | None = None
    metrics_port: int = 0
    seen: int = 0  # tap observations already consumed

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def collect(self) -> dict[str, Any]:
        """Ask the tap for everything it recorded (SIGUSR1); returns the dump."""
        assert self.dump is not None
        # the reply is written before the plugin observes its duration: let the last
        # observation land before asking (the signal handler runs between bytecodes)
        await asyncio.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.dump.unlink()
        self.process.send_signal(signal.SIGUSR1)
        for _ in range(500):
            if self.dump.exists():
                return dict(json.loads(self.dump.read_text()))
            await asyncio.sleep(0.01)
        raise BenchError(f"the {self.kind} child wrote no timing dump; stderr:\n{self.tail()}")


def _config_text(policy: str, host_root: Path) -> str:
    text = f'[policy]\nname = "{policy}"\n'
    if policy == "qos":
        text += "rebalance_interval_ms = 0\n"
    return text + f"[host]\nroot = {json.dumps(str(host_root))}\n"


def start_plugin(
    target: str, sock: Path, tmp: Path, host_root: Path, checkout: Path, stages: bool
) -> Child:
    """`target`: the policy, or "base-<policy>" for the --baseline-repo checkout's."""
    policy = target.removeprefix("base-")
    config = tmp / f"{target}.toml"
    config.write_text(_config_text(policy, host_root))
    log = tmp / f"{target}.stderr"
    dump = tmp / f"{target}.timings.json"
    port = _free_port()
    cmd = [sys.executable, str(HELPER), "plugin", "--dump", str(dump)]
    if stages:
        cmd.append("--stages")
    cmd += ["--", "run", "--socket", str(sock), "--config", str(config)]
    cmd += ["--log-level", "warning", "--metrics-address", f"127.0.0.1:{port}"]
    cmd += ["--debug-socket", str(tmp / f"{target}{'-stages' if stages else ''}.debug.sock")]
    with log.open("ab") as err:
        proc = subprocess.Popen(
            cmd, env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout, stderr=err
        )
    return Child(policy, proc, log, dump, port)


def start_floor(sock: Path, tmp: Path, mask: int) -> Child:
    conn = NriConnection(Role.PLUGIN)
    reg = pb.RegisterPluginRequest(plugin_name="floor", plugin_idx="50", NRI_version="v0.12.2")
    _, register = conn.send_request(
        services.RUNTIME_SERVICE, "RegisterPlugin", reg.SerializeToString(), 5_000_000_000
    )
    configure = ttrpc_pb2.Response(
        payload=pb.ConfigureResponse(events=mask).SerializeToString()
    ).SerializeToString()
    log = tmp / "floor.stderr"
    cmd = [sys.executable, str(HELPER), "floor", "--socket", str(sock)]
    cmd += ["--register", register.hex(), "--configure", configure.hex()]
    # The floor runs at the CPU priority the plugin runs at by default ([plugin] nice),
    # so under contention the two are scheduled alike and only their work differs.
    nice = PluginSettings().nice
    with log.open("ab") as err:
        proc = subprocess.Popen(
            cmd, stderr=err, preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)
        )
    return Child("floor", proc, log)


# --- the runtime side ------------------------------------------------------------------------


@dataclass
class Runtime:
    """Listens like a runtime; one plugin connection at a time."""

    sock: Path
    server: asyncio.AbstractServer | None = None
    channel: NriChannel | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    update_calls: int = 0
    # (request written, reply decoded) per call, perf_counter_ns: CLOCK_MONOTONIC, the
    # clock the plugin's stage timestamps use too
    stamps: list[tuple[int, int]] = field(default_factory=list)

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._accept, path=str(self.sock))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.channel = NriChannel(Role.RUNTIME, reader, writer, self._serve)
        self.channel.start()
        self.connected.set()

    async def _serve(self, event: RequestReceived) -> None:
        assert self.channel is not None
        if event.method == "RegisterPlugin":
            self.channel.respond(event.stream_id, b"")
            self.registered.set()
        elif event.method == "UpdateContainers":
            self.update_calls += 1
            self.channel.respond(event.stream_id, b"")
        else:
            self.channel.respond_error(event.stream_id, 12, f"method {event.method}")

    async def wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.registered.is_set():
            if child.process.poll() is not None:
                raise BenchError(f"{child.kind} child exited; stderr:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{child.kind} child never registered; stderr:\n{child.tail()}")
            await asyncio.sleep(0.02)

    async def call(
        self, method: str, payload: bytes, timeout_nano: int, meta: tuple[tuple[str, str], ...]
    ) -> tuple[float, bytes]:
        """One request; (round trip in ms, reply payload)."""
        ch = self.channel
        assert ch is not None
        t0 = time.perf_counter_ns()
        _, reply = ch.start_call(services.PLUGIN_SERVICE, method, payload, timeout_nano, meta)
        async with asyncio.timeout(10):
            resp = await reply
        t1 = time.perf_counter_ns()
        self.stamps.append((t0, t1))
        rt = (t1 - t0) / 1e6
        if resp.code != 0:
            raise BenchError(f"{method}: error reply {resp.code} {resp.message}")
        return rt, resp.payload

    async def disconnect(self) -> None:
        if self.channel is not None:
            self.channel.close("bench done")
            with contextlib.suppress(Exception):
                await self.channel.wait_closed()
        self.channel = None
        self.connected.clear()
        self.registered.clear()

    async def stop(self) -> None:
        await self.disconnect()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Session:
    """One plugin (or the floor) connected to the runtime side, with its subscription."""

    runtime: Runtime
    child: Child
    templates: Templates
    mask: int = 0

    async def configure(self) -> None:
        t = self.templates
        _, reply = await self.runtime.call("Configure", t.configure, 2_000_000_000, ())
        resp = pb.ConfigureResponse()
        resp.ParseFromString(reply)
        self.mask = resp.events
        await self.runtime.call(
            "Synchronize", pb.SynchronizeRequest().SerializeToString(), 2_000_000_000, ()
        )

    def subscribed(self, event: int) -> bool:
        return bool(self.mask & (1 << (event - 1)))

    async def send(self, event: int, n: int) -> tuple[str, float]:
        t = self.templates
        tpl = t.by_event[event]
        payload = t.request(event, n)
        rt, _ = await self.runtime.call(tpl.method, payload, tpl.timeout_nano, tpl.metadata)
        return tpl.label, rt

    async def lifecycle(self, n: int, events: tuple[int, ...]) -> list[tuple[str, float]]:
        return [await self.send(e, n) for e in events if self.subscribed(e)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 3),
        "p99": round(_pct(values, 0.99), 3),
        "mean": round(statistics.fmean(values), 3),
    }


@dataclass
class Target:
    """One target under measurement: its child, its runtime side, its session, and the
    block being measured (requests sent, round trips, the tap and histogram before it)."""

    name: str
    runtime: Runtime
    child: Child
    session: Session | None = None
    rts: dict[str, list[float]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    first_stamp: int = 0
    before_tap: int = 0
    before_hist: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def begin_block(self) -> None:
        self.rts, self.sent = {}, []
        self.first_stamp = len(self.runtime.stamps)
        if self.child.dump is not None:
            self.before_tap = len((await self.child.collect())["observed"])
            self.before_hist = scrape(self.child.metrics_port)

    async def one_lifecycle(self, n: int) -> None:
        assert self.session is not None
        for label, rt in await self.session.lifecycle(n, LIFECYCLE):
            self.rts.setdefault(label, []).append(rt)
            self.sent.append(label)

    async def end_block(self, stages: bool) -> dict[str, Any]:
        block: dict[str, Any] = {"round_trip_ms": {k: _stats(v) for k, v in self.rts.items()}}
        child = self.child
        if child.dump is not None:
            dump = await child.collect()
            after_hist = scrape(child.metrics_port)
            block["in_plugin_ms"] = _in_plugin(dump["observed"][self.before_tap :], self.sent)
            block["histogram"] = hist_delta(self.before_hist, after_hist)
            if stages:
                block["stages"] = _stages(
                    dump["records"][self.before_tap :],
                    self.sent,
                    self.runtime.stamps[self.first_stamp :],
                )
        return block

    def summary(self, blocks: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        out: dict[str, Any] = {"blocks": blocks, "events_mask": self.session.mask}
        errors = _logged_errors(self.child.log)
        if errors:
            out["plugin_errors"] = len(errors)
            out["plugin_first_error"] = errors[0]
        out["update_containers_calls"] = self.runtime.update_calls
        return out


async def _start_target(
    name: str,
    args: argparse.Namespace,
    templates: Templates,
    tmp: Path,
    host_root: Path,
    stages: bool,
) -> Target:
    sock = tmp / f"{name}{'-stages' if stages else ''}.sock"
    runtime = Runtime(sock)
    await runtime.start()
    if name == "floor":
        all_events = 0
        for e in LIFECYCLE:
            all_events |= 1 << (e - 1)
        child = start_floor(sock, tmp, all_events)
    else:
        checkout = args.baseline_repo if name.startswith("base-") else args.plugin_repo
        child = start_plugin(name, sock, tmp, host_root, checkout, stages)
    target = Target(name, runtime, child)
    try:
        await runtime.wait_ready(child)
        target.session = Session(runtime, child, templates)
        await target.session.configure()
    except BaseException:
        await runtime.stop()
        child.stop()
        raise
    return target


async def measure_targets(
    names: list[str],
    args: argparse.Namespace,
    templates: Templates,
    tmp: Path,
    host_root: Path,
    stages: bool = False,
    levels: list[int] | None = None,
) -> dict[str, Any]:
    """Every level and contention mode for `names`, all connected at once, each to its
    own runtime socket. Warm-up and measured lifecycles go round the targets one
    lifecycle each, in an order that rotates, so the floor, the baseline and this code
    share the same seconds of this VM, whose speed drifts over tens of seconds."""
    targets: list[Target] = []
    try:
        for name in names:
            targets.append(await _start_target(name, args, templates, tmp, host_root, stages))
        results: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
        live = 0
        next_id = 1_000_000
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.contention]
        gap = args.gap_ms / 1000
        for level in levels or args.live:
            while live < level:
                for t in targets:
                    assert t.session is not None
                    await t.session.lifecycle(live, LIVE_PART)
                live += 1
            for contended in modes:
                key = f"{level} live, {'contention' if contended else 'idle'}"
                with burners(contended):
                    for _ in range(WARMUP):
                        for t in targets:
                            await t.one_lifecycle(next_id)
                        next_id += 1
                    for t in targets:
                        await t.begin_block()
                    for i in range(args.pairs):
                        turn = i % len(targets)
                        for t in targets[turn:] + targets[:turn]:
                            await t.one_lifecycle(next_id)
                            if gap:
                                await asyncio.sleep(gap)
                        next_id += 1
                    for t in targets:
                        results[t.name][key] = await t.end_block(stages)
        return {t.name: t.summary(results[t.name]) for t in targets}
    finally:
        for t in targets:
            await t.runtime.stop()
            t.child.stop()


def _paired(items: list[Any], sent: list[str], method_of: Any) -> list[tuple[int, Any]]:
    """Pair each observation with the request it was for (its index in `sent`, whose
    label includes StateChange's event). The runtime side sends one request at a time, so
    the requests of one method are observed in the order they were sent; across methods
    the order may differ (a reply the policy thread writes is observed after it, and the
    loop may already have answered and observed the next request)."""
    if len(items) != len(sent):
        raise BenchError(f"the plugin observed {len(items)} requests, {len(sent)} were sent")
    queues: dict[str, list[int]] = {}
    for i, label in enumerate(sent):
        queues.setdefault(label.split("(")[0], []).append(i)
    taken: dict[str, int] = {}
    out = []
    for item in items:
        method = method_of(item)
        queue = queues.get(method, [])
        k = taken.get(method, 0)
        if k >= len(queue):
            raise BenchError(f"observed one {method} more than was sent")
        taken[method] = k + 1
        out.append((queue[k], item))
    return out


def _in_plugin(observed: list[Any], sent: list[str]) -> dict[str, Any]:
    """Per request label, the exact values the histogram observed in this block (ms)."""
    by: dict[str, list[float]] = {}
    for i, (_, seconds) in _paired(observed, sent, lambda o: o[0]):
        by.setdefault(sent[i], []).append(seconds * 1000)
    return {label: _stats(v) for label, v in by.items()}


def _stages(records: list[Any], sent: list[str], stamps: list[tuple[int, int]]) -> dict[str, Any]:
    """Per request label, each stage's p50 and mean (ms). With the runtime side's own
    send and reply timestamps (perf_counter_ns is CLOCK_MONOTONIC in both processes), the
    round trip's parts outside the plugin too: `to_wake` (request written -> the policy
    thread's poll() returned), `read` (-> the read syscall returned), `envelope` (-> the
    ttrpc envelope parsed: the histogram's "received") and `back` (reply written -> the
    runtime side has decoded it); and `after_reply`, the policy thread's own work after
    the reply (notes, intents) until it can read again."""
    out: dict[str, list[dict[str, float]]] = {}
    for i, rec in _paired(records, sent, lambda r: r["method"]):
        br = stage_breakdown(rec)
        if br is None:
            continue
        sent_at, replied_at = stamps[i]
        if "wake_at" in rec:
            br["to_wake"] = rec["wake_at"] - sent_at
            br["read"] = rec["parse_at"] - rec["wake_at"]
            br["envelope"] = rec["received_at"] - rec["parse_at"]
        br["back"] = replied_at - rec["answered_at"]
        if "done_at" in rec:  # the policy thread's work after the reply (notes, intents)
            br["after_reply"] = rec["done_at"] - rec["answered_at"]
        br["round_trip"] = replied_at - sent_at
        out.setdefault(sent[i], []).append({k: v / 1e6 for k, v in br.items()})
    return {label: _stage_stats(requests) for label, requests in out.items()}


def _stage_stats(requests: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each stage's p50 and mean, and its mean over the slowest 2 % of the requests (by
    in-plugin sum): where the tail's time goes."""
    cut = _pct([r["sum"] for r in requests], 0.98)
    tail = [r for r in requests if r["sum"] >= cut]
    stats: dict[str, dict[str, float]] = {}
    for k in requests[0]:
        values = [r[k] for r in requests if k in r]
        in_tail = [r[k] for r in tail if k in r]
        stats[k] = {
            "p50": round(statistics.median(values), 4),
            "mean": round(statistics.fmean(values), 4),
            "tail_mean": round(statistics.fmean(in_tail), 4) if in_tail else float("nan"),
        }
    return stats


def _logged_errors(log: Path) -> list[str]:
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()
        return [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    return []


# --- cProfile of the engine ------------------------------------------------------------------


async def cprofile_engine(
    args: argparse.Namespace, templates: Templates, tmp: Path, host_root: Path
) -> str:
    """Top functions of QosPolicy.create_container at the highest level, from cProfile run
    in the policy thread only around that call (a child started with a small wrapper)."""
    code = (
        "import cProfile, pstats, io, signal, sys, runpy\n"
        "OUT = sys.argv[1]\n"
        "from nri_plugin.policy.qos_policy import QosPolicy\n"
        "prof = cProfile.Profile()\n"
        "orig = QosPolicy.create_container\n"
        "def cc(self, pod, ctr):\n"
        "    prof.enable()\n"
        "    try:\n"
        "        return orig(self, pod, ctr)\n"
        "    finally:\n"
        "        prof.disable()\n"
        "QosPolicy.create_container = cc\n"
        "def dump(*_):\n"
        "    import traceback\n"
        "    try:\n"
        "        write()\n"
        "    except Exception:\n"
        "        traceback.print_exc()\n"
        "def write():\n"
        "    s = io.StringIO()\n"
        "    pstats.Stats(prof, stream=s).sort_stats('cumulative').print_stats(TOPN)\n"
        "    open(OUT, 'w').write(s.getvalue())\n"
        "signal.signal(signal.SIGUSR1, dump)\n"
        "sys.argv = ['nri_plugin'] + sys.argv[2:]\n"
        "runpy.run_module('nri_plugin', run_name='__main__')\n"
    ).replace("TOPN", str(args.cprofile))
    sock = tmp / "cprofile.sock"
    out = tmp / "cprofile.txt"
    config = tmp / "cprofile.toml"
    config.write_text(_config_text("qos", host_root))
    log = tmp / "cprofile.stderr"
    runtime = Runtime(sock)
    await runtime.start()
    cmd = [sys.executable, "-c", code, str(out), "run", "--socket", str(sock)]
    cmd += ["--config", str(config), "--log-level", "warning", "--metrics-address", ""]
    with log.open("ab") as err:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "PYTHONPATH": str(args.plugin_repo)},
            cwd=args.plugin_repo,
            stderr=err,
        )
    child = Child("cprofile", proc, log)
    try:
        await runtime.wait_ready(child)
        session = Session(runtime, child, templates)
        await session.configure()
        level = max(args.live)
        for n in range(level):
            await session.lifecycle(n, LIVE_PART)
        for n in range(args.pairs):
            await session.lifecycle(2_000_000 + n, LIFECYCLE)
        proc.send_signal(signal.SIGUSR1)
        for _ in range(500):
            if out.exists() and out.stat().st_size:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        if not out.exists():
            raise BenchError(f"the cProfile child wrote nothing; stderr:\n{child.tail()}")
        return out.read_text()
    finally:
        await runtime.stop()
        child.stop()


# --- reporting -------------------------------------------------------------------------------


def _fmt(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['p50']:.3f} / {s['p99']:.3f}"


def print_report(report: dict[str, Any]) -> None:
    t = report["templates"]
    print(
        f"flavor {report['flavor']} ({t['session']}); {report['pairs']} measured lifecycles "
        f"per level after {WARMUP} warm-up; CPUs: {report['cpus']}; plugin: {report['plugin']}"
        + (f"; baseline: {report['baseline']}" if report.get("baseline") else "")
        + (f"; idle {report['gap_ms']:g} ms after each lifecycle" if report.get("gap_ms") else "")
    )
    print("request sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in t["sizes"].items()))
    targets = report["targets"]
    floor = targets.get("floor")
    for key in next(iter(targets.values()))["blocks"]:
        print(f"\n## {key}")
        fb = floor["blocks"][key] if floor else None
        head = f"{'method':<34}{'floor RT':>16}"
        pols = [p for p in targets if p != "floor"]
        for p in pols:
            head += f"{p + ' in-plugin':>24}{p + ' RT':>20}"
        print(head + "   (p50 / p99 ms)")
        labels: list[str] = []
        for tgt in targets.values():
            for label in tgt["blocks"][key]["round_trip_ms"]:
                if label not in labels:
                    labels.append(label)
        for label in labels:
            row = f"{label:<34}"
            row += f"{_fmt(fb['round_trip_ms'].get(label) if fb else None):>16}"
            for p in pols:
                b = targets[p]["blocks"][key]
                ip = b["in_plugin_ms"].get(label)
                row += f"{_fmt(ip):>24}{_fmt(b['round_trip_ms'].get(label)):>20}"
            print(row)
        if fb:
            fl = fb["round_trip_ms"]["CreateContainer"]["p50"]
            for p in pols:
                cc = targets[p]["blocks"][key]["round_trip_ms"]["CreateContainer"]
                print(
                    f"{p}: CreateContainer round trip - floor: p50 {cc['p50'] - fl:+.3f} ms "
                    f"(p99 {cc['p99'] - fb['round_trip_ms']['CreateContainer']['p99']:+.3f})"
                )
        for p in pols:
            h = targets[p]["blocks"][key].get("histogram", {}).get("CreateContainer")
            ip = targets[p]["blocks"][key]["in_plugin_ms"].get("CreateContainer")
            if h and ip:
                print(
                    f"{p}: /metrics histogram CreateContainer: {h['count']} obs, mean "
                    f"{h['mean_ms']:.3f} ms (tap mean {ip['mean']:.3f}, n {ip['n']}), "
                    f"p50 {h['p50_bucket_ms']} ms, p99 {h['p99_bucket_ms']} ms"
                )
    for name, tgt in targets.items():
        extra = f"events mask {tgt['events_mask']:#x}"
        if tgt.get("update_containers_calls"):
            extra += f", {tgt['update_containers_calls']} UpdateContainers calls answered"
        if tgt.get("plugin_errors"):
            extra += f"; WARNING {tgt['plugin_errors']} ERROR lines: {tgt['plugin_first_error']}"
        print(f"{name}: {extra}")
    prof = report.get("profile")
    if prof:
        print(f"\n## profile: {prof['policy']}, {prof['level']} live, flavor {report['flavor']}")
        for key, block in prof["blocks"].items():
            st = block.get("stages", {})
            cc = st.get("CreateContainer")
            if not cc:
                continue
            print(f"\n### CreateContainer, {key} (ms; p50 / mean / mean of the slowest 2 %)")
            for k in (*ROUND_TRIP_BEFORE, *STAGE_ORDER, "sum", *ROUND_TRIP_AFTER):
                if k in cc:
                    st_k = cc[k]
                    print(
                        f"  {k:<12} {st_k['p50']:>8.4f} / {st_k['mean']:.4f}"
                        f" / {st_k.get('tail_mean', float('nan')):.4f}"
                    )
            print(
                "  other methods, sum p50 / mean: "
                + ", ".join(
                    f"{m} {v['sum']['p50']:.3f}/{v['sum']['mean']:.3f}"
                    for m, v in st.items()
                    if m != "CreateContainer"
                )
            )
    if report.get("cprofile"):
        print("\n## cProfile of QosPolicy.create_container (policy thread)\n")
        print(report["cprofile"])


# --- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    templates = load_templates(args.flavor)
    policies = ["recording", "qos"] if args.policy == "both" else [args.policy]
    targets = ["floor"]
    for policy in policies:  # the baseline right before its counterpart: side by side
        targets += [f"base-{policy}", policy] if args.baseline_repo else [policy]
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "flavor": args.flavor,
        "pairs": args.pairs,
        "gap_ms": args.gap_ms,
        "live": args.live,
        "contention": args.contention,
        "interleaved": args.interleave,
        "cpus": sorted(os.sched_getaffinity(0)),
        "plugin": _describe(args.plugin_repo),
        "baseline": _describe(args.baseline_repo) if args.baseline_repo else None,
        "templates": {
            "session": "/".join(FLAVORS[args.flavor]),
            "per_event_rpcs": templates.per_event_rpcs,
            "sizes": {t.label: len(t.payload) for t in templates.by_event.values()},
        },
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="nri-real-") as tmpdir:
        tmp = Path(tmpdir)
        host_root = this_machine_root(tmp / "host")
        if not args.interleave:
            for target in targets:
                measured = await measure_targets([target], args, templates, tmp, host_root)
                report["targets"].update(measured)
        else:
            report["targets"] = await measure_targets(targets, args, templates, tmp, host_root)
        if args.profile:
            level = max(args.live)
            # interleaved: among the floor and the other policy, so its caches are as cold
            others = ["floor", "qos" if args.profile == "recording" else "recording"]
            names = [*others, args.profile] if args.interleave else [args.profile]
            measured = await measure_targets(
                names, args, templates, tmp, host_root, stages=True, levels=[level]
            )
            prof = measured[args.profile]
            prof["level"] = level
            prof["policy"] = args.profile
            report["profile"] = prof
        if args.cprofile:
            report["cprofile"] = await cprofile_engine(args, templates, tmp, host_root)
        shutil.rmtree(tmp / "host", ignore_errors=True)
    return report


def _describe(path: Path) -> str:
    head = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{path} @ {head or '?'}{'+changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="containerd-2.3")
    parser.add_argument(
        "--contention",
        nargs="?",
        const="on",
        default="off",
        choices=["off", "on", "both"],
        help="busy loop pinned to every CPU while measuring (bare flag: on; both: idle and "
        "contended back to back)",
    )
    parser.add_argument(
        "--live",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 110],
        help="levels of live containers, comma-separated (default 0,110)",
    )
    parser.add_argument("--pairs", type=int, default=500, help="measured lifecycles per level")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="connect every target at once and go round them one lifecycle each",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="idle time after each measured lifecycle (as between two pods' starts on a "
        "node): what an idle vCPU's caches keep over it is what the next request finds",
    )
    parser.add_argument("--policy", choices=["recording", "qos", "both"], default="both")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="qos",
        choices=["qos", "recording"],
        help="per-stage breakdown of one more child running this policy (bare flag: qos)",
    )
    parser.add_argument(
        "--cprofile",
        type=int,
        default=0,
        metavar="N",
        help="top N functions of the qos create_container (cProfile)",
    )
    parser.add_argument("--plugin-repo", type=Path, default=REPO)
    parser.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="another checkout (e.g. a git worktree of an older commit) measured in the "
        "same run, each policy right before this one's (targets base-recording, base-qos)",
    )
    args = parser.parse_args()
    if args.pairs < 1 or sorted(args.live) != args.live or args.live[0] < 0:
        parser.error("--pairs >= 1; --live ascending, >= 0")
    args.plugin_repo = args.plugin_repo.resolve()
    if args.baseline_repo is not None:
        args.baseline_repo = args.baseline_repo.resolve()
    try:
        report = asyncio.run(run(args))
    except BenchError as exc:
        sys.exit(f"nri_real_payloads: {exc}")
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)


assert set(OWN_RPC) <= set(LIFECYCLE)

if __name__ == "__main__":
    main()
