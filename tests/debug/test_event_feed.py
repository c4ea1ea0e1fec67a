"""EventFeed: decision-log events reach the debug API's followers on the event loop,
and wake the loop only when someone follows (events come from the policy thread between
runtime requests: a wakeup per event would take the GIL from it)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from nri_plugin.debug.server import EventFeed
from nri_plugin.events import EventLog


def _from_another_thread(log: EventLog, message: str) -> None:
    thread = threading.Thread(target=log.add, args=("plan", "default/p/c", message))
    thread.start()
    thread.join(5)


async def test_no_follower_no_wakeup_and_a_follower_gets_history_then_news() -> None:
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(callback)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    log = EventLog()
    feed = EventFeed(log, loop)
    try:
        for i in range(5):
            _from_another_thread(log, f"before {i}")
        assert scheduled == []  # nobody follows: the loop was not woken

        stream = feed.follow()
        got = [(await anext(stream)).message for _ in range(5)]
        assert got == [f"before {i}" for i in range(5)]  # the history first
        _from_another_thread(log, "news")
        news = await asyncio.wait_for(anext(stream), 5)
        assert news.message == "news" and len(scheduled) == 1
        await stream.aclose()

        _from_another_thread(log, "after the follower left")
        assert len(scheduled) == 1
    finally:
        feed.close()
        del loop.call_soon_threadsafe
