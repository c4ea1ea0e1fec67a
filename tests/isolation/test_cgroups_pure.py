"""Table tests for the pure parts of isolation.cgroups: no filesystem, no root."""

from __future__ import annotations

import errno
from pathlib import Path, PurePosixPath

import pytest

from isolation.cgroups import (
    CgroupError,
    CgroupPathError,
    CgroupUnsupported,
    CpuQuota,
    HostLayout,
    detect_cgroup_mounts,
    expand_slice,
    format_cpu_max,
    parse_cpu_max,
    parse_flat_keyed,
    parse_mountinfo,
    parse_v1_memory_limit,
    parse_v2_memory_max,
    resolve_cgroups_path,
    shares_to_weight,
    weight_to_shares,
)

# --------------------------------------------------------------------------- slices


@pytest.mark.parametrize(
    ("slice_name", "expected"),
    [
        ("-.slice", "/"),
        ("system.slice", "/system.slice"),
        ("kubepods.slice", "/kubepods.slice"),
        ("kubepods-burstable.slice", "/kubepods.slice/kubepods-burstable.slice"),
        (
            "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
            "/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
        ),
        ("a-b-c-d.slice", "/a.slice/a-b.slice/a-b-c.slice/a-b-c-d.slice"),
        ("user-1000.slice", "/user.slice/user-1000.slice"),
    ],
    ids=[
        "the root slice",
        "system.slice",
        "kubepods.slice",
        "the burstable QoS slice",
        "a pod slice",
        "four levels",
        "a user slice",
    ],
)
def test_a_slice_name_expands_to_the_path_of_its_ancestor_slices(
    slice_name: str, expected: str
) -> None:
    assert expand_slice(slice_name) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "bad",
    ["", ".slice", "kubepods", "kubepods.scope", "a--b.slice", "-a.slice", "a-.slice",
     "a/b.slice", "--.slice"],
    ids=lambda bad: bad or "(empty)",
)  # fmt: skip
def test_a_malformed_slice_name_is_einval(bad: str) -> None:
    with pytest.raises(CgroupPathError) as info:
        expand_slice(bad)
    assert info.value.errno == errno.EINVAL


POD = "pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
CID = "3b1c0d5e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        # cgroupfs driver: the path itself
        (f"/kubepods/burstable/{POD}/{CID}", f"/kubepods/burstable/{POD}/{CID}"),
        (f"/harness/{POD}/{CID}", f"/harness/{POD}/{CID}"),
        (f"/kubepods/{POD}/{CID}/", f"/kubepods/{POD}/{CID}"),
        # systemd driver, containerd
        (
            f"kubepods-burstable-{POD}.slice:cri-containerd:{CID}",
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/"
            f"cri-containerd-{CID}.scope",
        ),
        # systemd driver, guaranteed pod (no QoS slice), CRI-O
        (
            f"kubepods-{POD}.slice:crio:{CID}",
            f"/kubepods.slice/kubepods-{POD}.slice/crio-{CID}.scope",
        ),
        # empty slice -> runc's default system.slice
        (f":docker:{CID}", f"/system.slice/docker-{CID}.scope"),
        # a name that is itself a slice is used as the unit
        ("kubepods.slice:crio:kubepods-besteffort.slice",
         "/kubepods.slice/kubepods-besteffort.slice"),
    ],
    ids=[
        "cgroupfs: a kubepods path as it is",
        "cgroupfs: any other path as it is",
        "cgroupfs: without the trailing slash",
        "systemd, containerd: burstable pod",
        "systemd, CRI-O: guaranteed pod, no QoS slice",
        "systemd: an empty slice is runc's system.slice",
        "systemd: a slice as the unit",
    ],
)  # fmt: skip
def test_cgroups_path_resolves_as_the_cgroupfs_and_systemd_drivers_lay_it_out(
    cgroups_path: str, expected: str
) -> None:
    assert resolve_cgroups_path(cgroups_path) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "bad",
    ["", "kubepods.slice:crio", "a.slice:b:c:d", "kubepods.slice:crio:", "bad-.slice:crio:x",
     "/kubepods/../etc", "kubepods/x/.."],
    ids=lambda bad: bad or "(empty)",
)  # fmt: skip
def test_a_malformed_cgroups_path_is_einval(bad: str) -> None:
    with pytest.raises(CgroupPathError) as info:
        resolve_cgroups_path(bad)
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, CgroupError)


