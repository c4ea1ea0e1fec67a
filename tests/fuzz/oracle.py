"""Run fuzz inputs through the protocol core and the policy, the way the plugin would.

`run_input` feeds one input's chunks to `NriConnection.receive_data` (plugin role, with its
RegisterPlugin call pending, as after connecting) and then serves every event like
`nri_plugin.plugin` / `nri_plugin.channel` do: a refused request gets `send_error`; a
request is looked up, decoded with `services.decode`, handed to `dispatch.handle` with a
real `QosPolicy`, and when that raises, answered by `dispatch.fail_open`; the reply goes
out through `send_response`, and updates of live containers through an UpdateContainers
call. A Shutdown ends serving.

Oracles (a violation is a `Finding`, deduplicated by oracle, exception type and the last
traceback frame):

* receive-data: `receive_data` raises nothing but RemoteProtocolError, and after one it
  raises the same error again (the connection stays dead);
* decode: `services.decode` raises nothing but ProtocolError;
* send-error / send-response / update-containers: refusing a request, writing a reply
  and calling UpdateContainers never raise (a raise there is a request never answered or
  a dropped connection), and what they produce parses back as the right frame;
* fail-open: `dispatch.fail_open` never raises;
* reply: every reply (handled or fail-open) is the method's response type, serializes,
  fits in a ttrpc message, a Configure reply subscribes to a non-zero event mask, and a
  Synchronize chunk marked `more` is answered `more=true`;
* reference: a stream that only re-frames or re-cuts a capture decodes to the capture's
  events; chunking: any stream decodes to the same events fed whole or in chunks;
* partial: after the stream, `has_partial_message` says whether it stopped inside a
  message (what the channel tells a truncated peer from a clean EOF by), as a plain
  struct-unpacking reading of the same bytes says;
* slow: an input takes longer than the bound (default 1 s), twice; where it spent the
  time is taken from a faulthandler dump at the bound (it fires even inside a C call);
* memory: `dispatch.handle` runs into the worker's memory cap (MemoryError);
* poisoned: a request exactly as the runtime recorded it raises in `dispatch.handle`, so
  an earlier, mutated one left the policy broken.

Otherwise `dispatch.handle` raising is not a finding (the plugin answers fail-open and
logs a traceback); each distinct one is kept as a `PolicyError` so they can be reviewed.
Known classes carry a `name` (the constants below) so that their tests can tell when they
are gone.

`run_campaign` runs inputs in forked workers under a memory cap, so an input that
crashes, hangs or exhausts memory is itself reported (and the run goes on with the next
input); `minimize` / `save_reproducer` / `load_reproducer` make and replay reproducers;
`retention` measures what the policy keeps of containers that are gone.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gzip
import hashlib
import json
import os
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from nri_plugin import dispatch
from nri_plugin.config import parse_config
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.protocol import mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import (
    BadRequest,
    Event,
    NriConnection,
    RequestReceived,
    Role,
)
from nri_plugin.protocol.errors import Code, LocalProtocolError, ProtocolError, RemoteProtocolError
from qos_model.topology import Topology
from tests.conftest import REPO
from tests.fuzz.mutate import FuzzInput, captures, generate, split_at
from tests.policy.sysfs_builder import MachineShape

SLOW_SECONDS = 1.0
_T = TypeVar("_T")

# Known findings, named so their tests can say when they are gone (docs/fuzzing.md).
STREAM_ID_0 = "stream-id-0-refusal-raises"
OVERSIZED_REPLY = "oversized-reply"
CONFIGURE_FAIL_OPEN_NO_EVENTS = "configure-fail-open-events-0"
OVERSIZED_UPDATE_CONTAINERS = "oversized-update-containers"
OVERSIZED_ERROR_REPLY = "oversized-error-reply"
CPU_LIST_MEMORY_BOMB = "cpu-list-range-memory-bomb"
POLICY_POISONED = "policy-poisoned"
UNRETRIEVED_EXCEPTION = "unretrieved-exception"
PARTIAL_OVERSIZED = "partial-state-ignores-oversized-skip"


@dataclass(frozen=True)
class Finding:
    oracle: str  # which check failed
    error: str  # the exception type, or what was wrong
    where: str  # "path:line in function" of the last traceback frame, or ""
    message: str  # one line
    name: str = ""  # the known class it belongs to, if any

    @property
    def key(self) -> str:
        """Distinct findings: a known class by its name (and the error type, so that its
        different failures are told apart), the rest by oracle, error and last frame."""
        if self.name:
            return f"{self.name}: {self.error}"
        return f"{self.oracle}: {self.error} at {self.where or '?'}"


@dataclass(frozen=True)
class PolicyError:
    """dispatch.handle raised (the plugin answers fail-open and logs it)."""

    method: str
    error: str
    where: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.error} at {self.where}"


@dataclass
class Result:
    index: int
    kind: str
    capture: str
    detail: str
    size: int
    seconds: float = 0.0
    requests: int = 0  # requests served (handled or fail-open)
    refused: int = 0  # BadRequest events answered with an error
    handled: int = 0  # dispatch.handle returned
    fail_open: int = 0  # answered by dispatch.fail_open
    connection_error: str = ""  # the RemoteProtocolError that ended the stream, if any
    plugin_checked: bool = False  # also run through the real plugin (endtoend)
    findings: list[Finding] = field(default_factory=list)
    policy_errors: list[PolicyError] = field(default_factory=list)
    max_rss_kib: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Result:
        raw = dict(raw)
        raw["findings"] = [Finding(**f) for f in raw["findings"]]
        raw["policy_errors"] = [PolicyError(**p) for p in raw["policy_errors"]]
        return cls(**raw)


# --- the policy under test ----------------------------------------------------------------


@cache
def topology() -> Topology:
    """16 CPUs: 2 packages (2 NUMA nodes), 4 cores each with 2 threads."""
    return MachineShape(packages=2, cores_per_l3=4, threads_per_core=2).expected_topology()


def runtime_config(text: str) -> EngineConfig:
    """The daemon's parser for a runtime-provided config (nri_plugin.daemon)."""
    return parse_config(text, "runtime-provided config").qos.policy


