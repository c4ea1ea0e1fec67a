"""[plugin] nice: the daemon's threads run at a higher CPU priority, or say why not."""

from __future__ import annotations

import os
import threading

import pytest

from nri_plugin.config import ConfigError, parse_config
from nri_plugin.priority import restore, set_nice


def _nice_of_thread(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


def test_threads_started_after_inherit_the_priority_and_restore_undoes_it() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    change = set_nice(before - 5)  # root here: lowering nice is allowed
    seen: list[int] = []
    try:
        assert change.warning == ""
        assert os.getpriority(os.PRIO_PROCESS, 0) == before - 5
        thread = threading.Thread(
            target=lambda: seen.append(_nice_of_thread(threading.get_native_id()))
        )
        thread.start()
        thread.join()
        assert seen == [before - 5]
    finally:
        restore(change)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_a_refused_change_is_one_line_that_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    change = set_nice(-10)
    assert change.after == before
    assert "\n" not in change.warning
    assert "CAP_SYS_NICE" in change.warning and f"[plugin] nice = {before}" in change.warning


def test_the_setting_is_read_and_checked() -> None:
    assert parse_config("[plugin]\nnice = 0\n").plugin.nice == 0
    assert parse_config("").plugin.nice == -10
    with pytest.raises(ConfigError, match=r"\[plugin\] nice must be between -20 and 19"):
        parse_config("[plugin]\nnice = -30\n")
