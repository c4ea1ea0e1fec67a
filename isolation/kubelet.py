"""The kubelet's CPU manager checkpoint, read: which policy the kubelet runs.

``/var/lib/kubelet/cpu_manager_state`` (under the host root) is JSON written by the
kubelet's CPU manager (pkg/kubelet/cm/cpumanager/state/checkpoint.go), e.g.
``{"policyName":"static","defaultCpuSet":"0,2-12","entries":{"<pod uid>":
{"<container>":"1,13"}},"checksum":1552716370}``; with the default policy it says
``"policyName":"none"``. A "static" policy means the kubelet assigns cpusets itself and
will fight any other agent that does. Read-only and cheap (one small file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CPU_MANAGER_STATE = Path("var/lib/kubelet/cpu_manager_state")
MAX_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class CpuManagerState:
    """The checkpoint as read: the policy, the shared set, how many exclusive grants."""

    policy: str  # "static", "none", ... as written
    default_cpuset: str
    exclusive: int  # containers holding exclusive CPUs


def read_cpu_manager_state(root: Path, path: Path = CPU_MANAGER_STATE) -> CpuManagerState | None:
    """The checkpoint under `root`, or None when it is absent, unreadable or not the
    checkpoint's format (nothing can be concluded then)."""
    file = root / path
    try:
        with file.open("rb") as f:
            data = json.loads(f.read(MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("policyName"), str):
        return None
    entries = data.get("entries")
    exclusive = 0
    if isinstance(entries, dict):
        exclusive = sum(len(v) for v in entries.values() if isinstance(v, dict))
    default = data.get("defaultCpuSet")
    return CpuManagerState(
        policy=data["policyName"],
        default_cpuset=default if isinstance(default, str) else "",
        exclusive=exclusive,
    )
