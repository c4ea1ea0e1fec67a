"""A one-shot alarm the event loop can watch: a Linux timerfd.

Why a timerfd: the policy thread answers requests itself, and the event loop must step
in only when it is late. Arming a timerfd is one system call and wakes nobody, whereas a
timer in the loop (call_soon_threadsafe) or a watchdog thread (a condition variable)
would wake a second thread for every request, which is exactly the cost the inline path
exists to avoid: on a 2-CPU node starting containers, every wakeup waits for a CPU. The
loop watches the descriptor with `add_reader` and is woken only when an alarm goes off.
The session arms it lazily (`Session._guard`): one arm serves every request that ends
before it goes off, so most requests make no system call for it at all.

Python 3.11 has no os.timerfd_*, so the calls go through ctypes (libc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_CLOCK_MONOTONIC = 1  # time.monotonic()'s clock on Linux, so deadlines compare directly
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _libc() -> ctypes.CDLL:
    """libc through PyDLL: its calls keep the GIL. timerfd_settime never blocks, and
    a call that released the GIL would let any other runnable thread take it, for up to
    a switch interval, in the middle of the request the alarm guards."""
    return ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


_LIBC = _libc()
_create = _LIBC.timerfd_create
_create.argtypes = (ctypes.c_int, ctypes.c_int)
_create.restype = ctypes.c_int
_settime = _LIBC.timerfd_settime
_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_settime.restype = ctypes.c_int


class Alarm:
    """One timer: `arm_at(when)` from any thread, `disarm()`, and `fired()` in the
    thread that watches `fileno()` (readable once the time has passed).
    Re-arming or disarming clears an expiry nobody has read yet, so a reader woken by an
    old expiry finds `fired()` False."""

    def __init__(self) -> None:
        fd = _create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._fd: int = int(fd)
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self._zero = ctypes.byref(_Itimerspec())

    def fileno(self) -> int:
        fd: int = self._fd
        return fd

    def arm_at(self, when: float) -> None:
        """Go off once at `when`, a time.monotonic() value (at once if it has passed)."""
        ns = max(1, int(when * 1e9))  # 0 would disarm
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        if _settime(self._fd, _TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def disarm(self) -> None:
        if self._fd >= 0:
            _settime(self._fd, 0, self._zero, None)

    def fired(self) -> bool:
        """Read the expiry count: True when the alarm went off since it was last armed.
        Raises OSError if the descriptor is broken (closed): the watcher must stop
        watching it rather than find it readable forever."""
        try:
            return os.read(self._fd, 8) != b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