# --------------------------------------------------------------------------- shares


@pytest.mark.parametrize(
    ("shares", "weight"),
    [
        # the table in opencontainers/cgroups utils_test.go
        (1, 1),
        (2, 1),
        (3, 2),
        (1024, 100),
        (262143, 10000),
        (262144, 10000),
        (262145, 10000),
        # worked by hand from weight = ceil(10 ** ((l*l + 125*l)/612 - 7/34)), l = log2
        (512, 59),  # l=9: 10**1.76471 = 58.2
        (2048, 174),  # l=11: 10**2.23856 = 173.2
        (10, 4),  # l=3.32: 10**0.49065 = 3.09
        (65536, 3023),  # l=16: 10**3.48039 = 3022.3
    ],
)
def test_shares_to_weight_matches_runc(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_default_shares_map_to_default_weight_unlike_the_old_linear_formula() -> None:
    old_linear = 1 + (1024 - 2) * 9999 // 262142
    assert old_linear == 39
    assert shares_to_weight(1024) == 100


@pytest.mark.parametrize(("weight", "shares"), [(1, 2), (100, 1024), (10000, 262144)])
def test_weight_to_shares_round_trips_the_anchor_points(weight: int, shares: int) -> None:
    assert weight_to_shares(weight) == shares


def test_every_weight_round_trips() -> None:
    previous = 0
    for weight in range(1, 10001):
        shares = weight_to_shares(weight)
        assert shares_to_weight(shares) == weight
        assert shares_to_weight(shares + 1) > weight or shares == 262144
        assert shares > previous
        previous = shares


# --------------------------------------------------------------------------- cpu.max


@pytest.mark.parametrize(
    ("text", "quota", "period"),
    [
        ("max 100000\n", None, 100000),
        ("50000 100000\n", 50000, 100000),
        ("150000 50000", 150000, 50000),
        ("1000 1000", 1000, 1000),
        ("max 1000000", None, 1000000),
    ],
    ids=[
        "unlimited",
        "half a CPU",
        "1.5 CPUs in 50 ms periods",
        "the smallest quota and period",
        "unlimited, the largest period",
    ],
)
def test_cpu_max_parses_and_formats_back_to_the_same_text(
    text: str, quota: int | None, period: int
) -> None:
    parsed = parse_cpu_max(text)
    assert parsed == CpuQuota(quota, period)
    assert format_cpu_max(parsed) == text.strip()


@pytest.mark.parametrize(
    "bad",
    ["", "max", "50000", "50000 100000 7", "abc 100000", "50000 max", "500 100000", "1000 500",
     "1000 2000000"],
    ids=lambda bad: bad or "(empty)",
)  # fmt: skip
def test_cpu_max_outside_the_kernels_syntax_or_range_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_max(bad)


def test_cpu_quota_in_cpus() -> None:
    assert CpuQuota(50000, 100000).cpus == 0.5
    assert CpuQuota(None).cpus is None
    assert CpuQuota(None).period_us == 100000


# --------------------------------------------------------------------------- memory, stat


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9223372036854771712\n", None),  # unlimited, 4 KiB pages (read on this host)
        ("9223372036854710272\n", None),  # unlimited, 64 KiB pages
        ("67108864\n", 67108864),
        ("999424\n", 999424),
    ],
    ids=["unlimited, 4 KiB pages", "unlimited, 64 KiB pages", "64 MiB", "a page-rounded limit"],
)
def test_v1_memory_limit_reads_the_page_rounded_maximum_as_unlimited(
    text: str, expected: int | None
) -> None:
    assert parse_v1_memory_limit(text) == expected


def test_parse_v2_memory_max() -> None:
    assert parse_v2_memory_max("max\n") is None
    assert parse_v2_memory_max("67108864\n") == 67108864


