#!/usr/bin/env python3
"""Helpers of bench/nri_real_payloads.py (issue 12); three roles in one file.

1. Imported by the bench: request templates cut from the recorded real NRI traffic
   (tests/data/nri-captures, loaded with tests.captures), and `Templates.request()`, which
   rewrites the pod id, container id and pod uid of one template into a new container's,
   byte for byte (the new ids have the same lengths, so no protobuf length changes and no
   re-encoding: the plugin gets exactly the bytes the runtime sent, with other ids).
2. `python3 bench/real_payloads.py floor --socket PATH --register HEX --configure HEX`: the
   floor, a bare socket loop with no project code. It registers with canned bytes, answers
   the first request on the plugin service (Configure) with a canned ConfigureResponse and
   every later one with an empty ttrpc response (a valid empty reply of every NRI response
   type), looking only at the mux and ttrpc headers: nothing is decoded.
3. `python3 bench/real_payloads.py plugin --dump FILE [--stages] -- <nri-qos run args>`:
   `nri-qos run`, in the same process as this bootstrap, with timing taps installed by
   monkeypatching (nothing under nri_plugin/ is edited). The tap wraps the plugin's own
   `nri_qos_request_duration_seconds` observation, so it records the exact value the
   histogram gets (received -> reply written) instead of only its bucket. `--stages` adds
   time.perf_counter_ns wrappers around each step of the request path (see STAGES). On
   SIGUSR1 everything recorded so far is written to FILE as JSON (FILE.tmp, renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent

FLAVORS = {
    # flavor -> (capture folder, session)
    "containerd-1.7": ("containerd-1.7.13", "session-logger-all-events"),
    "containerd-2.3": ("containerd-2.3.4", "session-logger-all-events"),
    "cri-o-1.36": ("cri-o-1.36.3", "session-logger-all-events"),
}

# One container's lifecycle as the runtime delivers it, by NRI event number (versions.Event):
# RunPodSandbox, CreateContainer, PostCreate, Start, PostStart, Update, PostUpdate, Stop,
# RemoveContainer, StopPodSandbox, RemovePodSandbox. The first five make a live container.
LIFECYCLE = (1, 4, 5, 6, 7, 8, 9, 10, 11, 2, 3)
LIVE_PART = LIFECYCLE[:5]
OWN_RPC = {4: "CreateContainer", 8: "UpdateContainer", 10: "StopContainer"}


def _new_hex(kind: str, n: int, length: int) -> str:
    return hashlib.sha256(f"nri-bench-{kind}-{n}".encode()).hexdigest()[:length]


def _new_uid(n: int) -> str:
    h = _new_hex("uid", n, 32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Template:
    label: str  # the method, or StateChange(EVENT) for legacy notifications
    method: str  # the ttrpc method name
    payload: bytes  # the NRI request, as recorded
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Templates:
    flavor: str
    configure: bytes  # the recorded ConfigureRequest
    by_event: dict[int, Template]  # lifecycle event -> the request that delivers it
    pod_id: str
    container_id: str
    pod_uid: str
    per_event_rpcs: bool  # NRI v0.12 per-event methods, else StateChange

    def request(self, event: int, n: int) -> bytes:
        """The recorded request for `event`, as it would be for container number `n`."""
        payload = self.by_event[event].payload
        for old, new in self._rewrites(n):
            payload = payload.replace(old, new)
        return payload

    def _rewrites(self, n: int) -> list[tuple[bytes, bytes]]:
        uid = _new_uid(n)
        pairs = [
            (self.pod_id, _new_hex("pod", n, len(self.pod_id))),
            (self.container_id, _new_hex("ctr", n, len(self.container_id))),
            (self.pod_uid, uid),
            (self.pod_uid.replace("-", "_"), uid.replace("-", "_")),
        ]
        out = []
        for old, new in pairs:
            assert len(old) == len(new), (old, new)
            out.append((old.encode(), new.encode()))
        return out

    def ids(self, n: int) -> tuple[str, str]:
        """(pod id, container id) of container number `n`."""
        return (
            _new_hex("pod", n, len(self.pod_id)),
            _new_hex("ctr", n, len(self.container_id)),
        )


def load_templates(flavor: str) -> Templates:
    """Cut one container's lifecycle out of a recorded session (the main pod's requests)."""
    from nri_plugin.protocol import ttrpc_pb2
    from tests.captures import TO_PLUGIN, load_session
    from tests.conftest import CAPTURES

    folder, name = FLAVORS[flavor]
    session = load_session(CAPTURES / folder, name)
    steps = session.steps
    main_pod = steps["main_pod"]
    assert isinstance(main_pod, dict)
    pod_name = str(main_pod["name"])
    pod_uid = str(main_pod["uid"])
    pod_id = str(steps["pod_id"])
    container_id = str(steps["container_id"])
    event_numbers = {
        "RUN_POD_SANDBOX": 1,
        "STOP_POD_SANDBOX": 2,
        "REMOVE_POD_SANDBOX": 3,
        "CREATE_CONTAINER": 4,
        "POST_CREATE_CONTAINER": 5,
        "START_CONTAINER": 6,
        "POST_START_CONTAINER": 7,
        "UPDATE_CONTAINER": 8,
        "POST_UPDATE_CONTAINER": 9,
        "STOP_CONTAINER": 10,
        "REMOVE_CONTAINER": 11,
    }
    method_events = {
        "RunPodSandbox": 1,
        "StopPodSandbox": 2,
        "RemovePodSandbox": 3,
        "CreateContainer": 4,
        "PostCreateContainer": 5,
        "StartContainer": 6,
        "PostStartContainer": 7,
        "UpdateContainer": 8,
        "PostUpdateContainer": 9,
        "StopContainer": 10,
        "RemoveContainer": 11,
    }
    configure = b""
    by_event: dict[int, Template] = {}
    per_event = False
    for msg, dec in zip(session.messages, session.decoded, strict=True):
        if msg.direction != TO_PLUGIN or msg.conn != 1 or dec.get("ttrpc_type") != "request":
            continue
        req = ttrpc_pb2.Request()
        req.ParseFromString(msg.data)
        body = dec.get("message")
        assert isinstance(body, dict)
        if req.method == "Configure":
            configure = req.payload
            continue
        pod = body.get("pod") or {}
        if not isinstance(pod, dict) or pod.get("name") != pod_name:
            continue
        if req.method == "StateChange":
            event = event_numbers[str(body["event"])]
            label = f"StateChange({body['event']})"
        elif req.method in method_events:
            event = method_events[req.method]
            label = req.method
            if event not in OWN_RPC:
                per_event = True
        else:
            continue  # ValidateContainerAdjustment: we never subscribe
        if event in by_event:
            continue
        by_event[event] = Template(
            label,
            req.method,
            req.payload,
            req.timeout_nano,
            tuple((kv.key, kv.value) for kv in req.metadata),
        )
    missing = [e for e in LIFECYCLE if e not in by_event]
    assert not missing, f"{flavor}: no recorded request for events {missing}"
    assert configure, f"{flavor}: no recorded Configure"
    return Templates(flavor, configure, by_event, pod_id, container_id, pod_uid, per_event)


# --- the floor: a bare socket loop ---------------------------------------------------------


def floor_main(socket_path: str, register: bytes, configure_reply: bytes) -> None:
    """Answer every ttrpc request on mux conn 1 without decoding it. Runs until EOF."""
    mux_header = struct.Struct(">II")
    ttrpc_header = struct.Struct(">IIBB")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    sock.sendall(register)
    streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    pending = bytearray()
    configured = False
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        pending += data
        out = []
        while len(pending) >= 8:
            conn, length = mux_header.unpack_from(pending)
            if len(pending) < 8 + length:
                break
            streams.setdefault(conn, bytearray()).extend(pending[8 : 8 + length])
            del pending[: 8 + length]
        buf = streams[1]
        while len(buf) >= 10:
            length, sid, mtype, _ = ttrpc_header.unpack_from(buf)
            if len(buf) < 10 + length:
                break
            del buf[: 10 + length]
            if mtype != 1:
                continue
            body = b"" if configured else configure_reply
            configured = True
            msg = ttrpc_header.pack(len(body), sid, 2, 0) + body
            out.append(mux_header.pack(1, len(msg)) + msg)
        streams[2].clear()  # the RegisterPlugin reply: not looked at
        if out:
            sock.sendall(b"".join(out))


# --- the plugin child with taps ------------------------------------------------------------

# Steps of the request path the --stages instrumentation times (ns, per request). The
# policy thread writes the reply itself (one hop: loop -> policy thread); the loop's
# work after the reply (intents) is outside "received -> written".
STAGES = (
    # read (the histogram's "received") -> lookup, counter, deadline: the alarm when the
    # policy thread serves it inline, a loop timer and the submit when the loop read it
    "pre_submit",
    "hop_in",  # submitted -> the policy thread runs Session._run (0 when served inline)
    "decode",  # protobuf decode of the NRI payload (services.decode)
    "convert_in",  # protobuf -> qos_model (pod_for_policy, container_for_policy, ...)
    "policy",  # the policy hook (engine)
    "convert_out",  # qos_model -> protobuf reply (adjustment_to_pb, updates_to_pb)
    "handle_rest",  # the rest of _handle / dispatch.handle (isinstance chain, Outcome, ...)
    "claim",  # _handle returned -> the reply is claimed and _answer starts
    "encode",  # reply SerializeToString + ttrpc/mux framing (_answer minus the write)
    "write",  # NriChannel.write_from_thread (the send syscall from the policy thread)
    "observe_gap",  # _answer returned -> histogram observation
)


class _Recorder:
    def __init__(self, dump: Path, stages: bool) -> None:
        self.dump = dump
        self.stages = stages
        self.observed: list[tuple[str, float]] = []  # (method, seconds) as the histogram got
        self.records: list[dict[str, Any]] = []  # per request, with --stages
        # A request's record: kept by stream id while the loop handles it, then carried
        # by the policy thread (which writes the reply and observes its duration while
        # the loop may already be reading the next request).
        self.pending: dict[int, dict[str, Any]] = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    @property
    def current(self) -> dict[str, Any] | None:
        """The record of the request this thread is on (the policy thread's)."""
        return getattr(self.local, "current", None)

    @current.setter
    def current(self, record: dict[str, Any] | None) -> None:
        self.local.current = record

    def write(self, *_: object) -> None:
        with self.lock:
            data = {"observed": self.observed, "records": self.records}
            tmp = self.dump.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.dump)


