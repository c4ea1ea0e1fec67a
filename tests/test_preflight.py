"""Start-up problems are one line that says what to fix, and `nri-qos run` exits with 2."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nri_plugin import cli
from nri_plugin.config import Config
from nri_plugin.plugin import PluginSettings
from nri_plugin.preflight import (
    PreflightError,
    check_all,
    check_host_root,
    check_inherited_fd,
    check_socket_length,
)
from tests.policy.sysfs_builder import MachineShape, write_sysfs


def mountinfo_line(mount_point: Path, fs_type: str = "cgroup2") -> str:
    return f"35 24 0:30 / {mount_point} rw,relatime shared:9 - {fs_type} {fs_type} rw\n"


def host_root(tmp_path: Path, *, proc: bool, mountinfo: bool, sysfs: bool, cgroup: bool) -> Path:
    """A fake host root with some of what nri-qos needs."""
    root = tmp_path / "host"
    root.mkdir()
    if proc:
        (root / "proc" / "self").mkdir(parents=True)
    if mountinfo:
        cg = root / "sys" / "fs" / "cgroup"
        text = mountinfo_line(cg) if cgroup else mountinfo_line(Path("/elsewhere"))
        (root / "proc" / "self" / "mountinfo").write_text(text)
    if sysfs:
        write_sysfs(MachineShape(), root)
    return root


GOOD = {"proc": True, "mountinfo": True, "sysfs": True, "cgroup": True}


@pytest.mark.parametrize(
    ("lacks", "message"),
    [
        ("proc", "no procfs under .*/host: .*/host/proc does not exist; mount procfs at"),
        ("mountinfo", "no procfs under .*: there is no .*/proc/self/mountinfo; mount procfs"),
        ("sysfs", "no sysfs under .*: .*/sys/devices/system/cpu does not exist; mount sysfs"),
        ("cgroup", "no cgroup filesystem is mounted at .*/host/sys/fs/cgroup .*mount cgroup2"),
    ],
)
def test_a_host_root_that_lacks_something_says_what(
    tmp_path: Path, lacks: str, message: str
) -> None:
    parts = {**GOOD, lacks: False}
    if lacks == "proc":
        parts["mountinfo"] = False
    root = host_root(tmp_path, **parts)
    with pytest.raises(PreflightError, match=message) as error:
        check_host_root(root)
    text = str(error.value)
    assert "\n" not in text and "set [host] root to that directory" in text


def test_a_complete_host_root_passes(tmp_path: Path) -> None:
    check_host_root(host_root(tmp_path, **GOOD))


def test_a_host_root_that_is_missing_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="does not exist: set it to the directory"):
        check_host_root(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError, match="is not a directory"):
        check_host_root(tmp_path / "file")
    with pytest.raises(PreflightError, match="must be an absolute path"):
        check_host_root(Path("relative"))


def test_the_recording_policy_does_not_need_the_host(tmp_path: Path) -> None:
    config = Config(
        policy_name="recording",
        host_root=tmp_path / "nowhere",
        plugin=PluginSettings(socket_path=tmp_path / "nri.sock"),
    )
    check_all(config)
    with pytest.raises(PreflightError, match="does not exist"):
        check_all(Config(host_root=tmp_path / "nowhere"))


def test_socket_paths_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    check_socket_length(tmp_path / "nri.sock", "the NRI socket")
    with pytest.raises(PreflightError, match=r"is 1\d\d bytes long; .* at most 107"):
        check_socket_length(Path("/" + "x" * 120), "the NRI socket")


def test_the_inherited_fd_must_be_an_open_socket(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="'abc' is not a file descriptor"):
        check_inherited_fd("abc")
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(PreflightError, match="is not an open file descriptor"):
        check_inherited_fd(str(fd))
    with (tmp_path / "f").open("w") as f, pytest.raises(PreflightError, match="is not a socket"):
        check_inherited_fd(str(f.fileno()))
    a, b = socket.socketpair()
    with a, b:
        assert check_inherited_fd(str(a.fileno())) == a.fileno()


# --- the command, end to end (in this process, so it stays fast) ----------------------------


RunCli = Callable[..., tuple[int, str]]


@pytest.fixture
def run_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[RunCli]:
    """`nri-qos run --no-wait` with a config file; returns (exit code, stderr)."""
    monkeypatch.delenv("NRI_PLUGIN_SOCKET", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(config_text: str, *extra: str) -> tuple[int, str]:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        sock = str(tmp_path / "nri.sock")
        code = cli.main(["run", "--no-wait", "--socket", sock, "--config", str(config), *extra])
        return code, capsys.readouterr().err

    yield run
    root.handlers[:], root.level = saved[0], saved[1]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (None, "does not exist"),
        ({}, "no procfs under"),
        ({"proc": True, "mountinfo": True}, "no sysfs under"),
        ({"proc": True, "mountinfo": True, "sysfs": True}, "no cgroup filesystem is mounted"),
    ],
    ids=["no such dir", "empty dir", "only proc", "proc and sys, no cgroup mount"],
)
def test_run_with_a_bad_host_root_exits_2_with_one_line(
    tmp_path: Path, run_cli: RunCli, parts: dict[str, bool] | None, message: str
) -> None:
    if parts is None:
        root = tmp_path / "nowhere"
    else:
        full = {"proc": False, "mountinfo": False, "sysfs": False, "cgroup": False, **parts}
        root = host_root(tmp_path, **full)
    code, err = run_cli(f'[host]\nroot = "{root}"\n')
    assert code == 2
    assert err.startswith("nri-qos: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_run_with_an_unusable_status_socket_exits_2_and_keeps_the_file(
    tmp_path: Path, run_cli: RunCli
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    code, err = run_cli('[policy]\nname = "recording"\n', "--debug-socket", str(precious))
    assert code == 2 and "exists and is not a socket" in err and err.count("\n") == 1
    assert precious.read_text() == "keep me"
