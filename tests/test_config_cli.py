"""Config parsing and the command line, as a user meets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nri_plugin.config import ConfigError, load_config, parse_config


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.plugin.socket_path == Path("/var/run/nri/nri.sock")
    assert (config.plugin.name, config.plugin.idx) == ("nri-qos", "50")
    assert config.policy_name == "qos"
    assert config.qos.policy.planner.reserved_cpus == frozenset()
    assert config.qos.rebalance_interval == 5.0


def test_full_file_is_applied() -> None:
    config = parse_config(
        """
        [plugin]
        name = "qos"
        index = "07"
        socket = "/run/crio/nri.sock"
        handler_budget_ms = 500
        [log]
        level = "debug"
        [policy]
        name = "qos"
        reserved_cpus = "0-1"
        reclaimed_min_cpus = 2
        shared_headroom = 0.5
        guaranteed_integral_to_dedicated = true
        system_namespaces = ["kube-system", "monitoring"]
        rebalance_interval_ms = 1000
        oom_bands = { reclaimed_cores = [600, 1000] }
        [host]
        root = "/tmp/fake"
        """
    )
    assert config.plugin.idx == "07" and config.plugin.handler_budget == 0.5
    assert config.plugin.socket_path == Path("/run/crio/nri.sock")
    assert config.log.level == "debug"
    planner = config.qos.policy.planner
    assert planner.reserved_cpus == {0, 1} and planner.reclaimed_min_cpus == 2
    assert planner.shared_headroom == 0.5 and planner.oom_bands.reclaimed_cores.lowest == 600
    assert config.qos.policy.qos.guaranteed_integral_to_dedicated
    assert config.qos.policy.qos.system_namespaces == ("kube-system", "monitoring")
    assert config.qos.rebalance_interval == 1.0 and config.host_root == Path("/tmp/fake")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[plugin]\nindx = '10'", "no key 'indx'"),
        ("[plugin]\nindex = '1'", "exactly two digits"),
        ("[plugins]\n", "unknown section"),
        ("[log]\nlevel = 'loud'", "level = 'loud'"),
        ("[policy]\nname = 'magic'", "'magic' is unknown"),
        ("[plugin\n", "not valid TOML"),
        ("[plugin]\nhandler_budget_ms = 'fast'", "handler_budget_ms = 'fast' is not valid"),
        ("[policy]\nreserved_cpus = '3-1'", "reserved_cpus"),
        ("[policy]\nreclaimed_min_cpus = 'two'", "must be an integer"),
        ("[policy]\nreserve_cpus = '0'", "no key"),
        ("[policy]\noom_bands = { reclaimed_cores = [0, 100] }", "oom bands|band"),
        ("[policy]\nname = 'recording'\nreserved_cpus = '0'", "takes no settings"),
    ],
    ids=[
        "misspelled plugin key",
        "one-digit index",
        "unknown section",
        "unknown log level",
        "unknown policy",
        "not TOML",
        "handler budget not a number",
        "reversed CPU range",
        "reclaimed_min_cpus not an integer",
        "misspelled policy key",
        "overlapping OOM bands",
        "settings for the recording policy",
    ],
)
def test_bad_config_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_config(text, "test.toml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nri_plugin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_version() -> None:
    result = _cli("version")
    assert result.returncode == 0
    assert result.stdout.startswith("nri-qos ") and "v0.12.2" in result.stdout


def test_run_with_missing_socket_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = _cli("run", "--socket", str(tmp_path / "nri.sock"), "--no-wait")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert "disable = false" in result.stderr and "enable_nri" in result.stderr


def test_run_with_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[plugin]\nindex = 'x'\n")
    result = _cli("run", "--config", str(bad), "--no-wait")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "c.toml" in result.stderr and "two digits" in result.stderr
