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
    assert config.policy_name == "recording"


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
        name = "recording"
        """
    )
    assert config.plugin.idx == "07" and config.plugin.handler_budget == 0.5
    assert config.plugin.socket_path == Path("/run/crio/nri.sock")
    assert config.log.level == "debug"


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