def _install_taps(rec: _Recorder) -> None:
    from nri_plugin import metrics as metrics_mod

    original_init = metrics_mod.Metrics.__init__

    class _Child:
        def __init__(self, child: Any, method: str) -> None:
            self._child, self._method = child, method

        def inc(self) -> None:
            self._child.inc()

        def observe(self, value: float) -> None:
            if rec.current is not None and rec.current["method"] == self._method:
                rec.current["observe_at"] = time.perf_counter_ns()
                rec.current["total"] = value
                rec.records.append(rec.current)
                rec.current = None
            rec.observed.append((self._method, value))
            self._child.observe(value)

    class _Tap:
        def __init__(self, histogram: Any) -> None:
            self._histogram = histogram

        def labels(self, method: str) -> _Child:
            return _Child(self._histogram.labels(method), method)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._histogram, name)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.request_seconds = _Tap(self.request_seconds)

    original_of_method = getattr(metrics_mod.Metrics, "of_method", None)
    tapped: dict[tuple[int, str], Any] = {}

    def of_method(self: Any, method: str) -> Any:
        """A tree with `Metrics.of_method` (the session's only way to its series): its
        series for `method`, with the observation tapped; made once per method."""
        key = (id(self), method)
        found = tapped.get(key)
        if found is None:
            assert original_of_method is not None
            series = original_of_method(self, method)
            if hasattr(series, "seconds"):  # (requests, seconds) children, up to 5b215ae
                found = series._replace(seconds=_Child(series.seconds, method))
            else:  # one MethodSeries: inc() and observe()
                found = _Child(series, method)
            tapped[key] = found
        return found

    if original_of_method is None:  # older still: the session labels request_seconds itself
        metrics_mod.Metrics.__init__ = init  # type: ignore[method-assign]
    else:
        metrics_mod.Metrics.of_method = of_method  # type: ignore[method-assign]
    if rec.stages:
        _install_stages(rec)