def make_policy() -> QosPolicy:
    return QosPolicy(Engine(topology()), runtime_config)


# --- one input ---------------------------------------------------------------------------


def _where(exc: BaseException) -> str:
    """The last traceback frame; when that is not this repository's code (the stdlib's
    enum, tomllib, ...), the innermost frame of ours that called it, too."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    where = f"{_relative(last.filename)}:{last.lineno} in {last.name}"
    if isinstance(exc, RecursionError):  # where the limit strikes depends on the caller's depth
        where = _relative(last.filename)
    if not _ours(last.filename):
        caller = next((f for f in reversed(frames) if _ours(f.filename)), None)
        if caller is not None:
            where += f" (from {_relative(caller.filename)}:{caller.lineno} in {caller.name})"
    return where


def _ours(path: str) -> bool:
    return Path(path).resolve().is_relative_to(REPO)


def _relative(path: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO))
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            tail = path.rsplit(marker, 1)[1]
            return tail if marker == "/site-packages/" else "<stdlib>/" + tail.split("/", 1)[1]
    return path


def _one_line(exc: BaseException | str, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _exc_finding(oracle: str, exc: BaseException, name: str = "") -> Finding:
    return Finding(oracle, type(exc).__name__, _where(exc), _one_line(exc), name)


def connect() -> NriConnection:
    """A plugin-side connection right after connecting: RegisterPlugin is pending."""
    conn = NriConnection(Role.PLUGIN)
    register = pb.RegisterPluginRequest(plugin_name="nri-qos", plugin_idx="50")
    conn.send_request(
        services.RUNTIME_SERVICE, "RegisterPlugin", register.SerializeToString(), 5 * 10**9
    )
    return conn


def feed(conn: NriConnection, chunks: Sequence[bytes]) -> tuple[list[Event], BaseException | None]:
    """Every event the chunks produce, and the exception that stopped reading (if any)."""
    events: list[Event] = []
    for data in chunks:
        try:
            events += conn.receive_data(data)
        except Exception as exc:
            return events, exc
    return events, None


@cache
def reference_events(capture_id: str) -> tuple[Event, ...]:
    """What the unmodified capture decodes to."""
    (cap,) = [c for c in captures() if c.id == capture_id]
    events, error = feed(connect(), [cap.stream])
    assert error is None, error
    return tuple(events)


@cache
def original_requests(capture_id: str) -> frozenset[tuple[str, bytes]]:
    """(method, payload) of every request of a capture, as recorded."""
    return frozenset(
        (e.method, e.payload)
        for e in reference_events(capture_id)
        if isinstance(e, RequestReceived)
    )


class _Server:
    """Serves decoded events like the plugin's session, collecting what goes wrong."""

    def __init__(self, conn: NriConnection, result: Result, capture: str) -> None:
        self.conn = conn
        self.result = result
        self.capture = capture
        self.policy = make_policy()
        self.sync = dispatch.SyncCollector()
        self.closed = False

    def find(self, finding: Finding) -> None:
        self.result.findings.append(finding)

    def serve(self, event: Event) -> None:
        if self.closed:
            return
        if isinstance(event, BadRequest):
            self.result.refused += 1
            self.send_error(event.stream_id, event.code, event.message)
        elif isinstance(event, RequestReceived):
            self.request(event)
        # ResponseReceived: the reply to RegisterPlugin (or a late one); nothing to do

    def send_error(self, stream_id: int, code: int, message: str) -> None:
        try:
            data = self.conn.send_error(stream_id, code, message)
        except Exception as exc:
            name = ""
            if stream_id == 0 and isinstance(exc, LocalProtocolError):
                name = STREAM_ID_0
            elif isinstance(exc, LocalProtocolError) and len(message) > ttrpc.MAX_DATA - 64:
                name = OVERSIZED_ERROR_REPLY
            self.find(_exc_finding("send-error", exc, name))
            return
        problem = check_frame(data, stream_id, lambda resp: resp.status.code == code)
        if problem:
            self.find(Finding("send-error", "malformed error reply", "", problem))

    def request(self, event: RequestReceived) -> None:
        method = services.lookup(event.service, event.method)
        if method is None or event.service != services.PLUGIN_SERVICE:
            what = (
                f"method {event.method}"
                if event.service == services.PLUGIN_SERVICE
                else f"service {event.service}"
            )
            self.send_error(event.stream_id, Code.UNIMPLEMENTED, what)
            return
        self.result.requests += 1
        request: Message | None = None
        try:
            request = services.decode(method.request, event.payload, method.name)
        except ProtocolError:
            pass
        except Exception as exc:  # the plugin's handler task dies: no reply at all
            self.find(_exc_finding("decode", exc))
            return
        outcome: dispatch.Outcome | None = None
        if request is not None:
            try:
                outcome = dispatch.handle(self.policy, method, request, self.sync)
                self.result.handled += 1
            except Exception as exc:
                where = _where(exc)
                self.result.policy_errors.append(
                    PolicyError(method.name, type(exc).__name__, where, _one_line(exc))
                )
                if isinstance(exc, MemoryError):  # past the worker's cap: unbounded at home
                    name = CPU_LIST_MEMORY_BOMB if "qos_model/cpulist.py" in where else ""
                    what = f"{method.name}: dispatch.handle ran out of memory"
                    self.find(Finding("memory", "MemoryError", where, what, name))
                elif type(exc).__name__ != "SyncOverflow" and (
                    method.name,
                    event.payload,
                ) in original_requests(self.capture):
                    # A request exactly as the runtime recorded it fails: an earlier one left
                    # the policy broken (its state, its config) for what follows. (SyncOverflow
                    # is the collector's bound, by design: the plugin closes the connection.)
                    what = f"a recorded {method.name}, unchanged, raised {type(exc).__name__}"
                    self.find(Finding("poisoned", type(exc).__name__, where, what, POLICY_POISONED))
        via = "handle"
        if outcome is None:
            via = "fail-open"
            self.result.fail_open += 1
            try:
                outcome = dispatch.fail_open(method, request, self.policy)
            except Exception as exc:
                self.find(_exc_finding("fail-open", exc))
                return
        if not self.check_reply(method, request, outcome, via):
            return
        payload = outcome.reply.SerializeToString()
        try:
            data = self.conn.send_response(event.stream_id, payload)
        except Exception as exc:
            big = isinstance(exc, LocalProtocolError) and len(payload) > ttrpc.MAX_DATA - 64
            self.find(_exc_finding("send-response", exc, OVERSIZED_REPLY if big else ""))
        else:
            problem = check_frame(data, event.stream_id, lambda resp: not resp.HasField("status"))
            if problem:
                self.find(Finding("send-response", "malformed reply", "", problem))
        self.update_containers(outcome)
        if method.name == "Shutdown":
            self.closed = True

    def check_reply(
        self,
        method: services.Method,
        request: Message | None,
        outcome: dispatch.Outcome,
        via: str,
    ) -> bool:
        reply = outcome.reply
        if not isinstance(reply, method.response):
            wrong = type(reply).__name__
            self.find(Finding("reply", "wrong type", via, f"{method.name} answered by {wrong}"))
            return False
        try:
            size = reply.ByteSize()
        except Exception as exc:
            self.find(_exc_finding("reply", exc))
            return False
        if via == "fail-open" and size > ttrpc.MAX_DATA - 64:
            self.find(Finding("reply", "oversized fail-open reply", via, f"{size} bytes"))
        if isinstance(reply, pb.ConfigureResponse) and reply.events == 0:
            name = CONFIGURE_FAIL_OPEN_NO_EVENTS if via == "fail-open" and request is None else ""
            undecodable = "an undecodable" if request is None else "a"
            what = f"{undecodable} Configure answered by {via} with events=0"
            self.find(Finding("reply", "Configure events=0", via, what, name))
        if (
            isinstance(reply, pb.SynchronizeResponse)
            and isinstance(request, pb.SynchronizeRequest)
            and request.more
            and not reply.more
        ):
            self.find(Finding("reply", "more not echoed", via, "a more=true chunk got more=false"))
        return True

    def update_containers(self, outcome: dispatch.Outcome) -> None:
        from nri_plugin.protocol import convert

        if not outcome.intents.updates:
            return
        request = pb.UpdateContainersRequest()
        try:
            convert.updates_to_pb(outcome.intents.updates, request.update)
            sid, _ = self.conn.send_request(
                services.RUNTIME_SERVICE, "UpdateContainers", request.SerializeToString(), 10**9
            )
        except Exception as exc:
            big = isinstance(exc, LocalProtocolError) and request.ByteSize() > ttrpc.MAX_DATA - 64
            name = OVERSIZED_UPDATE_CONTAINERS if big else ""
            self.find(_exc_finding("update-containers", exc, name))
            return
        self.conn.abandon(sid)


