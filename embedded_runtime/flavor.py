"""Which real runtime the embedded runtime pretends to be, and the pure rules that follow.

A plugin that works against the embedded runtime must work against containerd and CRI-O,
so everything the three captured runtimes do differently on the wire is a field or a
derived property here: the NRI version (events, Configure fields, split sync, dedicated
notification RPCs), the ttrpc metadata containerd attaches, and the state in which each
runtime reports a container at each event (tests/data/nri-captures/*/README.md).

The functions at the bottom (registration checks, event-mask validation, which method
carries an event, which metadata a request gets) are the runtime's decisions as pure
functions, so they are unit-tested without sockets.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from enum import Enum

from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.services import NOTIFICATION_FOR_EVENT
from nri_plugin.protocol.versions import Event, valid_event_mask
from qos_model.runtime import V0_7, V0_12, NriCapabilities, NriVersion

NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"


class UpdateScope(Enum):
    """Which resource fields a runtime's update path (§6.8) really applies."""

    # containerd: converts to CRI LinuxContainerResources; zero/empty = unchanged.
    CRI = "cri"
    # CRI-O: LinuxResources.ToOCI() and an OCI runtime update; every present field.
    OCI = "oci"


@dataclass(frozen=True, slots=True)
class RuntimeFlavor:
    """One runtime release as NRI plugins see it.

    The quirk flags record observed behaviour (the captures), each with the reason the
    runtime behaves that way, so a plugin tested here meets the same states as in
    production.
    """

    label: str
    runtime_name: str  # ConfigureRequest.runtime_name, exactly as the runtime sends it
    runtime_version: str  # ConfigureRequest.runtime_version
    nri_version: NriVersion
    # ttrpc metadata added to requests (containerd's namespace), and the methods that
    # go out without it (called from contexts that carry no namespace).
    request_metadata: tuple[tuple[str, str], ...] = ()
    metadata_exempt: frozenset[str] = frozenset({"Configure", "Synchronize", "StopContainer"})
    # CRI-O runs `runc create` inside CreateContainer: the process exists (pid set) at
    # POST_CREATE_CONTAINER. containerd creates the task only in StartContainer.
    pid_from_create: bool = False
    # CRI-O reports the container as CREATED without started_at in POST_START_CONTAINER
    # and only later as RUNNING; containerd sends RUNNING with started_at.
    post_start_reports_created: bool = False
    # containerd 1.7 calls StopContainer before stopping the task (container RUNNING);
    # containerd 2.x and CRI-O call it after the stop (STOPPED, finished_at set).
    stop_event_before_stop: bool = False
    # containerd 1.7 forgets the pid of an exited task (REMOVE_CONTAINER has no pid).
    clear_pid_on_stop: bool = False
    # containerd 2.x deletes the container before REMOVE_CONTAINER: state UNKNOWN, no pid.
    remove_reports_unknown: bool = False
    # containerd 1.7 rebuilds a stopped sandbox from metadata only: annotations from the
    # OCI spec (its own `io.kubernetes.cri.` ones), cgroups path, namespaces, resources
    # and pid are gone in STOP/REMOVE_POD_SANDBOX.
    stopped_pod_loses_spec: bool = False
    spec_annotation_prefix: str = "io.kubernetes.cri."
    # containerd 2.x reports a removed sandbox without its pid.
    removed_pod_loses_pid: bool = False
    update_scope: UpdateScope = UpdateScope.CRI
    # CreateContainerResponse.update for other containers: containerd only warns when
    # applying fails, CRI-O fails the creation (§7.3).
    create_fails_on_update_error: bool = False
    # A dropped launched plugin is SIGKILLed (nri >= v0.10 removeClosedPlugins); v0.4.0
    # kills only on failed registration/Configure.
    kill_dropped_plugins: bool = True

    # --- what the NRI version implies (docs/nri-protocol.md §3-§7) ---------------

    @property
    def capabilities(self) -> NriCapabilities:
        return _capabilities(self.nri_version)

    @property
    def valid_events(self) -> int:
        return valid_event_mask(self.nri_version)

    @property
    def dedicated_notifications(self) -> bool:
        """v0.12+: per-event RPCs, StateChange only as fallback (§4.3)."""
        return self.capabilities.has_dedicated_notifications

    @property
    def has_pod_update_and_validation(self) -> bool:
        """UpdatePodSandbox / PostUpdatePodSandbox / ValidateContainerAdjustment (v0.10+)."""
        return self.capabilities.has_pod_update_events

    @property
    def configure_sends_timeouts(self) -> bool:
        return self.capabilities.has_timeouts

    @property
    def configure_sends_nri_version(self) -> bool:
        return self.nri_version >= V0_12

    @property
    def split_sync(self) -> bool:
        return self.capabilities.has_timeouts

    @property
    def syncs_launched_plugins(self) -> bool:
        """v0.4.0 never sends Synchronize to pre-installed plugins (§3.2)."""
        return self.nri_version >= V0_7

    @property
    def strict_plugin_names(self) -> bool:
        """v0.12.0 added the [a-zA-Z0-9_.+-] rule; older versions only reject ""."""
        return self.nri_version >= V0_12

    @property
    def closes_plugin_on_sync_failure(self) -> bool:
        """v0.12 closes; older versions leave the connection open but never add it."""
        return self.nri_version >= V0_12

    @property
    def container_timestamps(self) -> bool:
        """created_at/started_at/finished_at exist since v0.10.0."""
        return self.capabilities.has_container_timestamps

    @property
    def field_names_in_conflicts(self) -> bool:
        """v0.10+ names conflicting fields by the `Field` enum; v0.4 uses prose."""
        return self.capabilities.has_pod_update_events

    @property
    def applies_oom_score_adj(self) -> bool:
        return self.capabilities.applies_oom_score_adj

    @property
    def applies_pids(self) -> bool:
        return self.capabilities.applies_pids

    @property
    def applies_device_rules(self) -> bool:
        return self.capabilities.applies_device_rules

    @property
    def applies_rdt(self) -> bool:
        return self.capabilities.applies_rdt

    def metadata_for(self, method: str) -> tuple[tuple[str, str], ...]:
        if method in self.metadata_exempt:
            return ()
        return self.request_metadata

    def __str__(self) -> str:
        return f"{self.label} (NRI {self.nri_version})"


