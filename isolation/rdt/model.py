"""What resctrl offers on this host (`RdtInfo`) and what a QoS class asks of it
(`RdtClassConfig`): plain values, so the policy can be computed and tested without a host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[A-Za-z0-9_.-]+")


class RdtUnavailable(Exception):
    """resctrl cannot be used on this host; the message says what is missing and what to do."""


@dataclass(frozen=True)
class CacheInfo:
    """L3 cache allocation (CAT), from info/L3 (info/L3CODE with CDP)."""

    num_closids: int
    cbm_mask: int
    min_cbm_bits: int
    shareable_bits: int
    domains: tuple[int, ...]  # L3 cache ids, from the root group's schemata
    sparse_masks: bool = False  # the CPU accepts non-contiguous masks (info/L3/sparse_masks)

    @property
    def ways(self) -> int:
        return self.cbm_mask.bit_count()


@dataclass(frozen=True)
class MbInfo:
    """Memory bandwidth allocation (MBA), from info/MB."""

    num_closids: int
    min_bandwidth: int
    bandwidth_gran: int
    delay_linear: bool
    mbps: bool  # mounted with mba_MBps: schemata MB values are MBps, not percent
    domains: tuple[int, ...]


@dataclass(frozen=True)
class MonInfo:
    """L3 monitoring (CMT/MBM), from info/L3_MON."""

    num_rmids: int
    features: frozenset[str]


@dataclass(frozen=True)
class RdtInfo:
    l3: CacheInfo | None
    mb: MbInfo | None
    mon: MonInfo | None
    cdp: bool

    @property
    def num_closids(self) -> int:
        """How many control groups (the root included) the kernel can hold: the smallest
        count over the allocation resources, as the kernel itself uses the minimum."""
        counts = [r.num_closids for r in (self.l3, self.mb) if r is not None]
        return min(counts) if counts else 0


@dataclass(frozen=True)
class RdtClassConfig:
    """What a class gets. None for a resource means "unrestricted" (all ways, 100 %), so
    a group always converges to one definite schemata whatever was there before."""

    l3_percent: int | None = None  # share of the ways (1-100), contiguous, from the low end
    l3_mask: int | None = None  # an explicit mask instead
    mb_percent: int | None = None  # MBA percent, rounded up to bandwidth_gran
    mb_mbps: int | None = None  # MBps, used only when mounted with mba_MBps


DEFAULT_CLASSES: dict[str, RdtClassConfig] = {
    "system": RdtClassConfig(l3_percent=100, mb_percent=100),
    "dedicated": RdtClassConfig(l3_percent=100, mb_percent=100),
    "shared": RdtClassConfig(l3_percent=100, mb_percent=100),
    "reclaimed": RdtClassConfig(l3_percent=30, mb_percent=30),
}


def check_token(value: str, what: str) -> str:
    """`value` if it is a plain file-name token; ValueError otherwise. Class and container
    names come from the runtime (untrusted) and become directory names under resctrl."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a plain name (only A-Z a-z 0-9 _ . -)")
    if len(value) > 200:
        raise ValueError(f"{what} {value[:20]!r}... is longer than 200 characters")
    return value