def check_frame(data: bytes, stream_id: int, status_ok: Callable[[Any], bool]) -> str:
    """What is wrong with one reply as written to the socket ("" when nothing)."""
    frames = mux.MuxReader([mux.PLUGIN_SERVICE_CONN]).feed(data)
    if [c for c, _ in frames] != [mux.PLUGIN_SERVICE_CONN]:
        return f"reply not on mux conn 1: {[c for c, _ in frames]}"
    messages = ttrpc.FrameReader().feed(frames[0][1])
    if len(messages) != 1 or not isinstance(messages[0], ttrpc.Frame):
        return "reply is not exactly one ttrpc message"
    frame = messages[0]
    if (frame.stream_id, frame.type, frame.flags) != (stream_id, ttrpc.MessageType.RESPONSE, 0):
        return f"reply header {(frame.stream_id, frame.type, frame.flags)} for stream {stream_id}"
    resp = ttrpc_pb2.Response.FromString(frame.data)
    return "" if status_ok(resp) else f"unexpected status {resp.status}"


def run_input(inp: FuzzInput, slow: float = SLOW_SECONDS) -> Result:
    """Every oracle on one input (in this process)."""
    result = Result(inp.index, inp.kind, inp.capture, inp.detail, inp.size)
    started = time.perf_counter()
    with _watchdog(slow) as hang_site:
        conn = connect()
        events, error = feed(conn, inp.chunks)
        if error is not None and not isinstance(error, RemoteProtocolError):
            result.findings.append(_exc_finding("receive-data", error))
        elif error is not None:
            result.connection_error = _one_line(error, 120)
            _check_sticky(conn, error, result)
        server = _Server(conn, result, inp.capture)
        for event in events:
            server.serve(event)
        _check_chunking(inp, events, error, conn, result)
    result.seconds = time.perf_counter() - started
    if result.seconds > slow:
        where = hang_site()
        message = f"{result.seconds:.2f} s (bound {slow} s); at {slow} s it was in {where}"
        bomb = "qos_model/cpulist.py" in where or any(
            f.name == CPU_LIST_MEMORY_BOMB for f in result.findings
        )
        name = CPU_LIST_MEMORY_BOMB if bomb else ""
        result.findings.append(Finding("slow", "slow input", where, message, name))
    return result


