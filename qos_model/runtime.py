"""Which NRI version a runtime speaks, and what that version lets a plugin do — said once.

The plugin side (`nri_plugin.protocol.versions.infer_runtime` builds a `RuntimeInfo` from
Configure), the engine (which asks whether the runtime applies an oom_score_adj adjustment)
and the embedded runtime (which behaves like a given NRI release) all read these
capabilities here, so a rule such as "oom_score_adj in an adjustment exists since v0.7"
cannot drift between them. The runtime -> NRI version table itself is protocol knowledge
and stays in `nri_plugin.protocol.versions`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True, slots=True)
class NriVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}"


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> NriVersion | None:
    """Leading "vX.Y[.Z]" of a version string; None when there is none (e.g. "devel")."""
    match = _VERSION_RE.match(text.strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return NriVersion(int(major), int(minor), int(patch or 0))


V0_4 = NriVersion(0, 4, 0)
V0_7 = NriVersion(0, 7, 0)
V0_10 = NriVersion(0, 10, 0)
V0_11 = NriVersion(0, 11, 0)
V0_12 = NriVersion(0, 12, 0)


@dataclass(frozen=True, slots=True)
class NriCapabilities:
    """What a runtime of a given NRI version does with what a plugin sends (and sends it).

    Each flag names the NRI release that introduced it (docs/nri-protocol.md §3-§7). The
    flags are worked out once, from `version`, when the value is made: the engine reads
    one on every container event, and a comparison of two versions is a call into
    Python each time."""

    version: NriVersion
    # ContainerAdjustment.linux.oom_score_adj reaches the container (v0.7).
    applies_oom_score_adj: bool = field(init=False, repr=False)
    applies_pids: bool = field(init=False, repr=False)  # v0.7
    applies_device_rules: bool = field(init=False, repr=False)  # v0.10
    # The LinuxRdt adjustment (clos_id, schemata, monitoring) (v0.11).
    applies_rdt: bool = field(init=False, repr=False)
    # Configure carries registration/request timeouts; Synchronize may be split (v0.7).
    has_timeouts: bool = field(init=False, repr=False)
    # UpdatePodSandbox / PostUpdatePodSandbox / ValidateContainerAdjustment (v0.10).
    has_pod_update_events: bool = field(init=False, repr=False)
    # created_at / started_at / finished_at in Container (v0.10).
    has_container_timestamps: bool = field(init=False, repr=False)
    # Per-event notification RPCs, StateChange only as the fallback (v0.12).
    has_dedicated_notifications: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        v = self.version
        flags = {
            "applies_oom_score_adj": v >= V0_7,
            "applies_pids": v >= V0_7,
            "applies_device_rules": v >= V0_10,
            "applies_rdt": v >= V0_11,
            "has_timeouts": v >= V0_7,
            "has_pod_update_events": v >= V0_10,
            "has_container_timestamps": v >= V0_10,
            "has_dedicated_notifications": v >= V0_12,
        }
        for name, value in flags.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """The runtime on the other end of the connection, as Configure revealed it."""

    name: str
    version: str
    nri_version: NriVersion  # best estimate, never above what the runtime speaks
    reason: str  # how it was decided, for logs and the debug API
    # what that NRI version lets a plugin do; made with the value (read on every event)
    capabilities: NriCapabilities = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "capabilities", NriCapabilities(self.nri_version))
