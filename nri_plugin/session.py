"""One runtime connection of the plugin: registration, serving each request under its
deadline, fail-open replies, calls to the runtime.

`NriPlugin` (nri_plugin.plugin) makes one `Session` per connection and drops it when the
connection ends, so nothing of one connection's state leaks into the next. Serving a
request, whatever happens on the way (a late or failing policy, an undecodable payload, a
reply too large for ttrpc, a bug of ours), ends in a reply; a split Synchronize past its
bounds ends the connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from nri_plugin import dispatch
from nri_plugin.alarm import Alarm
from nri_plugin.channel import Ending, NriChannel
from nri_plugin.metrics import ConnectionState, MethodSeries
from nri_plugin.policy.intents import Intents
from nri_plugin.protocol import convert, services
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import (
    BadRequest,
    Event,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.errors import Code, MessageTooLarge, ProtocolError, RpcError
from qos_model.containers import BulkUpdate, Update, flat_updates
from qos_model.runtime import RuntimeInfo

if TYPE_CHECKING:
    from nri_plugin.plugin import NriPlugin

log = logging.getLogger("nri_qos.plugin")
_R = TypeVar("_R")

# The protocol level we implement; runtimes log it, none reject on it.
NRI_VERSION = "v0.12.2"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    configured: bool  # did the runtime get as far as Configure?
    reason: str


class Session:
    """State of one connection; dropped entirely when the connection ends."""

    def __init__(
        self, plugin: NriPlugin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.plugin = plugin
        self.channel = NriChannel(
            Role.PLUGIN,
            reader,
            writer,
            self._received,
            on_bad_request=self._refused,
            on_close=self._closed,
            limits=plugin.settings.channel_limits,
            external_reading=True,
        )
        self.conn = self.channel.conn
        settings = plugin.settings
        self.sync = dispatch.SyncCollector(
            max_chunks=settings.sync_max_chunks, max_objects=settings.sync_max_objects
        )
        self.runtime: RuntimeInfo | None = None
        self.request_timeout = 0.0  # seconds, from Configure (v0.7+)
        self.tasks: set[asyncio.Task[None]] = set()  # deferred updates; the channel has handlers
        self.end_reason = "runtime closed the connection"
        self.configured = False
        self._loop_thread = threading.get_ident()
        self._loop = asyncio.get_running_loop()
        # Who reads the socket (see "Serving inline"): the policy thread while it is free,
        # the loop while it is stuck. `_lock` guards the switch, what the thread read and
        # has not served yet, and what the alarm guards.
        self._lock = threading.Lock()
        self._thread_reads = True
        self._unserved: deque[tuple[Event, float]] = deque()  # with when it was read
        self._alarm: Alarm | None = None
        try:
            self._alarm = Alarm()
        except OSError as exc:  # no timerfd (a seccomp profile, say): one hop per request
            log.warning(
                "cannot create a timerfd (%s): the event loop reads every request and "
                "hands it to the policy thread, one thread hop each",
                exc,
            )
            self._thread_reads = False
        self._guarded: _Turn | None = None  # the request the alarm would answer
        self._guarding = False  # the policy thread is in a stretch the alarm guards
        self._guard_due = 0.0  # when that stretch is late (time.monotonic())
        self._alarm_due = 0.0  # when the timerfd goes off; 0: not armed
        self._hand_back_asked = False
        self._alarm_fd = -1

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> SessionEnd:
        settings = self.plugin.settings
        read_task = self.channel.start()
        if self._alarm is not None:
            self._alarm_fd = self._alarm.fileno()  # the number the loop watches, until _detach
            self._loop.add_reader(self._alarm_fd, self._alarm_went_off)
        else:
            self.channel.read_in_loop(True)
        self.plugin.policy_thread.attach(self)
        register = asyncio.create_task(self._register())
        configured = asyncio.create_task(self.plugin.configured.wait())
        # Configure may arrive before the RegisterPlugin reply: the read loop serves it
        # meanwhile. Wait for both, unless the connection ends first.
        both: asyncio.Future[Any] = asyncio.gather(register, configured)
        try:
            watched: set[asyncio.Future[Any]] = {read_task, both}
            done, _ = await asyncio.wait(
                watched,
                timeout=settings.registration_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                self.end_reason = (
                    "no Configure from the runtime within "
                    f"{settings.registration_timeout:.1f}s of connecting"
                )
            elif not read_task.done():
                register.result()
                rt = self.runtime
                assert rt is not None
                log.info(
                    "registered as %s-%s with %s %s (NRI %s: %s)",
                    settings.idx,
                    settings.name,
                    rt.name,
                    rt.version,
                    rt.nri_version,
                    rt.reason,
                )
                await read_task
        except RpcError as exc:
            self.end_reason = f"runtime refused registration: {exc}"
            log.error("the runtime refused to register %s-%s: %s", settings.idx, settings.name, exc)
        except (ConnectionError, TimeoutError, ProtocolError) as exc:
            self.end_reason = f"registration failed: {exc or type(exc).__name__}"
        finally:
            self.close(self.end_reason)
            for task in (register, configured, both, *self.tasks):
                task.cancel()
            await asyncio.gather(both, return_exceptions=True)
            await self.channel.wait_closed()
            self._detach()
        return SessionEnd(self.configured, self.end_reason)

    def close(self, reason: str) -> None:
        self.channel.close(reason)

    async def _register(self) -> None:
        s = self.plugin.settings
        request = pb.RegisterPluginRequest(
            plugin_name=s.name, plugin_idx=s.idx, NRI_version=NRI_VERSION
        )
        reply = await self.call("RegisterPlugin", request, s.registration_timeout)
        if reply.code != Code.OK:
            raise RpcError(reply.code, reply.message)

    # --- reading ---------------------------------------------------------------------------

    def _received(self, event: RequestReceived) -> Coroutine[Any, Any, None]:
        """Called by the channel as it reads a request: start serving it at once (the
        policy thread gets it before the loop does anything else), and return what the
        channel's handler task awaits (the rest, after the reply)."""
        received = time.monotonic()
        turn = self._start(event, received)
        return self._finish(turn) if turn is not None else _nothing()

    def _refused(self, event: BadRequest) -> None:
        """The channel answers it; we count and log it."""
        self.plugin.metrics.protocol_errors.labels("bad_request").inc()
        log.warning("refusing request on stream %d: %s", event.stream_id, event.message)

    def _closed(self, ending: Ending, reason: str) -> None:
        """The first reason the connection ended is the session's; a broken stream counts,
        and so does a bound the runtime made us hit (said once, here)."""
        self.end_reason = reason
        metrics = self.plugin.metrics
        if ending is Ending.TRUNCATED:
            metrics.protocol_errors.labels("truncated").inc()
        elif ending is Ending.CORRUPT:
            metrics.protocol_errors.labels("corrupt").inc()
            log.error("runtime sent corrupt data, dropping the connection (%s)", reason)
        elif ending in _OVERLOAD_LIMITS:
            metrics.overload.labels(_OVERLOAD_LIMITS[ending]).inc()
            log.error("closing the runtime connection: %s", reason)

    # --- serving inline: the policy thread reads the socket ---------------------------------
    #
    # While the policy thread is free, it waits on the socket itself (PolicyThread calls
    # the five methods below) and serves each request where it read it: decode, decide,
    # encode, write. No other thread wakes for a request answered in time. The alarm
    # (a timerfd the loop watches) guards every stretch of the thread's work that leaves
    # the socket unread: a request's budget, or TAKEOVER_AFTER for a background task or
    # a notification decided after its reply (armed lazily: see `_guard`). When the
    # thread is past its stretch as the alarm goes off, the loop answers the late
    # request with no change (`_deadline_passed`) and reads the socket itself
    # (requests then go through `_start`, each under its own deadline, queued behind the
    # late call) until the thread is free again and asks for the socket back.

    def reading_fd(self) -> int | None:
        if not self._thread_reads or self.channel.closed:
            return None
        fd = self.channel.read_fd
        return fd if fd >= 0 else None

    def readable(self) -> None:
        try:
            if not self._thread_reads:
                return
            if self.channel.replies_backed_up:
                # The runtime is not taking our replies: the loop reads with back-pressure.
                self._give_reading_to_loop()
                return
            events = self.channel.read_now(in_loop=False)
            if not events:
                return
            received = time.monotonic()
            with self._lock:
                self._unserved.extend((event, received) for event in events)
            self._serve_unserved()
        except Exception:
            log.exception("serving requests in the policy thread failed; the loop reads now")
            self._give_reading_to_loop()

    def idle(self) -> None:
        """The thread ran out of work: if the loop has the socket, ask for it back."""
        if self._thread_reads or self._hand_back_asked or self.channel.closed:
            return
        self._hand_back_asked = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._hand_back)

    def task_begins(self) -> None:
        if self._thread_reads:
            self._guard(None, TAKEOVER_AFTER)

    def task_ended(self) -> None:
        self._unguard()

    def _serve_unserved(self) -> None:
        while True:
            with self._lock:
                if not self._thread_reads or not self._unserved:
                    return
                event, received = self._unserved.popleft()
            if self.channel.closed:
                return
            if isinstance(event, RequestReceived):
                self._serve_inline(event, received)
            elif isinstance(event, ResponseReceived):
                self.channel.settle_from_thread(event)
            else:
                self.channel.refuse_from_thread(event)

    def _serve_inline(self, event: RequestReceived, received: float) -> None:
        """In the policy thread: answer one request as `_start` and `_run` do, under the
        alarm instead of a loop timer; tell the loop only when it has something to do."""
        turn = self._open(event, received)
        if turn is None:
            return
        try:
            self._admit(turn)
            if turn.method.reply_is_fixed:  # answered: only a takeover to guard
                self._guard(None, TAKEOVER_AFTER)
            else:
                self._guard(turn, turn.budget)
        except Exception as exc:
            self._unguard()
            decision = self._failed_early(turn, exc)
            if decision is not None:
                self._in_loop(self._conclude, turn, decision)
            return
        try:
            ran = self._run(turn)
        finally:
            self._unguard()
        if isinstance(ran, _Decision):
            request = ran.request
            if isinstance(request, pb.ConfigureRequest) and request.request_timeout > 0:
                self.request_timeout = request.request_timeout / 1000  # for what follows
        if _loop_has_work(turn, ran):
            self._in_loop(self._conclude, turn, ran)

    def _guard(self, turn: _Turn | None, seconds: float) -> None:
        """The policy thread begins a stretch that is late `seconds` from now: a
        request's budget (`turn`), or TAKEOVER_AFTER for work that answers no request
        (None). The alarm is armed only when it is not armed already to go off by then:
        an alarm that goes off early finds the thread not late and is armed again for the
        stretch under way (`_alarm_went_off`), so back-to-back requests share one arm,
        and no request disarms it. That costs the loop one wakeup per budget while
        requests keep coming, and one after they stop. A short stretch that armed the
        alarm moves it out to a request's budget from now when it ends (`_unguard`):
        left as it is, it would go off TAKEOVER_AFTER later in the middle of the next
        requests and wake the loop for nothing, and the next request would have to arm
        it again (a notification is decided just before the next container event)."""
        due = time.monotonic() + seconds
        with self._lock:
            self._guarded = turn
            self._guarding = True
            self._guard_due = due
            alarm = self._alarm
            if alarm is not None and not 0 < self._alarm_due <= due:
                alarm.arm_at(due)
                self._alarm_due = due

    def _unguard(self) -> None:
        with self._lock:
            short = self._guarding and self._guarded is None
            if short and self._alarm is not None and 0 < self._alarm_due <= self._guard_due:
                due = time.monotonic() + self._budget(0)
                try:
                    self._alarm.arm_at(due)
                except OSError:  # closed: the session is ending, nothing to guard
                    due = 0.0
                self._alarm_due = due
            self._guarding = False
            self._guarded = None

    def _alarm_went_off(self) -> None:
        """In the loop: the alarm went off. If the policy thread is past the stretch it
        is in, answer its request (if it has one) and read the socket meanwhile; if it
        is in a newer stretch, arm the alarm for that one; if it is free, leave it."""
        with self._lock:
            if self._alarm is None:
                return
            try:
                fired = self._alarm.fired()
            except OSError:  # closed under us: stop watching it
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._alarm_fd)
                return
            if not fired:
                return  # re-armed since: its own expiry is still to come
            self._alarm_due = 0.0
            if not self._guarding:
                return  # free: the next stretch arms it again
            if time.monotonic() < self._guard_due:
                try:
                    self._alarm.arm_at(self._guard_due)
                except OSError:  # closed under us: the session is ending
                    return
                self._alarm_due = self._guard_due
                return
            turn = self._guarded
            self._guarding = False
            self._guarded = None
            self._thread_reads = False
        if turn is not None:
            self._deadline_passed(turn)
        log.debug("the policy thread is busy; the loop reads the runtime's requests meanwhile")
        self._loop_takes_reading()

    def _give_reading_to_loop(self) -> None:
        """From the policy thread: stop reading here, the loop takes over."""
        with self._lock:
            self._thread_reads = False
        self._in_loop(self._loop_takes_reading)

    def _loop_takes_reading(self) -> None:
        """In the loop: what the thread read and did not serve goes first, in order."""
        with self._lock:
            self._thread_reads = False
            unserved = [event for event, _ in self._unserved]
            self._unserved.clear()
        if self.channel.closed:
            return
        self.channel.dispatch(unserved)
        self.channel.read_in_loop(True)

    def _hand_back(self) -> None:
        """In the loop: give the socket back to the policy thread, if nothing read here
        still waits for it (what the loop started is queued in the thread, in order)."""
        self._hand_back_asked = False
        channel = self.channel
        if (
            self._alarm is None  # nothing would answer for a late inline request
            or self._thread_reads
            or channel.closed
            or channel.backlog_waiting
            or channel.replies_backed_up
            or not self.plugin.policy_thread.idle
        ):
            return
        channel.read_in_loop(False)
        with self._lock:
            self._thread_reads = True
        self.plugin.policy_thread.wake()

    def _in_loop(self, fn: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _detach(self) -> None:
        """In the loop, at the end: the thread stops serving this connection, then
        releases its descriptors (it may be waiting on them until then)."""
        if self._alarm_fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._alarm_fd)
        thread = self.plugin.policy_thread
        thread.attach(None)
        try:
            thread.submit(self._release)
        except RuntimeError:  # shut down: nothing waits on them
            self._release()

    def _release(self) -> None:
        self.channel.release_fd()
        if self._alarm is not None:
            self._alarm.close()

    # --- serving ---------------------------------------------------------------------------

    def _budget(self, timeout_nano: int) -> float:
        s = self.plugin.settings
        remaining = timeout_nano / 1e9 if timeout_nano > 0 else self.request_timeout
        if remaining <= 0:
            return s.handler_budget
        return max(0.001, min(s.handler_budget, remaining * s.deadline_fraction))

    def _start(self, event: RequestReceived, received: float) -> _Turn | None:
        """Answer one request, whatever happens on the way: a policy that is late or
        raises, a payload that does not decode, a reply too large to send, or a bug of
        ours all end in a reply that changes nothing. The one exception is a split
        Synchronize past its bounds, which ends the connection.

        This is the path of a request the loop read, because the policy thread was
        busy (see "Serving inline" for the usual one). One thread hop: the policy thread
        decodes, decides, encodes and writes the reply itself (`_run`), then tells the
        loop, which carries out the intents (`_finish`). The loop arms the deadline:
        past the budget it writes the fail-open reply instead. Whichever comes first
        claims the request (`_Turn.claim`); the other's reply is dropped, and a late
        policy's intents still go out when it ends. A reply the policy cannot change (an
        empty message: every notification) is written here, before the policy runs.
        None: already answered (unknown method, or a bug here)."""
        loop = asyncio.get_running_loop()
        turn = self._open(event, received, loop.create_future())
        if turn is None:
            return None
        try:
            self._admit(turn)
            if not turn.method.reply_is_fixed:
                turn.timer = loop.call_later(turn.budget, self._deadline_passed, turn)
            self.plugin.policy_thread.submit(self._run_queued, turn)
        except Exception as exc:
            # A bug between the socket and the policy, or no policy thread any more.
            if turn.timer is not None:
                turn.timer.cancel()
            decision = self._failed_early(turn, exc)
            if decision is not None:
                self._after(turn, decision)
            return None
        return turn

    def _open(
        self,
        event: RequestReceived,
        received: float,
        done: asyncio.Future[_Decision | dispatch.SyncOverflow] | None = None,
    ) -> _Turn | None:
        """Where both paths begin: the method and the turn. None: a method we do not
        serve, answered UNIMPLEMENTED here."""
        method = services.lookup(event.service, event.method)
        if method is None or event.service != services.PLUGIN_SERVICE:
            self._unimplemented(event)
            return None
        return _Turn(method, event, received, done)

    def _admit(self, turn: _Turn) -> None:
        """Count the request and set its budget. A reply the policy cannot change (an
        empty message: every notification) is written now; the policy decides it after,
        in order (what it asks of other containers goes out after, as for every
        request), under no deadline, since nothing is left to answer. Raises only on a
        bug of ours (`_failed_early`)."""
        method = turn.method
        turn.metrics = self.plugin.metrics.of_method(method.name)
        turn.metrics.inc()
        turn.budget = self._budget(turn.event.timeout_nano)
        if method.reply_is_fixed:
            turn.claim()
            self._reply_now(turn, _Decision(None, dispatch.Outcome(method.response())))

    def _failed_early(self, turn: _Turn, exc: Exception) -> _Decision | None:
        """A bug between the socket and the policy: the reply that changes nothing,
        unless one was written already. Returns it, for the loop to conclude."""
        if not turn.claim():
            return None
        decision = self._internal_error(turn.method, turn.event.stream_id, exc)
        self._reply_now(turn, decision)
        return decision

    async def _finish(self, turn: _Turn) -> None:
        """In the handler task: wait for the policy thread, then act on its decision."""
        assert turn.done is not None
        try:
            ran = await turn.done
        finally:
            if turn.timer is not None:
                turn.timer.cancel()
        self._conclude(turn, ran)

    def _conclude(self, turn: _Turn, ran: _Decision | dispatch.SyncOverflow) -> None:
        """In the loop, once the policy decided (in time or late): act on the decision."""
        if isinstance(ran, dispatch.SyncOverflow):
            self._sync_overflowed(ran, turn.event.stream_id if turn.claim() else None)
            return
        if turn.late:
            if not self.channel.closed:
                log.info(
                    "%s: the late policy call ended; carrying out its other intents",
                    turn.method.name,
                )
                self._carry_out_safely(turn.method.name, ran.outcome.intents)
                self._note_synchronized(ran)
            return
        self._after(turn, ran)
        self._note_synchronized(ran)

    def _note_synchronized(self, decision: _Decision) -> None:
        """The final chunk of Synchronize, decided by the policy: the engine holds this
        runtime's containers (what readiness waits for)."""
        request = decision.request
        if (
            isinstance(request, pb.SynchronizeRequest)
            and not request.more
            and not decision.failed_open
        ):
            self.plugin.synchronized.set()

    def _run_queued(self, turn: _Turn) -> None:
        """In the policy thread, for a request the loop read: decide, then hand the
        decision to the loop's handler task."""
        assert turn.done is not None
        _settle(turn.done, self._run(turn))

    def _run(self, turn: _Turn) -> _Decision | dispatch.SyncOverflow:
        """In the policy thread: decode, decide, and write the reply unless the deadline
        already did. Never raises."""
        method, event = turn.method, turn.event
        result: _Decision | dispatch.SyncOverflow
        request: Message | None
        try:
            try:
                request, outcome = self._handle(method, event.payload)
            except _HandlerFailed as exc:
                if not turn.late:
                    self._log_failure(method.name, event.stream_id, exc)
                else:
                    log.warning("%s: the late policy call failed too: %s", method.name, exc.message)
                request = exc.request
                result = _Decision(
                    request, dispatch.fail_open(method, request, self.plugin.policy), True
                )
            else:
                result = _Decision(request, outcome)
            if turn.claim():
                self._reply_now(turn, result)
            self._to_sink(turn, result.outcome.intents)
        except dispatch.SyncOverflow as exc:
            result = exc
        except Exception as exc:  # a bug of ours: still answered, with no change
            result = _Decision(None, dispatch.fail_open(method, None, self.plugin.policy), True)
            if turn.claim():
                self._reply_now(turn, self._internal_error(method, event.stream_id, exc))
        return result

    def _reply_now(self, turn: _Turn, decision: _Decision) -> None:
        """Write the reply (from whichever thread claimed the request) and observe its
        latency, received -> written."""
        if not self._answer(turn.event.stream_id, turn.method, decision):
            self._answer_last_resort(turn.event.stream_id, turn.method)
        metrics = turn.metrics or self.plugin.metrics.of_method(turn.method.name)
        metrics.observe(time.monotonic() - turn.received)

    def _deadline_passed(self, turn: _Turn) -> None:
        """In the loop, when the budget is spent: answer with no change, unless the
        policy thread answered first. The call goes on in the policy thread and its
        state change stands: what it asks of others is carried out when it ends."""
        if not turn.claim():
            return
        turn.late = True
        method, event = turn.method, turn.event
        self.plugin.metrics.fail_open.labels(method.name, "deadline").inc()
        log.warning(
            "%s: policy did not answer within %.0f ms; replying with no change "
            "(the runtime's deadline is %.0f ms)",
            method.name,
            turn.budget * 1000,
            event.timeout_nano / 1e6,
        )
        try:
            request = _decode_quietly(method, event.payload)
            decision = _Decision(
                request, dispatch.fail_open(method, request, self.plugin.policy), True
            )
        except Exception as exc:
            decision = self._internal_error(method, event.stream_id, exc)
        self._reply_now(turn, decision)
        self._after(turn, decision)

    def _after(self, turn: _Turn, decision: _Decision) -> None:
        """In the loop, after the reply is written: what Configure set up, the intents,
        and the end of the connection after Shutdown."""
        name = turn.method.name
        try:
            self._after_configure(decision.outcome, decision.request)
        except Exception:
            log.exception("%s: acting on the reply failed", name)
        if not turn.late:
            self._carry_out_safely(name, decision.outcome.intents)
        if name == "Shutdown":
            self.close("runtime sent Shutdown")

    def _carry_out_safely(self, name: str, intents: Intents) -> None:
        try:
            self._carry_out(intents)
        except Exception:
            log.exception("%s: acting on the reply failed", name)

    def _unimplemented(self, event: RequestReceived) -> None:
        """Go's wording; NRI v0.12 runtimes fall back to StateChange on this code."""
        what = (
            f"method {event.method}"
            if event.service == services.PLUGIN_SERVICE
            else f"service {event.service}"
        )
        self._write(self.conn.send_error(event.stream_id, Code.UNIMPLEMENTED, what))

    def _log_failure(self, name: str, stream_id: int, exc: _HandlerFailed) -> None:
        """An undecodable request is the runtime's input, not our bug: one line, the
        traceback only at DEBUG. A policy that raised keeps its traceback."""
        metrics = self.plugin.metrics
        if exc.request is None:
            metrics.fail_open.labels(name, "decode").inc()
            log.warning(
                "%s on stream %d: %s; replying with no change",
                name,
                stream_id,
                exc.message,
                exc_info=exc.__cause__ if log.isEnabledFor(logging.DEBUG) else None,
            )
        else:
            metrics.fail_open.labels(name, "error").inc()
            log.error("%s: %s; replying with no change", name, exc.message, exc_info=exc.__cause__)

    def _internal_error(
        self, method: services.Method, stream_id: int, exc: BaseException
    ) -> _Decision:
        """A bug between the socket and the policy: still answer, with no change."""
        self.plugin.metrics.fail_open.labels(method.name, "internal").inc()
        log.error(
            "%s on stream %d: internal error; replying with no change",
            method.name,
            stream_id,
            exc_info=exc,
        )
        return _Decision(None, dispatch.fail_open(method, None, self.plugin.policy), True)

    def _answer(self, stream_id: int, method: services.Method, decision: _Decision) -> bool:
        """Write the reply; False when nothing could be written (then answer otherwise).

        A reply over ttrpc's 4 MiB limit would be refused by the runtime, and an error
        fails a pod start in containerd: the runtime gets the fail-open reply instead
        (always small), or RESOURCE_EXHAUSTED in Go's words if even that did not fit."""
        try:
            payload = decision.outcome.reply.SerializeToString()
            try:
                data = self.conn.send_response(stream_id, payload)
            except MessageTooLarge as exc:
                data = self._too_large(stream_id, method, decision.request, exc)
        except Exception:
            log.exception("%s on stream %d: encoding the reply failed", method.name, stream_id)
            return False
        self._write(data)
        return True

    def _too_large(
        self,
        stream_id: int,
        method: services.Method,
        request: Message | None,
        exc: MessageTooLarge,
    ) -> bytes:
        metrics = self.plugin.metrics
        metrics.protocol_errors.labels("reply_too_large").inc()
        fallback = dispatch.fail_open(method, request, self.plugin.policy).reply
        try:
            data = self.conn.send_response(stream_id, fallback.SerializeToString())
        except MessageTooLarge:
            log.error(
                "%s: the reply is %d bytes, over ttrpc's %d-byte limit, and so is the "
                "reply with no change; answering RESOURCE_EXHAUSTED",
                method.name,
                exc.length,
                exc.limit,
            )
            return self.conn.send_error(stream_id, exc.code, str(exc))
        metrics.fail_open.labels(method.name, "reply_too_large").inc()
        log.error(
            "%s: the reply is %d bytes, over ttrpc's %d-byte limit; replying with no change",
            method.name,
            exc.length,
            exc.limit,
        )
        return data

    def _answer_last_resort(self, stream_id: int, method: services.Method) -> None:
        """When building the reply itself failed: the fail-open reply, else an error."""
        try:
            reply = dispatch.fail_open(method, None, self.plugin.policy).reply
            self._write(self.conn.send_response(stream_id, reply.SerializeToString()))
        except Exception:
            log.exception("%s on stream %d: no reply could be built", method.name, stream_id)
            self._write(self.conn.send_error(stream_id, Code.INTERNAL, "internal error"))

    def _sync_overflowed(self, exc: dispatch.SyncOverflow, stream_id: int | None) -> None:
        """Too much Synchronize: refuse it and close; the runtime starts over on reconnect."""
        self.plugin.metrics.overload.labels(exc.limit).inc()
        reason = f"{exc}; the partial state was dropped"
        log.error("closing the runtime connection: %s", reason)
        if stream_id is not None:
            self._write(self.conn.send_error(stream_id, Code.RESOURCE_EXHAUSTED, str(exc)))
        self.close(reason)

    def _handle(self, method: services.Method, payload: bytes) -> tuple[Message, dispatch.Outcome]:
        """Runs in the policy thread: decode, call the policy, build the reply."""
        try:
            request = services.decode(method.request, payload, method.name)
        except ProtocolError as exc:
            if method.request is pb.SynchronizeRequest:
                self.sync.reset()  # a split exchange cannot be completed any more
            raise _HandlerFailed(None, str(exc)) from exc
        try:
            return request, dispatch.handle(self.plugin.policy, method, request, self.sync)
        except dispatch.SyncOverflow:
            raise
        except Exception as exc:
            raise _HandlerFailed(request, f"policy raised {type(exc).__name__}: {exc}") from exc

    def _carry_out(self, intents: Intents) -> None:
        """In the loop, after the reply: updates of live containers go out with
        UpdateContainers (never from inside the event). Notes and host intents went to
        the sink from the policy thread (`_to_sink`)."""
        if intents.updates:
            task = asyncio.create_task(self._send_deferred(intents.updates))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _to_sink(self, turn: _Turn, intents: Intents) -> None:
        """In the policy thread, after the reply: notes and host intents to the sink
        (thread-safe, never blocks), in the order the policy decided them, with no
        wakeup of the loop. A late call's still go, unless the connection is gone."""
        sink = self.plugin.on_intents
        if sink is not None and not (turn.late and self.channel.closed):
            hand_over(intents, sink)

    def _after_configure(self, outcome: dispatch.Outcome, request: Message | None) -> None:
        if outcome.runtime is None:
            return
        if isinstance(request, pb.ConfigureRequest) and request.request_timeout > 0:
            self.request_timeout = request.request_timeout / 1000
        self.runtime = outcome.runtime
        self.configured = True
        self.plugin.configured.set()
        self.plugin.metrics.connection_changed(ConnectionState.CONFIGURED)

    def _write(self, data: bytes) -> None:
        """Write from whichever thread we are in (replies are written by the policy
        thread when it answers in time, by the loop otherwise)."""
        if threading.get_ident() == self._loop_thread:
            self.channel.write(data)
        else:
            self.channel.write_from_thread(data)

    # --- calling the runtime ---------------------------------------------------------------

    async def call(self, method: str, message: Message, timeout: float) -> ResponseReceived:
        payload = message.SerializeToString()
        return await self.channel.call(services.RUNTIME_SERVICE, method, payload, timeout)

    async def update_containers(self, updates: Sequence[Update | BulkUpdate]) -> None:
        request = pb.UpdateContainersRequest()
        convert.updates_to_pb(updates, request.update)
        # The runtime serializes this with event processing; allow for one event ahead.
        timeout = 2 * (self.request_timeout or 2.0) + 1.0
        metrics = self.plugin.metrics
        try:
            reply = await self.call("UpdateContainers", request, timeout)
        except (TimeoutError, ConnectionError):
            metrics.update_containers.labels("no_reply").inc()
            raise
        if reply.code != Code.OK:
            metrics.update_containers.labels("failed").inc()
            raise RpcError(reply.code, reply.message)
        metrics.update_containers.labels("ok").inc()

    async def _send_deferred(self, updates: Sequence[Update | BulkUpdate]) -> None:
        try:
            await self.update_containers(updates)
        except (RpcError, TimeoutError, ConnectionError) as exc:
            ids = ", ".join(u.container_id for u in flat_updates(updates))
            log.warning("UpdateContainers for %s failed: %s", ids, exc or type(exc).__name__)


