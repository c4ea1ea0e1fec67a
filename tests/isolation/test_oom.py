"""isolation.oom against this host's real procfs.

Raising oom_score_adj works for root; lowering it below the task's
``oom_score_adj_min`` (0) needs CAP_SYS_RESOURCE, which this CI host's root lacks: the
kernel answers EACCES and the agent must report that as a countable outcome.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from isolation.cgroups import CgroupFs, CgroupNotFound
from isolation.oom import (
    CAP_SYS_RESOURCE,
    OomAdjOutcome,
    ProcessControls,
    ProcessGone,
    parse_status,
)
from qos_model.cpulist import parse_cpu_list
from tests.processes import start_process, stop


def _cap_sys_resource_from_status() -> bool:
    """Read independently of the code under test: CapEff bit 24 of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE))
    raise AssertionError("no CapEff line in /proc/self/status")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = start_process()
    try:
        yield process
    finally:
        stop(process)


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_raise_and_read_back(sleeper: subprocess.Popen[bytes]) -> None:
    controls = ProcessControls()
    assert controls.get_oom_score_adj(sleeper.pid) == 0
    score_at_0 = controls.get_oom_score(sleeper.pid)

    result = controls.set_oom_score_adj(sleeper.pid, 500)

    assert result.outcome is OomAdjOutcome.APPLIED and result.ok
    assert controls.get_oom_score_adj(sleeper.pid) == 500
    assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "500"
    # oom_score = (1000 + badness * 1000 / totalpages) * 2 / 3, and adj 500 adds half
    # of totalpages to badness: about +333 for a process as small as sleep.
    assert 320 <= controls.get_oom_score(sleeper.pid) - score_at_0 <= 345


def test_lowering_back_to_zero_needs_no_capability(sleeper: subprocess.Popen[bytes]) -> None:
    controls = ProcessControls()
    controls.set_oom_score_adj(sleeper.pid, 500)
    assert controls.set_oom_score_adj(sleeper.pid, 0).outcome is OomAdjOutcome.APPLIED
    assert controls.get_oom_score_adj(sleeper.pid) == 0


def test_negative_value_without_cap_sys_resource_is_a_clean_outcome(
    sleeper: subprocess.Popen[bytes],
) -> None:
    controls = ProcessControls()
    assert controls.has_cap_sys_resource() == _cap_sys_resource_from_status()
    controls.set_oom_score_adj(sleeper.pid, 500)

    result = controls.set_oom_score_adj(sleeper.pid, -500)

    if _cap_sys_resource_from_status():
        pytest.skip("this process has CAP_SYS_RESOURCE, so -500 is allowed here")
    assert result.outcome is OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE
    assert not result.ok
    assert result.errno == errno.EACCES
    assert "lowering oom_score_adj" in result.message
    assert "needs CAP_SYS_RESOURCE; the agent runs without it" in result.message
    assert controls.get_oom_score_adj(sleeper.pid) == 500  # unchanged


def test_vanished_process() -> None:
    controls = ProcessControls()
    pid = _exited_pid()
    result = controls.set_oom_score_adj(pid, 300)
    assert result.outcome is OomAdjOutcome.PROCESS_GONE
    assert result.errno == errno.ENOENT
    with pytest.raises(ProcessGone) as info:
        controls.get_oom_score_adj(pid)
    assert info.value.errno == errno.ENOENT


def test_out_of_range_value_is_a_programming_error(sleeper: subprocess.Popen[bytes]) -> None:
    with pytest.raises(ValueError):
        ProcessControls().set_oom_score_adj(sleeper.pid, 1001)


def test_dry_run_writes_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    result = ProcessControls(dry_run=True).set_oom_score_adj(sleeper.pid, 700)
    assert result.outcome is OomAdjOutcome.PLANNED
    assert ProcessControls().get_oom_score_adj(sleeper.pid) == 0


def test_allowed_placement_matches_the_kernels_affinity() -> None:
    placement = ProcessControls().allowed_placement(os.getpid())
    assert placement.cpus == os.sched_getaffinity(0)
    status = parse_status(Path("/proc/self/status").read_text())
    assert placement.mems == parse_cpu_list(status["Mems_allowed_list"])
    assert 0 in placement.mems


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a cgroup")
@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/cpu/cgroup.procs").exists(),
    reason="no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu",
)
def test_apply_to_every_process_of_a_cgroup() -> None:
    cgroups = CgroupFs()
    controls = ProcessControls()
    group = PurePosixPath(f"/nri-qos-test-{secrets.token_hex(4)}")
    processes = [start_process() for _ in range(2)]
    try:
        cgroups.create_group(group)
        for process in processes:
            cgroups.move_pid(group, process.pid)

        report = controls.apply_oom_score_adj_to_group(cgroups, group, 800)

        assert report.count(OomAdjOutcome.APPLIED) == 2
        assert report.failures == ()
        assert {r.pid for r in report.results} == {p.pid for p in processes}
        for process in processes:
            assert controls.get_oom_score_adj(process.pid) == 800

        if not _cap_sys_resource_from_status():
            denied = controls.apply_oom_score_adj_to_group(cgroups, group, -100)
            assert denied.count(OomAdjOutcome.NEEDS_CAP_SYS_RESOURCE) == 2
            assert len(denied.failures) == 2
    finally:
        for process in processes:
            stop(process)
        with contextlib.suppress(CgroupNotFound):  # create_group itself failed
            cgroups.remove_group(group)
    with pytest.raises(CgroupNotFound):
        controls.apply_oom_score_adj_to_group(cgroups, group, 800)
