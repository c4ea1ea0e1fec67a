"""isolation.rdt against a faithful resctrl (tests/isolation/fake_resctrl.py).

This host has no resctrl, so `Resctrl` runs its production code path (plain os/open
under a root, every change through HostWriter) against `FakeResctrl`, which enforces
the kernel's rules; test_rdt_fake.py guards the fake itself.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from isolation.errors import HostError
from isolation.rdt import (
    DEFAULT_CLASSES,
    CacheInfo,
    MbInfo,
    MonInfo,
    RdtClassConfig,
    RdtInfo,
    RdtUnavailable,
    Resctrl,
    format_schemata,
    parse_schemata,
    schemata_for,
)
from isolation.writes import HostWriter
from tests.isolation.fake_cgroup2 import echo
from tests.isolation.fake_resctrl import MBPS_MAX, FakeResctrl, rc

RECLAIMED = DEFAULT_CLASSES["reclaimed"]


def resctrl(dry_run: bool = False) -> Resctrl:
    return Resctrl(Path("/"), HostWriter(dry_run=dry_run))


def writes(r: Resctrl) -> list[str]:
    return [f"{c.action} {c.target}" for c in r.writer.recent]


def cache(**kw: object) -> CacheInfo:
    base: dict[str, object] = dict(
        num_closids=16, cbm_mask=0xFFFFF, min_cbm_bits=1, shareable_bits=0, domains=(0, 1)
    )
    return CacheInfo(**(base | kw))  # type: ignore[arg-type]


def mb(**kw: object) -> MbInfo:
    base: dict[str, object] = dict(
        num_closids=8, min_bandwidth=10, bandwidth_gran=10, delay_linear=True, mbps=False,
        domains=(0, 1),
    )  # fmt: skip
    return MbInfo(**(base | kw))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- probe


def test_probe_two_socket_host(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, l3_domains=(0, 1), cbm_mask=0x7FF, min_cbm_bits=2, shareable_bits=0x600,
                num_closids=16, mb_num_closids=8, num_rmids=176)  # fmt: skip
    info = resctrl().probe()
    assert info.l3 == CacheInfo(16, 0x7FF, 2, 0x600, (0, 1))
    assert info.mb == MbInfo(8, 10, 10, True, False, (0, 1))
    assert info.mon == MonInfo(176, frozenset({"llc_occupancy", "mbm_total_bytes",
                                               "mbm_local_bytes"}))  # fmt: skip
    assert not info.cdp
    assert info.num_closids == 8  # the kernel uses the smallest count


def test_probe_without_mb_or_monitoring(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, mb=False, mon=False)
    info = resctrl().probe()
    assert info.l3 is not None and info.mb is None and info.mon is None
    assert set(schemata_for(info, RECLAIMED)) == {"L3"}


def test_probe_mba_mbps_and_cdp_from_the_mount(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, mba_mbps=True, cdp=True, num_closids=16)
    info = resctrl().probe()
    assert info.mb is not None and info.mb.mbps
    assert info.cdp and info.l3 is not None and info.l3.num_closids == 8


def test_not_mounted_says_what_to_do(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, mounted=False)
    with pytest.raises(RdtUnavailable, match=r"not mounted.*mount -t resctrl resctrl"):
        resctrl().probe()


def test_no_resctrl_in_the_kernel(fs: FakeFilesystem) -> None:
    fs.create_dir("/sys/fs")
    with pytest.raises(RdtUnavailable, match=r"does not exist.*CONFIG_X86_CPU_RESCTRL"):
        resctrl().probe()


def test_monitoring_only_is_nothing_to_isolate_with(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, l3=False, mb=False)
    with pytest.raises(RdtUnavailable, match="neither L3 nor MB"):
        resctrl().probe()


# ---------------------------------------------------------------------------- schemata


def test_l3_percent_takes_contiguous_low_ways_per_domain() -> None:
    info = RdtInfo(l3=cache(), mb=None, mon=None, cdp=False)
    assert schemata_for(info, RdtClassConfig(l3_percent=30)) == {"L3": {0: "3f", 1: "3f"}}
    assert schemata_for(info, RdtClassConfig()) == {"L3": {0: "fffff", 1: "fffff"}}
    tiny = RdtInfo(l3=cache(min_cbm_bits=4), mb=None, mon=None, cdp=False)
    assert schemata_for(tiny, RdtClassConfig(l3_percent=1)) == {"L3": {0: "f", 1: "f"}}


def test_cdp_sets_code_and_data_alike() -> None:
    info = RdtInfo(l3=cache(domains=(0,)), mb=None, mon=None, cdp=True)
    assert schemata_for(info, RdtClassConfig(l3_percent=50)) == {
        "L3CODE": {0: "3ff"}, "L3DATA": {0: "3ff"}
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mask", "sparse", "error"),
    [
        (0xF0F, False, "non-consecutive"),
        (0x100000, False, "not within cbm_mask"),
        (0x1, False, "fewer than min_cbm_bits=2"),
        (0xF0F, True, None),
        (0x3C, False, None),
    ],
)
def test_explicit_masks_are_validated(mask: int, sparse: bool, error: str | None) -> None:
    info = RdtInfo(l3=cache(min_cbm_bits=2, sparse_masks=sparse), mb=None, mon=None, cdp=False)
    config = RdtClassConfig(l3_mask=mask)
    if error is None:
        assert schemata_for(info, config)["L3"][0] == f"{mask:x}"
    else:
        with pytest.raises(ValueError, match=error):
            schemata_for(info, config)


@pytest.mark.parametrize(
    "config",
    [
        RdtClassConfig(l3_percent=0),
        RdtClassConfig(l3_percent=101),
        RdtClassConfig(l3_percent=30, l3_mask=0xF),
        RdtClassConfig(mb_percent=0),
    ],
)
def test_impossible_configs_are_refused(config: RdtClassConfig) -> None:
    with pytest.raises(ValueError):
        schemata_for(RdtInfo(l3=cache(), mb=mb(), mon=None, cdp=False), config)


@pytest.mark.parametrize(
    ("percent", "gran", "min_bw", "expected"),
    [(30, 10, 10, "30"), (25, 10, 10, "30"), (5, 10, 10, "10"), (99, 10, 10, "100"),
     (21, 1, 10, "21"), (3, 1, 10, "10")],
)  # fmt: skip
def test_mb_percent_rounds_up_to_the_granularity(
    percent: int, gran: int, min_bw: int, expected: str
) -> None:
    info = RdtInfo(l3=None, mb=mb(bandwidth_gran=gran, min_bandwidth=min_bw), mon=None, cdp=False)
    assert schemata_for(info, RdtClassConfig(mb_percent=percent)) == {
        "MB": {0: expected, 1: expected}
    }


def test_mbps_mode_uses_mb_mbps_and_otherwise_no_limit() -> None:
    info = RdtInfo(l3=None, mb=mb(mbps=True), mon=None, cdp=False)
    assert schemata_for(info, RdtClassConfig(mb_mbps=2048))["MB"] == {0: "2048", 1: "2048"}
    assert schemata_for(info, RECLAIMED)["MB"] == {0: str(MBPS_MAX), 1: str(MBPS_MAX)}


def test_schemata_text_both_ways() -> None:
    lines = {"L3": {1: "3f", 0: "3f"}, "MB": {0: "30", 1: "30"}}
    assert format_schemata(lines) == "L3:0=3f;1=3f\nMB:0=30;1=30\n"
    kernel = "    MB:0= 30;1=100\nL3DATA:0=0003f;1=fffff\n"
    assert parse_schemata(kernel) == {"MB": {0: "30", 1: "100"},
                                      "L3DATA": {0: "0003f", 1: "fffff"}}  # fmt: skip
    with pytest.raises(ValueError, match="not id=value"):
        parse_schemata("L3:0\n")


# ---------------------------------------------------------------------------- classes


def test_ensure_class_creates_then_writes_nothing(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs, l3_domains=(0, 1), cbm_mask=0x7FF)
    r = resctrl()
    info = r.probe()
    first = r.ensure_class("reclaimed", RECLAIMED, info)
    assert first == "nri-qos-reclaimed: created, set L3:0=7;1=7 MB:0=30;1=30"
    assert r.read_schemata("reclaimed") == {"L3": {0: "007", 1: "007"},
                                            "MB": {0: "30", 1: "30"}}  # fmt: skip
    done = len(r.writer.recent)
    again = r.ensure_class("reclaimed", RECLAIMED, info)
    assert "already" in again and len(r.writer.recent) == done  # no second write
    assert kernel.groups["nri-qos-reclaimed"].values["L3"] == {0: 0x7, 1: 0x7}


def test_ensure_class_repairs_only_what_drifted(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs)
    r = resctrl()
    info = r.probe()
    r.ensure_class("reclaimed", RECLAIMED, info)
    echo(rc("nri-qos-reclaimed", "schemata"), "MB:0=100\n")  # someone else wrote it
    assert kernel.groups["nri-qos-reclaimed"].values["MB"] == {0: 100}
    assert r.ensure_class("reclaimed", RECLAIMED, info).endswith("set MB:0=30")
    assert r.writer.recent[-1].value == "MB:0=30\n"


def test_out_of_closids_says_so(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, num_closids=2)  # the root group holds CLOSID 0
    r = resctrl()
    info = r.probe()
    r.ensure_class("system", DEFAULT_CLASSES["system"], info)
    with pytest.raises(HostError) as caught:
        r.ensure_class("reclaimed", RECLAIMED, info)
    assert caught.value.errno == errno.ENOSPC
    assert "out of CLOSIDs (num_closids=2)" in str(caught.value)


def test_out_of_rmids_for_a_class_says_so(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, num_rmids=1)
    r = resctrl()
    with pytest.raises(HostError, match=r"out of RMIDs \(num_rmids=1\)") as caught:
        r.ensure_class("reclaimed", RECLAIMED, r.probe())
    assert caught.value.errno == errno.ENOSPC


def test_a_refused_schemata_carries_the_kernels_reason(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, min_cbm_bits=4)
    r = resctrl()
    info = r.probe()
    assert info.l3 is not None
    stale = dataclasses.replace(info, l3=dataclasses.replace(info.l3, min_cbm_bits=1))
    with pytest.raises(HostError) as caught:
        r.ensure_class("reclaimed", RdtClassConfig(l3_percent=1), stale)
    assert caught.value.errno == errno.EINVAL
    assert "the kernel says: Need at least 4 bits in the mask" in str(caught.value)


def test_mbps_mount_end_to_end(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, mba_mbps=True)
    r = resctrl()
    info = r.probe()
    r.ensure_class("reclaimed", RdtClassConfig(l3_percent=30, mb_mbps=2048), info)
    assert r.read_schemata("reclaimed")["MB"] == {0: "2048"}
    assert "MB unlimited" in r.ensure_class("dedicated", RECLAIMED, info)


def test_remove_unused_leaves_foreign_groups_alone(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs)
    r = resctrl()
    info = r.probe()
    for cls in ("system", "reclaimed"):
        r.ensure_class(cls, DEFAULT_CLASSES[cls], info)
    os.mkdir(rc("batch-team"))  # someone else's group
    pid = kernel.spawn()
    assert r.assign_tasks("reclaimed", [pid], "test") == 1
    assert r.remove_unused(["system"]) == ["nri-qos-reclaimed"]
    assert sorted(kernel.groups) == ["", "batch-team", "nri-qos-system"]
    assert kernel.group_of(pid) == ("", None)  # back in the root group
    assert r.remove_unused(["system"]) == []


# ---------------------------------------------------------------------------- tasks


def test_tasks_move_between_classes_and_gone_pids_are_skipped(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs)
    r = resctrl()
    info = r.probe()
    for cls in ("dedicated", "reclaimed"):
        r.ensure_class(cls, DEFAULT_CLASSES[cls], info)
    a, b, gone = kernel.spawn(), kernel.spawn(), kernel.spawn()
    kernel.exit(gone)
    assert r.assign_tasks("dedicated", [a, b, gone], "pod start") == 2
    assert r.tasks_of("dedicated") == {a, b}
    assert r.assign_tasks("reclaimed", [b], "demoted") == 1
    assert (r.tasks_of("dedicated"), r.tasks_of("reclaimed")) == (frozenset({a}), frozenset({b}))
    for bad in (0, -1):  # 0 would move the agent itself
        with pytest.raises(ValueError, match="not a positive process id"):
            r.assign_tasks("dedicated", [bad], "x")


# ---------------------------------------------------------------------------- monitoring


def test_mon_groups_and_counters(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs, l3_domains=(0, 1))
    r = resctrl()
    r.ensure_class("dedicated", DEFAULT_CLASSES["dedicated"], r.probe())
    cid = "3b1c0d5e9f8a7b6c"
    assert r.ensure_mon_group("dedicated", cid, "container start") is True
    assert r.ensure_mon_group("dedicated", cid, "container start") is False
    assert r.mon_groups("dedicated") == [cid]
    pid = kernel.spawn()
    assert r.assign_tasks("dedicated", [pid], "start", mon=cid) == 1
    assert r.tasks_of("dedicated", mon=cid) == {pid} and r.tasks_of("dedicated") == {pid}
    group = "nri-qos-dedicated"
    kernel.set_counter(group, "llc_occupancy", 4096, mon=cid, domain=0)
    kernel.set_counter(group, "llc_occupancy", 1024, mon=cid, domain=1)
    kernel.set_counter(group, "mbm_total_bytes", "Unavailable", mon=cid, domain=0)
    kernel.set_counter(group, "mbm_total_bytes", "Unavailable", mon=cid, domain=1)
    kernel.set_counter(group, "mbm_local_bytes", "Unavailable", mon=cid, domain=0)
    kernel.set_counter(group, "mbm_local_bytes", 7, mon=cid, domain=1)
    sample = r.read_monitoring("dedicated", cid)
    assert (sample.llc_occupancy, sample.mbm_total_bytes, sample.mbm_local_bytes) == (
        5120, None, 7)  # fmt: skip
    kernel.set_counter(group, "llc_occupancy", 100, domain=0)
    assert r.read_monitoring("dedicated").llc_occupancy == 5220  # the class sums its mon groups
    assert r.remove_mon_group("dedicated", cid, "container gone") is True
    assert r.mon_groups("dedicated") == [] and kernel.group_of(pid) == (group, None)


def test_out_of_rmids_for_a_container_says_so(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, num_rmids=2)  # root and the class take both
    r = resctrl()
    r.ensure_class("dedicated", DEFAULT_CLASSES["dedicated"], r.probe())
    with pytest.raises(HostError, match=r"out of RMIDs \(num_rmids=2\)") as caught:
        r.ensure_mon_group("dedicated", "abc", "container start")
    assert caught.value.errno == errno.ENOSPC


# ---------------------------------------------------------------------------- dry run


def test_dry_run_changes_nothing_but_records_everything(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs)
    os.mkdir(rc("nri-qos-old"))
    pid = kernel.spawn()
    r = resctrl(dry_run=True)
    info = r.probe()
    outcome = r.ensure_class("reclaimed", RECLAIMED, info)
    assert "would set" in outcome
    assert r.assign_tasks("reclaimed", [pid], "start") == 1
    assert r.remove_unused(["reclaimed"]) == ["nri-qos-old"]
    assert sorted(kernel.groups) == ["", "nri-qos-old"]
    assert kernel.group_of(pid) == ("", None)
    assert [str(c) for c in r.writer.planned] == [
        "mkdir /sys/fs/resctrl/nri-qos-reclaimed (RDT class reclaimed)",
        "write 'L3:0=3f\\nMB:0=30\\n' > /sys/fs/resctrl/nri-qos-reclaimed/schemata "
        "(RDT class reclaimed)",
        f"write '{pid}' > /sys/fs/resctrl/nri-qos-reclaimed/tasks (start)",
        "rmdir /sys/fs/resctrl/nri-qos-old (RDT class no longer configured)",
    ]


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../info", "a/b", "..", ".", "", "x\n", "id with space"])
def test_hostile_names_are_refused(fs: FakeFilesystem, name: str) -> None:
    kernel = FakeResctrl(fs)
    r = resctrl()
    info = r.probe()
    with pytest.raises(ValueError, match="not a plain name"):
        r.ensure_class(name, RECLAIMED, info)
    r.ensure_class("dedicated", RECLAIMED, info)
    for call in (r.ensure_mon_group, r.remove_mon_group):
        with pytest.raises(ValueError, match="not a plain name"):
            call("dedicated", name, "container start")
    with pytest.raises(ValueError, match="not a plain name"):
        r.assign_tasks("dedicated", [kernel.self_pid], "x", mon=name)
    assert sorted(kernel.groups) == ["", "nri-qos-dedicated"]
    assert not kernel.groups["nri-qos-dedicated"].mons
