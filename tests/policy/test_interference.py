"""Interference detection, the mitigation ladder and eviction, fed signal windows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.eviction import Candidate, EvictionConfig, RateLimit, choose, rank
from nri_plugin.policy.intents import Evict
from nri_plugin.policy.interference import (
    OVERRIDE_ANNOTATION,
    Detector,
    InterferenceConfig,
    Verdict,
    Watched,
    config_for,
)
from nri_plugin.policy.mitigation import Ladder, LadderConfig, Move, Rung
from nri_plugin.policy.protection import ProtectionConfig
from nri_plugin.policy.qos import QosClass
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.cpulist import parse_cpu_list
from qos_model.signals import (
    RUNQ_BUCKETS,
    ContainerSignals,
    CpuThrottling,
    MemoryUse,
    NodeMemory,
    RunqLatency,
    SignalSnapshot,
)
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

CFG = InterferenceConfig()


def runq(p90_us: int, count: int = 100) -> RunqLatency:
    """A histogram whose 90th percentile falls in the bucket holding `p90_us`."""
    buckets = [0] * RUNQ_BUCKETS
    bucket = max(0, p90_us.bit_length() - 1)
    buckets[bucket] = count
    return RunqLatency(count=count, total_ns=count * p90_us * 1000, buckets=tuple(buckets))


def snap(
    t: float,
    victim_us: int,
    blame: dict[tuple[str, str], int] | None = None,
    **others: ContainerSignals,
) -> SignalSnapshot:
    containers = {"victim": ContainerSignals(runq=runq(victim_us)), **others}
    return SignalSnapshot(end_s=t, window_s=0.5, containers=containers, blame=blame or {})


WATCHED = {
    "victim": Watched("prod/web/app", True, frozenset({1}), CFG),
    "burner": Watched("batch/etl/spark", False, frozenset({1}), CFG),
    "innocent": Watched("batch/copy/cp", False, frozenset({0}), CFG),
}
BLAME = {("victim", "burner"): 760_000_000, ("victim", "innocent"): 1_000_000}


def test_interference_is_declared_after_n_bad_windows_and_names_who_ran_meanwhile() -> None:
    d = Detector()
    assert not d.observe(snap(0.5, 100), WATCHED).started  # 0.1 ms: fine
    results = [d.observe(snap(1.0 + i / 2, 8000, BLAME), WATCHED) for i in range(3)]
    assert [r.started for r in results] == [(), (), ("victim",)]
    detection = results[-1].active[0]
    assert detection.verdict is Verdict.NEIGHBOURS
    # the innocent's 1 ms (0.1 % of the wait) does not make it an antagonist
    assert [a.container_id for a in detection.antagonists] == ["burner"]
    assert detection.antagonists[0].score > 0.9
    assert "batch/etl/spark" in detection.reason and detection.confidence > 0.9
    # back under the threshold: cleared only after clear_windows good windows
    quiet = [d.observe(snap(3.0 + i / 2, 100), WATCHED) for i in range(CFG.clear_windows)]
    assert [r.cleared for r in quiet][-1] == ("victim",)
    assert all(not r.cleared for r in quiet[:-1])


def test_own_cpu_limit_is_not_interference() -> None:
    d = Detector()
    throttled = ContainerSignals(
        runq=runq(8000), throttling=CpuThrottling(periods=50, throttled_periods=40, throttled_ns=1)
    )
    for i in range(3):
        result = d.observe(
            SignalSnapshot(end_s=i, window_s=0.5, containers={"victim": throttled}), WATCHED
        )
    assert result.active[0].verdict is Verdict.SELF_THROTTLED
    assert "its own CPU limit" in result.active[0].reason
    assert not result.active[0].antagonists


def test_the_baseline_raises_the_bar_for_a_container_that_is_always_slow() -> None:
    d = Detector()
    for i in range(40):  # ~1 ms is this container's normal
        d.observe(snap(i, 1000), WATCHED)
    baseline, _ = d.state_of("victim")
    assert baseline is not None and 0.9 < baseline < 1.1
    # 4 ms is above the 2 ms absolute bar, but not above 4 x this container's baseline
    results = [d.observe(snap(50 + i, 3000, BLAME), WATCHED) for i in range(3)]
    assert not results[-1].started and not results[-1].bad
    results = [d.observe(snap(60 + i, 6000, BLAME), WATCHED) for i in range(3)]
    assert results[-1].started == ("victim",)


def test_without_a_blame_matrix_the_cpu_overlap_names_candidates_with_less_confidence() -> None:
    d = Detector()
    others = {
        "burner": ContainerSignals(cpu_usage_ns=480_000_000),
        "innocent": ContainerSignals(cpu_usage_ns=490_000_000),  # busier, but elsewhere
    }
    for i in range(3):
        result = d.observe(snap(i, 8000, None, **others), WATCHED)
    detection = result.active[0]
    assert [a.container_id for a in detection.antagonists] == ["burner"]
    assert detection.confidence <= 0.5


def test_a_pod_can_tune_or_disable_detection_and_bad_values_are_ignored() -> None:
    tuned = config_for({OVERRIDE_ANNOTATION: '{"runq_ms": "10", "windows": "5"}'}, CFG)
    assert (tuned.runq_ms, tuned.windows) == (10.0, 5)
    assert not config_for({OVERRIDE_ANNOTATION: '{"enabled": "false"}'}, CFG).enabled
    for bad in ('{"runq_ms": "nan"}', '{"windows": "0"}', "[1]", "{", '{"runq_ms": 5}'):
        assert config_for({OVERRIDE_ANNOTATION: bad}, CFG) == CFG


def test_the_ladder_climbs_one_rung_at_a_time_relaxes_and_does_not_flap() -> None:
    d = Detector()
    ladder = Ladder(LadderConfig(escalate_after_s=1.0, relax_after_s=2.0, cooldown_s=10.0))
    everything = lambda rung, det: ("", ("burner",))  # noqa: E731
    moves: list[tuple[float, Move, Rung]] = []
    t = 0.0
    for _ in range(8):  # 4 s of interference
        t += 0.5
        for a in ladder.step(t, d.observe(snap(t, 8000, BLAME), WATCHED), everything):
            moves.append((t, a.move, a.rung))
    assert moves == [
        (1.5, Move.APPLY, Rung.SHRINK_RECLAIMED),
        (2.5, Move.APPLY, Rung.CAP_CPU),
        (3.5, Move.APPLY, Rung.TIGHTEN_MBA),
    ]
    moves.clear()
    for _ in range(16):  # 8 s quiet: the episode clears, then one rung per relax_after_s
        t += 0.5
        for a in ladder.step(t, d.observe(snap(t, 100), WATCHED), everything):
            moves.append((t, a.move, a.rung))
    assert [(m, r) for _, m, r in moves] == [
        (Move.UNDO, Rung.TIGHTEN_MBA),
        (Move.UNDO, Rung.CAP_CPU),
        (Move.UNDO, Rung.SHRINK_RECLAIMED),
    ]
    assert moves[1][0] - moves[0][0] >= 2.0
    moves.clear()
    for _ in range(4):  # it comes back within the cool-down: undone rungs are passed over
        t += 0.5
        for a in ladder.step(t, d.observe(snap(t, 8000, BLAME), WATCHED), everything):
            moves.append((t, a.move, a.rung))
    assert [r for _, _, r in moves] == [Rung.EVICT]
    assert any("cool-down" in s for s in ladder.skipped) or moves


def test_eviction_ranks_by_class_priority_then_use_and_is_rate_limited() -> None:
    def cand(name: str, cls: QosClass, prio: int = 0, usage: float = 0.0) -> Candidate:
        return Candidate(name, f"pod-{name}", "ns", name, name, cls, prio, usage)

    ranked = rank(
        [
            cand("db", QosClass.DEDICATED_CORES, usage=9),
            cand("web", QosClass.SHARED_CORES, usage=9),
            cand("etl", QosClass.RECLAIMED_CORES, prio=10, usage=9),
            cand("copy", QosClass.RECLAIMED_CORES, prio=0, usage=1),
            cand("agent", QosClass.SYSTEM_CORES, usage=9),
        ]
    )
    assert [c.name for c in ranked] == ["copy", "etl", "web"]  # never db or agent
    limit = RateLimit(EvictionConfig(burst=2, window_s=60, cooldown_s=10))
    pick, _ = choose(ranked, frozenset(), limit, now=0.0)
    assert pick is not None and pick.name == "copy"
    limit.record(0.0)
    assert choose(ranked, frozenset(), limit, now=5.0)[1].startswith("cool-down")
    assert choose(ranked, frozenset({"pod-etl"}), limit, now=20.0)[1].startswith("an eviction")
    limit.record(20.0)
    assert choose(ranked, frozenset(), limit, now=40.0)[1].startswith("rate limit")
    assert choose(ranked, frozenset(), limit, now=81.0)[0] is not None


# --- the engine: the whole loop on a planned node ----------------------------------------


def node(evict: bool = True, **protection: object) -> Engine:
    """Two NUMA nodes of 2 CPUs; the reclaimed pool may use every CPU (overlapping the
    shared pool, with the lowest weight), so a bound online container shares CPUs with
    batch: the situation the ladder's first rung exists for."""
    topo = MachineShape(packages=2, cores_per_l3=2).expected_topology()
    config = EngineConfig(
        planner=PlannerConfig(
            reclaimed_overlap_shared=True,
            reclaimed_min_cpus=4,
            isolation=IsolationConfig(
                host=HostSupport(evict=Backend(evict, "started" if evict else "no API server"))
            ),
        ),
        protection=ProtectionConfig(**protection),  # type: ignore[arg-type]
    )
    e = Engine(topo, config)
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", True))
    e.synchronize([], [])
    return e


