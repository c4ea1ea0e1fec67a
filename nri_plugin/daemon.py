"""`nri-qos run`: wire config, policy and plugin runtime into a long-running service.

Works the same under systemd (Type=notify: READY=1 once the runtime has configured us),
as a DaemonSet container, and as a pre-installed plugin that the runtime launches with
its socket on an inherited fd (NRI_PLUGIN_SOCKET) and no stdout/stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import socket
import sys
from pathlib import Path

from nri_plugin.config import Config
from nri_plugin.plugin import NriPlugin
from nri_plugin.policy.api import PolicyBase, RecordingPolicy

log = logging.getLogger("nri_qos.daemon")

LAUNCHED_LOG_FILE = Path("/var/log/nri-qos.log")


def build_policy(config: Config) -> PolicyBase:
    if config.policy_name == "recording":
        return RecordingPolicy()
    raise ValueError(f"unknown policy {config.policy_name!r}")  # config.py checked already


def launched_by_runtime() -> bool:
    return "NRI_PLUGIN_SOCKET" in os.environ


def setup_logging(level: str, target: str) -> None:
    """Log to stderr, unless the runtime launched us (it connects stderr to nothing):
    then syslog if /dev/log exists, else a file."""
    if target == "auto":
        target = "stderr"
        if launched_by_runtime():
            target = "syslog" if Path("/dev/log").exists() else str(LAUNCHED_LOG_FILE)
    handler: logging.Handler
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif target == "syslog":
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("nri-qos[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.FileHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (no-op when not started by a Type=notify unit)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False
    return True


async def run_daemon(config: Config, wait_for_runtime: bool = True) -> int:
    """Serve until SIGTERM/SIGINT (external) or until the inherited socket closes."""
    plugin = NriPlugin(build_policy(config), config.plugin)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plugin.stop)

    async def announce_ready() -> None:
        await plugin.configured.wait()
        sd_notify("READY=1")

    ready = asyncio.create_task(announce_ready())
    try:
        if launched_by_runtime():
            fd = int(os.environ["NRI_PLUGIN_SOCKET"])
            end = await plugin.run_inherited(fd)
            log.info(
                "runtime connection closed (%s); a pre-installed plugin cannot reconnect, exiting",
                end.reason,
            )
            return 0
        await plugin.run(wait_for_runtime=wait_for_runtime)
        return 0
    finally:
        sd_notify("STOPPING=1")
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
        plugin.close()
