"""`nri-qos lab` end to end: embedded runtime + plugin process + real cgroups when root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

CPUSET = Path("/sys/fs/cgroup/cpuset")
CLASSES = {"system_cores", "dedicated_cores", "shared_cores", "reclaimed_cores"}
REAL = os.geteuid() == 0 and CPUSET.is_dir()


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nri_plugin", "lab", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _leftovers() -> list[str]:
    if not CPUSET.is_dir():
        return []
    return [p.name for p in CPUSET.iterdir() if p.name.startswith("nri-qos-lab-")]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module", params=["containerd-2.3", "containerd-1.7"])
def lab_json(request: pytest.FixtureRequest) -> dict[str, Any]:
    before = set(_leftovers())
    result = _lab("--json", "--flavor", request.param)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    report["_new_leftovers"] = set(_leftovers()) - before
    return report


def test_json_has_the_stable_keys(lab_json: dict[str, Any]) -> None:
    containers = lab_json["containers"]
    assert len(containers) == 5
    for c in containers:
        assert {
            "pod",
            "name",
            "class",
            "cpus",
            "mems",
            "oom_score_adj",
            "pids",
            "rdt_class",
            "io_weight",
            "net_class",
            "reasons",
        } <= c.keys()
        for key in ("rdt_class", "io_weight", "net_class"):
            assert {"value", "simulated", "source"} <= c[key].keys(), (key, c)
            assert c["reasons"][key]
        assert isinstance(c["oom_score_adj"], int) and isinstance(c["pids"], list)
        assert set(c["reasons"]) >= {"cpus", "mems", "oom_score_adj"}
        assert all(isinstance(r, str) and r for r in c["reasons"].values())
    assert {c["class"] for c in containers} == CLASSES
    by_pod = {c["pod"]: c for c in containers}
    assert by_pod["prod/legacy-cron"]["class"] == "shared_cores"  # learned via Synchronize
    assert "Synchronize" in "\n".join(lab_json["exchanges"])


@pytest.mark.root
@pytest.mark.skipif(not REAL, reason="needs root and a cgroup v1 cpuset hierarchy")
def test_what_the_host_enforces_is_what_was_planned(lab_json: dict[str, Any]) -> None:
    assert lab_json["real_containers"] is True
    containers = lab_json["containers"]
    for c in containers:
        assert c["pids"], c
        # /proc/<pid>/status Cpus_allowed_list == the plan
        assert c["cpus"] == c["planned"]["cpus"], c
        if c["planned"]["mems"]:
            assert c["mems"] == c["planned"]["mems"], c
        # this host can only raise oom_score_adj: non-negative plans must be in force
        if c["planned"]["oom_score_adj"] >= 0:
            assert c["oom_score_adj"] == c["planned"]["oom_score_adj"], c
        else:
            assert c["notes"], "a refused oom_score_adj must be explained"
    dedicated = [c for c in containers if c["class"] == "dedicated_cores"]
    assert len(dedicated) == 1
    from qos_model.cpulist import parse_cpu_list

    mine = parse_cpu_list(dedicated[0]["cpus"])
    others = set().union(*(parse_cpu_list(c["cpus"]) for c in containers if c is not dedicated[0]))
    assert mine and not mine & others, "the dedicated CPUs are shared with someone"
    reclaimed = next(c for c in containers if c["class"] == "reclaimed_cores")
    assert reclaimed["cpu_shares"] == 2
    # RDT, disk and network as the host (or, for RDT here, the stand-in tree) shows them
    for c in containers:
        for key in ("rdt_class", "io_weight", "net_class"):
            assert c[key]["value"] == c["planned"][key], (key, c)
        assert c["rdt_class"]["simulated"] == (not Path("/sys/fs/resctrl/info").is_dir())
        assert c["io_weight"]["simulated"] is False and c["net_class"]["simulated"] is False
    assert reclaimed["rdt_class"]["value"] == "reclaimed"
    assert reclaimed["net_class"]["value"] == "batch" and reclaimed["io_weight"]["value"] == 10
    # everything the lab made is gone
    assert not lab_json["_new_leftovers"]
    assert not any(_alive(pid) for c in containers for pid in c["pids"])


def test_text_output_explains_every_container() -> None:
    result = _lab()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NRI exchanges" in out and "CreateContainer" in out and "adjust cpus=" in out
    for cls in CLASSES:
        assert f"class={cls}" in out
    assert out.count("oom_score_adj: ") >= 5
    assert out.count("rdt_class: ") >= 5 and out.count("net_class: ") >= 5


@pytest.mark.root
@pytest.mark.skipif(not REAL, reason="needs root, cgroup2 and network namespaces")
def test_network_scenario_shapes_real_traffic_per_class() -> None:
    result = _lab("--scenario", "network", "--json", "--duration", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["link_mbit"] == 100
    assert set(report["classes"]) == {"system", "online", "batch"}
    for c in report["classes"].values():
        assert {"bytes", "rate_mbit", "ceil_mbit"} <= c.keys() and c["bytes"] > 0
    by_name = {c["name"]: c for c in report["containers"]}
    assert by_name["batch-copy"]["net_class"] == "batch"
    assert by_name["online-web"]["net_class"] == "online"
    for c in report["containers"]:
        assert {"name", "class", "net_class", "sent_bytes", "mbit"} <= c.keys()
        assert c["sent_bytes"] > 0
    # all four send at once through 100 Mbit/s: the sum cannot beat the link
    assert sum(c["mbit"] for c in report["containers"]) <= 100 * 1.1


@pytest.mark.root
@pytest.mark.skipif(not REAL, reason="needs root and a cgroup v1 cpuset hierarchy")
def test_ctrl_c_cleans_up_everything() -> None:
    before = set(_leftovers())
    proc = subprocess.Popen(
        [sys.executable, "-m", "nri_plugin", "lab"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "started prod/database" in line or time.monotonic() > deadline:
            break
    during = set(_leftovers()) - before
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert during, "the lab should have had real cgroups while running"
    assert not set(_leftovers()) - before


@pytest.mark.root
@pytest.mark.skipif(not REAL, reason="needs root, cgroups and BPF or schedstat")
def test_interference_scenario_detects_names_and_mitigates_the_antagonist_only() -> None:
    result = _lab("--scenario", "interference", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = {"detected", "detection_s", "mitigation_s", "antagonist", "innocent_untouched",
            "victim_delay_ms", "quiet_run", "actions", "probe_backend"}  # fmt: skip
    assert keys <= report.keys()
    assert report["probe_backend"] in ("core", "bcc", "schedstat")
    assert report["detected"] is True, report["actions"]
    assert report["detection_s"] <= 2.0
    assert report["mitigation_s"] <= 3.0
    assert report["antagonist"] == "lab/antagonist/antagonist"
    assert report["innocent_untouched"] is True
    delay = report["victim_delay_ms"]
    assert delay["during"] > delay["before"] and delay["after"] < delay["during"]
    assert report["quiet_run"]["actions"] == 0
    assert any(
        a["kind"] == "mitigation" and "antagonist" in a["message"] for a in report["actions"]
    )
