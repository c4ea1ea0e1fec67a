"""The [reconcile] section: the drift reconciliation loop.

```toml
[reconcile]
enabled = true
period_s = 10            # one host read + comparison per period (the loop's only timer)
unknown_containers = true  # flag pod container cgroups the runtime never delivered
conflict_after = 2       # periods in a row a field drifts: another agent owns it too
max_pids = 32            # processes per container whose oom_score_adj is read
cpu_manager_state = "/var/lib/kubelet/cpu_manager_state"  # under [host] root; "" skips
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nri_plugin.policy.drift import DriftConfig

_KEYS = {
    "enabled", "period_s", "unknown_containers", "conflict_after", "max_pids",
    "cpu_manager_state",
}  # fmt: skip
DEFAULT_CPU_MANAGER_STATE = "/var/lib/kubelet/cpu_manager_state"


class ReconcileSectionError(ValueError):
    """A bad key or value; the message names it."""


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    enabled: bool = True
    period_s: float = 10.0
    unknown_containers: bool = True
    max_pids: int = 32
    cpu_manager_state: str = DEFAULT_CPU_MANAGER_STATE
    drift: DriftConfig = field(default_factory=DriftConfig)


def parse_reconcile(raw: Mapping[str, Any]) -> ReconcileSettings:
    table = raw.get("reconcile", {})
    if not isinstance(table, dict):
        raise ReconcileSectionError("[reconcile] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ReconcileSectionError(
            f"[reconcile] has no key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}"
        )
    for key in ("enabled", "unknown_containers"):
        if not isinstance(table.get(key, True), bool):
            raise ReconcileSectionError(f"[reconcile] {key} = {table[key]!r} must be true or false")
    period = table.get("period_s", 10.0)
    number = isinstance(period, int | float) and not isinstance(period, bool)
    if not number or not 0.05 <= period <= 3600:
        raise ReconcileSectionError(
            f"[reconcile] period_s = {period!r} must be a number of seconds within 0.05..3600"
        )
    ints = {}
    for key, low, default in (("conflict_after", 2, 2), ("max_pids", 1, 32)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReconcileSectionError(
                f"[reconcile] {key} = {value!r} must be an integer >= {low}"
            )
        ints[key] = value
    state = table.get("cpu_manager_state", DEFAULT_CPU_MANAGER_STATE)
    if not isinstance(state, str) or (state and not state.startswith("/")):
        raise ReconcileSectionError(
            f'[reconcile] cpu_manager_state = {state!r} must be an absolute path or ""'
        )
    # Remind of a CPU manager fight about once an hour, whatever the period.
    remind = max(1, round(3600 / period))
    return ReconcileSettings(
        enabled=table.get("enabled", True),
        period_s=float(period),
        unknown_containers=table.get("unknown_containers", True),
        max_pids=ints["max_pids"],
        cpu_manager_state=state,
        drift=DriftConfig(conflict_after=ints["conflict_after"], remind_every=remind),
    )
