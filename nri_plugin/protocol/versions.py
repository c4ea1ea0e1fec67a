"""Which NRI version a runtime speaks, and which events it lets a plugin subscribe to.

Getting this wrong is fatal in both directions: a mask with a bit the runtime does not
know makes Configure fail ("invalid plugin events"), and a mask of 0 subscribes to
everything, which on NRI >= v0.10 turns the plugin into a validator that fails every
container creation unless it implements ValidateContainerAdjustment.

The runtime -> NRI table is docs/protocol.md §0 (from each runtime's go.mod). What each NRI
version can do is `qos_model.runtime.NriCapabilities`, shared with the engine.
"""

from __future__ import annotations

from enum import IntEnum

from qos_model.runtime import (
    V0_4,
    V0_7,
    V0_12,
    NriCapabilities,
    NriVersion,
    RuntimeInfo,
    parse_version,
)


class Event(IntEnum):
    RUN_POD_SANDBOX = 1
    STOP_POD_SANDBOX = 2
    REMOVE_POD_SANDBOX = 3
    CREATE_CONTAINER = 4
    POST_CREATE_CONTAINER = 5
    START_CONTAINER = 6
    POST_START_CONTAINER = 7
    UPDATE_CONTAINER = 8
    POST_UPDATE_CONTAINER = 9
    STOP_CONTAINER = 10
    REMOVE_CONTAINER = 11
    UPDATE_POD_SANDBOX = 12
    POST_UPDATE_POD_SANDBOX = 13
    VALIDATE_CONTAINER_ADJUSTMENT = 14

    @property
    def bit(self) -> int:
        return 1 << (self.value - 1)


def event_mask(events: set[Event] | frozenset[Event]) -> int:
    mask = 0
    for event in events:
        mask |= event.bit
    return mask


# Events before v0.10 (UPDATE_POD_SANDBOX and later did not exist).
VALID_EVENTS_LEGACY = 0x7FF
VALID_EVENTS_V0_10 = 0x3FFF

# (first runtime release, NRI version it ships), ascending; a release maps to the entry
# with the greatest first release not above it, within the same major.minor family.
_CONTAINERD: tuple[tuple[NriVersion, NriVersion], ...] = (
    (NriVersion(1, 7, 0), NriVersion(0, 3, 0)),
    (NriVersion(1, 7, 7), NriVersion(0, 4, 0)),
    (NriVersion(1, 7, 14), NriVersion(0, 6, 0)),
    (NriVersion(1, 7, 16), NriVersion(0, 6, 1)),
    (NriVersion(1, 7, 26), NriVersion(0, 8, 0)),
    (NriVersion(2, 0, 0), NriVersion(0, 8, 0)),
    (NriVersion(2, 2, 0), NriVersion(0, 10, 0)),
    (NriVersion(2, 2, 1), NriVersion(0, 11, 0)),
    (NriVersion(2, 3, 0), NriVersion(0, 12, 0)),
)
_CRIO: tuple[tuple[NriVersion, NriVersion], ...] = (
    (NriVersion(1, 26, 0), NriVersion(0, 2, 0)),
    (NriVersion(1, 26, 2), NriVersion(0, 3, 0)),
    (NriVersion(1, 29, 0), NriVersion(0, 5, 0)),
    (NriVersion(1, 29, 2), NriVersion(0, 6, 0)),
    (NriVersion(1, 31, 0), NriVersion(0, 6, 1)),
    (NriVersion(1, 32, 0), NriVersion(0, 9, 0)),
    (NriVersion(1, 33, 0), NriVersion(0, 9, 1)),
    (NriVersion(1, 34, 0), NriVersion(0, 10, 0)),
    (NriVersion(1, 35, 0), NriVersion(0, 11, 0)),
)
_RUNTIME_TABLES = {"containerd": _CONTAINERD, "cri-o": _CRIO, "crio": _CRIO}


def valid_event_mask(nri_version: NriVersion) -> int:
    """Every event bit a runtime of this NRI version accepts in a subscription."""
    if NriCapabilities(nri_version).has_pod_update_events:
        return VALID_EVENTS_V0_10
    return VALID_EVENTS_LEGACY


def infer_runtime(
    runtime_name: str, runtime_version: str, nri_version: str, has_timeouts: bool
) -> RuntimeInfo:
    """Decide the runtime's NRI version from the ConfigureRequest fields.

    `NRI_version` (v0.12+) wins when it parses; a development build may send
    "0.0.0-unknown", which still proves v0.12+. Otherwise the runtime's own version is
    looked up; the presence of the timeouts (v0.7+) is the last clue.
    """
    floor = V0_7 if has_timeouts else None
    if nri_version:
        parsed = parse_version(nri_version)
        if parsed is not None and parsed >= V0_4:
            return RuntimeInfo(runtime_name, runtime_version, parsed, "NRI_version field")
        floor = V0_12  # the field exists only since v0.12
    table = _RUNTIME_TABLES.get(runtime_name.lower())
    runtime = parse_version(runtime_version)
    if table is not None and runtime is not None:
        found = _lookup(table, runtime)
        if found is not None:
            if floor is not None and found < floor:
                found = floor
            return RuntimeInfo(
                runtime_name, runtime_version, found, f"{runtime_name} {runtime_version} table"
            )
    if floor == V0_12:
        reason = "unparsable NRI_version, which only v0.12+ sends"
    elif floor is not None:
        reason = "unknown runtime; timeouts present, so at least v0.7"
    else:
        reason = "unknown runtime and no version clues; assuming v0.4"
    return RuntimeInfo(runtime_name, runtime_version, floor or V0_4, reason)


def _lookup(
    table: tuple[tuple[NriVersion, NriVersion], ...], runtime: NriVersion
) -> NriVersion | None:
    """NRI version of the newest table entry at or below `runtime`, if any."""
    found = None
    for first, nri in table:
        if first <= runtime:
            found = nri
    return found
