"""qos_model.containers: merge_requested, the "a CRI update's requested values win" rule."""

from __future__ import annotations

import typing
from dataclasses import fields, replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from qos_model.containers import (
    CpuResources,
    HugepageLimit,
    MemoryResources,
    Resources,
    merge_requested,
)

REALTIME = ("realtime_runtime", "realtime_period")


def _field_values(cls: type) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per dataclass field, from its annotation (int | None, bool | None, str)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, st.SearchStrategy[Any]] = {}
    for f in fields(cls):
        hint = hints[f.name]
        if hint == int | None:
            out[f.name] = st.none() | st.integers(-1, 1 << 40)
        elif hint == bool | None:
            out[f.name] = st.none() | st.booleans()
        elif hint is str:
            out[f.name] = st.sampled_from(["", "0", "1-3", "0,2"])
        else:  # pragma: no cover - a new kind of field needs a strategy here
            raise AssertionError(f"{cls.__name__}.{f.name}: no strategy for {hint}")
    return out


cpus = st.builds(CpuResources, **_field_values(CpuResources))
memories = st.builds(MemoryResources, **_field_values(MemoryResources))
resources = st.builds(
    Resources,
    cpu=st.none() | cpus,
    memory=st.none() | memories,
    hugepage_limits=st.lists(
        st.builds(HugepageLimit, st.sampled_from(["2MB", "1GB"]), st.integers(0, 1 << 30)),
        max_size=2,
    ).map(tuple),
    blockio_class=st.none() | st.sampled_from(["", "slow"]),
    rdt_class=st.none() | st.sampled_from(["", "gold"]),
    unified=st.dictionaries(st.sampled_from(["memory.high", "cpu.idle"]), st.just("1")),
    pids_limit=st.none() | st.integers(-1, 1000),
)


def _is_set(value: object) -> bool:
    return value is not None and value != ""


def _reference(current: Resources | None, requested: Resources) -> Resources:
    """nri_plugin/policy/qos_policy.py's `_merge_requested` as it was when
    `merge_requested` replaced it, verbatim: the function must keep its exact semantics."""
    if current is None:
        return requested
    cpu = current.cpu
    if requested.cpu is not None:
        base = cpu or CpuResources()
        r = requested.cpu
        cpu = CpuResources(
            shares=r.shares if r.shares is not None else base.shares,
            quota=r.quota if r.quota is not None else base.quota,
            period=r.period if r.period is not None else base.period,
            realtime_runtime=base.realtime_runtime,
            realtime_period=base.realtime_period,
            cpus=r.cpus or base.cpus,
            mems=r.mems or base.mems,
        )
    memory = requested.memory if requested.memory is not None else current.memory
    return replace(current, cpu=cpu, memory=memory)


# --- examples ----------------------------------------------------------------------------


def test_requested_cpu_fields_win_where_set_realtime_stays() -> None:
    current = Resources(
        cpu=CpuResources(shares=1024, quota=50_000, period=100_000, realtime_runtime=5, cpus="0-3"),
        memory=MemoryResources(limit=1 << 30, swap=1 << 30),
    )
    requested = Resources(cpu=CpuResources(shares=0, cpus="4", realtime_runtime=9, mems="1"))
    merged = merge_requested(current, requested)
    assert merged.cpu == CpuResources(
        shares=0, quota=50_000, period=100_000, realtime_runtime=5, cpus="4", mems="1"
    )
    assert merged.memory == current.memory


def test_requested_memory_replaces_the_current_one_as_a_whole() -> None:
    current = Resources(memory=MemoryResources(limit=1 << 30, swap=2 << 30, swappiness=10))
    merged = merge_requested(current, Resources(memory=MemoryResources(limit=1 << 20)))
    assert merged.memory == MemoryResources(limit=1 << 20)


def test_other_fields_are_the_current_ones() -> None:
    current = Resources(
        hugepage_limits=(HugepageLimit("2MB", 4),),
        blockio_class="slow",
        unified={"memory.high": "1G"},
        pids_limit=100,
    )
    requested = Resources(
        cpu=CpuResources(shares=2),
        hugepage_limits=(HugepageLimit("1GB", 1),),
        blockio_class="fast",
        rdt_class="gold",
        unified={"cpu.idle": "1"},
        pids_limit=5,
    )
    assert merge_requested(current, requested) == replace(current, cpu=CpuResources(shares=2))


def test_without_current_resources_the_request_is_taken_whole() -> None:
    requested = Resources(cpu=CpuResources(realtime_period=7), pids_limit=3)
    assert merge_requested(None, requested) is requested


def test_an_empty_cpu_request_makes_cpu_present() -> None:
    merged = merge_requested(Resources(), Resources(cpu=CpuResources()))
    assert merged.cpu == CpuResources()


# --- properties --------------------------------------------------------------------------


@given(st.none() | resources, resources)
def test_same_as_the_policy_function_it_replaces(
    current: Resources | None, requested: Resources
) -> None:
    assert merge_requested(current, requested) == _reference(current, requested)


@given(resources, resources)
def test_requested_values_win_where_set(current: Resources, requested: Resources) -> None:
    merged = merge_requested(current, requested)
    if requested.cpu is None:
        assert merged.cpu == current.cpu
    else:
        assert merged.cpu is not None
        base = current.cpu or CpuResources()
        for f in fields(CpuResources):
            wanted = getattr(requested.cpu, f.name)
            expected = (
                wanted if _is_set(wanted) and f.name not in REALTIME else getattr(base, f.name)
            )
            assert getattr(merged.cpu, f.name) == expected, f.name
    assert merged.memory == (requested.memory if requested.memory is not None else current.memory)
    for name in ("hugepage_limits", "blockio_class", "rdt_class", "unified", "pids_limit"):
        assert getattr(merged, name) == getattr(current, name), name


@given(st.none() | resources, resources)
def test_applying_the_same_request_twice_changes_nothing(
    current: Resources | None, requested: Resources
) -> None:
    once = merge_requested(current, requested)
    assert merge_requested(once, requested) == once


@given(resources)
def test_an_empty_request_keeps_the_current_resources(current: Resources) -> None:
    assert merge_requested(current, Resources()) == current


@given(resources, resources, resources)
def test_a_later_request_wins_over_an_earlier_one(
    current: Resources, first: Resources, second: Resources
) -> None:
    """Two updates in a row end where the second alone would for every field it sets."""
    both = merge_requested(merge_requested(current, first), second)
    alone = merge_requested(current, second)
    if second.memory is not None:
        assert both.memory == alone.memory
    if second.cpu is not None:
        assert both.cpu is not None and alone.cpu is not None
        for f in fields(CpuResources):
            if f.name not in REALTIME and _is_set(getattr(second.cpu, f.name)):
                assert getattr(both.cpu, f.name) == getattr(alone.cpu, f.name)


# Resources with at most one field set (the usual adjustments and requests), or any.
_one_field_set = st.builds(
    lambda name, r: replace(Resources(), **{name: getattr(r, name)}),
    st.sampled_from([f.name for f in fields(Resources)]),
    resources,
)


@given(st.just(Resources()) | _one_field_set | resources)
def test_resources_are_empty_exactly_when_equal_to_the_default(r: Resources) -> None:
    assert r.is_empty() == (r == Resources())
