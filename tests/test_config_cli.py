"""Config parsing and the command line, as a user meets them."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_plugin import cli
from nri_plugin.config import ConfigError, load_config, parse_config
from nri_plugin.control.executor import HostLimits
from nri_plugin.policy.workload import SHARED


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
        ("[host]\nroot = 'host'", "root = 'host' must be an absolute path"),
        ("[host]\nroot = 5", "root = 5 must be an absolute path"),
        ("[log]\ntarget = 2", "target = 2; use"),
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
        "relative host root",
        "host root not a string",
        "log target not a string",
    ],
)
def test_bad_config_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_config(text, "test.toml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[plugin]\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)


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


@pytest.fixture
def root_logger() -> Iterator[None]:
    """`nri-qos run` in this process replaces the root logger's handlers: put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_run_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in out


def test_run_with_an_unusable_log_target_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logger: None
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[log]\ntarget = "{tmp_path}/no/such/dir/nri-qos.log"\n')
    assert cli.main(["run", "--no-wait", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nri-qos: [log] target = ") and err.count("\n") == 1
    assert "cannot open" in err and "No such file or directory" in err


def test_an_unexpected_error_exits_1_with_the_traceback_logged(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    root_logger: None,
) -> None:
    async def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr("nri_plugin.daemon.run_daemon", broken)
    monkeypatch.delenv("NRI_PLUGIN_SOCKET", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[policy]\nname = "recording"\n')
    assert cli.main(["run", "--config", str(config), "--socket", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "nri-qos stopped on an unexpected error" in err
    assert "Traceback" in err and "RuntimeError: a bug" in err


def test_host_and_connection_limits_are_configurable_and_checked() -> None:
    config = parse_config(
        "[plugin]\nmax_requests_in_flight = 8\nstall_timeout_ms = 500\n"
        '[host]\nroot = "/host"\nio_deadline_ms = 250\nmax_blocked_threads = 2\n'
    )
    assert config.plugin.max_requests_in_flight == 8 and config.plugin.stall_timeout == 0.5
    assert config.host_root == Path("/host")
    assert (config.host_limits.deadline, config.host_limits.max_stuck) == (0.25, 2)
    assert config.host_limits.retries == HostLimits().retries
    bad_values = ("io_deadline_ms = 0", "io_retries = -1", "io_retries = 1.5", "io_retries = true")
    for bad in (*bad_values, 'io_retries = "3"', "io_timeout = 1"):
        with pytest.raises(ConfigError, match=r"\[host\]"):
            parse_config(f"[host]\n{bad}\n")


@pytest.mark.parametrize(
    "text",
    [
        "[policy]\nshared_headroom = nan\n",
        "[policy]\nshared_headroom = inf\n",
        "[plugin]\nhandler_budget_ms = -inf\n",
        "[policy]\noom_bands = { reclaimed_cores = [500, nan] }\n",
        "a = " + "[" * 5000 + "]" * 5000 + "\n",
    ],
)
def test_values_that_would_poison_every_decision_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, "runtime-provided config")


def test_isolation_sections_are_applied() -> None:
    from isolation.blkio import Throttle
    from nri_plugin.policy.qos import QosClass

    config = parse_config(
        """
[host]
dry_run = true
[rdt]
runtime_classes = true
mount = "/host/sys/fs/resctrl"
[rdt.levels]
shared_cores = ""
[rdt.classes.reclaimed]
l3_mask = "0xf"
mb_percent = 20
[io]
devices = ["loop0"]
[io.weights]
reclaimed_cores = 5
shared_cores = 0
[io.throttle.reclaimed_cores]
read_bps = 1048576
[net]
interfaces = ["eth0"]
link_mbit = 1000
[net.levels]
dedicated_cores = "system"
"""
    )
    assert config.dry_run
    iso = config.isolation
    assert iso.rdt.runtime_classes and iso.rdt.mount == "host/sys/fs/resctrl"
    assert iso.rdt.classes["reclaimed"].l3_mask == 0xF
    assert iso.rdt.classes["reclaimed"].mb_percent == 20
    assert SHARED not in iso.rdt.classes  # no class uses it any more: no CLOSID for it
    levels = config.qos.policy.planner.isolation  # what the engine plans with
    assert levels.rdt_classes[QosClass.SHARED_CORES] is None
    assert levels.io_weights[QosClass.RECLAIMED_CORES] == 5
    assert levels.io_weights[QosClass.SHARED_CORES] is None
    assert levels.net_classes[QosClass.DEDICATED_CORES] == "system"
    assert iso.io.devices == ("loop0",)
    assert iso.io.throttle["reclaimed_cores"] == Throttle(read_bps=1048576)
    assert iso.net.interfaces == ("eth0",) and iso.net.link_mbit == 1000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[rdt]\nfoo = 1", r"\[rdt\] has no key"),
        ("[rdt.classes.reclaimed]\nl3_percent = 0", r"within 1\.\.100"),
        ('[rdt.classes.reclaimed]\nl3_mask = "xyz"', "must be hex"),
        ('[rdt.levels]\nshared_cores = "gold"', "no \\[rdt.classes"),
        ('[rdt.levels]\nbest_effort = "reclaimed"', "is not a QoS class"),
        ("[io.weights]\nreclaimed_cores = 20000", r"1\.\.10000"),
        ("[io.weights]\nreclaimed_cores = true", "must be an integer"),
        ("[io.throttle.batch]\nread_bps = 1", "is not a QoS class"),
        ('[io]\ndevices = ["../vda"]', "device names"),
        ('[net.levels]\nreclaimed_cores = "bulk"', "do not exist"),
        ("[net]\nlink_mbit = -1", "link_mbit"),
        ('[net]\ninterfaces = "eth0"', "must be a list"),
        ('[host]\ndry_run = "yes"', "dry_run"),
    ],
)
def test_bad_isolation_settings_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "test.toml")


def test_interference_and_eviction_sections_reach_the_engine() -> None:
    config = parse_config(
        """
[interference]
window_ms = 250
probe = "schedstat"
runq_ms = 1.0
windows = 2
escalate_after_ms = 500
cap_cores = 0.5
mba_class = "throttled"
[eviction]
dry_run = true
burst = 2
api = "off"
kill_fallback = true
"""
    )
    p = config.qos.policy.protection
    assert (p.detection.runq_ms, p.detection.windows) == (1.0, 2)
    assert p.ladder.escalate_after_s == 0.5 and p.cap_cores == 0.5 and p.mba_class == "throttled"
    assert p.eviction.dry_run and p.eviction.burst == 2
    assert config.protection.sampling.window_s == 0.25
    assert config.protection.sampling.probe == "schedstat"
    assert config.protection.evict.api == "off" and config.protection.evict.kill_fallback


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[interference]\nwindow = 1", r"\[interference\] has no key"),
        ("[interference]\nwindow_ms = 10", "window_ms must be within"),
        ('[interference]\nprobe = "kprobe"', "choose one of"),
        ("[interference]\nwindows = 0", "integer >= 1"),
        ("[interference]\nrunq_relative = 0.5", "runq_relative > 1"),
        ("[eviction]\nburst = true", "integer >= 1"),
        ('[eviction]\napi = "rest"', "choose one of"),
    ],
)
def test_bad_interference_settings_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "test.toml")


def test_the_gil_switch_interval_is_a_plugin_setting_applied_by_the_daemon() -> None:
    config = parse_config("[plugin]\ngil_switch_interval_ms = 0.25\n", "test.toml")
    assert config.plugin.gil_switch_interval == 0.00025
    assert parse_config("", "test.toml").plugin.gil_switch_interval == 0.0005
    with pytest.raises(ConfigError, match="gil_switch_interval_ms"):
        parse_config("[plugin]\ngil_switch_interval_ms = 0\n", "test.toml")


def test_the_configuration_the_readme_shows_is_accepted() -> None:
    """The README's full example is what users copy: it must load as written."""
    import re

    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    example = max(re.findall(r"```toml\n(.*?)```", text, re.S), key=len)
    assert "[plugin]" in example and "[reconcile]" in example
    config = parse_config(example, "README.md")
    assert config.reconcile.period_s == 10