def test_parse_flat_keyed_cpu_stat() -> None:
    text = (
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\n"
        "nr_throttled 1\nthrottled_usec 20\nnr_bursts 0\nburst_usec 0\n"
    )
    stats = parse_flat_keyed(text)
    assert stats["usage_usec"] == 1500
    assert stats["throttled_usec"] == 20
    assert len(stats) == 8


# --------------------------------------------------------------------------- mounts

# Verbatim from this CI host (Debian 12, kernel 6.18): v1 controllers + controller-less unified.
HYBRID_MOUNTINFO = """\
23 1 253:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A systemd "legacy" host: co-mounted cpu,cpuacct; optional fields; a container's bind
# mount of another cgroupfs far from the root, which must be ignored.
LEGACY_MOUNTINFO = """\
25 21 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup rw,xattr,name=systemd
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/net_cls,net_prio rw shared:14 - cgroup cgroup rw,net_cls,net_prio
31 25 0:28 / /sys/fs/cgroup/cpuset rw,nosuid shared:15 master:3 - cgroup cgroup rw,cpuset,clone_children
32 25 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:16 - cgroup cgroup rw,memory
90 80 0:26 /docker/abc /var/lib/x/sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct
"""  # noqa: E501

UNIFIED_MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""  # noqa: E501

ROOT = Path("/sys/fs/cgroup")


def test_detect_hybrid() -> None:
    mounts = detect_cgroup_mounts(parse_mountinfo(HYBRID_MOUNTINFO), ROOT)
    assert mounts.layout is HostLayout.HYBRID
    assert mounts.unified == ROOT / "unified"
    assert mounts.v1["cpu"] == ROOT / "cpu"
    assert mounts.v1["cpuacct"] == ROOT / "cpuacct"
    assert mounts.v1["cpuset"] == ROOT / "cpuset"
    assert "systemd" not in mounts.v1 and "name=systemd" not in mounts.v1


def test_detect_legacy_with_comounted_controllers() -> None:
    mounts = detect_cgroup_mounts(parse_mountinfo(LEGACY_MOUNTINFO), ROOT)
    assert mounts.layout is HostLayout.LEGACY
    assert mounts.unified is None
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == ROOT / "cpu,cpuacct"
    assert mounts.v1["net_prio"] == ROOT / "net_cls,net_prio"
    assert mounts.v1["cpuset"] == ROOT / "cpuset"
    assert "clone_children" not in mounts.v1


def test_detect_unified() -> None:
    mounts = detect_cgroup_mounts(parse_mountinfo(UNIFIED_MOUNTINFO), ROOT)
    assert mounts.layout is HostLayout.UNIFIED
    assert mounts.unified == ROOT
    assert dict(mounts.v1) == {}


def test_detect_under_another_root_sees_only_that_tree() -> None:
    mounts = detect_cgroup_mounts(
        parse_mountinfo(LEGACY_MOUNTINFO), Path("/var/lib/x/sys/fs/cgroup")
    )
    assert mounts.layout is HostLayout.LEGACY
    assert mounts.v1 == {"cpu": Path("/var/lib/x/sys/fs/cgroup/cpu"),
                         "cpuacct": Path("/var/lib/x/sys/fs/cgroup/cpu")}  # fmt: skip


def test_detect_nothing_mounted() -> None:
    with pytest.raises(CgroupUnsupported) as info:
        detect_cgroup_mounts(parse_mountinfo(UNIFIED_MOUNTINFO), Path("/elsewhere"))
    assert info.value.errno == errno.ENOENT
    assert "/elsewhere" in str(info.value)


def test_mountinfo_octal_escapes() -> None:
    line = r"40 31 0:37 / /tmp/my\040cg\134x rw - cgroup2 none rw"
    (entry,) = parse_mountinfo(line)
    assert entry.mount_point == PurePosixPath("/tmp/my cg\\x")
    assert entry.fs_type == "cgroup2"


def test_mountinfo_without_separator_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_mountinfo("40 31 0:37 / /x rw cgroup2 none rw")


def test_error_string_names_errno_and_path() -> None:
    error = CgroupError("/sys/fs/cgroup/cpu/x/cpu.shares", errno.ENOENT, "gone")
    assert str(error) == "gone [ENOENT: /sys/fs/cgroup/cpu/x/cpu.shares]"
    assert error.errno == errno.ENOENT
