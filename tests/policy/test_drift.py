"""Drift reconciliation, pure: the host as read against the plan, repairs, conflicts,
foreign containers and the kubelet's CPU manager (nri_plugin.policy.drift)."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy.class_intents import RDT_RECHECKS, rdt_clos_id
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.drift import (
    CONFLICT_KIND,
    CPU_MANAGER_KIND,
    DRIFT_KIND,
    REFUSED_KIND,
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
from nri_plugin.policy.intents import Intents, PlaceInRdtClass, SetIoWeight, SetOomScoreAdj
from nri_plugin.policy.qos_policy import QosPolicy
from qos_model.containers import CpuResources, Resources
from qos_model.cpulist import parse_cpu_list
from tests.builders import container, pod
from tests.policy.test_engine import engine

ON = Backend(True, "started")
STARTED = frozenset({"oom", "rdt", "io"})  # the controllers running on this "host"


def planned_engine(
    names: tuple[str, ...] = ("web", "db", "batch"), support: HostSupport | None = None
) -> QosPolicy:
    """Containers planned with the rdt and io controllers running (v1 io: by controller)."""
    support = support if support is not None else HostSupport(rdt=ON, io=ON)
    e = engine(8, reclaimed_min_cpus=0, isolation=IsolationConfig(host=support))
    classes = {"web": "shared_cores", "db": "dedicated_cores", "batch": "reclaimed_cores"}
    for name in names:
        e.container_created(pod(name, classes.get(name, "shared_cores")), container(name, 1000))
    return QosPolicy(e)


class Host:
    """The host as a dict: what each container shows. Starts as planned."""

    def __init__(self, e: Engine, started: frozenset[str] = STARTED) -> None:
        self.values: dict[str, dict[str, object]] = {}
        self.started = started
        self.refused: dict[str, int] = {}  # what the kernel refused (the host adapter's record)
        self.cap_sys_resource = True
        for cid, p in e.plan.containers.items():
            rdt = p.rdt_class.value
            self.values[cid] = {
                "cpus": p.cpus.value,
                "mems": p.mems.value,
                "oom": p.oom_score_adj.value,
                "rdt": rdt_clos_id(rdt) if rdt is not None else "",
                "io": p.io_weight.value or 100,
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
                ((100, v["rdt"]), (101, v["rdt"])),  # type: ignore[arg-type]
                v["io"],  # type: ignore[arg-type]
                oom_refused=self.refused.get(t.ref.id),
            )
        return Observation(seen, groups, started=self.started)

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
            v = self.values[intent.container.id]
            if isinstance(intent, PlaceInRdtClass):
                assert intent.rdt_class is not None
                v["rdt"] = rdt_clos_id(intent.rdt_class)
            elif isinstance(intent, SetIoWeight):
                v["io"] = intent.weight
            else:
                assert isinstance(intent, SetOomScoreAdj)
                if intent.value < 0 and not self.cap_sys_resource:  # EACCES
                    self.refused[intent.container.id] = intent.value
                else:
                    v["oom"] = intent.value


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


def test_a_process_outside_its_rdt_group_is_placed_back_naming_the_group_found() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    period(policy, host)
    batch = policy.engine.plan.containers["ctr-batch"]
    assert batch.rdt_class.value == "reclaimed"
    host.values["ctr-batch"]["rdt"] = ""  # moved back to the root group behind our back
    intents = period(policy, host)
    assert not intents.updates
    (intent,) = intents.host
    assert isinstance(intent, PlaceInRdtClass) and intent.rdt_class == "reclaimed"
    assert intent.container.id == "ctr-batch" and intent.recheck_after == RDT_RECHECKS
    assert intent.reason.startswith("drift repair: ")
    (note,) = intents.notes
    assert note.kind == DRIFT_KIND and note.subject == batch.name
    assert note.message == (
        "rdt_class is the root group (2 process(es)) on the host, planned "
        "nri-qos-reclaimed: re-applied"
    )
    assert host.values["ctr-batch"]["rdt"] == "nri-qos-reclaimed"
    assert period(policy, host) == Intents()
    host.values["ctr-batch"]["rdt"] = "nri-qos-shared"  # another class's group
    (note,) = period(policy, host).notes
    assert note.message.startswith("rdt_class is nri-qos-shared (2 process(es)) on the host")


def test_the_runtimes_own_rdt_class_of_that_name_is_not_drift() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    host.values["ctr-batch"]["rdt"] = "reclaimed"  # [rdt] runtime_classes: its group
    for _ in range(3):
        assert period(policy, host) == Intents()


def test_an_io_weight_changed_behind_our_back_goes_to_the_io_controller() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    period(policy, host)
    web = policy.engine.plan.containers["ctr-web"]
    planned = web.io_weight.value
    assert planned is not None
    host.values["ctr-web"]["io"] = planned + 7
    intents = period(policy, host)
    (intent,) = intents.host
    assert isinstance(intent, SetIoWeight) and intent.weight == planned
    assert intent.qos_class == "shared_cores" and intent.container.id == "ctr-web"
    (note,) = intents.notes
    assert note.message == f"io_weight is {planned + 7} on the host, planned {planned}: re-applied"
    assert period(policy, host) == Intents()


def test_an_io_weight_is_compared_within_what_its_file_holds() -> None:
    policy = planned_engine(("db",))
    planned = policy.engine.plan.containers["ctr-db"].io_weight.value
    assert planned == 500

    def look(found: int, maximum: int) -> Intents:
        seen = {
            t.ref.id: Seen(t.planned, io_weight=found, io_weight_max=maximum)
            for t in policy.drift_targets()
        }
        return policy.reconcile(Observation(seen, started=STARTED))

    look(500, 10000)
    assert look(300, 300) == Intents()  # the io controller caps what a file can hold
    (intent,) = look(299, 300).host
    assert isinstance(intent, SetIoWeight) and intent.weight == 500


def test_rdt_and_io_are_compared_only_with_their_controller_and_a_planned_value() -> None:
    policy = planned_engine()
    host = Host(policy.engine, started=frozenset({"oom"}))  # rdt and io did not start
    for v in host.values.values():
        v["rdt"], v["io"] = "", 1
    for _ in range(3):
        assert period(policy, host) == Intents()
    bare = planned_engine(support=HostSupport())  # nothing planned for rdt and io
    assert bare.engine.plan.containers["ctr-web"].rdt_class.value is None
    host = Host(bare.engine)
    for v in host.values.values():
        v["rdt"], v["io"] = "", 1
    for _ in range(3):
        assert period(bare, host) == Intents()


def test_a_refused_oom_repair_says_why_once_and_stops_until_the_plan_changes() -> None:
    policy = planned_engine()
    host = Host(policy.engine)
    host.cap_sys_resource = False
    period(policy, host)
    db = policy.engine.plan.containers["ctr-db"]
    planned = db.oom_score_adj.value
    assert planned < 0
    host.values["ctr-db"]["oom"] = 0
    first = period(policy, host)  # repaired once: the kernel refuses it (EACCES)
    assert [type(i) for i in first.host] == [SetOomScoreAdj]
    assert host.refused == {"ctr-db": planned}
    second = period(policy, host)
    assert second.host == () and second.updates == ()
    (note,) = second.notes
    assert note.kind == REFUSED_KIND and note.subject == db.name
    found = f"oom_score_adj is 0 (2 process(es)) on the host, planned {planned}"
    assert note.message.startswith(found)
    assert "refuses the write" in note.message and "CAP_SYS_RESOURCE" in note.message
    assert "securityContext" in note.message and "another agent" not in note.message
    for _ in range(4):  # no retries, no conflict, no repeat
        assert period(policy, host) == Intents()
    assert policy.drift.conflicts == {}
    assert set(policy.drift.refused) == {("ctr-db", "oom_score_adj")}
    # the plan changes (here: the container goes and comes back): judged again
    policy.engine.container_stopped(pod("db", "dedicated_cores"), container("db", 1000))
    period(policy, host)
    assert policy.drift.refused == {}
    host.refused.clear()  # the loop drops the adapter's record of a container gone
    policy.engine.container_created(pod("db", "dedicated_cores"), container("db", 1000))
    period(policy, host)  # a first look at the new plan
    first = period(policy, host)
    assert [type(i) for i in first.host] == [SetOomScoreAdj]  # tried again, once


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
        st.sampled_from(("cpus", "mems", "oom", "rdt", "io")),
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
            elif fld == "rdt":
                new = ("", "nri-qos-shared", "nri-qos-reclaimed", "foreign")[value % 4]
            elif fld == "io":
                new = (10, 100, 500, 1000)[value % 4]
            elif fld == "mems":
                new = frozenset({value % 2})  # 1 NUMA node: {1} is drift, {0} is not
            else:
                new = frozenset({value})
            host.values[cid][fld] = new
        for cid, v in host.values.items():
            p = plans[cid]
            rdt = p.rdt_class.value
            want = {
                "cpus": p.cpus.value,
                "mems": p.mems.value,
                "oom": p.oom_score_adj.value,
                "rdt": rdt_clos_id(rdt) if rdt is not None else "",
                "io": p.io_weight.value,
            }
            for fld in ("cpus", "oom", "rdt", "io"):
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
        short = {"oom": "oom_score_adj", "rdt": "rdt_class", "io": "io_weight"}
        assert repaired == {(names[cid], short.get(f, f)) for cid, f in touched}