class StageSums(Protocol):
    """Where timed stages add up: the record of the request being timed (None: none)."""

    @property
    def current(self) -> dict[str, Any] | None: ...


def _add(rec: StageSums, stage: str, ns: int) -> None:
    cur = rec.current
    if cur is not None:
        cur[stage] = cur.get(stage, 0) + ns


_depth = threading.local()


def timed(rec: StageSums, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Time `fn` into `stage`; only the outermost call of a stage counts (e.g.
    container_from_pb calls resources_from_pb through the patched module global)."""
    perf = time.perf_counter_ns

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth: dict[str, int] = _depth.__dict__.setdefault("stages", {})
        if depth.get(stage):
            return fn(*args, **kwargs)
        depth[stage] = 1
        t0 = perf()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(rec, stage, perf() - t0)
            depth[stage] = 0

    return wrapper


def _install_stages(rec: _Recorder) -> None:
    from nri_plugin import channel as channel_mod
    from nri_plugin import dispatch
    from nri_plugin import session as session_mod
    from nri_plugin.policy.api import RecordingPolicy
    from nri_plugin.policy.qos_policy import QosPolicy
    from nri_plugin.protocol import connection as connection_mod
    from nri_plugin.protocol import convert, services

    try:  # a baseline checkout from before the policy thread read the socket
        from nri_plugin.policy_thread import PolicyThread as pool
    except ImportError:
        from concurrent.futures import ThreadPoolExecutor as pool  # type: ignore[assignment]

    perf = time.perf_counter_ns
    S = session_mod.Session
    orig_received, orig_run, orig_reply_now = S._received, S._run, S._reply_now
    orig_inline = getattr(S, "_serve_inline", None)
    orig_readable = getattr(S, "readable", None)  # a checkout before the thread read
    orig_handle, orig_answer = S._handle, S._answer
    orig_submit = pool.submit
    channel = channel_mod.NriChannel
    orig_writes = channel.write, channel.write_from_thread

    def received(self: Any, event: Any) -> Any:
        rec.pending[event.stream_id] = {"method": event.method, "received_at": perf()}
        return orig_received(self, event)

    # Before "received": the policy thread's poll() returned (wake_at), the read
    # syscall, and the ttrpc envelope parsed. The first request of a read carries them.
    orig_read_now = channel.read_now
    orig_receive_data = connection_mod.NriConnection.receive_data

    def readable(self: Any) -> None:
        rec.local.read = {"wake_at": perf()}
        rec.local.served = None
        try:
            assert orig_readable is not None
            orig_readable(self)
        finally:
            rec.local.read = None
            served = rec.local.served  # the last request this read served
            if served is not None:
                served["done_at"] = perf()  # its work after the reply ends here

    def read_now(self: Any, in_loop: bool) -> Any:
        read = getattr(rec.local, "read", None)
        if read is not None:
            read["read_at"] = perf()
        return orig_read_now(self, in_loop)

    def receive_data(self: Any, data: bytes) -> Any:
        read = getattr(rec.local, "read", None)
        if read is not None:
            read["parse_at"] = perf()
        return orig_receive_data(self, data)

    def submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        turn = args[0] if args else None
        event = getattr(turn, "event", None)
        cur = rec.pending.get(event.stream_id) if event is not None else None
        if cur is not None:
            cur["submit_at"] = perf()
        return orig_submit(self, fn, *args, **kwargs)

    def serve_inline(self: Any, event: Any, received: float) -> None:
        """The policy thread read it: no submit, no hop (run_at is the submit)."""
        rec.current = record = {"method": event.method, "received_at": perf()}
        read = getattr(rec.local, "read", None)
        if read is not None and "parse_at" in read:
            record.update(read)
            rec.local.read = None
        try:
            assert orig_inline is not None
            orig_inline(self, event, received)
        finally:
            rec.current = None
            rec.local.served = record

    def run(self: Any, turn: Any) -> Any:
        cur = rec.current
        if cur is None:
            cur = rec.pending.pop(turn.event.stream_id, None)
        if cur is not None:
            cur["run_at"] = perf()
            cur.setdefault("submit_at", cur["run_at"])
        rec.current = cur
        try:
            return orig_run(self, turn)
        finally:
            rec.current = None

    def reply_now(self: Any, turn: Any, decision: Any) -> None:
        """A reply the loop writes (a notification's, or a fail-open one) has no policy
        stages; its record still has to reach the histogram's observation."""
        if rec.current is not None:
            orig_reply_now(self, turn, decision)
            return
        rec.current = rec.pending.pop(turn.event.stream_id, None)
        try:
            orig_reply_now(self, turn, decision)
        finally:
            rec.current = None

    def handle(self: Any, method: Any, payload: bytes) -> Any:
        cur = rec.current
        if cur is not None:
            cur["handle_at"] = perf()
        try:
            return orig_handle(self, method, payload)
        finally:
            if cur is not None:
                cur["handled_at"] = perf()

    def answer(self: Any, stream_id: int, method: Any, decision: Any) -> bool:
        cur = rec.current
        t0 = perf()
        if cur is not None:
            cur["answer_at"] = t0
        try:
            return orig_answer(self, stream_id, method, decision)
        finally:
            if cur is not None:
                cur["answer_ns"] = perf() - t0
                cur["answered_at"] = perf()

    S._received = received  # type: ignore[method-assign]
    S._run = run  # type: ignore[method-assign]
    if orig_inline is not None:
        S._serve_inline = serve_inline  # type: ignore[method-assign]
    if orig_readable is not None:
        S.readable = readable  # type: ignore[method-assign]
        channel.read_now = read_now  # type: ignore[method-assign]
        connection_mod.NriConnection.receive_data = receive_data  # type: ignore[method-assign]
    S._reply_now = reply_now  # type: ignore[method-assign]
    S._handle = handle  # type: ignore[method-assign]
    S._answer = answer  # type: ignore[method-assign]
    pool.submit = submit  # type: ignore[method-assign]
    channel.write = timed(rec, "write", orig_writes[0])  # type: ignore[method-assign]
    channel.write_from_thread = timed(rec, "write", orig_writes[1])  # type: ignore[method-assign]
    services.decode = timed(rec, "decode", services.decode)
    for name in (
        "pod_for_policy",
        "container_for_policy",
        "pod_from_pb",
        "container_from_pb",
        "resources_from_pb",
        "resources_for_policy",
    ):
        if hasattr(convert, name):  # a baseline checkout may not have it
            setattr(convert, name, timed(rec, "convert_in", getattr(convert, name)))
    for name in ("adjustment_to_pb", "updates_to_pb"):
        setattr(convert, name, timed(rec, "convert_out", getattr(convert, name)))
    for cls in (QosPolicy, RecordingPolicy):
        for hook in (*dispatch.HOOK_EVENTS, "synchronize", "configure"):
            if hook in vars(cls):
                setattr(cls, hook, timed(rec, "policy", getattr(cls, hook)))


def stage_breakdown(record: dict[str, Any]) -> dict[str, int] | None:
    """One request's stages (ns) from the timestamps and sums a --stages child recorded."""
    needed = ("received_at", "submit_at", "run_at", "handle_at", "handled_at")
    if any(k not in record for k in (*needed, "answer_at", "answered_at", "observe_at")):
        return None
    inner = sum(record.get(k, 0) for k in ("decode", "convert_in", "policy", "convert_out"))
    write = record.get("write", 0)
    out = {
        "pre_submit": record["submit_at"] - record["received_at"],
        "hop_in": record["run_at"] - record["submit_at"],
        "decode": record.get("decode", 0),
        "convert_in": record.get("convert_in", 0),
        "policy": record.get("policy", 0),
        "convert_out": record.get("convert_out", 0),
        "handle_rest": record["handled_at"] - record["handle_at"] - inner,
        "claim": record["answer_at"] - record["handled_at"],
        "encode": record.get("answer_ns", 0) - write,
        "write": write,
        "observe_gap": record["observe_at"] - record["answered_at"],
    }
    out["sum"] = record["observe_at"] - record["received_at"]
    return out


def plugin_main(dump: Path, stages: bool, argv: list[str]) -> int:
    rec = _Recorder(dump, stages)
    _install_taps(rec)
    signal.signal(signal.SIGUSR1, rec.write)
    from nri_plugin.cli import main

    return main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    floor = sub.add_parser("floor")
    floor.add_argument("--socket", required=True)
    floor.add_argument("--register", required=True, help="hex: the RegisterPlugin bytes")
    floor.add_argument("--configure", required=True, help="hex: the ConfigureResponse body")
    plugin = sub.add_parser("plugin")
    plugin.add_argument("--dump", type=Path, required=True)
    plugin.add_argument("--stages", action="store_true")
    plugin.add_argument("nri_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.role == "floor":
        floor_main(args.socket, bytes.fromhex(args.register), bytes.fromhex(args.configure))
        return
    nri_args = args.nri_args[1:] if args.nri_args[:1] == ["--"] else args.nri_args
    sys.exit(plugin_main(args.dump, args.stages, nri_args))


if __name__ == "__main__":
    main()
