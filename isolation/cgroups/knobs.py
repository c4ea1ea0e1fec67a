"""`CgroupFs` reads and writes of resource knobs: cpuset, CPU weight/bandwidth/usage, memory.

Each maps to the v1 or v2 file of whichever hierarchy serves the controller.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from isolation.cgroups.access import CgroupWrite, _CgroupAccess
from isolation.cgroups.errors import CgroupError, CgroupUnsupported, CgroupValueRejected
from isolation.cgroups.layout import CgroupVersion
from isolation.cgroups.paths import _relative, normalize_group
from isolation.cgroups.values import (
    CPU_SHARES_MAX,
    CPU_SHARES_MIN,
    CpuQuota,
    format_cpu_max,
    parse_cpu_max,
    parse_flat_keyed,
    parse_v1_memory_limit,
    parse_v2_memory_max,
    shares_to_weight,
    weight_to_shares,
)
from qos_model.cpulist import format_cpu_list, parse_cpu_list

# The sets the kernel actually grants: v1 file name -> v2 file name.
_EFFECTIVE_V1_TO_V2 = {
    "cpuset.effective_cpus": "cpuset.cpus.effective",
    "cpuset.effective_mems": "cpuset.mems.effective",
}


class _CgroupKnobs(_CgroupAccess):
    """Resource knobs of a group; mixed into `CgroupFs`."""

    # ----------------------------------------------------------------- cpuset

    def _cpuset_file(self, group: str | PurePosixPath, what: str) -> Path:
        _, mount = self._locate("cpuset")
        return mount / _relative(normalize_group(group)) / f"cpuset.{what}"

    def set_cpuset_cpus(self, group: str | PurePosixPath, cpus: Iterable[int]) -> list[CgroupWrite]:
        return [self._write(self._cpuset_file(group, "cpus"), self._nonempty_list(cpus, "CPUs"))]

    def set_cpuset_mems(self, group: str | PurePosixPath, mems: Iterable[int]) -> list[CgroupWrite]:
        nodes = self._nonempty_list(mems, "memory nodes")
        return [self._write(self._cpuset_file(group, "mems"), nodes)]

    @staticmethod
    def _nonempty_list(ids: Iterable[int], what: str) -> str:
        text = format_cpu_list(ids)
        if not text:
            raise CgroupValueRejected(
                "", errno_codes.EINVAL, f"refusing to write an empty set of {what}"
            )
        return text

    def get_cpuset_cpus(self, group: str | PurePosixPath) -> frozenset[int]:
        """The configured cpuset (v2: the requested set; empty means "inherit")."""
        return parse_cpu_list(self._read(self._cpuset_file(group, "cpus")))

    def get_cpuset_mems(self, group: str | PurePosixPath) -> frozenset[int]:
        return parse_cpu_list(self._read(self._cpuset_file(group, "mems")))

    def get_effective_cpus(self, group: str | PurePosixPath) -> frozenset[int]:
        """The CPUs the kernel actually grants (v1 cpuset.effective_cpus, v2 .cpus.effective)."""
        return parse_cpu_list(self._read(self._effective_file(group, "cpus")))

    def get_effective_mems(self, group: str | PurePosixPath) -> frozenset[int]:
        return parse_cpu_list(self._read(self._effective_file(group, "mems")))

    def _effective_file(self, group: str | PurePosixPath, what: str) -> Path:
        version, mount = self._locate("cpuset")
        v1_name = f"cpuset.effective_{what}"
        name = v1_name if version is CgroupVersion.V1 else _EFFECTIVE_V1_TO_V2[v1_name]
        return mount / _relative(normalize_group(group)) / name

    # ----------------------------------------------------------------- cpu

    def set_cpu_shares(self, group: str | PurePosixPath, shares: int) -> list[CgroupWrite]:
        """Set the CPU weight in v1 units (v2: written as cpu.weight, see shares_to_weight)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if not CPU_SHARES_MIN <= shares <= CPU_SHARES_MAX:
            raise CgroupValueRejected(
                directory,
                errno_codes.EINVAL,
                f"cpu shares {shares} are outside {CPU_SHARES_MIN}..{CPU_SHARES_MAX}",
            )
        if version is CgroupVersion.V1:
            return [self._write(directory / "cpu.shares", str(shares))]
        return [self._write(directory / "cpu.weight", str(shares_to_weight(shares)))]

    def get_cpu_shares(self, group: str | PurePosixPath) -> int:
        """The CPU weight in v1 units (v2: the smallest shares that map to cpu.weight)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V1:
            return int(self._read(directory / "cpu.shares"))
        return weight_to_shares(int(self._read(directory / "cpu.weight")))

    def set_cpu_quota(self, group: str | PurePosixPath, quota: CpuQuota) -> list[CgroupWrite]:
        """Set CFS bandwidth (v1 cpu.cfs_quota_us + cpu.cfs_period_us, v2 cpu.max)."""
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V2:
            return [self._write(directory / "cpu.max", format_cpu_max(quota))]
        period = (directory / "cpu.cfs_period_us", str(quota.period_us))
        limit = (
            directory / "cpu.cfs_quota_us",
            "-1" if quota.quota_us is None else str(quota.quota_us),
        )
        # The kernel checks quota/period against the parent's and children's bandwidth
        # after each write, so the intermediate state can be refused: write the period
        # first, and if that is rejected, the quota first (the order runc uses).
        try:
            return [self._write(*period), self._write(*limit)]
        except CgroupValueRejected as exc:
            if exc.path != str(period[0]):
                raise
            return [self._write(*limit), self._write(*period)]

    def get_cpu_quota(self, group: str | PurePosixPath) -> CpuQuota:
        version, mount = self._locate("cpu")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V2:
            return parse_cpu_max(self._read(directory / "cpu.max"))
        quota = int(self._read(directory / "cpu.cfs_quota_us"))
        period = int(self._read(directory / "cpu.cfs_period_us"))
        return CpuQuota(quota_us=None if quota < 0 else quota, period_us=period)

    def cpu_usage_ns(self, group: str | PurePosixPath) -> int:
        """Total CPU time of the group and its descendants, in nanoseconds.

        v1: cpuacct.usage (ns). v2: cpu.stat ``usage_usec`` (exists even without the cpu
        controller, so hybrid hosts without cpuacct still get a number).
        """
        path = normalize_group(group)
        mount = self.mounts.v1_mount("cpuacct")
        if mount is not None:
            return int(self._read(mount / _relative(path) / "cpuacct.usage"))
        if self.mounts.unified is None:
            raise CgroupUnsupported(
                self.root,
                errno_codes.EOPNOTSUPP,
                "neither cpuacct (v1) nor a cgroup2 tree is mounted; CPU usage is unavailable",
            )
        stat_path = self.mounts.unified / _relative(path) / "cpu.stat"
        stats = parse_flat_keyed(self._read(stat_path))
        if "usage_usec" not in stats:
            raise CgroupError(stat_path, errno_codes.EIO, f"{stat_path} has no usage_usec")
        return stats["usage_usec"] * 1000

    # ----------------------------------------------------------------- memory

    def set_memory_limit(self, group: str | PurePosixPath, limit: int | None) -> list[CgroupWrite]:
        """Hard memory limit in bytes; None removes it. The kernel rounds down to a page."""
        version, mount = self._locate("memory")
        directory = mount / _relative(normalize_group(group))
        if limit is not None and limit < 0:
            raise CgroupValueRejected(
                directory, errno_codes.EINVAL, f"memory limit {limit} is negative; use None"
            )
        if version is CgroupVersion.V1:
            return [
                self._write(
                    directory / "memory.limit_in_bytes", "-1" if limit is None else str(limit)
                )
            ]
        return [self._write(directory / "memory.max", "max" if limit is None else str(limit))]

    def get_memory_limit(self, group: str | PurePosixPath) -> int | None:
        version, mount = self._locate("memory")
        directory = mount / _relative(normalize_group(group))
        if version is CgroupVersion.V1:
            return parse_v1_memory_limit(self._read(directory / "memory.limit_in_bytes"))
        return parse_v2_memory_max(self._read(directory / "memory.max"))