@dataclass(frozen=True, slots=True)
class _Decision:
    """What to answer a request with, and what to do after."""

    request: Message | None  # None when it could not be decoded
    outcome: dispatch.Outcome
    failed_open: bool = False  # the policy did not decide it (late, failed, undecodable)


@dataclass(slots=True)
class _Turn:
    """One request being served. The policy thread and the loop's deadline race to
    answer it; `claim` lets exactly one of them write the reply."""

    method: services.Method
    event: RequestReceived
    received: float  # time.monotonic() when the request was read
    # set by the policy thread for a request the loop read (None: served inline)
    done: asyncio.Future[_Decision | dispatch.SyncOverflow] | None = None
    budget: float = 0.0  # seconds from `received` to the fail-open reply
    late: bool = False  # the deadline answered; the policy call may still be running
    metrics: MethodSeries | None = None
    timer: asyncio.TimerHandle | None = None  # the deadline
    _claimed: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True exactly once, for whoever answers first."""
        return self._claimed.acquire(blocking=False)


def hand_over(intents: Intents, submit: Callable[[Intents], object]) -> Intents:
    """In the policy thread, right after the decision that made them: notes and host
    intents to `submit` (the host executor). Every decision, a request's (`_to_sink`) or
    a loop's (`NriPlugin.decide`), is handed over there, so the host gets them in the
    order the policy made them (an older oom_score_adj never lands after a newer one).
    Returns `intents`."""
    if intents.host or intents.notes:
        try:
            submit(intents)
        except Exception:
            log.exception("carrying out intents failed")
    return intents


def _loop_has_work(turn: _Turn, ran: _Decision | dispatch.SyncOverflow) -> bool:
    """After an inline reply: does the loop have anything to do (a wakeup is costly)?
    Notes and host intents are not its work: the policy thread hands them over itself."""
    if not isinstance(ran, _Decision) or turn.late:
        return True
    outcome = ran.outcome
    return bool(
        outcome.runtime is not None
        or outcome.intents.updates
        or turn.method.name == "Shutdown"
        or isinstance(ran.request, pb.SynchronizeRequest)
    )


# The alarm around policy-thread work that leaves the socket unread and answers no
# request of its own (a background decision, a notification decided after its reply):
# past it, the loop reads. Small next to any request budget (half the runtime's timeout),
# large next to what a decision takes (well under 10 ms at 1,000 containers).
TAKEOVER_AFTER = 0.05


# Channel endings that mean the runtime made us hit a bound, as metric labels.
_OVERLOAD_LIMITS = {
    Ending.UNREAD_REPLIES: "unread_replies",
    Ending.WRITE_BUFFER_FULL: "write_buffer",
    Ending.HANDLERS_STALLED: "requests_in_flight",
}


class _HandlerFailed(Exception):
    def __init__(self, request: Message | None, message: str) -> None:
        super().__init__(message)
        self.request = request
        self.message = message


async def _nothing() -> None:
    """The handler of a request answered as it was read."""


def _settle(done: asyncio.Future[_R], result: _R) -> None:
    """From the policy thread: hand `result` to the loop (nobody waits any more when the
    connection ended, or the loop is gone)."""

    def set_result() -> None:
        if not done.done():
            done.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        done.get_loop().call_soon_threadsafe(set_result)


def _decode_quietly(method: services.Method, payload: bytes) -> Message | None:
    try:
        return services.decode(method.request, payload, method.name)
    except ProtocolError:
        return None