def _check_sticky(conn: NriConnection, error: BaseException, result: Result) -> None:
    try:
        conn.receive_data(b"\x00")
    except RemoteProtocolError as again:
        if again is not error:
            result.findings.append(
                Finding("receive-data", "error not sticky", "", "a second, different error")
            )
        return
    except Exception as exc:
        result.findings.append(_exc_finding("receive-data", exc))
        return
    result.findings.append(
        Finding("receive-data", "error not sticky", "", "a dead connection accepted more data")
    )


def _check_chunking(
    inp: FuzzInput,
    events: list[Event],
    error: BaseException | None,
    conn: NriConnection,
    result: Result,
) -> None:
    if inp.reference:
        expected = list(reference_events(inp.capture))
        if error is not None or events != expected or conn.has_partial_message:
            what = f"{len(events)} events (expected {len(expected)}), error {error!r}"
            result.findings.append(Finding("reference", "events differ", "", what))
        return
    if error is None:
        expected_partial, oversized = _naive_partial(inp.data)
        if expected_partial != conn.has_partial_message:
            name = PARTIAL_OVERSIZED if expected_partial and oversized else ""
            what = (
                f"has_partial_message is {conn.has_partial_message} where the stream "
                f"{'stops inside' if expected_partial else 'ends between'} messages "
                "(EOF now would be misreported)"
            )
            result.findings.append(Finding("partial", "wrong partial state", "", what, name))
    if len(inp.chunks) == 1:
        return
    whole = connect()
    whole_events, whole_error = feed(whole, [inp.data])
    if (error is None) != (whole_error is None):
        what = f"chunked: {error!r}; whole: {whole_error!r}"
        result.findings.append(Finding("chunking", "error depends on chunking", "", what))
    elif error is None and (
        whole_events != events or whole.has_partial_message != conn.has_partial_message
    ):
        what = f"{len(events)} events chunked, {len(whole_events)} whole"
        result.findings.append(Finding("chunking", "events depend on chunking", "", what))


def _naive_partial(data: bytes) -> tuple[bool, bool]:
    """Whether a stream stops inside a mux frame or inside a ttrpc message of a served
    conn (read with plain struct unpacking, not nri_plugin code), and whether it holds an
    oversized (> MAX_DATA) message."""
    per_conn: dict[int, bytearray] = {mux.PLUGIN_SERVICE_CONN: bytearray(), 2: bytearray()}
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            return True, False
        conn, length = struct.unpack_from(">II", data, pos)
        pos += 8
        if pos + length > len(data):
            return True, False
        if conn in per_conn:
            per_conn[conn] += data[pos : pos + length]
        pos += length
    partial = oversized = False
    for buf in per_conn.values():
        at = 0
        while at < len(buf):
            if at + 10 > len(buf):
                partial = True
                break
            (length,) = struct.unpack_from(">I", buf, at)
            oversized = oversized or length > ttrpc.MAX_DATA
            if at + 10 + length > len(buf):
                partial = True
                break
            at += 10 + length
    return partial, oversized