def test_the_engine_moves_the_reclaimed_pool_off_the_victim_then_caps_then_evicts() -> None:
    e = node(eviction=EvictionConfig(cooldown_s=0))
    web = pod("web", "shared_cores", memory={"numa_binding": "true"})
    e.container_created(web, container("web", 1000))
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0))
    e.container_created(pod("copy", "reclaimed_cores"), container("copy", 0))
    reclaimed = e.plan.pools.reclaimed
    assert reclaimed & e.plan.containers["ctr-web"].cpus.value  # they overlap: the setup
    blame = {("ctr-web", "ctr-etl"): 700_000_000, ("ctr-web", "ctr-copy"): 1_000_000}

    def window(t: float, us: int, b: dict[tuple[str, str], int] | None = None) -> object:
        s = SignalSnapshot(
            end_s=t,
            window_s=0.5,
            containers={"ctr-web": ContainerSignals(runq=runq(us))},
            blame=b or {},
        )
        return e.signals_sampled(s)

    steps = [window(0.5 * i, 8000, blame) for i in range(1, 4)]
    first = steps[-1].intents  # type: ignore[attr-defined]
    assert any(n.kind == "interference" and "ctr-etl" not in n.message for n in first.notes)
    assert any("shrink-reclaimed" in n.message for n in first.notes)
    now_reclaimed = e.plan.pools.reclaimed
    assert not now_reclaimed & e.plan.containers["ctr-web"].cpus.value
    assert "avoiding CPUs" in e.plan.pools.reasons["reclaimed"]
    moved = {u.container_id for u in first.all_updates()}
    assert {"ctr-etl", "ctr-copy"} <= moved  # the pool's members follow it

    capped = window(2.5, 8000, blame).intents  # type: ignore[attr-defined]
    quota = {u.container_id: u.resources.cpu.quota for u in capped.all_updates()}
    assert quota == {"ctr-etl": 20_000}  # the antagonist only, never the innocent
    skipped = window(3.5, 8000, blame).intents  # type: ignore[attr-defined]
    assert any("tighten-mba" in n.message and "mba_class" in n.message for n in skipped.notes)
    evict = [i for i in skipped.host if isinstance(i, Evict)]
    assert [(i.namespace, i.pod) for i in evict] == [("default", "etl")]  # not the innocent

    lifted: dict[str, int | None] = {}
    for i in range(30):  # quiet: cleared after 2 s, then a rung every 5 s, top first
        quiet = window(4.0 + 0.5 * i, 100).intents  # type: ignore[attr-defined]
        for u in quiet.all_updates():
            if u.resources.cpu is not None and u.resources.cpu.quota is not None:
                lifted[u.container_id] = u.resources.cpu.quota
    assert lifted == {"ctr-etl": -1}  # BestEffort: no kubelet quota to restore
    assert e.plan.pools.reclaimed == reclaimed
    assert not e.protection.ladder.in_force()


