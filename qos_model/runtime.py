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
from dataclasses import dataclass


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

    Each flag names the NRI release that introduced it (docs/nri-protocol.md §3-§7)."""

    version: NriVersion

    @property
    def applies_oom_score_adj(self) -> bool:
        """ContainerAdjustment.linux.oom_score_adj reaches the container (v0.7)."""
        return self.version >= V0_7

    @property
    def applies_pids(self) -> bool:
        return self.version >= V0_7

    @property
    def applies_device_rules(self) -> bool:
        return self.version >= V0_10

    @property
    def applies_rdt(self) -> bool:
        """The LinuxRdt adjustment (clos_id, schemata, monitoring) (v0.11)."""
        return self.version >= V0_11

    @property
    def has_timeouts(self) -> bool:
        """Configure carries registration/request timeouts; Synchronize may be split (v0.7)."""
        return self.version >= V0_7

    @property
    def has_pod_update_events(self) -> bool:
        """UpdatePodSandbox / PostUpdatePodSandbox / ValidateContainerAdjustment (v0.10)."""
        return self.version >= V0_10

    @property
    def has_container_timestamps(self) -> bool:
        """created_at / started_at / finished_at in Container (v0.10)."""
        return self.version >= V0_10

    @property
    def has_dedicated_notifications(self) -> bool:
        """Per-event notification RPCs, StateChange only as the fallback (v0.12)."""
        return self.version >= V0_12


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """The runtime on the other end of the connection, as Configure revealed it."""

    name: str
    version: str
    nri_version: NriVersion  # best estimate, never above what the runtime speaks
    reason: str  # how it was decided, for logs and the debug API

    @property
    def capabilities(self) -> NriCapabilities:
        """Read on every container event: one per version, made once."""
        found = _CAPABILITIES.get(self.nri_version)
        if found is None:
            found = _CAPABILITIES[self.nri_version] = NriCapabilities(self.nri_version)
        return found


# A handful of NRI versions ever exist in one process; the values are frozen.
_CAPABILITIES: dict[NriVersion, NriCapabilities] = {}
