"""Class config -> resctrl schemata lines, and the schemata text format both ways.

Pure functions: the masks and percentages are computed the way the kernel validates them
(ctrlmondata.c), so an impossible config fails here with a sentence, before any write.
"""

from __future__ import annotations

from isolation.rdt.model import CacheInfo, MbInfo, RdtClassConfig, RdtInfo

Schemata = dict[str, dict[int, str]]

# The kernel's "no limit" for MB in mba_MBps mode (MBA_MAX_MBPS, U32_MAX).
MBPS_UNLIMITED = 0xFFFFFFFF


def is_cache_resource(name: str) -> bool:
    """L3, L3CODE, L3DATA, L2...: values are hex bit masks; everything else is decimal."""
    return name.startswith(("L3", "L2"))


def value_of(resource: str, text: str) -> int:
    """The number a schemata value stands for (the kernel pads masks with zeros and MB
    values with spaces, so compare numbers, not text)."""
    return int(text.strip(), 16 if is_cache_resource(resource) else 10)


def _contiguous(mask: int) -> bool:
    low = mask & -mask
    return mask != 0 and (mask + low) & mask == 0


def _first_run(mask: int) -> int:
    """Length of the lowest run of 1-bits (what the kernel checks against min_cbm_bits)."""
    if mask == 0:
        return 0
    shifted = mask >> ((mask & -mask).bit_length() - 1)
    return (~shifted & (shifted + 1)).bit_length() - 1


def l3_mask(cache: CacheInfo, config: RdtClassConfig) -> int:
    """The cache bit mask for the class; ValueError for what the kernel would refuse."""
    if config.l3_percent is not None and config.l3_mask is not None:
        raise ValueError("give l3_percent or l3_mask, not both")
    full = cache.cbm_mask
    if config.l3_mask is not None:
        mask = config.l3_mask
        if mask <= 0 or mask & ~full:
            raise ValueError(f"L3 mask {mask:x} is not within cbm_mask {full:x}")
        if not cache.sparse_masks and not _contiguous(mask):
            raise ValueError(
                f"L3 mask {mask:x} has non-consecutive 1-bits (this CPU needs contiguous ways)"
            )
        if _first_run(mask) < cache.min_cbm_bits:
            raise ValueError(
                f"L3 mask {mask:x} has fewer than min_cbm_bits={cache.min_cbm_bits} ways"
            )
        return mask
    percent = 100 if config.l3_percent is None else config.l3_percent
    if not 1 <= percent <= 100:
        raise ValueError(f"l3_percent {percent} is not within 1-100")
    ways = cache.ways
    if ways < max(cache.min_cbm_bits, 1):
        raise ValueError(f"cbm_mask {full:x} has fewer ways than min_cbm_bits")
    want = max((ways * percent + 50) // 100, cache.min_cbm_bits, 1)
    # Take the lowest `want` bits that cbm_mask has (it is contiguous on every known CPU).
    mask, bit = 0, 0
    while want:
        if full >> bit & 1:
            mask |= 1 << bit
            want -= 1
        bit += 1
    if not cache.sparse_masks and not _contiguous(mask):
        raise ValueError(f"cbm_mask {full:x} has a hole: cannot take contiguous ways")
    return mask


def mb_value(mb: MbInfo, config: RdtClassConfig) -> int:
    """The schemata MB value: a percent rounded up to the granularity (as the kernel
    would), or MBps when mounted with mba_MBps (unlimited when no mb_mbps is given: a
    percent means nothing to the software controller)."""
    if mb.mbps:
        if config.mb_mbps is None:
            return MBPS_UNLIMITED
        if not 1 <= config.mb_mbps <= MBPS_UNLIMITED:
            raise ValueError(f"mb_mbps {config.mb_mbps} is not within 1-{MBPS_UNLIMITED}")
        return config.mb_mbps
    percent = 100 if config.mb_percent is None else config.mb_percent
    if not 1 <= percent <= 100:
        raise ValueError(f"mb_percent {percent} is not within 1-100")
    gran = max(mb.bandwidth_gran, 1)
    rounded = -(-max(percent, mb.min_bandwidth) // gran) * gran
    return min(rounded, 100)


def schemata_for(info: RdtInfo, config: RdtClassConfig) -> Schemata:
    """{"L3": {cache_id: "hexmask"}, "MB": {cache_id: "30"}} for the resources this host
    has (L3CODE and L3DATA with the same mask under CDP). Raises ValueError, with a
    sentence, for a config the kernel would refuse."""
    out: Schemata = {}
    if info.l3 is not None:
        mask = f"{l3_mask(info.l3, config):x}"
        for name in ("L3CODE", "L3DATA") if info.cdp else ("L3",):
            out[name] = dict.fromkeys(info.l3.domains, mask)
    if info.mb is not None:
        out["MB"] = dict.fromkeys(info.mb.domains, str(mb_value(info.mb, config)))
    return out


def format_schemata(lines: Schemata) -> str:
    """The text to write: one line per resource, domains in id order, trailing newline
    (the kernel refuses a schemata write without one)."""
    return "".join(
        f"{name}:" + ";".join(f"{d}={v}" for d, v in sorted(domains.items())) + "\n"
        for name, domains in lines.items()
    )


def parse_schemata(text: str) -> Schemata:
    """Read a schemata file. Tolerates any line order and the kernel's padding (names
    right-aligned, MB values space-padded); ValueError for a line it cannot read."""
    out: Schemata = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"schemata line {raw!r} has no 'resource:' prefix")
        domains: dict[int, str] = {}
        for token in rest.split(";"):
            if not token.strip():
                continue
            dom, eq, value = token.partition("=")
            if not eq or not dom.strip().isdigit() or not value.strip():
                raise ValueError(f"schemata line {raw!r}: {token.strip()!r} is not id=value")
            domains[int(dom)] = value.strip()
        out[name] = domains
    return out


def differing(current: Schemata, wanted: Schemata) -> Schemata:
    """The lines of `wanted` whose values differ from `current` (numerically)."""
    out: Schemata = {}
    for name, domains in wanted.items():
        have = current.get(name, {})
        try:
            same = all(
                d in have and value_of(name, have[d]) == value_of(name, v)
                for d, v in domains.items()
            )
        except ValueError:  # unreadable current value: rewrite it
            same = False
        if not same:
            out[name] = domains
    return out