# --- watchdog: where a slow input spends its time ------------------------------------------

_DUMP: Any = None
_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[Callable[[], str]]:
    """Dump the stack `seconds` from now (faulthandler: works inside a long C call);
    yields a function returning the innermost frame of the code under test from it."""
    global _DUMP
    if _DUMP is None:  # one per process, kept open for it (faulthandler writes to its fd)
        _DUMP = tempfile.TemporaryFile()  # noqa: SIM115
    _DUMP.seek(0)
    _DUMP.truncate()
    faulthandler.dump_traceback_later(seconds, repeat=False, file=_DUMP)

    def site() -> str:
        _DUMP.seek(0)
        text = _DUMP.read().decode(errors="replace")
        first_thread = text.split("\n\n")[0]
        frames = _FRAME.findall(first_thread)  # innermost first
        # the innermost frame of this repository (the stdlib's json or tomllib say less)
        ours = [f for f in frames if _ours(f[0])]
        picked = ours or frames
        if not picked:
            return "?"
        path, line, name = picked[0]
        return f"{_relative(path)}:{line} in {name}"

    try:
        yield site
    finally:
        faulthandler.cancel_dump_traceback_later()


# --- campaigns ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One distinct finding or policy error: how often, the first input, its kinds."""

    key: str
    oracle: str
    name: str
    error: str
    where: str
    message: str
    count: int = 0
    first_index: int = -1
    first_detail: str = ""
    kinds: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    seed: int
    inputs: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    kind_seconds: dict[str, float] = field(default_factory=dict)
    findings: dict[str, Seen] = field(default_factory=dict)
    policy_errors: dict[str, Seen] = field(default_factory=dict)
    max_rss_kib: int = 0
    slowest: list[tuple[float, int, str, str]] = field(default_factory=list)
    connection_errors: int = 0  # inputs whose stream ended in a RemoteProtocolError
    requests: int = 0
    fail_open: int = 0
    plugin_checked: int = 0  # inputs also run through the real plugin
    workers: int = 0  # worker processes started (one per worker, plus one per crash or hang)

    @property
    def inputs_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def named(self, name: str) -> list[Seen]:
        return [s for s in self.findings.values() if s.name == name]

    def unnamed(self, *oracles: str) -> list[Seen]:
        return [
            s for s in self.findings.values() if not s.name and (not oracles or s.oracle in oracles)
        ]

    def add(self, result: Result) -> None:
        self.inputs += 1
        self.by_kind[result.kind] = self.by_kind.get(result.kind, 0) + 1
        self.kind_seconds[result.kind] = self.kind_seconds.get(result.kind, 0.0) + result.seconds
        self.max_rss_kib = max(self.max_rss_kib, result.max_rss_kib)
        self.connection_errors += bool(result.connection_error)
        self.requests += result.requests
        self.fail_open += result.fail_open
        self.plugin_checked += result.plugin_checked
        self.slowest = sorted(
            [*self.slowest, (result.seconds, result.index, result.kind, result.detail[:160])],
            reverse=True,
        )[:5]
        for f in result.findings:
            self._count(self.findings, f.key, f.oracle, f.name, f.error, f.where, f.message, result)
        for p in result.policy_errors:
            seen = self._count(
                self.policy_errors,
                p.key,
                "dispatch.handle",
                "",
                p.error,
                p.where,
                p.message,
                result,
            )
            seen.methods[p.method] = seen.methods.get(p.method, 0) + 1

    @staticmethod
    def _count(
        table: dict[str, Seen],
        key: str,
        oracle: str,
        name: str,
        error: str,
        where: str,
        message: str,
        result: Result,
    ) -> Seen:
        seen = table.get(key)
        if seen is None:
            seen = table[key] = Seen(key, oracle, name, error, where, message)
            seen.first_index, seen.first_detail = result.index, result.detail
        seen.count += 1
        seen.kinds[result.kind] = seen.kinds.get(result.kind, 0) + 1
        return seen

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs_per_second"] = round(self.inputs_per_second, 1)
        return out


