"""Real processes for the tests that need a live pid: started here, always reaped."""

from __future__ import annotations

import subprocess

SLEEP = ("sleep", "60")


def start_process(*argv: str) -> subprocess.Popen[bytes]:
    """Start `argv`, by default a `sleep 60`: long enough to outlive any test."""
    return subprocess.Popen(argv or SLEEP)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the process if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()
