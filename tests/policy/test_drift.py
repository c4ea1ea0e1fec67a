"""Drift reconciliation, pure: the host as read against the plan, repairs, conflicts,
foreign containers and the kubelet's CPU manager (nri_plugin.policy.drift)."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy.drift import (
    CONFLICT_KIND,
    CPU_MANAGER_KIND,
    DRIFT_KIND,
    UNKNOWN_KIND,
    DriftBook,
    DriftConfig,
    HostGroup,
    Observation,
    Planned,
    Seen,
    Target,
    cpuset_request_notes,
    targets,
)
from nri_plugin.policy.engine import Engine
from nri_plugin.policy.intents import Intents, SetOomScoreAdj
from nri_plugin.policy.qos_policy import QosPolicy
from qos_model.containers import CpuResources, Resources
from qos_model.cpulist import parse_cpu_list
from tests.builders import container, pod
from tests.policy.test_engine import engine


def planned_engine(names: tuple[str, ...] = ("web", "db", "batch")) -> QosPolicy:
    e = engine(8, reclaimed_min_cpus=0)
    classes = {"web": "shared_cores", "db": "dedicated_cores", "batch": "reclaimed_cores"}
    for name in names:
        e.container_created(pod(name, classes.get(name, "shared_cores")), container(name, 1000))
    return QosPolicy(e)


class Host:
    """The host as a dict: what each container shows. Starts as planned."""

    def __init__(self, e: Engine) -> None:
        self.values: dict[str, dict[str, object]] = {}
        for cid, p in e.plan.containers.items():
            self.values[cid] = {
                "cpus": p.cpus.value,
                "mems": p.mems.value,
                "oom": p.oom_score_adj.value,
            }

    def observe(
        self, policy: QosPolicy, groups: tuple[HostGroup, ...] | None = None
    ) -> Observation:
        seen = {}
        for t in policy.drift_targets():
            v = self.values[t.ref.id]
            seen[t.ref.id] = Seen(
                t.planned,
                v["cpus"],  # type: ignore[arg-type]
                v["mems"],  # type: ignore[arg-type]
                ((100, v["oom"]), (101, v["oom"])),  # type: ignore[arg-type]
            )
        return Observation(seen, groups)

    def apply(self, policy: QosPolicy, intents: Intents) -> None:
        """What the runtime and the oom controller do with the repairs."""
        for update in intents.all_updates():
            cpu = update.resources.cpu
            assert cpu is not None
            v = self.values[update.container_id]
            v["cpus"] = parse_cpu_list(cpu.cpus)
            if cpu.mems:
                v["mems"] = parse_cpu_list(cpu.mems)
        for intent in intents.host:
            assert isinstance(intent, SetOomScoreAdj)
            self.values[intent.container.id]["oom"] = intent.value


def period(policy: QosPolicy, host: Host) -> Intents:
    intents = policy.reconcile(host.observe(policy))
    host.apply(policy, intents)
    return intents


def test_nothing_drifted_nothing_done() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    for _ in range(3):
        intents = period(policy, host)
        assert intents == Intents()
    assert policy.drift.period == 3


def test_a_changed_cpuset_is_repaired_with_a_note_naming_field_and_values() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    period(policy, host)  # a first look: plans are judged once they held a period
    web = policy.engine.plan.containers["ctr-web"]
    host.values["ctr-web"]["cpus"] = frozenset({0})
    intents = period(policy, host)
    (update,) = intents.all_updates()
    assert update.container_id == "ctr-web" and update.resources == web.update().resources
    (note,) = [n for n in intents.notes if n.kind == DRIFT_KIND]
    assert note.subject == web.name
    assert note.message.startswith("cpus is 0 on the host, planned ")
    assert host.values["ctr-web"]["cpus"] == web.cpus.value
    assert period(policy, host) == Intents()  # held after one repair: no conflict


def test_a_changed_oom_score_adj_goes_to_the_oom_controller() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    period(policy, host)
    planned = policy.engine.plan.containers["ctr-batch"].oom_score_adj.value
    host.values["ctr-batch"]["oom"] = -998
    intents = period(policy, host)
    assert not intents.updates
    (intent,) = intents.host
    assert isinstance(intent, SetOomScoreAdj) and intent.value == planned
    assert intent.container.id == "ctr-batch" and intent.container.cgroups_path
    (note,) = intents.notes
    assert f"oom_score_adj is -998 (2 process(es)) on the host, planned {planned}" in note.message


def test_a_young_or_moving_plan_is_not_judged() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    host.values["ctr-web"]["cpus"] = frozenset({7})
    assert policy.reconcile(host.observe(policy)).updates == ()  # first look
    stale = host.observe(policy)
    moved = {
        cid: Seen(Planned(frozenset({1}), s.planned.mems, s.planned.oom_score_adj), s.cpus)
        for cid, s in stale.containers.items()
    }
    # read against other planned values (a move on its way): not drift
    assert policy.reconcile(Observation(moved)).updates == ()


def test_unreadable_values_are_not_drift() -> None:
    policy = planned_engine()
    for _ in range(3):
        seen = {t.ref.id: Seen(t.planned) for t in policy.drift_targets()}
        assert policy.reconcile(Observation(seen)) == Intents()


def test_a_field_changed_again_right_after_repair_is_a_conflict_naming_the_field() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    period(policy, host)
    conflicts = []
    for _ in range(4):  # another agent sets mems... no: cpus, every period
        host.values["ctr-web"]["cpus"] = frozenset({0, 1})
        conflicts += [n for n in period(policy, host).notes if n.kind == CONFLICT_KIND]
    (conflict,) = conflicts  # reported once, not every period
    assert conflict.message.startswith("cpus changed again right after its repair")
    assert "another agent" in conflict.message
    assert policy.drift.fighting() == {
        "cpuset_drift": "1 container cpuset(s) changed again right after repair"
    }
    notes = period(policy, host).notes  # the agent stopped
    assert [n.message for n in notes if n.kind == CONFLICT_KIND] == ["cpus holds again"]
    assert policy.drift.conflicts == {}


def test_a_kubelet_cpuset_request_is_evidence_and_we_keep_ours() -> None:
    policy = planned_engine()
    e = policy.engine
    web_pod, web = pod("web", "shared_cores"), container("web", 1000)
    planned = e.plan.containers["ctr-web"].cpus.value
    kubelet = Resources(cpu=CpuResources(shares=1024, cpus="0-7"))
    replies = set()
    for _ in range(5):  # the kubelet's reconcile, again and again
        step = e.container_updated(web_pod, web, kubelet)
        (reply,) = step.intents.reply_updates
        assert reply.resources.cpu is not None
        replies.add(reply.resources.cpu.cpus)
        assert not step.intents.updates  # nobody else moves: no flapping
        (note,) = [n for n in step.intents.notes if n.kind == CPU_MANAGER_KIND]
        assert "asked for cpuset 0-7" in note.message
    (ours,) = replies
    assert parse_cpu_list(ours) == planned
    same = Resources(cpu=CpuResources(cpus=ours))
    assert cpuset_request_notes(e.plan.containers["ctr-web"], same) == ()
    assert cpuset_request_notes(e.plan.containers["ctr-web"], None) == ()


def test_cpu_manager_warning_names_evidence_and_fix_and_is_rate_limited() -> None:
    policy = planned_engine()
    policy.drift = DriftBook(DriftConfig(remind_every=3))
    host = Host(policy.engine)
    warnings = []
    for i in range(7):
        seen = host.observe(policy)
        requests = ("default/web/web: an update asked for cpuset 0-7",) if i == 0 else ()
        obs = Observation(seen.containers, None, "static" if i == 1 else None, requests)
        warnings += [n for n in policy.reconcile(obs).notes if n.kind == CPU_MANAGER_KIND]
    assert len(warnings) == 3  # periods 1, 4, 7
    assert "cpuManagerPolicy: none" in warnings[0].message
    assert "1 UpdateContainer request(s)" in warnings[0].message
    assert set(policy.drift.fighting()) == {"update_request", "state_file"}


def test_a_none_cpu_manager_is_no_evidence() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    seen = host.observe(policy)
    intents = policy.reconcile(Observation(seen.containers, None, "none"))
    assert intents == Intents() and policy.drift.fighting() == {}


def test_a_container_never_delivered_is_flagged_then_picked_up() -> None:
    policy = planned_engine(("web",))
    host = Host(policy.engine)
    gap = HostGroup(("ctr-gap",), "/kubepods/pod-gap/ctr-gap")
    sandbox = HostGroup(("pod-web",), "/kubepods/pod-web/pod-web")  # its pause: known pod
    policy.engine.table.pods["pod-web"] = pod("web", "shared_cores")

    def look() -> list[str]:
        obs = host.observe(policy, (gap, sandbox))
        return [n.message for n in policy.reconcile(obs).notes if n.kind == UNKNOWN_KIND]

    assert look() == []  # seen once: may be a container on its way in or out
    (flag,) = look()
    assert "never delivered" in flag and "/kubepods/pod-gap/ctr-gap" in flag
    assert look() == [] and policy.drift.flagged() == {"ctr-gap": "/kubepods/pod-gap/ctr-gap"}
    policy.engine.container_created(pod("gap"), container("gap"))  # the next Synchronize
    host = Host(policy.engine)
    assert look() == ["picked up (/kubepods/pod-gap/ctr-gap)"]
    assert policy.drift.flagged() == {}


def test_targets_skip_containers_without_a_cgroup() -> None:
    policy = planned_engine(("web",))
    e = policy.engine
    (t,) = targets(e.plan.containers, e.table)
    assert isinstance(t, Target) and t.ref.cgroups_path == "/kubepods/pod-web/ctr-web"


# --- random drift histories ------------------------------------------------------------------

NAMES = ("web", "db", "batch", "api")
CHANGES = st.lists(
    st.tuples(
        st.sampled_from(NAMES),
        st.sampled_from(("cpus", "mems", "oom")),
        st.integers(0, 7),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(CHANGES, min_size=1, max_size=8))
def test_any_drift_is_repaired_within_one_period(history: list[list[tuple[str, str, int]]]) -> None:
    """Whatever is changed behind our back in a period, after that period's repairs the
    host shows the plan again; every repair names its field; unchanged periods do
    nothing."""
    policy = planned_engine(NAMES)
    host = Host(policy.engine)
    period(policy, host)
    plans = policy.engine.plan.containers

    def as_planned() -> Mapping[str, dict[str, object]]:
        return Host(policy.engine).values

    for changes in history:
        touched = set()
        for name, fld, value in changes:
            cid = f"ctr-{name}"
            if fld == "oom":
                new: object = value * 100 - 300
            elif fld == "mems":
                new = frozenset({value % 2})  # 1 NUMA node: {1} is drift, {0} is not
            else:
                new = frozenset({value})
            host.values[cid][fld] = new
        for cid, v in host.values.items():
            p = plans[cid]
            want = {"cpus": p.cpus.value, "mems": p.mems.value, "oom": p.oom_score_adj.value}
            for fld in ("cpus", "oom"):
                if v[fld] != want[fld]:
                    touched.add((cid, fld))
            if want["mems"] and v["mems"] != want["mems"]:
                touched.add((cid, "mems"))
        intents = period(policy, host)
        for cid, v in host.values.items():
            expected = dict(as_planned()[cid])
            if not plans[cid].mems.value:
                expected["mems"] = v["mems"]  # not pinned: whatever the host has
            assert v == expected, (cid, v, expected)
        repaired = {
            (n.subject, n.message.partition(" ")[0]) for n in intents.notes if n.kind == DRIFT_KIND
        }
        names = {cid: plans[cid].name for cid in plans}
        short = {"oom": "oom_score_adj"}
        assert repaired == {(names[cid], short.get(f, f)) for cid, f in touched}
