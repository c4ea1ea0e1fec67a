"""The per-container plan: a generic diff over its fields, and every field routed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from nri_plugin.policy.engine import ROUTES, check_routes
from nri_plugin.policy.plan import (
    CPU,
    OOM,
    ContainerPlan,
    Decision,
    FieldChange,
    diff_plans,
    plan_fields,
)
from nri_plugin.policy.qos import QosClass
from nri_plugin.policy.workload import SHARED


def plan(**changes: object) -> ContainerPlan:
    base = ContainerPlan(
        container_id="c1",
        pod_id="p1",
        name="default/p1/c1",
        qos_class=QosClass.SHARED_CORES,
        pool=SHARED,
        cpus=Decision(frozenset({0, 1}), "shared_cores: the shared pool"),
        mems=Decision(None, "not NUMA-bound: every memory node"),
        cpu_shares=Decision(None, "kept the weight the kubelet set"),
        cpu_quota=Decision(None, "kept the quota the kubelet set"),
        oom_score_adj=Decision(166, "shared band"),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_diff_names_every_changed_value_with_its_domain() -> None:
    old = plan()
    new = plan(
        cpus=Decision(frozenset({2, 3}), "moved"),
        oom_score_adj=Decision(200, "other band"),
    )
    assert diff_plans(old, new) == (
        FieldChange("cpus", CPU, frozenset({0, 1}), frozenset({2, 3})),
        FieldChange("oom_score_adj", OOM, 166, 200),
    )


def test_a_new_reason_alone_is_no_change() -> None:
    assert diff_plans(plan(), plan(cpus=Decision(frozenset({0, 1}), "other words"))) == ()


def test_a_field_added_to_the_plan_is_diffed_without_touching_the_diff() -> None:
    @dataclass(frozen=True, slots=True)
    class PlanWithMba(ContainerPlan):
        mba_percent: Decision[int | None] = field(
            default=Decision(None, "not managed yet"), metadata={"domain": "rdt"}
        )

    old = PlanWithMba(**{f: getattr(plan(), f) for f in plan().__dataclass_fields__})
    new = replace(old, mba_percent=Decision(30, "reclaimed_cores: 30% of the bandwidth"))
    assert diff_plans(old, new) == (FieldChange("mba_percent", "rdt", None, 30),)
    assert "mba_percent" in new.reasons()
    check_routes(PlanWithMba)  # "rdt" is routed (to nobody yet), so the engine accepts it


def test_a_field_in_a_domain_nobody_applies_is_refused() -> None:
    @dataclass(frozen=True, slots=True)
    class PlanWithGpu(ContainerPlan):
        gpu: Decision[str | None] = field(
            default=Decision(None, "not managed yet"), metadata={"domain": "gpu"}
        )

    with pytest.raises(ValueError, match="domain 'gpu'"):
        check_routes(PlanWithGpu)


def test_every_planned_field_has_a_routed_domain_and_a_reason() -> None:
    names = [f.name for f in plan_fields(ContainerPlan)]
    assert names == [
        "cpus",
        "mems",
        "cpu_shares",
        "cpu_quota",
        "oom_score_adj",
        "rdt_class",
        "io_weight",
        "net_class",
    ]
    assert {f.metadata["domain"] for f in plan_fields(ContainerPlan)} <= set(ROUTES)
    assert all(plan().reasons().values())


def test_the_nri_rendering_changes_exactly_when_a_cpu_value_changes() -> None:
    variants = [
        plan(),
        plan(cpus=Decision(frozenset({0}), "x")),
        plan(mems=Decision(frozenset({0}), "x")),
        plan(cpu_shares=Decision(2, "x")),
        plan(oom_score_adj=Decision(900, "x")),
    ]
    for a in variants:
        for b in variants:
            cpu_moved = any(c.domain == CPU for c in diff_plans(a, b))
            assert cpu_moved == (a.cpu_resources() != b.cpu_resources())
