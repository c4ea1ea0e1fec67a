"""The [interference] and [eviction] sections.

```toml
[interference]
enabled = true
window_ms = 500          # one signal window (the only periodic timer besides usage)
probe = "auto"           # "core" (libbpf CO-RE), "bcc", "schedstat" or "auto" (best first)
runq_ms = 2.0            # p90 wakeup->run delay above this ...
runq_relative = 4.0      # ... and above this many times the container's baseline
psi_some = 0.25          # or cpu pressure above this share of the window
windows = 3              # for this many windows in a row
clear_windows = 4
throttled_ratio = 0.2    # throttled in this share of CFS periods: its own limit
blame_min = 0.3
antagonist_share = 0.1
escalate_after_ms = 1000 # a rung gets this long before the next
relax_after_ms = 5000
cooldown_ms = 30000
cap_cores = 0.2          # CPU quota of a capped antagonist
mba_class = ""           # RDT class for throttled antagonists ("" = no such rung)

[eviction]
enabled = true
dry_run = false
burst = 1
window_ms = 60000
cooldown_ms = 30000
memory_available_min = 0.05
memory_full_psi = 0.10
owner_window_ms = 600000 # an owner that lost a pod here is not evicted from here again
holdback_ms = 30000      # after evicting a reclaimed pod, publish that much less
                         # reclaimable capacity for this long (default: cooldown_ms)
api = "auto"             # "in-cluster", "kubeconfig", "off"
kubeconfig = ""
kill_fallback = false    # kill the container's processes when the API cannot be used
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nri_plugin.policy.eviction import EvictionConfig
from nri_plugin.policy.interference import InterferenceConfig
from nri_plugin.policy.mitigation import LadderConfig
from nri_plugin.policy.protection import ProtectionConfig

PROBES = ("auto", "core", "bcc", "schedstat")
APIS = ("auto", "in-cluster", "kubeconfig", "off")


class ProtectionSectionError(ValueError):
    """A bad key or value; the message names it."""


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    enabled: bool = True
    window_s: float = 0.5
    probe: str = "auto"


@dataclass(frozen=True, slots=True)
class EvictApiSettings:
    api: str = "auto"
    kubeconfig: str = ""
    kill_fallback: bool = False
    dry_run: bool = False
    owner_window_s: float = 600.0  # the evict controller's check on real ownerReferences


@dataclass(frozen=True, slots=True)
class ProtectionSettings:
    engine: ProtectionConfig = field(default_factory=ProtectionConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    evict: EvictApiSettings = field(default_factory=EvictApiSettings)


def _number(table: Mapping[str, Any], section: str, key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ProtectionSectionError(f"[{section}] {key} = {value!r} must be a number >= 0")
    return float(value)


def _int(table: Mapping[str, Any], section: str, key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtectionSectionError(f"[{section}] {key} = {value!r} must be an integer >= 1")
    return value


def _bool(table: Mapping[str, Any], section: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ProtectionSectionError(f"[{section}] {key} = {value!r} must be true or false")
    return value


def _choice(table: Mapping[str, Any], section: str, key: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise ProtectionSectionError(
            f"[{section}] {key} = {value!r}: choose one of {list(choices)}"
        )
    return str(value)


_INTERFERENCE_KEYS = {
    "enabled", "window_ms", "probe", "runq_ms", "runq_relative", "psi_some", "windows",
    "clear_windows", "throttled_ratio", "blame_min", "antagonist_share",
    "escalate_after_ms", "relax_after_ms", "cooldown_ms", "cap_cores", "mba_class",
}  # fmt: skip
_EVICTION_KEYS = {
    "enabled", "dry_run", "burst", "window_ms", "cooldown_ms", "memory_available_min",
    "memory_full_psi", "api", "kubeconfig", "kill_fallback", "owner_window_ms",
    "holdback_ms",
}  # fmt: skip


def parse_protection(raw: Mapping[str, Any]) -> ProtectionSettings:
    i = raw.get("interference", {})
    e = raw.get("eviction", {})
    for name, table, keys in (
        ("interference", i, _INTERFERENCE_KEYS),
        ("eviction", e, _EVICTION_KEYS),
    ):
        if not isinstance(table, dict):
            raise ProtectionSectionError(f"[{name}] must be a table")
        unknown = set(table) - keys
        if unknown:
            raise ProtectionSectionError(
                f"[{name}] has no key(s) {sorted(unknown)}; allowed: {sorted(keys)}"
            )
    s = "interference"
    window = _number(i, s, "window_ms", 500) / 1000
    if not 0.05 <= window <= 60:
        raise ProtectionSectionError("[interference] window_ms must be within 50..60000")
    detection = InterferenceConfig(
        enabled=_bool(i, s, "enabled", True),
        runq_ms=_number(i, s, "runq_ms", 2.0),
        runq_relative=_number(i, s, "runq_relative", 4.0),
        psi_some=_number(i, s, "psi_some", 0.25),
        windows=_int(i, s, "windows", 3),
        clear_windows=_int(i, s, "clear_windows", 4),
        throttled_ratio=_number(i, s, "throttled_ratio", 0.2),
        blame_min=_number(i, s, "blame_min", 0.3),
        antagonist_share=_number(i, s, "antagonist_share", 0.1),
    )
    ladder = LadderConfig(
        escalate_after_s=_number(i, s, "escalate_after_ms", 1000) / 1000,
        relax_after_s=_number(i, s, "relax_after_ms", 5000) / 1000,
        cooldown_s=_number(i, s, "cooldown_ms", 30000) / 1000,
    )
    mba = i.get("mba_class", "")
    if not isinstance(mba, str):
        raise ProtectionSectionError("[interference] mba_class must be a string")
    s = "eviction"
    eviction = EvictionConfig(
        enabled=_bool(e, s, "enabled", True),
        dry_run=_bool(e, s, "dry_run", False),
        burst=_int(e, s, "burst", 1),
        window_s=_number(e, s, "window_ms", 60000) / 1000,
        cooldown_s=_number(e, s, "cooldown_ms", 30000) / 1000,
        memory_available_min=_number(e, s, "memory_available_min", 0.05),
        memory_full_psi=_number(e, s, "memory_full_psi", 0.10),
        owner_window_s=_number(e, s, "owner_window_ms", 600_000) / 1000,
        holdback_s=_number(e, s, "holdback_ms", 0) / 1000 if "holdback_ms" in e else None,
    )
    engine = ProtectionConfig(
        detection=detection,
        ladder=ladder,
        eviction=eviction,
        cap_cores=_number(i, "interference", "cap_cores", 0.2),
        mba_class=mba or None,
    )
    try:
        engine.check()
    except ValueError as exc:
        raise ProtectionSectionError(f"[interference]/[eviction]: {exc}") from None
    kubeconfig = e.get("kubeconfig", "")
    if not isinstance(kubeconfig, str):
        raise ProtectionSectionError("[eviction] kubeconfig must be a path string")
    return ProtectionSettings(
        engine=engine,
        sampling=SamplingSettings(
            enabled=detection.enabled,
            window_s=window,
            probe=_choice(i, "interference", "probe", PROBES),
        ),
        evict=EvictApiSettings(
            api=_choice(e, "eviction", "api", APIS),
            kubeconfig=kubeconfig,
            kill_fallback=_bool(e, "eviction", "kill_fallback", False),
            dry_run=eviction.dry_run,
            owner_window_s=eviction.owner_window_s,
        ),
    )
