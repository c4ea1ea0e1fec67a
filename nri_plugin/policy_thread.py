"""The one thread that runs the policy, and that reads the runtime's socket while idle.

Every policy call runs here, one at a time, so the engine never sees two callers. Work
comes two ways:

- tasks submitted from the event loop (`submit`, an Executor so `run_in_executor`
  works): the background loops' decisions, and requests the loop read itself;
- requests read straight from the runtime's socket, when a `SocketServer` is attached
  and wants it: with nothing queued, the thread waits in poll() on the socket and a
  wake-up descriptor together, and serves what it reads itself (decode, decide,
  encode, write). A request then costs one wakeup (this thread's) instead of two (the
  loop's, then this thread's). On a 2-CPU node starting containers, each wakeup waits
  for a CPU: that hop was most of a request's cost under contention.

The attached server decides when the socket is this thread's to read (it gives it to the
event loop while this thread is stuck, and takes it back when asked); it is told when a
task begins and ends, so it can arm its own deadline around work that keeps the socket
unread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger("nri_qos.plugin")
_R = TypeVar("_R")


class SocketServer(Protocol):
    """What the policy thread needs of a connection it reads for."""

    def reading_fd(self) -> int | None:
        """The socket to wait on while idle; None while the thread must not read it."""

    def readable(self) -> None:
        """The socket is readable: read and serve (never raises)."""

    def idle(self) -> None:
        """Tasks ran and the queue is empty now (never raises)."""

    def task_begins(self) -> None:
        """A task is about to run while the socket is unread (never raises)."""

    def task_ended(self) -> None:
        """That task ended (never raises)."""


class PolicyThread(Executor):
    """A single worker thread (named `nri-policy`) with an optional socket to serve."""

    def __init__(
        self, name: str = "nri-policy", on_idle: Callable[[], object] | None = None
    ) -> None:
        self._name = name
        # called each time the queue runs dry, before the thread waits (idle-time work:
        # garbage collection, gc_pacing.py); must not raise
        self.on_idle = on_idle
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._server: SocketServer | None = None
        self._shutdown = False
        self._running = False  # a task is running
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.ident: int | None = None

    # --- Executor ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., _R], /, *args: Any, **kwargs: Any) -> Future[_R]:
        future: Future[_R] = Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._tasks.append((future, call, args if not kwargs else ()))
            self._ensure_started()
        self.wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            dropped = list(self._tasks) if cancel_futures else []
            if cancel_futures:
                self._tasks.clear()
            thread = self._thread
            if thread is None:  # never started: nobody else will close it
                self._close_wake_fd()
        for future, _, _ in dropped:
            future.cancel()
        self.wake()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # --- the attached socket ---------------------------------------------------------------

    def attach(self, server: SocketServer | None) -> None:
        """Serve `server`'s socket while idle (None: serve none). Takes effect at once."""
        with self._lock:
            self._server = server
            if server is not None:
                self._ensure_started()
        self.wake()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running (read from the loop, to hand the socket back)."""
        return not self._running and not self._tasks

    def wake(self) -> None:
        """Make the thread look again at its queue and at what to read. Under the lock:
        once the thread has ended and closed its descriptor, the number may belong to
        another file, which must never get our 8 bytes."""
        with self._lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)

    def _close_wake_fd(self) -> None:
        """With the lock held."""
        if self._wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
            self._wake_fd = -1

    # --- the thread ----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()

    def _main(self) -> None:
        self.ident = threading.get_ident()
        poller = select.poll()
        wake_fd = self._wake_fd
        poller.register(wake_fd, select.POLLIN)
        polled_fd: int | None = None
        ran = False
        while True:
            with self._lock:
                task = self._tasks.popleft() if self._tasks else None
                self._running = task is not None
                server = self._server
                if task is None and self._shutdown:
                    self._close_wake_fd()
                    break
            if task is not None:
                self._run(task, server)
                ran = True
                continue
            if ran:
                ran = False
                if server is not None:
                    server.idle()
                if self.on_idle is not None:
                    self._idle_work(self.on_idle)
                if self._tasks:
                    continue
            fd = server.reading_fd() if server is not None else None
            if fd != polled_fd:
                if polled_fd is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        poller.unregister(polled_fd)
                if fd is not None:
                    poller.register(fd, select.POLLIN)
                polled_fd = fd
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            for ready_fd, _ in ready:
                if ready_fd == wake_fd:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.eventfd_read(wake_fd)
            socket_ready = any(ready_fd == polled_fd for ready_fd, _ in ready)
            if socket_ready and server is not None and server is self._server:
                server.readable()
                ran = True

    @staticmethod
    def _idle_work(work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:
            log.exception("idle-time work of the policy thread failed")

    @staticmethod
    def _run(
        task: tuple[Future[Any], Callable[..., Any], tuple[Any, ...]],
        server: SocketServer | None,
    ) -> None:
        future, fn, args = task
        if not future.set_running_or_notify_cancel():
            return
        if server is not None:
            server.task_begins()
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            if server is not None:
                server.task_ended()