def test_memory_pressure_evicts_the_batch_pod_the_oom_killer_would_take_first() -> None:
    e = node()
    e.container_created(pod("web", "shared_cores"), container("web", 1000))
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0, oom=1000))
    e.container_created(pod("copy", "reclaimed_cores"), container("copy", 0, oom=1000))
    s = SignalSnapshot(
        end_s=1.0,
        window_s=0.5,
        containers={
            "ctr-etl": ContainerSignals(memory=MemoryUse(usage_bytes=100 << 20)),
            "ctr-copy": ContainerSignals(memory=MemoryUse(usage_bytes=900 << 20)),
            "ctr-web": ContainerSignals(memory=MemoryUse(usage_bytes=5 << 30)),
        },
        node_memory=NodeMemory(available_bytes=200 << 20, total_bytes=16 << 30),
    )
    intents = e.signals_sampled(s).intents
    evict = [i for i in intents.host if isinstance(i, Evict)]
    assert [i.pod for i in evict] == ["copy"]  # reclaimed, largest; never the online web
    again = e.signals_sampled(replace(s, end_s=2.0)).intents
    assert not [i for i in again.host if isinstance(i, Evict)]  # one at a time
    assert any("already under way" in n.message for n in again.notes)


def test_without_an_eviction_executor_memory_pressure_evicts_nothing() -> None:
    e = node(evict=False)
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0, oom=1000))
    s = SignalSnapshot(
        end_s=1.0,
        window_s=0.5,
        containers={"ctr-etl": ContainerSignals(memory=MemoryUse(usage_bytes=1 << 30))},
        node_memory=NodeMemory(available_bytes=1 << 20, total_bytes=16 << 30),
    )
    assert not [i for i in e.signals_sampled(s).intents.host if isinstance(i, Evict)]


