"""Eviction loops (koordinator#2529, #1114): an owner that lost a pod here is not evicted
from here again within the window; the reclaimable capacity an eviction took away is held
back from what the node reports for the cool-down."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nri_plugin.config_protection import ProtectionSectionError, parse_protection
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.eviction import (
    Candidate,
    EvictionConfig,
    Owner,
    OwnerMemory,
    RateLimit,
    choose_without_loops,
    owner_of,
)
from nri_plugin.policy.intents import Evict, Intents, ReportEvictionLoop
from nri_plugin.policy.protection import ProtectionConfig
from nri_plugin.policy.qos import QosClass
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import Pod
from qos_model.signals import ContainerSignals, MemoryUse, NodeMemory, SignalSnapshot
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

MiB = 1 << 20

# --- owners from names and labels ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [
        # a Deployment's pod: the ReplicaSet is the name up to and including the hash
        (
            "web-5d8f7c9b4-x2k9p",
            {"pod-template-hash": "5d8f7c9b4", "app": "web"},
            ("ReplicaSet", "web-5d8f7c9b4"),
        ),
        # StatefulSet: the pod-name label, or an ordinal the revision hash agrees with
        (
            "db-2",
            {"controller-revision-hash": "db-6c9f8d",
             "statefulset.kubernetes.io/pod-name": "db-2"},
            ("StatefulSet", "db"),
        ),
        ("kafka-broker-10", {"controller-revision-hash": "kafka-broker-7d4c"},
         ("StatefulSet", "kafka-broker")),
        # DaemonSet: the revision hash with pod-template-generation; name minus 5 chars
        (
            "agent-7xk2q",
            {"controller-revision-hash": "6d5b9c8f7", "pod-template-generation": "3"},
            ("DaemonSet", "agent"),
        ),
        ("etl-nightly-28312-abcde", {"batch.kubernetes.io/job-name": "etl-nightly-28312"},
         ("Job", "etl-nightly-28312")),
        ("spark-1", {"job-name": "spark"}, ("Job", "spark")),
    ],
)  # fmt: skip
def test_the_owner_comes_from_the_labels_the_controllers_set(
    name: str, labels: dict[str, str], expected: tuple[str, str]
) -> None:
    owner = owner_of("batch", name, labels)
    assert owner is not None
    assert (owner.kind, owner.name, owner.namespace) == (*expected, "batch")
    assert owner.source  # says how it was found


def test_a_bare_pod_has_no_owner_and_is_never_a_loop() -> None:
    assert owner_of("batch", "debug-shell", {"app": "debug"}) is None
    memory = OwnerMemory(600)
    bare = _candidate("debug-shell", None)
    allowed, loops = memory.split([bare], now=1.0)
    assert allowed == [bare] and not loops


def test_the_owner_identity_ignores_how_it_was_found() -> None:
    assert Owner("ReplicaSet", "a", "b", "label x") == Owner("ReplicaSet", "a", "b", "API")


def _candidate(pod_name: str, owner: Owner | None, usage: float = 1.0) -> Candidate:
    return Candidate(
        container_id=f"ctr-{pod_name}",
        pod_id=f"pod-{pod_name}",
        namespace="batch",
        pod=pod_name,
        name=f"batch/{pod_name}/main",
        qos_class=QosClass.RECLAIMED_CORES,
        priority=0,
        usage=usage,
        owner=owner,
    )


def test_an_owner_evicted_within_the_window_is_passed_over_for_the_next_candidate() -> None:
    rs = Owner("ReplicaSet", "batch", "etl-5d8f7c9b4")
    memory = OwnerMemory(600)
    memory.record(rs, "batch/etl-5d8f7c9b4-aaaaa", now=100.0)
    again = _candidate("etl-5d8f7c9b4-bbbbb", rs, usage=9.0)  # the best victim by use
    other = _candidate("copy-6b7c8d9e0-ccccc", Owner("ReplicaSet", "batch", "copy-6b7c8d9e0"))
    limit = RateLimit(EvictionConfig(cooldown_s=0))
    choice = choose_without_loops([again, other], frozenset(), limit, 160.0, memory)
    assert choice.pick == other
    assert [(loop.owner, loop.earlier_pod, round(loop.ago_s)) for loop in choice.loops] == [
        (rs, "batch/etl-5d8f7c9b4-aaaaa", 60)
    ]
    text = choice.loops[0].message()
    assert "ReplicaSet batch/etl-5d8f7c9b4" in text and "loop" in text
    assert "taint" in text and "reclaimed_millicpu" in text
    # alone, it is not evicted at all, and the reason names the owner
    alone = choose_without_loops([again], frozenset(), limit, 160.0, memory)
    assert alone.pick is None and "ReplicaSet batch/etl-5d8f7c9b4" in alone.why_not
    # the window over, the owner may lose a pod here again
    assert choose_without_loops([again], frozenset(), limit, 700.0, memory).pick == again
    assert len(memory) == 0


# --- the engine: the same owner twice on one node ------------------------------------------


def node(**eviction: object) -> Engine:
    topo = MachineShape(packages=2, cores_per_l3=2).expected_topology()
    config = EngineConfig(
        planner=PlannerConfig(
            reclaimed_min_cpus=2,
            isolation=IsolationConfig(host=HostSupport(evict=Backend(True, "started"))),
        ),
        protection=ProtectionConfig(
            eviction=EvictionConfig(cooldown_s=0, burst=10, **eviction)  # type: ignore[arg-type]
        ),
    )
    e = Engine(topo, config)
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", True))
    e.synchronize([], [])
    return e


def replica(name: str, rs: str = "etl-5d8f7c9b4") -> tuple[Pod, str]:
    """A reclaimed pod of ReplicaSet `rs` (its container is "ctr-<name>")."""
    p = replace(pod(name, "reclaimed_cores"), labels={"pod-template-hash": rs.split("-")[-1]})
    return replace(p, name=f"{rs}-{name}"), f"ctr-{name}"


def short_of_memory(t: float, *cids: str) -> SignalSnapshot:
    return SignalSnapshot(
        end_s=t,
        window_s=0.5,
        containers={c: ContainerSignals(memory=MemoryUse(usage_bytes=900 * MiB)) for c in cids},
        node_memory=NodeMemory(available_bytes=100 * MiB, total_bytes=16 << 30),
    )


def evicted(intents: Intents) -> list[str]:
    return [i.pod for i in intents.host if isinstance(i, Evict)]


def test_the_same_owner_is_not_evicted_from_this_node_twice_within_the_window() -> None:
    e = node(owner_window_s=600)
    first, cid = replica("aaaaa")
    e.container_created(first, container("aaaaa", 0, oom=1000))
    step = e.signals_sampled(short_of_memory(10.0, cid)).intents
    assert evicted(step) == ["etl-5d8f7c9b4-aaaaa"]
    e.pod_removed(first)  # gone; its ReplicaSet makes another, which lands here again

    second, cid2 = replica("bbbbb")
    e.container_created(second, container("bbbbb", 0, oom=1000))
    step = e.signals_sampled(short_of_memory(70.0, cid2)).intents
    assert evicted(step) == []  # not again: a loop
    loops = [i for i in step.host if isinstance(i, ReportEvictionLoop)]
    assert [(i.namespace, i.pod, i.owner) for i in loops] == [
        ("default", "etl-5d8f7c9b4-bbbbb", "ReplicaSet default/etl-5d8f7c9b4")
    ]
    warning = [n for n in step.notes if "loop" in n.message]
    assert len(warning) == 1 and "etl-5d8f7c9b4-aaaaa here 60 s ago" in warning[0].message
    # said once per loop, not every window
    step = e.signals_sampled(short_of_memory(71.0, cid2)).intents
    assert evicted(step) == [] and not [i for i in step.host if isinstance(i, ReportEvictionLoop)]
    assert not [n for n in step.notes if "loop" in n.message]

    # another owner's pod is still evicted meanwhile: the guard is per owner
    other, cid3 = replica("ccccc", rs="copy-6b7c8d9e0")
    e.container_created(other, container("ccccc", 0, oom=1000))
    step = e.signals_sampled(short_of_memory(72.0, cid2, cid3)).intents
    assert evicted(step) == ["copy-6b7c8d9e0-ccccc"]
    e.pod_removed(other)

    # the window over: the owner may lose a pod here again
    step = e.signals_sampled(short_of_memory(611.0, cid2)).intents
    assert evicted(step) == ["etl-5d8f7c9b4-bbbbb"]


def test_a_zero_window_turns_the_guard_off() -> None:
    e = node(owner_window_s=0)
    first, cid = replica("aaaaa")
    e.container_created(first, container("aaaaa", 0, oom=1000))
    assert evicted(e.signals_sampled(short_of_memory(10.0, cid)).intents)
    e.pod_removed(first)
    second, cid2 = replica("bbbbb")
    e.container_created(second, container("bbbbb", 0, oom=1000))
    assert evicted(e.signals_sampled(short_of_memory(11.0, cid2)).intents)


# --- the hold-back of reclaimable capacity -------------------------------------------------


def totals(e: Engine) -> tuple[int, int]:
    r = e.reclaimable()
    return sum(v.millicores for v in r.values()), sum(v.memory_bytes for v in r.values())


def test_evicting_a_reclaimed_pod_holds_its_request_back_from_the_reclaimable_report() -> None:
    e = node(holdback_s=30)
    e.container_created(pod("web", "shared_cores"), container("web", 1000))
    batch, cid = replica("aaaaa")
    # a Burstable batch pod: a 1.5-CPU request (cpu.shares) and a 512 MiB limit
    e.container_created(batch, container("aaaaa", 1500, oom=1000, memory=512 * MiB))
    before = totals(e)
    step = e.signals_sampled(short_of_memory(10.0, cid)).intents
    assert evicted(step) == ["etl-5d8f7c9b4-aaaaa"]
    during = totals(e)
    assert during == (before[0] - 1500, before[1] - 512 * MiB)
    assert any("held back for 30 s" in n.message for n in step.notes)
    assert any("held back 1500m" in r.reason for r in e.reclaimable().values())
    e.pod_removed(batch)
    e.container_stopped(batch, container("aaaaa"))
    # still within the hold-back: the pod leaving does not give the capacity back yet
    assert totals(e)[0] < totals_without_holdback(e)[0]
    e.signals_sampled(SignalSnapshot(end_s=39.0, window_s=0.5))
    assert totals(e) < totals_without_holdback(e)
    e.signals_sampled(SignalSnapshot(end_s=40.5, window_s=0.5))  # 30 s are over
    assert totals(e) == totals_without_holdback(e)


def totals_without_holdback(e: Engine) -> tuple[int, int]:
    saved, e.protection.holdbacks = e.protection.holdbacks, []
    try:
        return totals(e)
    finally:
        e.protection.holdbacks = saved


def test_a_best_effort_batch_pod_holds_back_what_it_used() -> None:
    e = node(holdback_s=30)
    batch, cid = replica("aaaaa")
    best_effort = replace(container("aaaaa", 0, oom=1000), resources=None)
    e.container_created(batch, best_effort)
    before = totals(e)
    snap = SignalSnapshot(
        end_s=10.0,
        window_s=0.5,
        containers={
            cid: ContainerSignals(cpu_usage_ns=250_000_000, memory=MemoryUse(usage_bytes=300 * MiB))
        },
        node_memory=NodeMemory(available_bytes=100 * MiB, total_bytes=16 << 30),
    )
    assert evicted(e.signals_sampled(snap).intents)
    assert totals(e) == (before[0] - 500, before[1] - 300 * MiB)  # 0.25 s of 0.5 s: 500m


def test_without_a_holdback_the_report_is_not_reduced() -> None:
    e = node()  # cooldown_s = 0 and no holdback_s: nothing is held back
    batch, cid = replica("aaaaa")
    e.container_created(batch, container("aaaaa", 1500, oom=1000, memory=512 * MiB))
    before = totals(e)
    assert evicted(e.signals_sampled(short_of_memory(10.0, cid)).intents)
    assert not e.protection.holdbacks and totals(e) == before


# --- configuration -------------------------------------------------------------------------


def test_the_eviction_section_takes_the_window_and_the_holdback() -> None:
    s = parse_protection({"eviction": {"owner_window_ms": 120000, "holdback_ms": 5000}})
    assert s.engine.eviction.owner_window_s == 120.0
    assert s.engine.eviction.holdback == 5.0
    assert s.evict.owner_window_s == 120.0
    default = parse_protection({})
    assert default.engine.eviction.owner_window_s == 600.0
    assert default.engine.eviction.holdback == default.engine.eviction.cooldown_s
    with pytest.raises(ProtectionSectionError, match="owner_window_ms"):
        parse_protection({"eviction": {"owner_window_ms": -1}})
