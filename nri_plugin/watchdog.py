"""The systemd watchdog (WatchdogSec= in the unit), fed from the event loop.

systemd restarts the service when no `WATCHDOG=1` arrives within the watchdog period.
The pings are sent by a task on the asyncio loop, so they prove what matters: that the
loop still runs (a handler stuck in a blocking call, a deadlock on the loop thread or a
runaway coroutine stops them by itself, with no extra thread watching), and that the
daemon's own health check passes (e.g. host work is not stalled behind blocked threads).

This is the one periodic timer nri-qos keeps besides its sampling periods: systemd asks
for a ping at least once per period, there is no event to wait on instead. It only runs
when systemd set a watchdog up for this very process (WATCHDOG_USEC, WATCHDOG_PID).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from nri_plugin.control.executor import HostExecutor

log = logging.getLogger("nri_qos.watchdog")

Notify = Callable[[str], bool]
HealthCheck = Callable[[], str]


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings: half the period systemd announced (sd_watchdog_enabled's
    rule, so one late ping is not yet a restart); None when no watchdog applies to us.

    WATCHDOG_PID, when set, must be our pid: a child that inherited the variables (a
    helper we fork, or a plugin launched by a runtime that runs under a watchdog itself)
    must not ping on someone else's behalf. A malformed value is logged and ignored."""
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        pid = int(pid_text) if pid_text else os.getpid()
    except ValueError:
        log.warning(
            "systemd watchdog ignored: WATCHDOG_USEC=%r WATCHDOG_PID=%r are not integers",
            usec_text,
            pid_text,
        )
        return None
    if pid != os.getpid() or usec <= 0:
        return None
    return usec / 2_000_000


def executor_health(executor: HostExecutor) -> HealthCheck:
    """The daemon's health check: "" while host work proceeds, else why it does not.

    A stalled executor (every allowed worker thread blocked in the kernel) applies no
    more isolation; a restart is the remedy that needs nobody at the node."""

    def check() -> str:
        status = executor.status()
        if not status.stalled:
            return ""
        blocked = ", ".join(s.path or s.label or "unknown file" for s in status.stuck)
        return f"host I/O stalled: {len(status.stuck)} thread(s) blocked ({blocked})"

    return check


async def watchdog_loop(notify: Notify, interval: float, healthy: HealthCheck) -> None:
    """Send WATCHDOG=1 every `interval` seconds while `healthy()` returns "".

    When it returns a reason, send STATUS= with it (shown by `systemctl status`) and stop
    pinging, so systemd restarts the daemon once the watchdog period runs out; the check
    keeps running meanwhile, and a daemon that recovers before that resumes the pings (a
    stall shorter than the period is no reason to restart). A send that fails is logged
    by `notify` and retried at the next tick: systemd may be restarting itself."""
    failing = ""
    while True:
        reason = healthy()
        if reason and reason != failing:
            log.error("watchdog: stopped pinging systemd, it will restart nri-qos: %s", reason)
            notify(f"STATUS=unhealthy, watchdog pings stopped: {reason}")
        elif not reason and failing:
            log.warning("watchdog: healthy again, pings resumed (was: %s)", failing)
            notify("STATUS=healthy again; watchdog pings resumed")
        failing = reason
        if not reason:
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog(
    notify: Notify, healthy: HealthCheck, env: Mapping[str, str] | None = None
) -> asyncio.Task[None] | None:
    """The watchdog task on the running loop, or None when systemd set up no watchdog
    for this process (then nothing wakes up periodically for it)."""
    interval = watchdog_interval(env)
    if interval is None:
        return None
    log.info("systemd watchdog: pinging every %.1f s", interval)
    return asyncio.get_running_loop().create_task(
        watchdog_loop(notify, interval, healthy), name="systemd-watchdog"
    )