@pytest.mark.parametrize("dry", [True])
def test_dry_run_eviction_says_what_it_would_do_and_asks_nothing(dry: bool) -> None:
    e = node(eviction=EvictionConfig(dry_run=dry))
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0, oom=1000))
    s = SignalSnapshot(
        end_s=1.0,
        window_s=0.5,
        containers={"ctr-etl": ContainerSignals(memory=MemoryUse(usage_bytes=1 << 30))},
        node_memory=NodeMemory(available_bytes=1 << 20, total_bytes=16 << 30),
    )
    intents = e.signals_sampled(s).intents
    assert not [i for i in intents.host if isinstance(i, Evict)]
    assert any(n.message.startswith("dry-run: would evict pod default/etl") for n in intents.notes)


def test_cpu_lists_in_reasons_parse() -> None:
    assert parse_cpu_list("0-1") == frozenset({0, 1})


def test_a_numa_node_short_of_memory_is_enough() -> None:
    e = node()
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0, oom=1000))
    s = SignalSnapshot(
        end_s=1.0,
        window_s=0.5,
        containers={"ctr-etl": ContainerSignals(memory=MemoryUse(usage_bytes=1 << 30))},
        node_memory=NodeMemory(available_bytes=8 << 30, total_bytes=16 << 30),
        numa_memory={
            0: NodeMemory(available_bytes=4 << 30, total_bytes=8 << 30),
            1: NodeMemory(available_bytes=100 << 20, total_bytes=8 << 30),
        },
    )
    intents = e.signals_sampled(s).intents
    assert [i.pod for i in intents.host if isinstance(i, Evict)] == ["etl"]
    assert any("NUMA node 1 memory available" in n.message for n in intents.notes)
