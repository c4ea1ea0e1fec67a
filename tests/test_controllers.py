"""Controllers: host intents applied per domain, after the reply, one failure isolated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path, PurePosixPath

import pytest

from isolation.cgroups import CgroupFs, CgroupNotFound
from isolation.host import LinuxHost
from isolation.oom import ProcessControls
from nri_plugin.control.base import (
    Controller,
    Controllers,
    ControllerStartError,
    ControllerUnavailable,
    Mode,
)
from nri_plugin.control.executor import HostExecutor
from nri_plugin.control.oom import OomController
from nri_plugin.events import EventLog
from nri_plugin.policy.intents import (
    ContainerRef,
    HostIntent,
    Intents,
    Note,
    Phase,
    SetOomScoreAdj,
    Severity,
)
from tests.builders import FakeHost
from tests.processes import start_process, stop

REF = ContainerRef("ctr-1", "default/web/app", "pod-1", "/kubepods/pod-1/ctr-1", 4242)


def oom(value: int, phase: Phase = Phase.POST_UPDATE, ref: ContainerRef = REF) -> SetOomScoreAdj:
    return SetOomScoreAdj(phase=phase, container=ref, reason="shared band", value=value)


class Broken(Controller):
    name = "rdt"
    domain = "rdt-test"
    mode = Mode.OPTIONAL

    def post_update(self, intent: HostIntent) -> str:
        raise OSError(5, "Input/output error")


class BrokenIntent(HostIntent):
    domain = "rdt-test"


def test_the_oom_controller_writes_in_post_start_and_post_update() -> None:
    host = FakeHost()
    controllers = Controllers([OomController(host)])  # type: ignore[arg-type]
    controllers.start()
    notes = controllers.apply([oom(900, Phase.POST_START), oom(-500), oom(7, Phase.PRE_CREATE)])
    assert host.oom_writes == [(REF.cgroups_path, 4242, 900), (REF.cgroups_path, 4242, -500)]
    assert [n.subject for n in notes] == ["default/web/app"] * 2  # pre-create does nothing
    (status,) = controllers.status()
    assert (status.applied, status.failed) == (3, 0)


def test_one_failing_controller_never_stops_another_domain() -> None:
    host = FakeHost()
    controllers = Controllers([Broken(), OomController(host)])  # type: ignore[arg-type]
    controllers.start()
    broken = BrokenIntent(phase=Phase.POST_UPDATE, container=REF, reason="test")
    notes = controllers.apply([broken, oom(300), broken])
    assert host.oom_writes == [(REF.cgroups_path, 4242, 300)]
    failures = [n for n in notes if n.severity is Severity.WARNING]
    assert len(failures) == 2 and "Input/output error" in failures[0].message
    by_name = {s.name: s for s in controllers.status()}
    assert (by_name["rdt"].failed, by_name["oom"].applied) == (2, 1)
    assert "OSError" in by_name["rdt"].last_error


def test_an_intent_for_a_domain_without_controller_is_reported_not_dropped() -> None:
    (note,) = Controllers([]).apply([oom(1)])
    assert (
        note.severity is Severity.WARNING and "no controller applies domain 'oom'" in note.message
    )


class Missing(Controller):
    name = "rdt"
    domain = "rdt-test"

    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def start(self) -> None:
        raise ControllerUnavailable("/sys/fs/resctrl is not mounted: mount -t resctrl ...")


def test_an_optional_controller_that_cannot_start_is_disabled_with_its_reason() -> None:
    controllers = Controllers([Missing(Mode.OPTIONAL)])
    (note,) = controllers.start()
    assert "resctrl is not mounted" in note.message
    (status,) = controllers.status()
    assert not status.enabled and "resctrl" in status.reason
    broken = BrokenIntent(phase=Phase.POST_UPDATE, container=REF, reason="test")
    assert controllers.apply([broken]) == []  # disabled: nothing attempted


def test_a_required_controller_that_cannot_start_stops_the_start() -> None:
    with pytest.raises(ControllerStartError, match="rdt controller: /sys/fs/resctrl"):
        Controllers([Missing(Mode.REQUIRED)]).start()


def test_the_oom_controller_needs_procfs(tmp_path: Path) -> None:
    host = LinuxHost(procs=ProcessControls(tmp_path / "proc"))
    with pytest.raises(ControllerUnavailable, match="does not exist"):
        OomController(host).start()
    (tmp_path / "proc").mkdir()
    OomController(host).start()


def test_two_controllers_cannot_claim_one_domain() -> None:
    with pytest.raises(ValueError, match="both claim domain"):
        Controllers([Broken(), Broken()])


async def test_the_executor_applies_host_intents_off_the_loop_and_records_notes() -> None:
    host = FakeHost()
    events = EventLog()
    executor = HostExecutor(Controllers([OomController(host)]), events)  # type: ignore[arg-type]
    executor.start()
    other = ContainerRef("ctr-2", "default/web/side", "pod-1", "/kubepods/pod-1/ctr-2", 4343)
    try:
        executor.submit(
            Intents(
                host=(oom(100), oom(200, ref=other)),
                notes=(Note("plan", "default/web/app", "planned"),),
            )
        )
        assert events.snapshot()[0].message == "planned"  # notes at once, before host work
        await executor.drain()
        assert [w[2] for w in host.oom_writes] == [100, 200]  # in order, on the host thread
        assert [e.kind for e in events.snapshot()] == ["plan", "host", "host"]
    finally:
        executor.close()


async def test_a_newer_intent_for_the_same_container_supersedes_a_queued_one() -> None:
    host = FakeHost()
    executor = HostExecutor(Controllers([OomController(host)]))  # type: ignore[arg-type]
    executor.start()
    try:
        # one submit queues all three under the executor's lock: the worker sees only
        # the newest as current
        executor.submit(Intents(host=(oom(100), oom(200), oom(300))))
        await executor.drain()
        assert [w[2] for w in host.oom_writes][-1] == 300
        assert 200 not in [w[2] for w in host.oom_writes]
        assert [w[2] for w in host.oom_writes] == [300]
        assert executor.counts["superseded"] == 2
    finally:
        executor.close()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a cgroup")
@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/cpu/cgroup.procs").exists(),
    reason="no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu",
)
def test_the_oom_controller_writes_the_processes_of_a_real_container_cgroup() -> None:
    cgroups = CgroupFs()
    container_id = f"ctr{secrets.token_hex(8)}"
    group = PurePosixPath(f"/nri-qos-test-{secrets.token_hex(4)}/{container_id}")
    sleeper = start_process()
    try:
        cgroups.create_group(group)
        cgroups.move_pid(group, sleeper.pid)
        ref = ContainerRef(container_id, "default/x/x", "pod-x", str(group), sleeper.pid)
        controllers = Controllers([OomController(LinuxHost())])
        controllers.start()
        (note,) = controllers.apply([oom(733, ref=ref)])
        assert "1 applied" in note.message
        assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "733"
        # the same pid, claimed by a container (with an empty cgroup) whose cgroup it is
        # not in, is left alone
        cgroups.create_group(group.parent / "ctr-stranger")
        stranger = ContainerRef(
            "ctr-stranger", "default/y/y", "pod-y", f"{group.parent}/ctr-stranger", sleeper.pid
        )
        (note,) = controllers.apply([oom(900, ref=stranger)])
        assert "1 not_in_group" in note.message
        assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "733"
    finally:
        stop(sleeper)
        with contextlib.suppress(CgroupNotFound):
            cgroups.remove_group(group.parent, recursive=True)


def test_a_failing_required_controller_is_an_error_an_optional_one_a_warning() -> None:
    class RequiredBroken(Broken):
        mode = Mode.REQUIRED

    broken = BrokenIntent(phase=Phase.POST_UPDATE, container=REF, reason="test")
    for controller, severity in ((RequiredBroken(), Severity.ERROR), (Broken(), Severity.WARNING)):
        controllers = Controllers([controller])
        controllers.start()
        (note,) = controllers.apply([broken])
        assert note.severity is severity and "Input/output error" in note.message


async def test_an_intent_that_asks_for_rechecks_runs_again_until_a_newer_one_comes() -> None:
    host = FakeHost()
    executor = HostExecutor(Controllers([OomController(host)]))  # type: ignore[arg-type]
    executor.start()
    try:
        first = SetOomScoreAdj(
            phase=Phase.POST_START,
            container=REF,
            reason="late forks",
            value=100,
            recheck_after=(0.05, 0.05),
        )
        executor.submit(Intents(host=(first,)))
        await asyncio.sleep(0.4)
        assert [w[2] for w in host.oom_writes] == [100, 100, 100]  # the run + 2 rechecks
        assert executor.counts["rechecks"] == 2

        later = SetOomScoreAdj(
            phase=Phase.POST_START,
            container=REF,
            reason="late forks",
            value=200,
            recheck_after=(0.2,),
        )
        executor.submit(Intents(host=(later,)))
        await executor.drain()
        executor.submit(Intents(host=(oom(300),)))  # the plan moved: its recheck is void
        await asyncio.sleep(0.4)
        assert [w[2] for w in host.oom_writes][3:] == [200, 300]
    finally:
        executor.close()
