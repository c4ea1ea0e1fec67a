"""Log lines stay bounded: long values are cut, repeated warnings are rate limited."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from nri_plugin.logsafe import RateLimitFilter, TruncateFilter, clip, install

MiB = 1 << 20


def record(
    msg: object,
    *args: object,
    level: int = logging.WARNING,
    name: str = "nri_qos.test",
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, Clock]]:
    """A logger whose handler has both filters, as setup_logging installs them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    clock = Clock()
    install(handler, clock=clock)
    logger = logging.getLogger("nri_qos.test.logsafe")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out, clock
    logger.removeHandler(handler)
    logger.propagate = True


def test_clip() -> None:
    assert clip("short") == "short"
    assert clip("x" * 200) == "x" * 200
    assert clip("x" * 250) == "x" * 200 + "…(+50 chars)"
    assert clip("abcdef", 2) == "ab…(+4 chars)"


def test_a_1_mib_annotation_does_not_make_a_1_mib_line(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    logger, out, _ = logged
    value = "v" * MiB
    logger.warning("pod %s: bad annotation %r", "web", value)
    line = out.getvalue()
    assert len(line) < 600
    assert line.startswith("WARNING pod web: bad annotation 'vvv")
    assert f"…(+{MiB - 512} chars)'" in line


def test_bytes_and_mapping_args_are_cut() -> None:
    cut = TruncateFilter(arg_limit=8)
    r = record("got %s and %r", b"0123456789abc", bytearray(b"x" * 20))
    assert cut.filter(r)
    assert r.getMessage() == "got b'01234567'…(+5 bytes) and b'xxxxxxxx'…(+12 bytes)"
    r = record("%(key)s=%(value)s", {"key": "k", "value": "y" * 20})
    cut.filter(r)
    assert r.getMessage() == "k=yyyyyyyy…(+12 chars)"
    r = record("short %s %d", "ok", 7)
    cut.filter(r)
    assert r.getMessage() == "short ok 7" and r.msg == "short %s %d"  # left as it was


def test_a_long_message_from_other_values_is_cut_too() -> None:
    cut = TruncateFilter(arg_limit=512, message_limit=100)
    r = record("cpus %s", list(range(1000)))  # not a str: its repr is long
    cut.filter(r)
    message = r.getMessage()
    assert message.startswith("cpus [0, 1, 2") and len(message) < 120
    assert message.endswith(f"…(+{len('cpus ' + str(list(range(1000)))) - 100} chars)")


def test_traceback_lines_are_cut() -> None:
    cut = TruncateFilter(message_limit=100)
    try:
        raise ValueError("z" * 5000)
    except ValueError:
        r = logging.LogRecord("n", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    cut.filter(r)
    assert r.exc_text is not None
    assert r.exc_text.startswith("Traceback (most recent call last):")
    assert r.exc_text.splitlines()[-1] == "ValueError: " + "z" * 88 + "…(+4912 chars)"


def test_repeated_warnings_are_rate_limited_and_the_count_reported(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    logger, out, clock = logged
    for i in range(20):
        logger.warning("container %s: no process found", f"ctr-{i}")
        clock.now += 0.1  # 20 records in 2 s: inside the 10 s window
    lines = out.getvalue().splitlines()
    assert lines == [f"WARNING container ctr-{i}: no process found" for i in range(5)]
    clock.now += 10
    logger.warning("container %s: no process found", "ctr-late")
    assert out.getvalue().splitlines()[-1] == (
        "WARNING container ctr-late: no process found (15 similar messages suppressed)"
    )
    # a fresh window: 4 more pass without a note
    for i in range(4):
        logger.warning("container %s: no process found", f"again-{i}")
    assert out.getvalue().splitlines()[-1] == "WARNING container again-3: no process found"


def test_rate_limit_keys_on_logger_level_and_template() -> None:
    limit = RateLimitFilter(window=10, burst=1, clock=Clock())
    assert limit.filter(record("same %s", 1))
    assert not limit.filter(record("same %s", 2))
    assert limit.filter(record("other %s", 1))  # another template
    assert limit.filter(record("same %s", 1, level=logging.ERROR))  # another level
    assert limit.filter(record("same %s", 1, name="nri_qos.other"))  # another logger
    for _ in range(10):
        assert limit.filter(record("same %s", 1, level=logging.INFO))  # below WARNING: never


def test_the_suppressed_count_survives_cutting_a_long_message() -> None:
    clock = Clock()
    limit, cut = RateLimitFilter(window=10, burst=1, clock=clock), TruncateFilter(arg_limit=50)
    r = record("value %s %s", "a" * 100, "b" * 100)
    assert limit.filter(r) and cut.filter(r)
    assert not limit.filter(record("value %s %s", "c", "d"))
    clock.now += 10
    r = record("value %s %s", "e" * 100, "f" * 100)
    assert limit.filter(r)
    TruncateFilter(arg_limit=50, message_limit=60).filter(r)
    message = r.getMessage()
    assert message.startswith("value eeee") and "…(+" in message
    assert message.endswith(" (1 similar message suppressed)")


def test_rate_limiter_memory_is_bounded() -> None:
    clock = Clock()
    limit = RateLimitFilter(window=10, burst=1, clock=clock, max_keys=3)
    for i in range(10):
        assert limit.filter(record(f"distinct template {i}"))
    assert len(limit._windows) <= 3
