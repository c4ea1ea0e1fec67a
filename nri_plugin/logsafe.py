"""Log records that stay readable whatever the input: bounded length, bounded repetition.

Values that reach a log line come from outside (annotations, runtime messages, config
text): a 1 MiB annotation must not become a 1 MiB log line, and a warning hit once per
container on a node of 1,000 must not become 1,000 lines. Two filters, installed on the
daemon's handler by `nri_plugin.daemon.setup_logging` (`install` puts them in the right
order):

* `RateLimitFilter`: of the records with the same logger, level and message template
  (`record.msg`, before its arguments are filled in) at WARNING and above, the first
  `burst` of a `window` pass; the rest are counted and dropped. The first one that passes
  after the window ends says "(N similar messages suppressed)". No timer and no thread:
  windows are checked when the next record arrives, so a suppressed count is reported
  only if the message comes again.
* `TruncateFilter`: every str/bytes argument longer than `arg_limit` is cut, then the
  formatted message if it is still longer than `message_limit` (a long repr of some other
  object), and each line of a traceback; "…(+N chars)" marks each cut.

`clip(text, limit)` (from `qos_model.text`, where the engine uses it too) is the same cut,
for code that quotes a value in a message itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from qos_model.text import clip

ARG_LIMIT = 512
MESSAGE_LIMIT = 2048
WINDOW = 10.0
BURST = 5
MAX_KEYS = 1024  # distinct templates tracked at once


class _Clipped:
    """A cut bytes value: reads the same through %s and %r."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _clip_arg(value: object, limit: int) -> object:
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, bytes | bytearray) and len(value) > limit:
        return _Clipped(f"{bytes(value[:limit])!r}…(+{len(value) - limit} bytes)")
    return value


SUPPRESSED_ATTR = "suppressed_similar"  # set on a record by RateLimitFilter


class TruncateFilter(logging.Filter):
    def __init__(self, arg_limit: int = ARG_LIMIT, message_limit: int = MESSAGE_LIMIT) -> None:
        super().__init__()
        self.arg_limit = arg_limit
        self.message_limit = message_limit

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(_clip_arg(a, self.arg_limit) for a in args)
        elif isinstance(args, Mapping) and args:
            record.args = {k: _clip_arg(v, self.arg_limit) for k, v in args.items()}
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: let the handler report it as usual
        if len(message) > self.message_limit:
            # keep the rate limiter's note, which ends the message
            note = _suppressed_note(getattr(record, SUPPRESSED_ATTR, 0))
            if note and message.endswith(note):
                message = message[: -len(note)]
            else:
                note = ""
            record.msg = clip(message, self.message_limit) + note
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and len(record.exc_text) > self.message_limit:
            record.exc_text = "\n".join(
                clip(line, self.message_limit) for line in record.exc_text.split("\n")
            )
        return True


def _suppressed_note(count: int) -> str:
    if not count:
        return ""
    return f" ({count} similar message{'s' if count != 1 else ''} suppressed)"


@dataclass(slots=True)
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    def __init__(
        self,
        window: float = WINDOW,
        burst: int = BURST,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        super().__init__()
        self.window = window
        self.burst = burst
        self.level = level
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or not isinstance(record.msg, str):
            return True
        key = (record.name, record.levelno, record.msg)
        now = self._clock()
        current = self._windows.get(key)
        if current is not None and now - current.start < self.window:
            if current.passed < self.burst:
                current.passed += 1
                return True
            current.suppressed += 1
            return False
        # a new window: this record passes, and reports what the last one dropped
        if current is None and len(self._windows) >= self.max_keys:
            self._forget(now)
        self._windows[key] = _Window(now)
        if current is not None and current.suppressed:
            setattr(record, SUPPRESSED_ATTR, current.suppressed)
            record.msg = record.msg + _suppressed_note(current.suppressed)
        return True

    def _forget(self, now: float) -> None:
        """Make room: drop the windows that ended, else the oldest one."""
        ended = [k for k, w in self._windows.items() if now - w.start >= self.window]
        for key in ended:
            del self._windows[key]
        if len(self._windows) >= self.max_keys:
            del self._windows[next(iter(self._windows))]


def install(handler: logging.Handler, clock: Callable[[], float] = time.monotonic) -> None:
    """Both filters on `handler`: the rate limit first (it groups records by their message
    template, which truncation may replace by the cut text)."""
    handler.addFilter(RateLimitFilter(clock=clock))
    handler.addFilter(TruncateFilter())