def memory_limit(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus `extra_bytes`, so an
    input that allocates without bound gets MemoryError instead of the OOM killer."""
    with open("/proc/self/status") as status:
        vm_size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm_size * 1024 + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_campaign(
    seed: int,
    inputs: int | None = None,
    seconds: float | None = None,
    *,
    start: int = 0,
    workers: int = 1,
    slow: float = SLOW_SECONDS,
    hard_timeout: float = 60.0,
    memory_bytes: int = 1 << 30,
    kinds: Sequence[str] = (),
    plugin_every: int = 0,
    on_result: Callable[[Result], None] | None = None,
) -> Report:
    """Run inputs `start`, `start+1`, ... of `seed` until `inputs` ran or `seconds` passed,
    in `workers` forked processes (input i goes to worker i % workers). Each worker may use
    `memory_bytes` more than it started with. One that dies, or says nothing for
    `hard_timeout` seconds, is a finding (crash or hang) for the input it was on, and a
    new worker goes on after it. Every `plugin_every`-th input also goes through the real
    plugin (endtoend.run_plugin_input)."""
    assert inputs is not None or seconds is not None
    report = Report(seed)
    began = time.monotonic()
    plan = _Plan(
        seed,
        start + inputs if inputs is not None else None,
        began + seconds if seconds is not None else None,
        workers,
        slow,
        memory_bytes,
        tuple(kinds),
        plugin_every,
    )
    running = [_Worker(plan, start + k) for k in range(workers)]
    report.workers = len(running)

    def take(result: Result) -> None:
        report.add(result)
        if on_result is not None:
            on_result(result)

    while running:
        by_fd = {w.fd: w for w in running}
        ready, _, _ = select.select(list(by_fd), [], [], 1.0)
        now = time.monotonic()
        for fd in ready:
            worker = by_fd[fd]
            for result in worker.read():
                take(result)
        for worker in list(running):
            if worker.done or now - worker.heard > hard_timeout:
                failure = worker.finish(hung=not worker.done, hard_timeout=hard_timeout)
                running.remove(worker)
                if failure is not None:
                    take(_failed_input(plan, worker.current, failure))
                    following = worker.current + workers
                    if plan.wants(following):
                        running.append(_Worker(plan, following))
                        report.workers += 1
    report.seconds = time.monotonic() - began
    report.max_rss_kib = max(report.max_rss_kib, max_rss_kib())
    return report


@dataclass(frozen=True)
class _Plan:
    seed: int
    end: int | None  # first index not to run
    deadline: float | None  # time.monotonic() to stop at
    step: int
    slow: float
    memory_bytes: int
    kinds: tuple[str, ...]
    plugin_every: int

    def wants(self, index: int) -> bool:
        return (self.end is None or index < self.end) and (
            self.deadline is None or time.monotonic() < self.deadline
        )


class _Worker:
    """A forked process running inputs first, first+step, ...; results come as JSON lines."""

    def __init__(self, plan: _Plan, first: int) -> None:
        self.plan = plan
        self.current = first
        self.heard = time.monotonic()
        self.done = False
        self._buffer = b""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            os._exit(_work(plan, first, write_fd))
        os.close(write_fd)
        self.pid, self.fd = pid, read_fd

    def read(self) -> list[Result]:
        data = os.read(self.fd, 1 << 20)
        self.heard = time.monotonic()
        if not data:
            self.done = True
            return []
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        results = []
        for line in lines:
            raw = json.loads(line)
            if "start" in raw:
                self.current = raw["start"]
            else:
                results.append(Result.from_json(raw))
                self.current = raw["index"] + self.plan.step
        return results

    def finish(self, hung: bool, hard_timeout: float) -> str | None:
        """Reap the process; what went wrong with the input it was on, if anything."""
        if hung:
            os.kill(self.pid, signal.SIGKILL)
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        if hung:
            return f"hang: no result within {hard_timeout:.0f} s"
        if os.WIFSIGNALED(status):
            return f"crash: worker killed by signal {os.WTERMSIG(status)}"
        if os.WEXITSTATUS(status) != 0:
            return f"crash: worker exited with status {os.WEXITSTATUS(status)}"
        return None


def _work(plan: _Plan, first: int, write_fd: int) -> int:
    """The worker's loop (in the forked child); returns its exit status."""
    try:
        memory_limit(plan.memory_bytes)
        with os.fdopen(write_fd, "w", buffering=1) as out:
            index = first
            while plan.wants(index):
                out.write(json.dumps({"start": index}) + "\n")
                result = run_guarded(plan.seed, index, plan.kinds, plan.slow, plan.plugin_every)
                result.max_rss_kib = max_rss_kib()
                out.write(json.dumps(result.to_json()) + "\n")
                index += plan.step
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def pick_input(seed: int, index: int, kinds: Sequence[str]) -> FuzzInput:
    """Input `index`; with `kinds`, the kind is drawn from those only."""
    if not kinds:
        return generate(seed, index)
    return generate(seed, index, kinds[index % len(kinds)])


def run_guarded(
    seed: int, index: int, kinds: Sequence[str], slow: float, plugin_every: int = 0
) -> Result:
    """run_input (confirming a slow input by running it again, since a busy machine can
    stall any input once), plus the real plugin for every `plugin_every`-th input; a
    failure of the harness itself is a finding of that input, not the end of the worker."""
    try:
        inp = pick_input(seed, index, kinds)
        result = run_input(inp, slow)
        if any(f.oracle == "slow" for f in result.findings):
            again = run_input(inp, slow)
            if not any(f.oracle == "slow" for f in again.findings):
                result = again
        if plugin_every and index % plugin_every == 0:
            from tests.fuzz.endtoend import run_plugin_input

            result.findings += run_plugin_input(inp).findings
            result.plugin_checked = True
        return result
    except Exception as exc:
        result = Result(index, "?", "?", "the harness failed", 0)
        result.findings.append(_exc_finding("harness", exc))
        return result


def _failed_input(plan: _Plan, index: int, what: str) -> Result:
    inp = pick_input(plan.seed, index, plan.kinds)
    result = Result(inp.index, inp.kind, inp.capture, inp.detail, inp.size)
    result.findings.append(Finding("worker", what.split(":")[0], "", what))
    return result


# --- reproducers -------------------------------------------------------------------------


def save_reproducer(directory: Path, name: str, inp: FuzzInput, finding: str) -> Path:
    """Write `<name>.bin` (the stream) and `<name>.json` (how to feed it, what it shows)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = inp.data
    for old in (directory / f"{name}.bin", directory / f"{name}.bin.gz"):
        old.unlink(missing_ok=True)
    if len(data) > 64 * 1024:  # the big ones are mostly one repeated byte
        (directory / f"{name}.bin.gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        (directory / f"{name}.bin").write_bytes(data)
    meta = {
        "finding": finding,
        "seed": inp.seed,
        "index": inp.index,
        "kind": inp.kind,
        "capture": inp.capture,
        "detail": inp.detail,
        "chunks": [len(c) for c in inp.chunks],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_reproducer(path: Path) -> tuple[FuzzInput, str]:
    """The input saved at `path` (the .json) and the finding it reproduces."""
    meta = json.loads(path.read_text())
    raw = path.with_suffix(".bin")
    data = raw.read_bytes() if raw.exists() else gzip.decompress(Path(f"{raw}.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"{path}: .bin changed"
    inp = FuzzInput(
        meta["seed"],
        meta["index"],
        meta["kind"],
        meta["capture"],
        meta["detail"],
        split_at(data, meta["chunks"]),
    )
    return inp, str(meta["finding"])


def shows(result: Result, key: str) -> bool:
    """Whether a result has finding `key`, or a policy error of that key."""
    return any(f.key == key for f in result.findings) or any(
        p.key == key for p in result.policy_errors
    )


def minimize(
    inp: FuzzInput, key: str, budget: float = 30.0, slow: float = SLOW_SECONDS
) -> FuzzInput:
    """A smaller input that still shows `key` (a finding's or a policy error's): one chunk
    if that does, then whole mux frames dropped, then byte ranges, while `budget` lasts."""
    stop = time.monotonic() + budget

    def still(chunks: tuple[bytes, ...]) -> bool:
        candidate = FuzzInput(inp.seed, inp.index, inp.kind, inp.capture, inp.detail, chunks)
        return shows(run_input(candidate, slow), key)

    chunks = inp.chunks
    if len(chunks) > 1 and still((inp.data,)):
        chunks = (inp.data,)
    if len(chunks) == 1:
        # Whole mux frames first; the runtime's replies (conn 2: RegisterPlugin's) stay, so
        # that the plugin still registers when the reproducer is replayed against it.
        units = _mux_units(chunks[0])
        kept = [k for k, u in enumerate(units) if _conn_of(u) == mux.RUNTIME_SERVICE_CONN]
        loose = [k for k in range(len(units)) if k not in kept]

        def joined(picked: list[int]) -> bytes:
            return b"".join(units[k] for k in sorted([*kept, *picked]))

        loose = _ddmin(loose, lambda picked: still((joined(picked),)), stop)
        data = joined(loose)
        head = b"".join(units[k] for k in kept)
        if data.startswith(head) and len(data) <= 64 * 1024:  # then byte ranges after it
            body = data[len(head) :]
            pieces = [body[k : k + 64] for k in range(0, len(body), 64)]

            def with_head(kept_pieces: list[bytes]) -> bool:
                return still((head + b"".join(kept_pieces),))

            smaller: list[bytes] = _ddmin(pieces, with_head, stop)
            data = head + b"".join(smaller)
        chunks = (data,)
    return FuzzInput(
        inp.seed, inp.index, inp.kind, inp.capture, inp.detail + " (minimized)", chunks
    )


def _conn_of(unit: bytes) -> int:
    return mux.HEADER.unpack_from(unit)[0] if len(unit) >= mux.HEADER_SIZE else -1


def _mux_units(data: bytes) -> list[bytes]:
    """The stream cut at its mux frames, for as long as they parse; the rest is one unit."""
    units, pos = [], 0
    while pos + mux.HEADER_SIZE <= len(data):
        _, length = mux.HEADER.unpack_from(data, pos)
        end = pos + mux.HEADER_SIZE + length
        if end > len(data):
            break
        units.append(data[pos:end])
        pos = end
    if pos < len(data):
        units.append(data[pos:])
    return units


def _ddmin(units: list[_T], holds: Callable[[list[_T]], bool], stop: float) -> list[_T]:
    """Drop ever smaller runs of units while `holds` stays true (a simple delta debugging)."""
    size = max(1, len(units) // 2)
    while size >= 1 and time.monotonic() < stop:
        k = 0
        while k < len(units) and time.monotonic() < stop:
            candidate = units[:k] + units[k + size :]
            if candidate and holds(candidate):
                units = candidate
            else:
                k += size
        size //= 2
    return units


def minimize_isolated(
    inp: FuzzInput, key: str, budget: float = 30.0, memory_bytes: int = 1 << 30
) -> FuzzInput:
    """minimize() in a forked child under a memory cap (the input may be a memory bomb);
    the input itself when the child fails."""
    with tempfile.TemporaryDirectory(prefix="nri-fuzz-min-") as tmp:
        out = Path(tmp) / "min"
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                memory_limit(memory_bytes)
                save_reproducer(out.parent, out.name, minimize(inp, key, budget), key)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return load_reproducer(out.with_suffix(".json"))[0]
    return inp


def run_isolated(
    inp: FuzzInput, *, plugin: bool = False, memory_bytes: int = 512 << 20, timeout: float = 60.0
) -> Result:
    """run_input (and with `plugin`, the real plugin too) in a forked child under a memory
    cap, so that a memory bomb is a MemoryError there, not the OOM killer here. A child
    that dies or hangs is a "worker" finding."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        status = 1
        try:
            memory_limit(memory_bytes)
            result = run_input(inp)
            if plugin:
                from tests.fuzz.endtoend import run_plugin_input

                result.findings += run_plugin_input(inp).findings
                result.plugin_checked = True
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(result.to_json()))
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_fd)
    data = b""
    try:
        end = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if data and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return Result.from_json(json.loads(data))
    result = Result(inp.index, inp.kind, inp.capture, inp.detail, inp.size)
    what = f"the child ended with status {status:#x} after {len(data)} bytes of result"
    result.findings.append(Finding("worker", "crash or hang", "", what))
    return result


