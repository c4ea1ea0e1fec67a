"""Pure tests of the merge rules: ownership, collecting replies, applying the result."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedded_runtime import CONTAINERD_1_7, CONTAINERD_2_3, CRIO_1_36, RuntimeFlavor
from embedded_runtime.errors import AdjustmentError, OwnershipConflictError
from embedded_runtime.flavor import UpdateScope
from embedded_runtime.merge import (
    CreateMerge,
    Owners,
    UpdateCollector,
    adjust_env,
    apply_adjustment,
    apply_update,
    prepare_create_request,
)
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.fields import RESOURCE_FIELDS, Kind, ResourceField
from qos_model import containers as model

F = pb.Field


def set_field(res: pb.LinuxResources, row: ResourceField, value: int = 1) -> None:
    """Set one table field of `res` to a non-default value."""
    group = getattr(res, row.group)
    if row.kind is Kind.STRING:
        setattr(group, row.name, str(value))
    else:
        getattr(group, row.name).value = bool(value) if row.kind is Kind.BOOL else value


def has_field(res: pb.LinuxResources, row: ResourceField) -> bool:
    group = getattr(res, row.group)
    return group.HasField(row.name) if row.wrapped else bool(getattr(group, row.name))


ROW_IDS = [f"{f.group}.{f.name}" for f in RESOURCE_FIELDS]


def request_container(**annotations: str) -> pb.Container:
    ctr = pb.Container(id="c0", env=["PATH=/bin", "A=1"])
    ctr.annotations.update(annotations)
    ctr.linux.resources.cpu.shares.value = 512
    prepare_create_request(ctr)
    return ctr


def reply(
    annotations: dict[str, str] | None = None,
    env: list[tuple[str, str]] | None = None,
    **resources: int,
) -> pb.CreateContainerResponse:
    response = pb.CreateContainerResponse()
    response.adjust.annotations.update(annotations or {})
    for key, text in env or []:
        response.adjust.env.add(key=key, value=text)
    for name, number in resources.items():
        group, field = name.split("_", 1)
        getattr(getattr(response.adjust.linux.resources, group), field).value = number
    return response


# --- ownership ---------------------------------------------------------------------------


def conflict(plugin: str, other: str, subject: str) -> str:
    return f'plugins "{plugin}" and "{other}" both tried to set {subject}'


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        pytest.param(
            [("a", F.MemLimit, None), ("b", F.CPUShares, None)], None,
            id="two fields: no conflict",
        ),
        pytest.param(
            [("a", F.MemLimit, None), ("b", F.MemLimit, None)], conflict("b", "a", "MemLimit"),
            id="one field, two plugins: conflict",
        ),
        pytest.param(
            [("a", F.MemLimit, None), ("a", F.MemLimit, None)], conflict("a", "a", "MemLimit"),
            id="one field claimed twice by one plugin: conflict",
        ),
        pytest.param(
            [("a", F.Annotations, "x"), ("b", F.Annotations, "y")], None,
            id="two annotation keys: no conflict",
        ),
        pytest.param(
            [("a", F.Annotations, "x"), ("b", F.Annotations, "x")],
            conflict("b", "a", "Annotations x"),
            id="one annotation key, two plugins: conflict",
        ),
        pytest.param(
            [("a", F.Env, "X"), ("b", F.Annotations, "X")], None,
            id="one key in env and in annotations: no conflict",
        ),
    ],
)  # fmt: skip
def test_a_field_or_key_can_be_claimed_once_per_container(
    claims: list[tuple[str, int, str | None]], error: str | None
) -> None:
    owners = Owners()
    try:
        for plugin, field, key in claims:
            owners.claim("c0", field, plugin, key)
    except OwnershipConflictError as exc:
        assert str(exc) == error
    else:
        assert error is None


def test_owners_are_per_container() -> None:
    owners = Owners()
    owners.claim("c0", F.CPUShares, "a")
    owners.claim("c1", F.CPUShares, "b")
    assert owners.owner("c1", F.CPUShares) == "b"


def test_a_remover_may_set_again_others_conflict_with_it() -> None:
    owners = Owners()
    owners.claim("c0", F.Env, "a", "X")
    owners.clear("c0", F.Env, "b", "X")
    with pytest.raises(OwnershipConflictError, match='"a" and "b" both tried to set Env X'):
        owners.claim("c0", F.Env, "a", "X")
    owners.claim("c0", F.Env, "b", "X")
    assert owners.owner("c0", F.Env, "X") == "b"


def test_legacy_conflict_wording() -> None:
    owners = Owners(legacy_messages=True)
    owners.claim("c0", F.CPUSetCPUs, "10-a")
    with pytest.raises(OwnershipConflictError) as exc:
        owners.claim("c0", F.CPUSetCPUs, "20-b")
    assert str(exc.value) == 'plugins "20-b" and "10-a" both tried to set CPU pinning'
    assert (exc.value.plugin, exc.value.other, exc.value.field) == ("20-b", "10-a", "CPU pinning")


def test_owners_message_for_validators() -> None:
    owners = Owners()
    owners.claim("c0", F.Annotations, "10-a", "k")
    owners.claim("c0", F.CPUShares, "20-b")
    msg = owners.to_pb()
    assert dict(msg.owners["c0"].simple) == {F.CPUShares: "20-b"}
    assert dict(msg.owners["c0"].compound[F.Annotations].owners) == {"k": "10-a"}


# --- collecting CreateContainer replies --------------------------------------------------


def test_later_plugins_see_earlier_changes_in_the_request() -> None:
    request = request_container()
    merge = CreateMerge(request, CONTAINERD_2_3)
    merge.apply("10-a", reply({"a": "1"}, [("A", "2")], memory_limit=1 << 20))
    assert request.annotations["a"] == "1"
    assert list(request.env) == ["PATH=/bin", "A=2"]
    assert request.linux.resources.memory.limit.value == 1 << 20
    merge.apply("20-b", reply({"b": "1"}, cpu_quota=1000))
    result = merge.result()
    assert dict(result.adjust.annotations) == {"a": "1", "b": "1"}
    assert [(kv.key, kv.value) for kv in result.adjust.env] == [("A", "2")]
    assert result.adjust.linux.resources.memory.limit.value == 1 << 20
    assert result.adjust.linux.resources.cpu.quota.value == 1000
    assert result.adjust.HasField("hooks")  # NRI's empty-but-present shape
    owners = result.owners.owners["c0"]
    assert owners.simple[F.MemLimit] == "10-a" and owners.simple[F.CPUQuota] == "20-b"


@pytest.mark.parametrize(
    ("first", "second", "subject"),
    [
        (reply({"k": "1"}), reply({"k": "2"}), "Annotations k"),
        (reply(env=[("X", "1")]), reply(env=[("X", "2")]), "Env X"),
        (reply(cpu_shares=1), reply(cpu_shares=2), "CPUShares"),
        (reply(memory_reservation=1), reply(memory_reservation=2), "MemReservation"),
    ],
    ids=["annotation", "env variable", "cpu shares", "memory reservation"],
)
def test_second_claim_fails_the_merge(
    first: pb.CreateContainerResponse, second: pb.CreateContainerResponse, subject: str
) -> None:
    merge = CreateMerge(request_container(), CONTAINERD_2_3)
    merge.apply("10-a", first)
    with pytest.raises(OwnershipConflictError) as exc:
        merge.apply("20-b", second)
    assert str(exc.value) == f'plugins "20-b" and "10-a" both tried to set {subject}'


@pytest.mark.parametrize("row", RESOURCE_FIELDS, ids=ROW_IDS)
@pytest.mark.parametrize("legacy", [False, True], ids=["field names", "legacy subjects"])
def test_every_cpu_and_memory_field_is_merged_and_owned(row: ResourceField, legacy: bool) -> None:
    flavor = CONTAINERD_1_7 if legacy else CONTAINERD_2_3
    request = pb.Container(id="c0")
    prepare_create_request(request)
    merge = CreateMerge(request, flavor)
    first = pb.CreateContainerResponse()
    set_field(first.adjust.linux.resources, row)
    merge.apply("10-a", first)
    assert has_field(request.linux.resources, row)
    assert has_field(merge.result().adjust.linux.resources, row)
    assert merge.owners.owner("c0", row.field_id) == "10-a"
    with pytest.raises(OwnershipConflictError) as exc:
        merge.apply("20-b", first)
    assert exc.value.field == (row.legacy_subject if legacy else pb.Field.Name(row.field_id))  # type: ignore[arg-type]


def test_compound_resources_conflict_per_key() -> None:
    merge = CreateMerge(request_container(), CONTAINERD_2_3)
    first = pb.CreateContainerResponse()
    first.adjust.linux.resources.unified["memory.high"] = "1G"
    first.adjust.linux.resources.hugepage_limits.add(page_size="2MB", limit=1)
    merge.apply("10-a", first)
    second = pb.CreateContainerResponse()
    second.adjust.linux.resources.unified["memory.low"] = "1G"
    second.adjust.linux.resources.hugepage_limits.add(page_size="1GB", limit=1)
    merge.apply("20-b", second)
    third = pb.CreateContainerResponse()
    third.adjust.linux.resources.hugepage_limits.add(page_size="2MB", limit=2)
    with pytest.raises(OwnershipConflictError, match="HugepageLimits 2MB"):
        merge.apply("30-c", third)


def test_annotation_removal_travels_as_a_marker() -> None:
    request = request_container(gone="x")
    merge = CreateMerge(request, CONTAINERD_2_3)
    merge.apply("10-a", reply({"-gone": ""}))
    assert dict(merge.result().adjust.annotations) == {"-gone": ""}
    merge.apply("20-b", reply({"-other": "", "other": "set"}))
    assert request.annotations["other"] == "set"
    assert merge.owners.owner("c0", F.Annotations, "other") == "20-b"


def test_env_removal_only_undoes_earlier_plugins() -> None:
    request = request_container()
    merge = CreateMerge(request, CONTAINERD_2_3)
    merge.apply("10-a", reply(env=[("NEW", "1")]))
    merge.apply("20-b", reply(env=[("-NEW", ""), ("-PATH", "")]))
    assert [kv.key for kv in merge.result().adjust.env] == []
    assert list(request.env) == ["A=1"]
    # The remover now owns NEW; the original setter conflicts with it.
    with pytest.raises(OwnershipConflictError, match='"10-a" and "20-b"'):
        merge.apply("10-a", reply(env=[("NEW", "2")]))


def test_updates_of_other_containers_are_collected_but_not_of_the_new_one() -> None:
    merge = CreateMerge(request_container(), CONTAINERD_2_3)
    response = pb.CreateContainerResponse()
    response.update.add(container_id="other").linux.resources.cpu.cpus = "1"
    response.evict.add(container_id="other")
    merge.apply("10-a", response)
    (update,) = merge.result().updates
    assert update.container_id == "other" and update.linux.resources.cpu.cpus == "1"
    assert merge.evictions == 1
    itself = pb.CreateContainerResponse()
    itself.update.add(container_id="c0")
    with pytest.raises(AdjustmentError, match='plugin "20-b" asked update of "c0" during creation'):
        merge.apply("20-b", itself)


@pytest.mark.parametrize(
    ("flavor", "merged", "ignored"),
    [
        (CONTAINERD_1_7, False, True),
        (CRIO_1_36, True, False),
        (CONTAINERD_2_3, True, False),
    ],
    ids=["containerd 1.7.13: ignored", "CRI-O 1.36.3: merged", "containerd 2.3.4: merged"],
)
def test_fields_an_old_nri_does_not_know_are_ignored(
    flavor: RuntimeFlavor, merged: bool, ignored: bool
) -> None:
    merge = CreateMerge(request_container(), flavor)
    response = pb.CreateContainerResponse()
    response.adjust.linux.oom_score_adj.value = -500
    response.adjust.linux.resources.pids.limit = 100
    response.adjust.linux.rdt.clos_id.value = "gold"
    merge.apply("10-a", response)
    adjust = merge.result().adjust.linux
    assert adjust.HasField("oom_score_adj") is merged
    assert adjust.resources.HasField("pids") is merged
    assert adjust.HasField("rdt") is merged
    assert any("oom_score_adj" in note for note in merge.ignored) is ignored


def test_unmodelled_fields_are_listed() -> None:
    merge = CreateMerge(request_container(), CONTAINERD_2_3)
    response = pb.CreateContainerResponse()
    response.adjust.mounts.add(destination="/x")
    response.adjust.linux.sysctl["net.core.somaxconn"] = "1"
    merge.apply("10-a", response)
    assert merge.ignored == [
        "10-a: mounts (not emulated)",
        "10-a: linux.sysctl (not emulated)",
    ]


# --- collecting updates ------------------------------------------------------------------


def test_update_for_the_updated_container_is_folded_into_the_request() -> None:
    requested = pb.LinuxResources()
    requested.memory.limit.value = 1 << 30
    collector = UpdateCollector(Owners(), target_id="c0", requested=requested)
    upd = pb.ContainerUpdate(container_id="c0")
    upd.linux.resources.cpu.shares.value = 256
    upd.linux.resources.pids.limit = 100  # dropped by NRI itself
    other = pb.ContainerUpdate(container_id="c1")
    other.linux.resources.cpu.cpus = "3"
    collector.add("10-a", [upd, other])
    assert requested.memory.limit.value == 1 << 30
    assert requested.cpu.shares.value == 256
    assert not requested.HasField("pids")
    assert [u.container_id for u in collector.updates] == ["c1"]


def test_conflicting_update_with_ignore_failure_is_skipped() -> None:
    collector = UpdateCollector(Owners())
    first = pb.ContainerUpdate(container_id="c1")
    first.linux.resources.cpu.cpus = "1"
    collector.add("10-a", [first])
    second = pb.ContainerUpdate(container_id="c1", ignore_failure=True)
    second.linux.resources.cpu.cpus = "2"
    collector.add("20-b", [second])
    assert collector.updates[0].linux.resources.cpu.cpus == "1"
    second.ignore_failure = False
    with pytest.raises(OwnershipConflictError, match="CPUSetCPUs"):
        collector.add("20-b", [second])


# --- applying ----------------------------------------------------------------------------


def spec() -> pb.Container:
    ctr = pb.Container(id="c0", env=["PATH=/usr/bin", "TERM=xterm", "PATH=/bin"])
    ctr.annotations["keep"] = "1"
    ctr.annotations["drop"] = "1"
    res = ctr.linux.resources
    res.cpu.shares.value = 512
    res.memory.limit.value = 128 << 20
    res.hugepage_limits.add(page_size="2MB", limit=10)
    return ctr


def test_adjustment_applied_like_the_oci_generator() -> None:
    ctr = spec()
    adjust = pb.ContainerAdjustment()
    adjust.annotations.update({"-drop": "", "new": "1"})
    adjust.env.add(key="NEW", value="x")
    res = adjust.linux.resources
    res.cpu.cpus = "0-1"
    res.cpu.quota.value = 20000
    res.memory.limit.value = 64 << 20
    res.memory.reservation.value = 1 << 20  # ignored by the generator
    res.hugepage_limits.add(page_size="2MB", limit=20)
    res.hugepage_limits.add(page_size="1GB", limit=1)
    res.unified["memory.high"] = "50M"
    res.blockio_class.value = "slow"
    adjust.linux.oom_score_adj.value = 900
    adjust.linux.cgroups_path = "/custom"
    changes = apply_adjustment(ctr, adjust, CONTAINERD_2_3)
    assert dict(ctr.annotations) == {"keep": "1", "new": "1"}
    assert list(ctr.env) == ["PATH=/bin", "TERM=xterm", "NEW=x"]
    out = ctr.linux.resources
    assert (out.cpu.shares.value, out.cpu.quota.value, out.cpu.cpus) == (512, 20000, "0-1")
    assert (out.memory.limit.value, out.memory.swap.value) == (64 << 20, 64 << 20)
    assert not out.memory.HasField("reservation")
    assert [(h.page_size, h.limit) for h in out.hugepage_limits] == [("2MB", 20), ("1GB", 1)]
    assert dict(out.unified) == {"memory.high": "50M"}
    assert ctr.linux.oom_score_adj.value == 900 and ctr.linux.cgroups_path == "/custom"
    assert (changes.blockio_class, changes.rdt_class) == ("slow", None)


@pytest.mark.parametrize(
    ("flavor", "oom", "pids", "devices", "rdt"),
    [
        (CONTAINERD_1_7, False, False, False, None),
        (CRIO_1_36, True, True, True, "gold"),
        (CONTAINERD_2_3, True, True, True, "gold"),
    ],
    ids=["containerd 1.7.13: none", "CRI-O 1.36.3: all", "containerd 2.3.4: all"],
)
def test_oom_pids_devices_and_rdt_adjustments_apply_only_past_nri_v0_4(
    flavor: RuntimeFlavor, oom: bool, pids: bool, devices: bool, rdt: str | None
) -> None:
    ctr = spec()
    adjust = pb.ContainerAdjustment()
    adjust.linux.oom_score_adj.value = 1
    adjust.linux.resources.pids.limit = 10
    adjust.linux.resources.devices.add(allow=False, access="rwm")
    adjust.linux.rdt.clos_id.value = "gold"
    changes = apply_adjustment(ctr, adjust, flavor)
    assert ctr.linux.HasField("oom_score_adj") is oom
    assert ctr.linux.resources.HasField("pids") is pids
    assert bool(ctr.linux.resources.devices) is devices
    assert changes.rdt_class == rdt


def test_zero_memory_limit_and_empty_cpuset_change_nothing() -> None:
    ctr = spec()
    adjust = pb.ContainerAdjustment()
    adjust.linux.resources.memory.limit.value = 0
    adjust.linux.resources.cpu.cpus = ""
    adjust.linux.resources.rdt_class.value = ""
    changes = apply_adjustment(ctr, adjust, CONTAINERD_2_3)
    assert ctr.linux.resources.memory.limit.value == 128 << 20
    assert not ctr.linux.resources.memory.HasField("swap")
    assert changes.rdt_class == ""  # "" clears the class


@pytest.mark.parametrize(
    ("env", "changes", "expected"),
    [
        pytest.param(["A=1", "A=2"], [], ["A=1", "A=2"],
                     id="untouched without adjustments, duplicates too"),
        pytest.param(["P=long", "T=x", "P=/bin"], [("N", "1")], ["P=/bin", "T=x", "N=1"],
                     id="CRI-O capture: a duplicate keeps its last value in its first place"),
        pytest.param(["A=1", "B=2"], [("A", "9")], ["A=9", "B=2"],
                     id="a set replaces in place"),
        pytest.param(["A=1", "B=2"], [("-A", "")], ["B=2"], id="-KEY removes"),
        pytest.param(["A=1", "junk", "B=2"], [("C", "3")], ["A=1", "B=2", "C=3"],
                     id="an entry without = is dropped"),
        pytest.param(["A=1"], [("B", "1"), ("B", "2")], ["A=1", "B=2"],
                     id="the last of two sets wins"),
    ],
)  # fmt: skip
def test_env_adjustments_set_remove_and_deduplicate_like_the_oci_generator(
    env: list[str], changes: list[tuple[str, str]], expected: list[str]
) -> None:
    assert adjust_env(env, changes) == expected


@pytest.mark.parametrize(
    ("scope", "reservation", "swap", "pids", "shares"),
    [
        (UpdateScope.CRI, None, 1 << 20, None, 512),
        (UpdateScope.OCI, 1 << 10, 5, 7, 0),
    ],
    ids=["containerd (CRI)", "CRI-O (OCI)"],
)
def test_containerd_applies_the_cri_part_of_an_update_and_cri_o_all_of_it(
    scope: UpdateScope, reservation: int | None, swap: int, pids: int | None, shares: int
) -> None:
    target = spec().linux.resources
    update = pb.LinuxResources()
    update.memory.limit.value = 1 << 20
    update.memory.reservation.value = 1 << 10
    update.memory.swap.value = 5
    update.pids.limit = 7
    update.cpu.shares.value = 0  # containerd: zero means unchanged
    update.cpu.mems = "0"
    update.unified["cpu.weight"] = "10"
    apply_update(target, update, scope)
    assert target.memory.limit.value == 1 << 20
    memory = target.memory
    assert (memory.reservation.value if memory.HasField("reservation") else None) == reservation
    assert memory.swap.value == swap
    assert (target.pids.limit if target.HasField("pids") else None) == pids
    assert target.cpu.shares.value == shares
    assert target.cpu.mems == "0" and dict(target.unified) == {"cpu.weight": "10"}


@pytest.mark.parametrize("row", RESOURCE_FIELDS, ids=ROW_IDS)
@pytest.mark.parametrize("scope", list(UpdateScope))
def test_update_path_takes_each_field_per_runtime(row: ResourceField, scope: UpdateScope) -> None:
    """CRI-O (OCI) takes every field an update sets; containerd only the CRI ones."""
    target = pb.LinuxResources()
    update = pb.LinuxResources()
    set_field(update, row, 3)
    apply_update(target, update, scope)
    assert has_field(target, row) is (scope is UpdateScope.OCI or row.cri)


# The CPU fields a CRI update carries: where the policy's model of an update
# (qos_model.containers.merge_requested) and the runtimes' update path must agree.
_cpu_updates = st.builds(
    model.CpuResources,
    shares=st.none() | st.integers(2, 1 << 18),
    quota=st.none() | st.integers(1000, 1 << 30),
    period=st.none() | st.integers(1000, 1 << 20),
    cpus=st.sampled_from(["", "0", "1-3"]),
    mems=st.sampled_from(["", "0", "1"]),
)
_cpu_current = st.none() | st.builds(
    model.CpuResources,
    shares=st.none() | st.integers(2, 1 << 18),
    quota=st.none() | st.integers(-1, 1 << 30),
    period=st.none() | st.integers(1000, 1 << 20),
    realtime_runtime=st.none() | st.integers(0, 1000),
    realtime_period=st.none() | st.integers(1, 1000),
    cpus=st.sampled_from(["", "0-7"]),
    mems=st.sampled_from(["", "0-1"]),
)


@given(
    _cpu_current, st.none() | st.integers(1, 1 << 40), _cpu_updates, st.sampled_from(UpdateScope)
)
def test_model_update_agrees_with_the_runtimes_for_cpu(
    cpu: model.CpuResources | None,
    limit: int | None,
    requested_cpu: model.CpuResources,
    scope: UpdateScope,
) -> None:
    """For a CRI update of non-zero CPU values, both runtimes end where
    merge_requested says; memory, untouched by the update, stays."""
    memory = None if limit is None else model.MemoryResources(limit=limit, swap=limit)
    current = model.Resources(cpu=cpu, memory=memory)
    requested = model.Resources(cpu=requested_cpu)
    target = convert.resources_to_pb(current)
    apply_update(target, convert.resources_to_pb(requested), scope)
    applied = convert.resources_from_pb(target)
    expected = model.merge_requested(current, requested)
    if applied.cpu is None:  # nothing set: the runtime leaves cpu absent
        applied = replace(applied, cpu=model.CpuResources())
    assert applied == expected