@functools.lru_cache(maxsize=32)
def _capabilities(version: NriVersion) -> NriCapabilities:
    """One value per NRI version: flavors are asked on every message they emulate."""
    return NriCapabilities(version)


_K8S_NAMESPACE = ((NAMESPACE_METADATA_KEY, "k8s.io"),)

CONTAINERD_1_7 = RuntimeFlavor(
    label="containerd 1.7.13",
    runtime_name="containerd",
    runtime_version="v1.7.13",
    nri_version=NriVersion(0, 4, 0),
    request_metadata=_K8S_NAMESPACE,
    stop_event_before_stop=True,
    clear_pid_on_stop=True,
    stopped_pod_loses_spec=True,
    kill_dropped_plugins=False,
)

CONTAINERD_2_3 = RuntimeFlavor(
    label="containerd 2.3.4",
    runtime_name="containerd",
    runtime_version="v2.3.4",
    nri_version=NriVersion(0, 12, 0),
    request_metadata=_K8S_NAMESPACE,
    remove_reports_unknown=True,
    removed_pod_loses_pid=True,
)

CRIO_1_36 = RuntimeFlavor(
    label="CRI-O 1.36.3",
    runtime_name="cri-o",
    runtime_version="1.36.3",
    nri_version=NriVersion(0, 11, 0),
    pid_from_create=True,
    post_start_reports_created=True,
    update_scope=UpdateScope.OCI,
    create_fails_on_update_error=True,
)

FLAVORS: dict[str, RuntimeFlavor] = {
    "containerd-1.7.13": CONTAINERD_1_7,
    "containerd-2.3.4": CONTAINERD_2_3,
    "cri-o-1.36.3": CRIO_1_36,
}


# --- pure decisions ----------------------------------------------------------------------

_INDEX_RE = re.compile(r"[0-9]{2}")
_NAME_RE = re.compile(r"[a-zA-Z0-9_.+-]+")


