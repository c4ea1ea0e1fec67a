"""The debug commands as a person runs them: a subprocess against the daemon-like server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nri_plugin.cli_debug import sparkline
from tests.conftest import REPO
from tests.debug.conftest import NOBODY, Daemon, Relay, cli_env


def cli(*args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    where = ["--socket", str(socket)] if socket is not None else []
    return subprocess.run(
        [sys.executable, "-m", "nri_plugin.cli_debug", *args, *where],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=cli_env(),
    )  # fmt: skip


def test_status_pods_numa_signals_tables(daemon: Daemon) -> None:
    status = cli("status", socket=daemon.path)
    assert status.returncode == 0, status.stderr
    assert "waiting for the runtime" in status.stdout and "policy  qos" in status.stdout
    pods = cli("pods", socket=daemon.path)
    assert pods.returncode == 0 and "prod/db" in pods.stdout and "dedicated_cores" in pods.stdout
    numa = cli("numa", socket=daemon.path)
    assert numa.returncode == 0 and "NODE" in numa.stdout
    signals = cli("signals", socket=daemon.path)
    assert signals.returncode == 0 and "prod/web/web" in signals.stdout


@pytest.mark.parametrize("query", ["ctr-we", "prod/web/web", "web/web"])
def test_explain_by_prefix_and_by_pod_container(daemon: Daemon, query: str) -> None:
    result = cli("explain", query, socket=daemon.path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prod/web/web  (ctr-web)") and "oom_score_adj" in result.stdout


@pytest.mark.parametrize(("query", "says"), [("nope", "no container matches"),
                                             ("ctr-ap", "matches 2 containers")])  # fmt: skip
def test_explain_missing_or_ambiguous_is_one_line_and_exit_2(
    daemon: Daemon, query: str, says: str
) -> None:
    result = cli("explain", query, socket=daemon.path)
    assert result.returncode == 2 and says in result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout


@pytest.mark.parametrize("command", [["status"], ["pods"], ["explain", "web"], ["signals"],
                                     ["numa"], ["events"]])  # fmt: skip
def test_json_parses(daemon: Daemon, command: list[str]) -> None:
    result = cli(*command, "--json", socket=daemon.path)
    assert result.returncode == 0, result.stderr
    if command == ["events"]:
        values = [json.loads(line) for line in result.stdout.splitlines()]
        assert values and {"time", "kind", "subject", "message"} <= values[0].keys()
    else:
        assert isinstance(json.loads(result.stdout), dict)


def test_events_follow_prints_a_new_event(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nri_plugin.cli_debug", "events", "--follow", "--json",
         "--socket", str(daemon.path)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # the history
        assert first["kind"]
        daemon.executor.events.add("host", "cli", "followed")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if json.loads(proc.stdout.readline())["message"] == "followed":
                break
        else:
            pytest.fail("the new event did not arrive")
    finally:
        proc.terminate()
        proc.wait(10)


def test_dry_run_on_and_off(daemon: Daemon) -> None:
    on = cli("dry-run", "on", socket=daemon.path)
    assert on.returncode == 0 and on.stdout.startswith("dry-run on")
    off = cli("dry-run", "off", "--json", socket=daemon.path)
    assert json.loads(off.stdout)["previous"] is True
    assert daemon.dry_run_calls[-2:] == [True, False]


def test_signals_watch_draws_sparklines(daemon: Daemon) -> None:
    result = cli("signals", "--watch", "--count", "2", "--interval", "0.05", socket=daemon.path)
    assert result.returncode == 0, result.stderr
    assert any(ch in result.stdout for ch in "▁▂▃▄▅▆▇█")
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█" and sparkline([0.0, 0.0]) == "▁▁"


def test_config_check(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[policy]\nname = "qos"\n')
    bad.write_text("[policy]\nnam = 1\n")
    assert cli("config", "check", str(good)).returncode == 0
    result = cli("config", "check", str(bad))
    assert result.returncode == 2 and "nam" in result.stderr and result.stderr.count("\n") == 1
    assert json.loads(cli("config", "check", str(bad), "--json").stdout)["valid"] is False


def test_daemon_not_running_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = cli("status", socket=tmp_path / "none.sock")
    assert result.returncode == 2
    assert result.stderr == (
        f"nri-qos status: nri-qos is not running: {tmp_path / 'none.sock'} does not exist; "
        "start it (systemctl start nri-qos), or pass --socket PATH if it listens elsewhere\n"
    )


def test_refused_uid_is_one_line_and_exit_2(daemon: Daemon, as_nobody: Relay) -> None:
    result = cli("pods", socket=as_nobody.path)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith(f"nri-qos pods: permission denied: uid {NOBODY}")
    assert result.stderr.count("\n") == 1