# --- retained memory -----------------------------------------------------------------------

RETENTION_FIELDS = ("name", "original")  # "cpus" works too, but parsing 1 MiB lists is slow


def retention(field_name: str, count: int = 80, size: int = 1 << 20) -> int:
    """KiB still allocated (tracemalloc) after `count` containers, each with a different
    `size`-byte value in one field, were created and stopped (the recorded CreateContainer
    and StopContainer of containerd 2.3.4, through dispatch.handle). The policy keeps
    nothing of a stopped container, so what stays is held by caches keyed by what the
    runtime sent: `name` the container name, `original` our nri-qos.io/original
    annotation, `cpus` a (valid) cpuset string. Run it in a fresh interpreter
    (`retention_in_subprocess`): the caches must start empty."""
    import gc
    import tracemalloc

    cap = next(c for c in captures() if c.id == "containerd-2.3.4/session-logger-all-events")
    policy = make_policy()
    sync = dispatch.SyncCollector()
    decoded: dict[str, tuple[services.Method, Message]] = {}
    for event in reference_events(cap.id):
        if not isinstance(event, RequestReceived):
            continue
        method = services.lookup(event.service, event.method)
        assert method is not None
        request = services.decode(method.request, event.payload, method.name)
        decoded.setdefault(method.name, (method, request))
        if method.name in ("Configure", "Synchronize"):
            dispatch.handle(policy, method, request, sync)
    create_method, create = decoded["CreateContainer"]
    stop_method, stop = decoded["StopContainer"]
    assert isinstance(create, pb.CreateContainerRequest)
    assert isinstance(stop, pb.StopContainerRequest)
    gc.collect()
    tracemalloc.start()
    for k in range(count):
        value = f"{k:08d}" + "x" * size
        request = pb.CreateContainerRequest()
        request.CopyFrom(create)
        ctr = request.container
        ctr.id = f"fuzz-retention-{k}"
        if field_name == "name":
            ctr.name = value
        elif field_name == "original":
            ctr.annotations["nri-qos.io/original"] = value
        else:
            ctr.linux.resources.cpu.cpus = "0-1," * (size // 4) + str(k % 16)
        dispatch.handle(policy, create_method, request, sync)
        stopped = pb.StopContainerRequest()
        stopped.CopyFrom(stop)
        stopped.container.CopyFrom(ctr)
        dispatch.handle(policy, stop_method, stopped, sync)
        del request, ctr, stopped, value
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current // 1024


def retention_in_subprocess(
    fields: Sequence[str], count: int, memory_bytes: int = 2 << 30
) -> dict[str, int]:
    """retention() of each field, each in a fresh interpreter under a memory cap."""
    out = {}
    for name in fields:
        code = (
            "import json; from tests.fuzz.oracle import memory_limit, retention; "
            f"memory_limit({memory_bytes}); print(json.dumps(retention({name!r}, {count})))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        out[name] = int(done.stdout.strip().splitlines()[-1])
    return out