def registration_error(flavor: RuntimeFlavor, name: str, idx: str) -> str | None:
    """The error an external plugin's RegisterPlugin gets, worded as the runtime words
    it, or None when name and index are acceptable (§3.1)."""
    if not name:
        if flavor.strict_plugin_names:
            return "invalid plugin name: invalid plugin name: name is empty"
        return "invalid (empty) plugin name"
    if flavor.strict_plugin_names and not _NAME_RE.fullmatch(name):
        bad = next(ch for ch in name if not _NAME_RE.fullmatch(ch))
        return (
            f"invalid plugin name: invalid plugin name {_quote(name)}: "
            f"contains invalid character '{bad}'"
        )
    if len(idx) != 2:
        return f"invalid plugin index: invalid plugin index {_quote(idx)}, must be 2 digits"
    if not _INDEX_RE.fullmatch(idx):
        return f"invalid plugin index: invalid plugin index {_quote(idx)} (not [0-9][0-9])"
    return None


def _quote(text: str) -> str:
    """Go's %q for the strings that matter here (JSON escaping is close enough)."""
    return json.dumps(text, ensure_ascii=False)


class InvalidEventMaskError(ValueError):
    """ConfigureResponse.events has bits the runtime does not know (§5)."""


def subscribed_events(flavor: RuntimeFlavor, mask: int) -> int:
    """The event set a ConfigureResponse mask subscribes to: 0 means every valid event
    (including validation on v0.10+), bits outside the valid set make Configure fail."""
    if mask == 0:
        return flavor.valid_events
    extra = mask & ~flavor.valid_events
    if extra:  # a negative int32 prints like Go's %x: "0x-4000"
        raise InvalidEventMaskError(f"invalid plugin events: 0x{extra:x}")
    return mask


def is_subscribed(events: int, event: Event) -> bool:
    return bool(events & event.bit)


# Events that always travel as their own RPC (CreateContainer & co. since v0.4, the
# v0.10 additions since v0.10); every other event is a "notification".
_DEDICATED_ALWAYS: dict[Event, str] = {
    Event.CREATE_CONTAINER: "CreateContainer",
    Event.UPDATE_CONTAINER: "UpdateContainer",
    Event.STOP_CONTAINER: "StopContainer",
    Event.UPDATE_POD_SANDBOX: "UpdatePodSandbox",
    Event.VALIDATE_CONTAINER_ADJUSTMENT: "ValidateContainerAdjustment",
}


def method_for_event(flavor: RuntimeFlavor, event: Event, uses_state_change: bool) -> str:
    """The Plugin-service method that carries `event` to one plugin (§4.3).

    `uses_state_change` is the per-plugin memory of an earlier UNIMPLEMENTED answer to a
    dedicated notification (v0.12 falls back and sticks to StateChange).
    """
    if event in _DEDICATED_ALWAYS:
        if event in (Event.UPDATE_POD_SANDBOX, Event.VALIDATE_CONTAINER_ADJUSTMENT) and (
            not flavor.has_pod_update_and_validation
        ):
            raise ValueError(f"{flavor} has no {event.name} event")
        return _DEDICATED_ALWAYS[event]
    if event is Event.POST_UPDATE_POD_SANDBOX and not flavor.has_pod_update_and_validation:
        raise ValueError(f"{flavor} has no {event.name} event")
    if flavor.dedicated_notifications and not uses_state_change:
        return NOTIFICATION_FOR_EVENT[event].name
    return "StateChange"


def falls_back_to_state_change(flavor: RuntimeFlavor, method: str, code: int) -> bool:
    """True when an UNIMPLEMENTED answer to `method` must be retried as StateChange."""
    if not flavor.dedicated_notifications or code != Code.UNIMPLEMENTED:
        return False
    return any(m.name == method for m in NOTIFICATION_FOR_EVENT.values())


# Which event errors block the CRI call (the rest are only logged by the runtime).
BLOCKING_EVENTS = frozenset(
    {
        Event.RUN_POD_SANDBOX,
        Event.CREATE_CONTAINER,
        Event.START_CONTAINER,
        Event.UPDATE_CONTAINER,
        Event.UPDATE_POD_SANDBOX,
    }
)
