"""The real plugin (`NriPlugin.serve`, its channel, threads and deadlines) against a fuzz
input, over a socket: the runtime side writes the input's bytes and reads every reply.

`oracle.run_input` checks the protocol core and the policy one call at a time; this checks
what the runtime finally gets. Used for saved reproducers, a sample of the CI inputs and
by `bench/fuzz_wire.py --live` (there against a plugin process):

* every request the stream carries (as the sans-IO decoder reads it) gets exactly one
  reply on its stream id, up to a Shutdown, a corrupt stream or a split Synchronize the
  plugin refuses (after which it closes);
* every reply is a well-formed ttrpc response on mux conn 1 that fits in a ttrpc message,
  an OK reply decodes as the method's response, and a Configure reply subscribes to a
  non-zero event mask;
* the plugin does not close the connection unless the stream gave it a reason (corrupt
  data, Shutdown, no Configure or RegisterPlugin reply, an endless Synchronize), and when
  it stays open, a well-formed CreateContainer sent after the input is answered in time;
* nothing is logged with a traceback except a policy that raised (answered fail-open).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from nri_plugin import dispatch
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.protocol import mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import RequestReceived, ResponseReceived
from nri_plugin.protocol.errors import Code
from tests.fuzz.mutate import U32, FuzzInput, captures, decoded_requests
from tests.fuzz.oracle import (
    CONFIGURE_FAIL_OPEN_NO_EVENTS,
    OVERSIZED_REPLY,
    STREAM_ID_0,
    UNRETRIEVED_EXCEPTION,
    Finding,
    _where,
    connect,
    feed,
    make_policy,
)

PROBE_SECONDS = 3.0  # a CreateContainer after the input must be answered within this
# The plugin may close a connection whose split Synchronize goes past this many chunks
# (dispatch.SyncCollector); 64 when the bound was added.
SYNC_CHUNKS_BOUND: int = getattr(dispatch, "MAX_SYNC_CHUNKS", 64)


def _more(payload: bytes) -> bool:
    try:
        return pb.SynchronizeRequest.FromString(payload).more
    except Exception:
        return False


@dataclass
class Reply:
    stream_id: int
    code: int
    payload: bytes
    oversized: bool = False


@dataclass
class Expectation:
    """What the stream asks of the plugin, read by the sans-IO decoder."""

    requests: dict[int, str]  # stream id -> method ("" for a refused or unknown request)
    must_answer: list[int]  # stream ids that need a reply, in order (an id once per use)
    may_close: str  # why the plugin may close the connection ("" when it may not)
    last_stream_id: int  # the highest request id the stream used
    probe_stream_id: int  # where a CreateContainer after the input would be read (0: nowhere)

    @classmethod
    def of(cls, inp: FuzzInput) -> Expectation:
        conn = connect()
        # In small pieces: receive_data drops the events of a call that ends in a protocol
        # error, and the plugin may have read (and answered) those before the bad bytes.
        data = inp.data
        events, error = feed(conn, [data[k : k + 4096] for k in range(0, len(data), 4096)])
        requests: dict[int, str] = {}
        order: list[int] = []
        may_close = f"corrupt stream ({type(error).__name__})" if error is not None else ""
        registered = False
        configured = False
        shutdown = False
        split = 0  # Synchronize chunks marked `more` in a row
        for event in events:
            if isinstance(event, ResponseReceived):
                registered = registered or (event.stream_id == 1 and event.code == 0)
                continue
            if shutdown:
                continue
            method = ""
            if isinstance(event, RequestReceived):
                found = services.lookup(event.service, event.method)
                if found is not None and event.service == services.PLUGIN_SERVICE:
                    method = found.name
            requests.setdefault(event.stream_id, method)
            order.append(event.stream_id)
            configured = configured or method == "Configure"
            if method == "Shutdown":
                shutdown = True
                may_close = may_close or "Shutdown"
            if method == "Synchronize" and isinstance(event, RequestReceived):
                split = split + 1 if _more(event.payload) else 0
                if split > SYNC_CHUNKS_BOUND:
                    may_close = may_close or f"a split Synchronize of over {split - 1} chunks"
        if not registered:
            may_close = may_close or "no RegisterPlugin reply"
        if not configured:
            may_close = may_close or "no Configure"
        must = [] if error is not None else order
        last = max(requests, default=0)
        probe = 0
        sid = last + 2 if last % 2 else last + 1
        if error is None and sid <= U32:
            # The probe is only fair when the stream left the reader between messages (not
            # inside one, nor skipping an oversized one): then it decodes as a request.
            after, problem = feed(conn, [probe_request(inp, sid)])
            if problem is None and any(
                isinstance(e, RequestReceived) and e.stream_id == sid for e in after
            ):
                probe = sid
        return cls(requests, must, may_close, last, probe)


@dataclass
class PluginRun:
    findings: list[Finding] = field(default_factory=list)
    answered: int = 0
    closed: str = ""  # why the plugin closed the connection, as far as we can tell
    probe: str = ""  # "answered", "skipped: ...", or what went wrong


class _Wire:
    """The runtime side's reader: the plugin's frames, per conn, as they arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.mux = mux.MuxReader([mux.PLUGIN_SERVICE_CONN, mux.RUNTIME_SERVICE_CONN])
        self.frames = {c: ttrpc.FrameReader() for c in (1, 2)}
        self.replies: list[Reply] = []
        self.calls: list[tuple[int, ttrpc_pb2.Request]] = []
        self.arrived = asyncio.Event()
        self.eof = False
        self.broken = ""

    async def pump(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                for conn, chunk in self.mux.feed(data):
                    for frame in self.frames[conn].feed(chunk):
                        self._frame(conn, frame)
                self.arrived.set()
        except ConnectionError:
            pass  # the plugin aborted the connection: an end like EOF, judged by the caller
        except Exception as exc:  # the plugin wrote something our reader refuses
            self.broken = f"{type(exc).__name__}: {exc}"
        finally:
            self.eof = True
            self.arrived.set()

    def _frame(self, conn: int, frame: ttrpc.Frame | ttrpc.OversizedFrame) -> None:
        if conn == mux.RUNTIME_SERVICE_CONN:  # the plugin calls us
            if isinstance(frame, ttrpc.Frame) and frame.type == ttrpc.MessageType.REQUEST:
                call = ttrpc_pb2.Request.FromString(frame.data)
                self.calls.append((frame.stream_id, call))
                if call.method == "UpdateContainers":
                    reply = ttrpc.encode_response(frame.stream_id, b"")
                    self.writer.write(mux.encode_message(mux.RUNTIME_SERVICE_CONN, reply))
            return
        if isinstance(frame, ttrpc.OversizedFrame):
            self.replies.append(Reply(frame.stream_id, -1, b"", oversized=True))
            return
        if frame.type != ttrpc.MessageType.RESPONSE or frame.flags != 0:
            self.broken = f"frame of type {frame.type} flags {frame.flags} on conn 1"
            return
        resp = ttrpc_pb2.Response.FromString(frame.data)
        code = resp.status.code if resp.HasField("status") else 0
        self.replies.append(Reply(frame.stream_id, code, resp.payload))

    async def until(self, done: Callable[[], object], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not done():
            if self.eof:
                return bool(done())
            self.arrived.clear()
            left = end - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        return True


class _Errors(logging.Handler):
    """Log records with a traceback (the plugin's, and asyncio's "exception was never
    retrieved"), other than a policy that raised (expected)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and "policy raised" not in record.getMessage():
            self.records.append(record)


@contextlib.contextmanager
def _logged_errors() -> Iterator[_Errors]:
    handler = _Errors()
    loggers = [logging.getLogger("nri_qos"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def probe_request(inp: FuzzInput, stream_id: int) -> bytes:
    """A well-formed CreateContainer from the input's capture, on `stream_id`."""
    (cap,) = [c for c in captures() if c.id == inp.capture]
    msgs = cap.copy_messages()
    (create,) = decoded_requests(msgs, ["CreateContainer"])[:1]
    body = ttrpc.encode_request(
        stream_id,
        services.PLUGIN_SERVICE,
        "CreateContainer",
        create.request.SerializeToString(),
        timeout_nano=2 * 10**9,
    )
    return mux.encode_message(mux.PLUGIN_SERVICE_CONN, body)


async def exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    inp: FuzzInput,
    *,
    wait: float = 5.0,
    registered: bool = False,
) -> PluginRun:
    """Play the runtime for one connection: take the plugin's RegisterPlugin (unless
    `registered`), write the input, collect and judge the replies, then probe."""
    run = PluginRun()
    wire = _Wire(reader, writer)
    pump = asyncio.create_task(wire.pump())
    try:
        if not registered:
            if not await wire.until(lambda: wire.calls, wait):
                run.findings.append(Finding("plugin", "no RegisterPlugin", "", "none in time"))
                return run
            sid, call = wire.calls[0]
            if (sid, call.method) != (1, "RegisterPlugin"):
                what = f"first call {call.method} on stream {sid}"
                run.findings.append(Finding("plugin", "bad RegisterPlugin", "", what))
        expect = Expectation.of(inp)
        try:
            for chunk in inp.chunks:
                writer.write(chunk)
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
            await writer.drain()
        except ConnectionError:
            pass  # the plugin closed while we wrote: judged below

        def all_answered() -> bool:
            have = {r.stream_id for r in wire.replies}
            return all(sid in have for sid in expect.must_answer)

        await wire.until(all_answered, wait)
        if wire.eof:
            run.probe = "skipped: connection closed"
        elif expect.may_close:
            run.probe = f"skipped: {expect.may_close}"
        elif not expect.probe_stream_id:
            run.probe = "skipped: the stream ends inside a message"
        else:
            await _probe(wire, writer, inp, expect.probe_stream_id, run)
        _judge(expect, wire, run)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
    return run


async def _probe(
    wire: _Wire, writer: asyncio.StreamWriter, inp: FuzzInput, sid: int, run: PluginRun
) -> None:
    try:
        writer.write(probe_request(inp, sid))
        await writer.drain()
    except ConnectionError:
        pass
    ok = await wire.until(lambda: any(r.stream_id == sid for r in wire.replies), PROBE_SECONDS)
    if not ok:
        closed = " (connection closed)" if wire.eof else ""
        run.probe = f"not answered in {PROBE_SECONDS} s{closed}"
        run.findings.append(Finding("plugin", "probe not answered", "", run.probe))
        return
    (reply,) = [r for r in wire.replies if r.stream_id == sid]
    if reply.code != 0:
        run.findings.append(Finding("plugin", "probe refused", "", f"status {reply.code}"))
    run.probe = "answered"


def _judge(expect: Expectation, wire: _Wire, run: PluginRun) -> None:
    if wire.broken:
        run.findings.append(Finding("plugin", "unreadable output", "", wire.broken))
    seen: dict[int, int] = {}
    uses = {sid: expect.must_answer.count(sid) for sid in set(expect.must_answer)}
    for reply in wire.replies:
        seen[reply.stream_id] = seen.get(reply.stream_id, 0) + 1
        method = expect.requests.get(reply.stream_id)
        if reply.oversized:
            what = f"reply to {method or '?'} on stream {reply.stream_id} is over 4 MiB"
            run.findings.append(Finding("plugin", "oversized reply", "", what, OVERSIZED_REPLY))
            continue
        if method is None:
            if reply.stream_id <= expect.last_stream_id + 2:
                continue  # the probe's reply
            what = f"reply on stream {reply.stream_id}, which no request used"
            run.findings.append(Finding("plugin", "unsolicited reply", "", what))
            continue
        if reply.code != Code.OK or not method:
            continue
        response = services.PLUGIN_METHODS[method].response
        try:
            decoded = response.FromString(reply.payload)
        except Exception as exc:
            what = f"{method} reply does not decode: {exc}"
            run.findings.append(Finding("plugin", "undecodable reply", "", what))
            continue
        if isinstance(decoded, pb.ConfigureResponse) and decoded.events == 0:
            what = "Configure answered with events=0"
            name = CONFIGURE_FAIL_OPEN_NO_EVENTS
            run.findings.append(Finding("plugin", "Configure events=0", "", what, name))
    run.answered = len(seen)
    # A reused id is answered once per use: the request, then the refusal (as Go does).
    twice = sorted(sid for sid, n in seen.items() if n > max(1, uses.get(sid, 1)))
    if twice:
        run.findings.append(Finding("plugin", "answered twice", "", f"streams {twice[:5]}"))
    must = expect.must_answer
    refused = _refused_sync(expect, wire)
    if refused is not None:  # it closes after refusing: nothing after that is owed
        must = must[: must.index(refused) + 1] if refused in must else must
    if wire.eof and expect.may_close:
        # It had a reason to close (registration refused, no Configure, Shutdown, ...):
        # what was still being handled then goes unanswered, as with any closed connection.
        must = []
    missing = [sid for sid in must if sid not in seen]
    closed_early = wire.eof and not expect.may_close and refused is None
    if missing:
        name = STREAM_ID_0 if 0 in missing else ""
        methods = sorted({expect.requests[sid] or "refused" for sid in missing})
        what = f"{len(missing)} request(s) never answered: streams {missing[:5]} ({methods})"
        if closed_early:
            what += "; the plugin closed the connection"
        run.findings.append(Finding("plugin", "unanswered request", "", what, name))
    elif closed_early:
        run.findings.append(
            Finding("plugin", "closed the connection", "", "with no reason in the stream")
        )
    if wire.eof:
        run.closed = expect.may_close or "unexpected"


def _refused_sync(expect: Expectation, wire: _Wire) -> int | None:
    """The stream id of a split Synchronize the plugin refused past its bounds (after
    which it closes the connection), if any."""
    for r in wire.replies:
        if r.code == Code.RESOURCE_EXHAUSTED and expect.requests.get(r.stream_id) == "Synchronize":
            return r.stream_id
    return None


def run_plugin_input(inp: FuzzInput, *, wait: float = 5.0) -> PluginRun:
    """The in-process plugin (a real `NriPlugin` with a QosPolicy) against one input."""
    with _logged_errors() as errors:
        run = asyncio.run(_in_process(inp, wait))
        gc.collect()  # "exception was never retrieved" is logged when a future is collected
    for record in errors.records:
        exc = record.exc_info[1] if record.exc_info else None
        error = type(exc).__name__ if exc is not None else "?"
        where = _where(exc) if exc is not None else ""
        text = str(exc)
        name = ""
        if "exceed maximum message size" in text or "exceeds the" in text:
            name = OVERSIZED_REPLY
        elif "stream id 0 " in text:
            name = STREAM_ID_0
        elif record.name == "asyncio" and "never retrieved" in record.getMessage():
            name = UNRETRIEVED_EXCEPTION
        message = record.getMessage()[:200]
        run.findings.append(Finding("plugin-log", error, where, message, name))
    return run


async def _in_process(inp: FuzzInput, wait: float) -> PluginRun:
    a, b = socket.socketpair()
    plugin = NriPlugin(make_policy(), PluginSettings(registration_timeout=2.0))
    p_reader, p_writer = await asyncio.open_unix_connection(sock=b)
    serving = asyncio.create_task(plugin.serve(p_reader, p_writer))
    r_reader, r_writer = await asyncio.open_unix_connection(sock=a)
    try:
        return await exchange(r_reader, r_writer, inp, wait=wait)
    finally:
        r_writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
        plugin.close()


def findings_of(runs: Sequence[PluginRun]) -> list[Finding]:
    return [f for r in runs for f in r.findings]
