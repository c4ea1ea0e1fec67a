from __future__ import annotations

import pytest

from nri_plugin.usage import UsageMeter


def test_rate_from_counters_with_slow_decay() -> None:
    meter = UsageMeter(window=3)
    assert meter.sample(0.0, {"a": 0, "b": 0}) == 0.0  # first readings: no rate yet
    assert meter.sample(1.0, {"a": 1_000_000_000, "b": 500_000_000}) == pytest.approx(1.5)
    # quiet again: the peak holds for the rest of the window...
    assert meter.sample(2.0, {"a": 1_000_000_000, "b": 500_000_000}) == pytest.approx(1.5)
    assert meter.sample(3.0, {"a": 1_000_000_000, "b": 500_000_000}) == pytest.approx(1.5)
    # ...and then it is released
    assert meter.sample(4.0, {"a": 1_000_000_000, "b": 500_000_000}) == 0.0


def test_new_missing_and_reset_counters() -> None:
    meter = UsageMeter(window=1)
    meter.sample(0.0, {"a": 5_000_000_000})
    # b is new (no rate yet), a went backwards (re-created): neither counts
    assert meter.sample(1.0, {"a": 1_000, "b": 10, "c": None}) == 0.0
    assert meter.sample(2.0, {"a": 2_000_001_000}) == pytest.approx(2.0)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UsageMeter(window=0)
