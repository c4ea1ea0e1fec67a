"""Guards FakeResctrl against the documented resctrl formats and rules
(the kernel's Documentation/arch/x86/resctrl.rst and the error texts of rdtgroup.c), and
checks the property that whatever `schemata_for` computes, the kernel model accepts.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfakefs.fake_filesystem import FakeFilesystem
from pyfakefs.fake_filesystem_unittest import Patcher

from isolation.rdt import RdtClassConfig, Resctrl, format_schemata, parse_schemata, schemata_for
from tests.isolation.fake_cgroup2 import echo
from tests.isolation.fake_resctrl import FakeResctrl, rc


def read(*parts: str) -> str:
    with open(rc(*parts)) as handle:
        return handle.read()


def refused(path: Path, value: str) -> int:
    with pytest.raises(OSError) as caught:
        echo(path, value)
    return caught.value.errno or 0


def test_layout_follows_the_documentation(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, l3_domains=(0, 1), cbm_mask=0x7FF, shareable_bits=0x600)
    for name in ("num_closids", "cbm_mask", "min_cbm_bits", "shareable_bits", "bit_usage"):
        assert os.path.exists(rc("info/L3", name))
    for name in ("min_bandwidth", "bandwidth_gran", "delay_linear", "thread_throttle_mode"):
        assert os.path.exists(rc("info/MB", name))
    assert read("info/L3_MON/mon_features").split() == [
        "llc_occupancy", "mbm_total_bytes", "mbm_local_bytes"
    ]  # fmt: skip
    assert read("info/L3/cbm_mask") == "7ff\n"
    assert read("info/L3/bit_usage") == "0=XXSSSSSSSSS;1=XXSSSSSSSSS\n"
    assert read("info/last_cmd_status") == "ok\n"
    assert read("schemata") == "L3:0=7ff;1=7ff\nMB:0=100;1=100\n"
    assert read("mode") == "shareable\n"
    assert os.path.isdir(rc("mon_data/mon_L3_01")) and os.path.isdir(rc("mon_groups"))
    with open("/proc/mounts") as mounts:
        assert "resctrl /sys/fs/resctrl resctrl rw,relatime 0 0" in mounts.read()


def test_reads_pad_like_the_kernel(fs: FakeFilesystem) -> None:
    FakeResctrl(fs, l3_domains=(0, 1), cdp=True)
    os.mkdir(rc("g"))
    echo(rc("g/schemata"), "MB:1=50\nL3DATA:0=3f\n")  # partial: only some domains
    assert read("g/schemata") == (
        "L3CODE:0=fffff;1=fffff\nL3DATA:0=0003f;1=fffff\n    MB:0=  100;1=   50\n"
    )
    assert parse_schemata(read("g/schemata"))["MB"] == {0: "100", 1: "50"}


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("L3:0=f0f\n", "The mask f0f has non-consecutive 1-bits"),
        ("L3:0=1\n", "Need at least 2 bits in the mask"),
        ("L3:0=100000\n", "Mask out of range"),
        ("L3:0=xyz\n", "Non-hex character in the mask xyz"),
        ("MB:0=5\n", "MB value 5 out of range [10,100]"),
        ("L2:0=f\n", "Unknown or unsupported resource name 'L2'"),
        ("L3:0=f;0=f\n", "Duplicate domain 0"),
        ("L3 0=f\n", "Missing ':'"),
        ("L3:7=f\n", "ok"),  # unknown domain: EINVAL, and the kernel explains nothing
    ],
)
def test_bad_schemata_are_refused_with_the_kernels_words(
    fs: FakeFilesystem, value: str, status: str
) -> None:
    kernel = FakeResctrl(fs, min_cbm_bits=2, l3_domains=(0, 1))
    os.mkdir(rc("g"))
    assert refused(rc("g/schemata"), "MB:1=50\n" + value) == errno.EINVAL
    assert read("info/last_cmd_status") == status + "\n"
    assert kernel.groups["g"].values["MB"] == {0: 100, 1: 100}  # all or nothing


def test_good_writes_round_mb_and_need_a_newline(fs: FakeFilesystem) -> None:
    FakeResctrl(fs)
    os.mkdir(rc("g"))
    assert refused(rc("g/schemata"), "MB:0=50") == errno.EINVAL  # no trailing newline
    echo(rc("g/schemata"), "MB:0=25\n")
    assert parse_schemata(read("g/schemata"))["MB"] == {0: "30"}
    assert read("info/last_cmd_status") == "ok\n"


def test_closids_rmids_and_tasks_follow_the_kernel(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs, num_closids=3, num_rmids=4)
    pid = kernel.spawn()
    os.mkdir(rc("a"))
    os.mkdir(rc("b"))
    with pytest.raises(OSError) as caught:
        os.mkdir(rc("c"))
    assert caught.value.errno == errno.ENOSPC and kernel.last_cmd_status == "Out of CLOSIDs"
    os.mkdir(rc("a/mon_groups/m"))
    with pytest.raises(OSError) as caught:
        os.mkdir(rc("a/mon_groups/n"))
    assert caught.value.errno == errno.ENOSPC and kernel.last_cmd_status == "Out of RMIDs"
    with pytest.raises(OSError) as caught:
        os.mkdir(rc("a/elsewhere"))
    assert caught.value.errno == errno.EPERM
    assert refused(rc("b/tasks"), "999999") == errno.ESRCH
    assert kernel.last_cmd_status == "No task 999999"
    assert refused(rc("a/mon_groups/m/tasks"), str(pid)) == errno.EINVAL  # not in "a" yet
    echo(rc("a/tasks"), str(pid))
    echo(rc("a/mon_groups/m/tasks"), str(pid))
    assert read("a/tasks") == read("a/mon_groups/m/tasks") == f"{pid}\n"
    assert str(pid) not in read("tasks").split()
    echo(rc("b/tasks"), str(pid))  # a task is in one group: writing it moves it
    assert read("a/tasks") == read("a/mon_groups/m/tasks") == ""
    os.rmdir(rc("b"))
    assert kernel.group_of(pid) == ("", None) and kernel.closids_in_use() == {0, 1}
    os.mkdir(rc("c"))  # the freed CLOSID is reusable
    with pytest.raises(OSError) as caught:
        os.rmdir(rc("info"))
    assert caught.value.errno == errno.EPERM


def test_counters_render_numbers_or_unavailable(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs)
    os.mkdir(rc("g"))
    os.mkdir(rc("g/mon_groups/m"))
    kernel.set_counter("g", "mbm_total_bytes", "Unavailable", mon="m")
    assert read("g/mon_groups/m/mon_data/mon_L3_00/mbm_total_bytes") == "Unavailable\n"
    kernel.set_counter("g", "llc_occupancy", 10)
    kernel.set_counter("g", "llc_occupancy", 5, mon="m")
    assert read("g/mon_data/mon_L3_00/llc_occupancy") == "15\n"


hardware = st.fixed_dictionaries(
    {
        "cbm_bits": st.integers(4, 20),
        "min_cbm_bits": st.integers(1, 4),
        "domains": st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
        "gran": st.sampled_from([1, 5, 10]),
        "min_bw": st.sampled_from([10, 20]),
        "cdp": st.booleans(),
        "mbps": st.booleans(),
    }
)
configs = st.builds(
    RdtClassConfig,
    l3_percent=st.none() | st.integers(1, 100),
    mb_percent=st.none() | st.integers(1, 100),
    mb_mbps=st.none() | st.integers(1, 100_000),
)


@settings(max_examples=40, deadline=None)
@given(hw=hardware, config=configs)
def test_schemata_for_always_yields_what_the_kernel_accepts(
    hw: dict[str, Any], config: RdtClassConfig
) -> None:
    with Patcher() as patcher:
        assert patcher.fs is not None
        FakeResctrl(
            patcher.fs,
            l3_domains=tuple(hw["domains"]),
            cbm_mask=(1 << hw["cbm_bits"]) - 1,
            min_cbm_bits=hw["min_cbm_bits"],
            bandwidth_gran=hw["gran"],
            min_bandwidth=hw["min_bw"],
            cdp=hw["cdp"],
            mba_mbps=hw["mbps"],
        )
        info = Resctrl().probe()
        wanted = schemata_for(info, config)
        os.mkdir(rc("g"))
        echo(rc("g/schemata"), format_schemata(wanted))  # raises if the kernel refuses
        back = parse_schemata(read("g/schemata"))
        for name, domains in wanted.items():
            base = 10 if name == "MB" else 16
            assert {d: int(v, base) for d, v in back[name].items()} == {
                d: int(v, base) for d, v in domains.items()
            }
