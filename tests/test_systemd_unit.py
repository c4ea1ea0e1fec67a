"""systemd/nri-qos.service and systemd/nri-qos.conf: what they must say, checked by a small
unit-file parser here and by systemd's own tools when they are installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "systemd" / "nri-qos.service"
TMPFILES = REPO / "systemd" / "nri-qos.conf"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd.syntax(7), the part the unit uses: [Section], Key=Value (a key may repeat
    and its values add up), comments on their own lines, backslash continuations."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: bad section header {line!r}"
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"line {number}: a setting before any section"
        assert "=" in line, f"line {number}: not Key=Value: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"line {number}: bad key {key!r}"
        section.setdefault(key, []).append(value)
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> set[str]:
    return {w for v in unit[section].get(key, []) for w in v.split()}


def test_notify_service_with_a_watchdog_that_restarts(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"  # not pyroute2's forked helpers
    assert one(unit, "Service", "WatchdogSec") == "30"
    assert one(unit, "Service", "Restart") == "always"
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "ExecStart") == "/usr/local/bin/nri-qos run"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_ordered_after_both_runtimes_without_needing_either(unit: Unit) -> None:
    assert {"containerd.service", "crio.service"} <= words(unit, "Unit", "After")
    for strong in ("Wants", "Requires", "Requisite", "BindsTo", "PartOf"):
        assert not {"containerd.service", "crio.service"} & words(unit, "Unit", strong), strong


def test_hardening_leaves_exactly_what_the_daemon_writes(unit: Unit) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert words(unit, "Service", "ReadWritePaths") == {
        "/sys/fs/cgroup",
        "-/sys/fs/resctrl",
        "-/sys/fs/bpf",
    }
    assert one(unit, "Service", "ProtectHome") in ("yes", "read-only", "tmpfs")
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "RuntimeDirectory") == "nri-qos"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"
    assert words(unit, "Service", "CapabilityBoundingSet") == {
        "CAP_DAC_OVERRIDE",  # oom_score_adj files of other users' processes
        "CAP_SYS_RESOURCE",  # lowering oom_score_adj
        "CAP_SYS_ADMIN",  # setns, BPF before 5.8
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",  # tc
        "CAP_KILL",  # eviction's kill fallback
        "CAP_SYS_NICE",  # [plugin] nice
    }
    # each of these would take away something the daemon writes (see the unit's comments)
    for forbidden in (
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "PrivateNetwork",
        "MemoryDenyWriteExecute",
        "SystemCallFilter",
        "PrivateUsers",
        "DynamicUser",
    ):
        assert forbidden not in service, forbidden
    assert words(unit, "Service", "RestrictNamespaces") == {"net"}  # setns into pod netns
    assert {"AF_UNIX", "AF_NETLINK"} <= words(unit, "Service", "RestrictAddressFamilies")


def test_every_setting_says_why() -> None:
    """Each setting line has a comment line somewhere above it in its paragraph, except
    the self-describing ones listed here."""
    self_evident = {"Description", "Documentation", "WantedBy", "ExecStart"}
    self_evident |= {"ProtectClock", "ProtectHostname", "ProtectKernelLogs"}
    self_evident |= {"RestrictRealtime", "RestrictSUIDSGID", "LockPersonality"}
    self_evident |= {"RuntimeDirectoryMode", "StartLimitBurst", "After"}
    commented = False
    for line in UNIT.read_text().splitlines():
        if not line.strip() or line.startswith("["):
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            key = line.split("=", 1)[0]
            assert commented or key in self_evident, f"{key}= has no comment saying why"


def test_tmpfiles_entry_creates_the_runtime_directory() -> None:
    entries = [
        line.split()
        for line in TMPFILES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries == [["d", "/run/nri-qos", "0700", "root", "root", "-"]]


# --- systemd's own tools ------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt install systemd)",
)


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here: verify checks
    that the command is executable, and nri-qos is not installed in /usr/local/bin."""
    true = shutil.which("true")
    assert true is not None
    copy = tmp_path / "nri-qos.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/nri-qos", true))
    return copy


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    copy = _runnable_copy(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are warnings on stderr with exit code 0: fail on both.
    about_us = [line for line in done.stderr.splitlines() if "nri-qos" in line]
    assert done.returncode == 0 and about_us == [], done.stderr


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a typo in a key is reported."""
    copy = _runnable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key" in done.stderr and "NoNewPrivilege" in done.stderr


@needs_analyze
def test_exposure_is_at_most_medium(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the sandbox; root with CAP_SYS_ADMIN cannot reach
    "OK", but a regression to "UNSAFE"/"EXPOSED" (above 7.0) means hardening was lost."""
    copy = _runnable_copy(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "--offline" in done.stderr:
        pytest.skip(f"systemd-analyze too old for --offline: {done.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 7.0, done.stdout


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="the entry chowns to root: needs root")
def test_systemd_tmpfiles_creates_the_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    made = (tmp_path / "run" / "nri-qos").stat()
    assert oct(made.st_mode & 0o7777) == "0o700"
    assert (made.st_uid, made.st_gid) == (0, 0)
