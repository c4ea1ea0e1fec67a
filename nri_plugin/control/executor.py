"""Where the engine's intents are carried out: after the reply, off the request path, each
host operation under a deadline.

The plugin runtime hands each request's `Intents` to `HostExecutor.submit` once the reply
is written. Notes go straight into the decision log (and the log, warnings as warnings).
Each host intent becomes one job; jobs run in order on one host worker thread — never the
thread that answers the runtime — and other host reads (the usage sampler) join the same
queue through `run`, so host I/O is serialized in one place.

What can go wrong on a host, and what happens then:

* A file blocks in the kernel (a hung cgroupfs, procfs under pressure; a FIFO in tests)
  and Python cannot interrupt the syscall. A scheduler thread watches the running job's
  deadline; when it passes, the worker thread is abandoned (left blocked, reported with
  the file it was on, from `isolation.inflight`), a fresh worker takes the queue, and the
  job's key (domain and container) is quarantined: later jobs for it wait, and the latest
  one is tried again after a back-off that doubles per strike, but never while a thread
  is still stuck on that key (so one hung file holds at most one thread). At most `max_stuck`
  threads are ever abandoned; past that, host work stalls visibly (status, an error)
  instead of piling up threads, and resumes when a blocked thread returns.
* A job fails for a reason that may pass (EIO, ENOSPC, EBUSY...: `Applied.retry`): it is
  retried a bounded number of times with growing delays. Other failures are final.
* One job failing never affects another: each intent is its own job.
* A newer intent for the same container and domain supersedes a queued or pending-retry
  older one (the last plan is the one to apply).

The scheduler sleeps until the next deadline or retry is due, and indefinitely when there
is nothing to watch: no polling when idle.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from isolation import inflight
from nri_plugin.control.base import Applied, Controllers
from nri_plugin.events import EventLog
from nri_plugin.policy.intents import HostIntent, Intents, Note, Severity

log = logging.getLogger("nri_qos.decisions")
_R = TypeVar("_R")


class HostStalled(TimeoutError):
    """A host operation did not finish in time, or its target is quarantined."""


@dataclass(frozen=True, slots=True)
class HostLimits:
    deadline: float = 2.0  # seconds one host operation may take before it is abandoned
    retries: int = 3  # further attempts after a failure that may pass
    retry_delay: float = 1.0  # before the first retry; doubled for each next one
    quarantine: float = 30.0  # first back-off of a key whose operation got stuck
    quarantine_max: float = 600.0
    max_stuck: int = 4  # threads that may be left blocked before host work stalls
    max_queued: int = 50_000  # jobs waiting; beyond it new ones are dropped, with an error


@dataclass(eq=False, slots=True)
class _Job:
    key: str  # what a stuck job quarantines, and what supersedes what
    label: str  # for people: "oom post-start default/web/app"
    work: Callable[[], Any]
    subject: str = ""
    generation: int = 0
    attempt: int = 0
    future: Future[Any] | None = None  # run(): the caller waits on it
    intent: HostIntent | None = None  # the intent a job applies (for its rechecks)


@dataclass(eq=False, slots=True)
class _Worker:
    thread: threading.Thread | None = None
    job: _Job | None = None
    started: float = 0.0
    abandoned: bool = False

    @property
    def ident(self) -> int:
        assert self.thread is not None and self.thread.ident is not None
        return self.thread.ident


@dataclass(slots=True)
class _Quarantine:
    until: float = 0.0
    strikes: int = 0
    path: str = ""
    held: _Job | None = None  # the latest job for the key, run when the back-off ends


@dataclass(slots=True)
class _Timer:
    due: float
    seq: int
    job: _Job | None = None  # a retry to queue
    release: str = ""  # or a quarantined key to release

    def __lt__(self, other: _Timer) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


@dataclass(frozen=True, slots=True)
class StuckIo:
    path: str
    label: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """What status views show about host work."""

    queued: int
    retries_pending: int
    stalled: bool
    stuck: tuple[StuckIo, ...]
    quarantined: dict[str, str]  # key -> "path, retry in N s (strike k)"
    counts: dict[str, int] = field(default_factory=dict)
    rechecks_pending: int = 0  # intents due to run again (late forks), not failures


class HostExecutor:
    def __init__(
        self,
        controllers: Controllers,
        events: EventLog | None = None,
        limits: HostLimits | None = None,
    ) -> None:
        self.controllers = controllers
        self._observers: list[Callable[[Intents], None]] = []
        self.events = events if events is not None else EventLog()
        self.limits = limits if limits is not None else HostLimits()
        self.counts: Counter[str] = Counter()  # applied, failed, retried, abandoned, ...
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._latest: dict[str, int] = {}
        self._quarantine: dict[str, _Quarantine] = {}
        self._stuck: dict[int, _Worker] = {}
        self._active: _Worker | None = None
        self._wake_at = float("inf")  # when the scheduler next wakes by itself
        self._closing = False
        self._spawn_worker()
        self._scheduler = threading.Thread(
            target=self._schedule, name="nri-host-watch", daemon=True
        )
        self._scheduler.start()

    # --- the caller's side -----------------------------------------------------------------

    def start(self) -> None:
        """Start the controllers (raises ControllerStartError for a Required one)."""
        self.record(self.controllers.start())

    def observe(self, callback: Callable[[Intents], None]) -> None:
        """Also hand every submitted Intents to `callback` (metrics count decisions);
        called on the submitter's thread, before anything is queued; must not block."""
        self._observers.append(callback)

    def submit(self, intents: Intents) -> None:
        """Carry out `intents` (minus updates, which the plugin sends): never blocks."""
        for observer in self._observers:
            try:
                observer(intents)
            except Exception:
                log.exception("an intents observer failed")
        self.record(intents.notes)
        if not intents.host:
            return
        with self._cond:
            for intent in intents.host:
                self._enqueue(self._intent_job(intent))
            self._cond.notify_all()

    async def run(self, fn: Callable[[], _R], key: str = "read") -> _R:
        """Run other host I/O (reads) on the host thread, after what is queued. Raises
        HostStalled when it does not finish within the deadline or `key` is quarantined."""
        future: Future[_R] = Future()
        job = _Job(key=f"run:{key}", label=key, work=fn, future=future)
        with self._cond:
            self._enqueue(job)
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    async def drain(self) -> None:
        """Wait until every host job queued so far has run (or was abandoned)."""
        await self.run(lambda: None, key="drain")

    def record(self, notes: Sequence[Note]) -> None:
        for note in notes:
            if note.severity is Severity.ERROR:
                log.error("%s: %s", note.subject, note.message)
            elif note.severity is Severity.WARNING:
                log.warning("%s: %s", note.subject, note.message)
            else:
                log.debug("%s %s: %s", note.kind, note.subject, note.message)
            self.events.add(note.kind, note.subject, note.message)

    def status(self) -> ExecutorStatus:
        now = time.monotonic()
        with self._cond:
            stuck = tuple(
                StuckIo(inflight.path_of(w.ident), w.job.label if w.job else "", now - w.started)
                for w in self._stuck.values()
            )
            quarantined = {
                key: f"{q.path or 'unknown path'}, retry in {max(0.0, q.until - now):.0f} s "
                f"(strike {q.strikes})"
                for key, q in self._quarantine.items()
                if q.until > now
            }
            return ExecutorStatus(
                queued=len(self._queue),
                retries_pending=sum(
                    1 for t in self._timers if t.job is not None and not _is_recheck(t.job)
                ),
                rechecks_pending=sum(
                    1 for t in self._timers if t.job is not None and _is_recheck(t.job)
                ),
                stalled=self._active is None and not self._closing,
                stuck=stuck,
                quarantined=quarantined,
                counts=dict(self.counts),
            )

    def close(self) -> None:
        with self._cond:
            self._closing = True
            pending = [j for j in self._queue if j.future is not None]
            self._queue.clear()
            self._timers.clear()
            self._cond.notify_all()
        for job in pending:
            _fail(job, HostStalled("the host executor is closing"))
        self.controllers.stop()

    # --- jobs ------------------------------------------------------------------------------

    def _intent_job(self, intent: HostIntent) -> _Job:
        ref = intent.container
        key = f"{intent.domain}:{type(intent).__name__}:{ref.id}"
        generation = self._latest.get(key, 0) + 1
        self._latest[key] = generation
        subject = ref.name or ref.id
        return _Job(
            key=key,
            label=f"{intent.domain} {intent.phase} {subject}",
            work=lambda: self.controllers.apply_one(intent),
            subject=subject,
            generation=generation,
            intent=intent,
        )

    def _recheck(self, job: _Job) -> None:
        """Under the lock: a job whose intent asks to be checked again once its
        container's processes settled is queued again after the first delay."""
        intent = job.intent
        if intent is None or not intent.recheck_after or not self._current(job):
            return
        again = replace(intent, recheck_after=intent.recheck_after[1:])
        follow = _Job(
            job.key,
            job.label.removesuffix(" (recheck)") + " (recheck)",
            lambda: self.controllers.apply_one(again),
            job.subject,
            job.generation,
            intent=again,
        )
        self._add_timer(_Timer(time.monotonic() + intent.recheck_after[0], next(self._seq), follow))
        self.counts["rechecks"] += 1

    def _enqueue(self, job: _Job) -> None:
        """Under the lock."""
        if self._closing:
            _fail(job, HostStalled("the host executor is closed"))
            return
        if len(self._queue) >= self.limits.max_queued:
            self.counts["dropped"] += 1
            _fail(job, HostStalled("too much host work queued"))
            if self.counts["dropped"] == 1 or self.counts["dropped"] % 1000 == 0:
                log.error(
                    "host work is not keeping up: %d jobs queued, %d dropped so far (%s)",
                    len(self._queue),
                    self.counts["dropped"],
                    job.label,
                )
            return
        self._queue.append(job)

    def _current(self, job: _Job) -> bool:
        """Under the lock: False for an intent a newer one superseded."""
        return job.future is not None or self._latest.get(job.key, 0) == job.generation

    # --- the worker thread -----------------------------------------------------------------

    def _spawn_worker(self) -> None:
        """Under the lock (or in __init__): a fresh active worker."""
        worker = _Worker()
        worker.thread = threading.Thread(
            target=self._work, args=(worker,), name="nri-host", daemon=True
        )
        self._active = worker
        worker.thread.start()

    def _work(self, me: _Worker) -> None:
        while True:
            with self._cond:
                job = self._next_job(me)
                if job is None:
                    return
            outcome, error = _execute(job)
            with self._cond:
                if me.abandoned:
                    notes = self._returned(me, job)
                    leaving = self._active is not me
                else:
                    me.job = None
                    notes = self._finished(job, outcome, error)
                    leaving = False
            self._record_later(notes)
            if leaving:
                inflight.forget(threading.get_ident())
                return

    def _next_job(self, me: _Worker) -> _Job | None:
        """Under the lock: wait for a job this worker may run; None when it must stop."""
        while True:
            while not self._queue and not self._closing and self._active is me:
                self._cond.wait()
            if self._closing or self._active is not me:
                return None
            job = self._queue.popleft()
            if not self._current(job):
                self.counts["superseded"] += 1
                continue
            quarantine = self._quarantine.get(job.key)
            if quarantine is not None and quarantine.until > time.monotonic():
                if job.future is not None:
                    _fail(job, HostStalled(f"{job.label}: {quarantine.path} is quarantined"))
                else:
                    quarantine.held = job
                continue
            me.job, me.started = job, time.monotonic()
            if me.started + self.limits.deadline < self._wake_at:
                self._cond.notify_all()  # the scheduler must watch this deadline
            return job

    def _finished(self, job: _Job, outcome: Any, error: BaseException | None) -> list[Note]:
        """Under the lock: settle the job's future, count, schedule a retry."""
        self._quarantine.pop(job.key, None)  # it answered: the key is healthy
        if job.future is not None:
            if error is not None:
                _fail(job, error)
            elif not job.future.done():
                job.future.set_result(outcome)
            return []
        if error is not None:  # apply_one never raises; this is a bug, say so
            self.counts["failed"] += 1
            return [Note("host", job.subject, f"{job.label} crashed: {error!r}", Severity.ERROR)]
        assert isinstance(outcome, Applied)
        note = outcome.note
        if note is None or note.severity is Severity.INFO:
            self.counts["done"] += 1
            self._recheck(job)
            return [note] if note is not None else []
        if note.kind == "refused":
            self.counts["refused"] += 1
            return [note]
        self.counts["failed"] += 1
        if not outcome.retry or job.attempt >= self.limits.retries or not self._current(job):
            return [note]
        delay = self.limits.retry_delay * (2**job.attempt)
        retry = _Job(
            job.key,
            job.label,
            job.work,
            job.subject,
            job.generation,
            job.attempt + 1,
            intent=job.intent,
        )
        self._add_timer(_Timer(time.monotonic() + delay, next(self._seq), job=retry))
        self.counts["retried"] += 1
        again = f"{note.message}; retry {retry.attempt} of {self.limits.retries} in {delay:g} s"
        return [Note(note.kind, note.subject, again, note.severity)]

    def _returned(self, me: _Worker, job: _Job) -> list[Note]:
        """Under the lock: an abandoned thread came back. It takes over as the worker if
        host work had stalled; its key may be tried again at once."""
        elapsed = time.monotonic() - me.started
        path = inflight.path_of(me.ident)
        self._stuck.pop(me.ident, None)
        quarantine = self._quarantine.get(job.key)
        if quarantine is not None and quarantine.until <= time.monotonic():
            # the back-off ended while the thread was stuck: the held job may go now
            self._add_timer(_Timer(time.monotonic(), next(self._seq), release=job.key))
        if self._active is None and not self._closing:
            me.abandoned, me.job = False, None
            self._active = me
            self._cond.notify_all()
        message = f"{job.label}: {path or 'the host'} answered after {elapsed:.1f} s"
        return [Note("host", job.subject or job.label, message, Severity.WARNING)]

    # --- the scheduler thread --------------------------------------------------------------

    def _schedule(self) -> None:
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                worker = self._active
                late = worker is not None and now >= worker.started + self.limits.deadline
                if worker is not None and worker.job is not None and late:
                    notes = self._abandon(worker, now)
                    self._cond.release()  # record (log, events) without the lock
                    try:
                        self._record_later(notes)
                    finally:
                        self._cond.acquire()
                    continue
                while self._timers and self._timers[0].due <= now:
                    self._fire(heapq.heappop(self._timers), now)
                wake = float("inf")
                if worker is not None and worker.job is not None:
                    wake = worker.started + self.limits.deadline
                if self._timers:
                    wake = min(wake, self._timers[0].due)
                self._wake_at = wake
                self._cond.wait(None if wake == float("inf") else max(0.0, wake - now))
                self._wake_at = float("inf")

    def _fire(self, timer: _Timer, now: float) -> None:
        """Under the lock: a retry is due, or a quarantine ends."""
        if timer.job is not None:
            if self._current(timer.job):
                self._enqueue(timer.job)
                self._cond.notify_all()
            return
        quarantine = self._quarantine.get(timer.release)
        if quarantine is None or quarantine.until > now or quarantine.held is None:
            return
        if any(w.job is not None and w.job.key == timer.release for w in self._stuck.values()):
            return  # never a second thread on a stuck key: its return releases the key
        job, quarantine.held = quarantine.held, None
        quarantine.until = 0.0  # let it through; a new strike quarantines it again
        self._enqueue(job)
        self._cond.notify_all()

    def _abandon(self, worker: _Worker, now: float) -> list[Note]:
        """Under the lock: the worker's job passed its deadline."""
        job = worker.job
        assert job is not None
        worker.abandoned = True
        self._stuck[worker.ident] = worker
        self.counts["abandoned"] += 1
        path = inflight.path_of(worker.ident)
        quarantine = self._quarantine.setdefault(job.key, _Quarantine())
        quarantine.strikes += 1
        backoff = min(
            self.limits.quarantine_max,
            self.limits.quarantine * 2 ** (quarantine.strikes - 1),
        )
        quarantine.until, quarantine.path = now + backoff, path
        if job.future is None:
            quarantine.held = job  # try the same operation again after the back-off
        else:
            _fail(job, HostStalled(f"{job.label}: no answer from {path or 'the host'}"))
        self._add_timer(_Timer(quarantine.until, next(self._seq), release=job.key))
        notes = [
            Note(
                "host",
                job.subject or job.label,
                f"{job.label}: no answer from {path or 'the host'} within "
                f"{self.limits.deadline:g} s; abandoned, and retried in {backoff:g} s",
                Severity.ERROR,
            )
        ]
        if len(self._stuck) < self.limits.max_stuck:
            self._spawn_worker()
            return notes
        self._active = None
        blocked = ", ".join(sorted({inflight.path_of(i) or "?" for i in self._stuck}))
        notes.append(
            Note(
                "host",
                "host",
                f"host I/O stalled: {len(self._stuck)} threads are blocked ({blocked}); host "
                "intents wait until one returns",
                Severity.ERROR,
            )
        )
        return notes

    def _add_timer(self, timer: _Timer) -> None:
        """Under the lock."""
        heapq.heappush(self._timers, timer)
        if timer.due < self._wake_at:
            self._cond.notify_all()

    def _record_later(self, notes: list[Note]) -> None:
        if notes:
            self.record(notes)


def _is_recheck(job: _Job) -> bool:
    return job.label.endswith(" (recheck)")


def _execute(job: _Job) -> tuple[Any, BaseException | None]:
    try:
        return job.work(), None
    except Exception as exc:
        return None, exc


def _fail(job: _Job, error: BaseException) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(error)
