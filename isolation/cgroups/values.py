"""Values in cgroup interface files: ranges, v1<->v2 conversions and parsers.

Pure functions, no filesystem access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# cpu.shares range (kernel MIN_SHARES..MAX_SHARES) and cpu.weight range (cgroup-v2.rst).
CPU_SHARES_MIN = 2
CPU_SHARES_MAX = 262_144
CPU_SHARES_DEFAULT = 1024
CPU_WEIGHT_MIN = 1
CPU_WEIGHT_MAX = 10_000
CPU_WEIGHT_DEFAULT = 100

# CFS bandwidth limits the kernel enforces (1 ms .. 1 s period, quota at least 1 ms).
CFS_PERIOD_MIN_US = 1_000
CFS_PERIOD_MAX_US = 1_000_000
CFS_QUOTA_MIN_US = 1_000
CFS_PERIOD_DEFAULT_US = 100_000

# v1 memory.limit_in_bytes reads PAGE_COUNTER_MAX * PAGE_SIZE when unlimited, i.e.
# 2**63 rounded down to a page (9223372036854771712 with 4 KiB pages). Anything this
# close to 2**63 means "unlimited" for any page size up to 1 MiB.
_V1_UNLIMITED_THRESHOLD = (1 << 63) - (1 << 20)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares -> cgroup v2 cpu.weight, as runc/crun convert them today.

    The formula (opencontainers/cgroups ConvertCPUSharesToCgroupV2Value, adopted for
    kubernetes/kubernetes#131216) fits a quadratic in log2 space through the three
    points that matter: min 2 -> 1, default 1024 -> 100, max 262144 -> 10000::

        l = log2(shares);  weight = ceil(10 ** ((l*l + 125*l) / 612 - 7/34))

    Older runc used the linear ``1 + (shares - 2) * 9999 // 262142``, which maps the
    default 1024 to 39 (not 100); systemd's own ``CPUShares=`` conversion is
    ``clamp(shares * 100 // 1024, 1, 10000)``. We follow current runc so our writes match
    what the runtime wrote for the same request. Out-of-range values are clamped like the
    kernel clamps cpu.shares (runc's "0 = unset" is ``None`` at our call sites).
    """
    if shares <= CPU_SHARES_MIN:
        return CPU_WEIGHT_MIN
    if shares >= CPU_SHARES_MAX:
        return CPU_WEIGHT_MAX
    log = math.log2(shares)
    exponent = (log * log + 125 * log) / 612.0 - 7.0 / 34.0
    return math.ceil(math.pow(10.0, exponent))


def weight_to_shares(weight: int) -> int:
    """The largest cpu.shares that `shares_to_weight` maps to ``weight``.

    The forward map rounds up (ceil) and is monotonic with slope below 1, so every weight
    1..10000 is hit by a run of shares values; the top of the run is the one the
    continuous formula gives exactly, so 1 -> 2, 100 -> 1024 and 10000 -> 262144 round-trip.
    Used to report v2 weights in the v1 units NRI speaks.
    """
    target = min(max(weight, CPU_WEIGHT_MIN), CPU_WEIGHT_MAX)
    lo, hi = CPU_SHARES_MIN, CPU_SHARES_MAX
    while lo < hi:  # the largest s with shares_to_weight(s) <= target
        mid = (lo + hi + 1) // 2
        if shares_to_weight(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class CpuQuota:
    """CFS bandwidth: at most ``quota_us`` of CPU time per ``period_us``; None = no limit."""

    quota_us: int | None
    period_us: int = CFS_PERIOD_DEFAULT_US

    def __post_init__(self) -> None:
        if not CFS_PERIOD_MIN_US <= self.period_us <= CFS_PERIOD_MAX_US:
            raise ValueError(
                f"CFS period {self.period_us} us is outside "
                f"{CFS_PERIOD_MIN_US}..{CFS_PERIOD_MAX_US} us"
            )
        if self.quota_us is not None and self.quota_us < CFS_QUOTA_MIN_US:
            raise ValueError(
                f"CFS quota {self.quota_us} us is below the kernel minimum {CFS_QUOTA_MIN_US} us"
            )

    @property
    def cpus(self) -> float | None:
        """The limit in CPUs (quota / period), None when unlimited."""
        return None if self.quota_us is None else self.quota_us / self.period_us


def parse_cpu_max(text: str) -> CpuQuota:
    """Parse v2 ``cpu.max`` ("$MAX $PERIOD", $MAX may be "max")."""
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"cpu.max must hold '$MAX $PERIOD', got {text!r}")
    quota_text, period_text = fields
    try:
        quota = None if quota_text == "max" else int(quota_text)
        return CpuQuota(quota_us=quota, period_us=int(period_text))
    except ValueError as exc:
        raise ValueError(f"bad cpu.max {text!r}: {exc}") from None


def format_cpu_max(quota: CpuQuota) -> str:
    """The v2 ``cpu.max`` line for a quota ("max 100000" when unlimited)."""
    limit = "max" if quota.quota_us is None else str(quota.quota_us)
    return f"{limit} {quota.period_us}"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse a cgroup "flat keyed" file (``KEY VALUE`` per line), e.g. cpu.stat."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        try:
            result[fields[0]] = int(fields[1])
        except ValueError:
            continue
    return result


def parse_v1_memory_limit(text: str) -> int | None:
    value = int(text.strip())
    return None if value >= _V1_UNLIMITED_THRESHOLD or value < 0 else value


def parse_v2_memory_max(text: str) -> int | None:
    value = text.strip()
    return None if value == "max" else int(value)
