"""The evict controller against a real local API server (tests/isolation/test_evict.py).

What is proven: a disruption budget's "not now" is reported and never escalated to a
kill, even with the kill fallback on; a failed eviction kills only when the fallback is
configured (for real, on a root host, else shown by the ownership refusal the kill path
raises) and is otherwise a HostError the executor retries; an unreachable API without
the fallback disables the controller with one line saying what to set; a dry run sends
and kills nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from isolation.errors import TRANSIENT_ERRNOS, HostError
from isolation.evict import KubernetesEvictor, PodController, controller_of
from isolation.host import LinuxHost
from isolation.ownership import ForeignCgroup
from isolation.writes import HostWriter
from nri_plugin.control.base import Controllers, ControllerUnavailable
from nri_plugin.control.evict import EvictController, EvictSettings
from nri_plugin.policy.intents import ContainerRef, Evict, Phase, ReportEvictionLoop
from tests.isolation import test_cgroup_kill_real as real_cgroups
from tests.isolation import test_evict as wire

# A path no kill may ever act on: if the controller tried, ForeignCgroup would say so.
FOREIGN = ContainerRef("ctr-web", "shop/web/app", "pod-uid-1", "/", None)


@pytest.fixture
def server() -> Iterator[wire.ApiServer]:
    with wire.running_apiserver() as state:
        yield state


def intent(container: ContainerRef = FOREIGN, *, grace: int | None = 30) -> Evict:
    return Evict(
        phase=Phase.POST_UPDATE,
        container=container,
        reason="memory pressure: reclaimed pod over its share",
        namespace="shop",
        pod="web-1",
        pod_uid="pod-uid-1",
        grace_period_s=grace,
    )


def controller(
    server: wire.ApiServer, *, kill_fallback: bool = False, dry_run: bool = False
) -> tuple[EvictController, HostWriter]:
    writer = HostWriter()
    evictor = KubernetesEvictor.for_url(server.url, wire.TOKEN, writer)
    settings = EvictSettings(kill_fallback=kill_fallback, dry_run=dry_run)
    c = EvictController(settings, LinuxHost(), writer, evictor)
    c.start()
    return c, writer


def test_an_accepted_eviction_is_reported_with_its_reason(server: wire.ApiServer) -> None:
    server.answer(201, wire.created_status())
    c, _ = controller(server)

    outcome = c.hook(Phase.POST_UPDATE)(intent())

    assert outcome == "evicted pod shop/web-1: memory pressure: reclaimed pod over its share"
    (request,) = server.requests
    assert request.path == "/api/v1/namespaces/shop/pods/web-1/eviction"
    assert request.body["deleteOptions"] == {
        "gracePeriodSeconds": 30,
        "preconditions": {"uid": "pod-uid-1"},
    }


def test_not_now_is_an_outcome_and_never_a_kill_even_with_the_fallback(
    server: wire.ApiServer,
) -> None:
    server.answer(429, wire.PDB_STATUS, Retry_After="10")
    c, writer = controller(server, kill_fallback=True)

    outcome = c.post_update(intent())  # FOREIGN: a kill attempt would raise

    assert outcome.startswith("not now: pod shop/web-1: Cannot evict pod")
    assert "web-pdb needs 2 healthy pods" in outcome
    assert outcome.endswith("(retry after 10s)")
    assert [c.action for c in writer.recent] == ["evict pod"]


def test_failed_without_the_fallback_is_a_host_error_the_executor_retries(
    server: wire.ApiServer,
) -> None:
    server.answer(500, wire.internal_error_status())
    c, _ = controller(server)

    with pytest.raises(HostError) as raised:
        c.post_update(intent())

    assert raised.value.errno == errno.EAGAIN
    assert "etcdserver: request timed out" in str(raised.value)
    server.answer(503, wire.internal_error_status())
    applied = Controllers([c])
    applied.start()
    assert applied.apply_one(intent()).retry


def test_a_refusal_for_want_of_rights_is_not_retried(server: wire.ApiServer) -> None:
    server.answer(
        403,
        {
            "kind": "Status",
            "status": "Failure",
            "message": 'pods "web-1" is forbidden: User "system:serviceaccount:kube-system:'
            'nri-qos" cannot create resource "pods/eviction"',
            "reason": "Forbidden",
            "code": 403,
        },
    )
    c, _ = controller(server)

    with pytest.raises(HostError) as raised:
        c.post_update(intent())

    assert raised.value.errno == errno.EACCES
    assert raised.value.errno not in TRANSIENT_ERRNOS
    assert 'cannot create resource "pods/eviction"' in str(raised.value)


def test_failed_with_the_fallback_goes_to_the_kill_which_checks_ownership(
    server: wire.ApiServer,
) -> None:
    server.answer(500, wire.internal_error_status())
    c, _ = controller(server, kill_fallback=True)

    with pytest.raises(ForeignCgroup):  # the kill path was taken, and refused "/"
        c.post_update(intent())


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups and kill")
def test_failed_with_the_fallback_kills_the_containers_processes(
    server: wire.ApiServer, tmp_path: Path
) -> None:
    server.answer(500, wire.internal_error_status())
    c, writer = controller(server, kill_fallback=True)
    with real_cgroups.container_group(tmp_path) as group:
        group.start_forker()
        group.wait_for_members(3)
        ref = ContainerRef(group.id, "shop/web-1/app", "pod-uid-1", group.cgroups_path, None)

        outcome = c.post_update(intent(ref))

        assert outcome.startswith("eviction failed (pod shop/web-1: HTTP 500")
        assert "killed container shop/web-1/app" in outcome
        assert group.members() == []
        assert len(server.requests) == 1
        assert writer.recent[0].action == "evict pod"
        assert any(ch.target.endswith("cgroup.kill") for ch in writer.recent)


def test_no_api_without_the_fallback_disables_the_controller_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    c = EvictController(EvictSettings(api="in-cluster"), LinuxHost(), HostWriter())

    with pytest.raises(ControllerUnavailable) as raised:
        c.start()

    message = str(raised.value)
    assert message.startswith("not running in a cluster: ")
    assert "set [eviction] kubeconfig" in message
    assert "kill_fallback = true" in message
    assert "\n" not in message


def test_no_api_with_the_fallback_still_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = EvictSettings(api="auto", kill_fallback=True)
    c = EvictController(settings, LinuxHost(), HostWriter())

    c.start()

    assert c.evictor is None
    assert c.api_unavailable.startswith("not running in a cluster")
    with pytest.raises(ForeignCgroup):  # straight to the kill, which refuses "/"
        c.post_update(intent())


def test_a_bad_setting_says_which(tmp_path: Path) -> None:
    for settings, expected in [
        (EvictSettings(api="maybe"), "[eviction] api = 'maybe' is not one of"),
        (
            EvictSettings(api="kubeconfig"),
            "[eviction] api = kubeconfig needs [eviction] kubeconfig",
        ),
        (EvictSettings(kubeconfig=str(tmp_path / "none")), "kubeconfig"),
        (EvictSettings(enabled=False), "disabled by [eviction] enabled = false"),
    ]:
        with pytest.raises(ControllerUnavailable, match=expected.replace("[", r"\[")):
            EvictController(settings, LinuxHost(), HostWriter()).start()


def test_dry_run_sends_nothing_and_says_the_whole_decision(server: wire.ApiServer) -> None:
    c, shared = controller(server, kill_fallback=True, dry_run=True)

    outcome = c.post_update(intent())

    assert outcome == (
        "dry-run: would evict pod shop/web-1 (uid pod-uid-1, grace period 30s); if the API "
        "server fails, kill container shop/web/app: memory pressure: reclaimed pod over its "
        "share"
    )
    assert server.requests == []
    assert not shared.recent  # the shared writer did nothing
    assert [str(p) for p in c.writer.planned] == [
        "evict pod shop/web-1 'grace period 30s' (memory pressure: reclaimed pod over its share)"
    ]


# --- eviction loops: the real owner, read from the API server ------------------------------


def owned_pod(
    name: str, kind: str = "ReplicaSet", owner: str = "web-5d8f7c9b4"
) -> dict[str, object]:
    ref = {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "rs-1", "controller": True}
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm-1"}
    return {"kind": "Pod", "metadata": {"name": name, "ownerReferences": [other, ref]}}


def pod_intent(pod: str) -> Evict:
    return replace(intent(), pod=pod, pod_uid=f"uid-{pod}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_same_real_owner_is_not_evicted_twice_within_the_window(
    server: wire.ApiServer,
) -> None:
    """Owners the labels do not name (an operator's custom resource) are caught by the
    ownerReference read before evicting: the second pod is left alone, and a Warning
    Event on it says why and what to do."""
    for name in ("web-1", "web-2"):
        server.objects[f"/api/v1/namespaces/shop/pods/{name}"] = owned_pod(
            name, kind="CloneSet", owner="web"
        )
    writer = HostWriter()
    evictor = KubernetesEvictor.for_url(server.url, wire.TOKEN, writer)
    clock = Clock()
    c = EvictController(EvictSettings(owner_window_s=600), LinuxHost(), writer, evictor, clock)
    c.start()

    first = c.hook(Phase.POST_UPDATE)(pod_intent("web-1"))
    assert first.startswith("evicted pod shop/web-1")
    clock.now += 90
    second = c.hook(Phase.POST_UPDATE)(pod_intent("web-2"))
    assert second.startswith("not evicted: pod shop/web-2: its owner CloneSet shop/web lost pod")
    assert "shop/web-1 here 90 s ago" in second and "event EvictionLoop posted" in second
    evictions = [r for r in server.requests if r.path.endswith("/eviction")]
    assert [r.path for r in evictions] == ["/api/v1/namespaces/shop/pods/web-1/eviction"]
    (event,) = [r for r in server.requests if r.path == "/api/v1/namespaces/shop/events"]
    assert event.body["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "web-2",
        "namespace": "shop",
        "uid": "uid-web-2",
    }
    assert (event.body["reason"], event.body["type"]) == ("EvictionLoop", "Warning")
    assert "taint" in event.body["message"]

    clock.now += 600  # the window is over
    third = c.hook(Phase.POST_UPDATE)(pod_intent("web-2"))
    assert third.startswith("evicted pod shop/web-2")


def test_a_pod_that_cannot_be_read_is_still_evicted(server: wire.ApiServer) -> None:
    c, _ = controller(server)  # no objects: the GET answers 404
    assert c.hook(Phase.POST_UPDATE)(pod_intent("web-1")).startswith("evicted pod")
    assert c.hook(Phase.POST_UPDATE)(pod_intent("web-1")).startswith("evicted pod")
    assert server.reads == ["/api/v1/namespaces/shop/pods/web-1"] * 2


def test_the_engines_loop_report_becomes_an_event_on_the_pod(server: wire.ApiServer) -> None:
    c, _ = controller(server)
    report = ReportEvictionLoop(
        phase=Phase.POST_UPDATE,
        container=FOREIGN,
        reason="not evicting pod shop/web-2: its owner ReplicaSet shop/web-5d8f lost ...",
        namespace="shop",
        pod="web-2",
        pod_uid="uid-web-2",
        owner="ReplicaSet shop/web-5d8f",
    )
    assert c.hook(Phase.POST_UPDATE)(report) == "event EvictionLoop posted on pod shop/web-2"
    (event,) = server.requests
    assert event.path == "/api/v1/namespaces/shop/events"
    assert event.body["message"].startswith("not evicting pod shop/web-2")
    assert not server.reads  # a report evicts nothing and reads nothing


def test_controller_of_takes_the_controller_reference_only() -> None:
    assert controller_of(owned_pod("a")) == PodController("ReplicaSet", "web-5d8f7c9b4", "rs-1")
    assert controller_of({"metadata": {"ownerReferences": [{"kind": "X", "name": "y"}]}}) is None
    assert controller_of({}) is None
