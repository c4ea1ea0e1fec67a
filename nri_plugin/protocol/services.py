"""The two NRI ttrpc services as data: method name -> request/response message types.

Both the plugin runtime and the embedded runtime dispatch through these tables, and the
capture tests use them to decode every recorded message, so a method added here is
immediately covered everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.errors import RemoteProtocolError
from nri_plugin.protocol.versions import Event

PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    request: type[Message]
    response: type[Message]
    # The lifecycle event this call delivers, if any (None for Configure/Synchronize/...).
    event: Event | None = None
    # True for the v0.12 per-event notifications that fall back to StateChange.
    notification: bool = False

    @property
    def reply_is_fixed(self) -> bool:
        """The response message has no fields: the reply is the same whatever the
        policy decides (StateChange, every notification, UpdatePodSandbox, Shutdown), so
        it can be written before the policy runs."""
        return not self.response.DESCRIPTOR.fields


def _methods(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


PLUGIN_METHODS: dict[str, Method] = _methods(
    Method("Configure", pb.ConfigureRequest, pb.ConfigureResponse),
    Method("Synchronize", pb.SynchronizeRequest, pb.SynchronizeResponse),
    Method("Shutdown", pb.Empty, pb.Empty),
    Method(
        "CreateContainer",
        pb.CreateContainerRequest,
        pb.CreateContainerResponse,
        Event.CREATE_CONTAINER,
    ),
    Method(
        "UpdateContainer",
        pb.UpdateContainerRequest,
        pb.UpdateContainerResponse,
        Event.UPDATE_CONTAINER,
    ),
    Method(
        "StopContainer",
        pb.StopContainerRequest,
        pb.StopContainerResponse,
        Event.STOP_CONTAINER,
    ),
    Method("StateChange", pb.StateChangeEvent, pb.Empty),
    Method(
        "UpdatePodSandbox",
        pb.UpdatePodSandboxRequest,
        pb.UpdatePodSandboxResponse,
        Event.UPDATE_POD_SANDBOX,
    ),
    Method(
        "ValidateContainerAdjustment",
        pb.ValidateContainerAdjustmentRequest,
        pb.ValidateContainerAdjustmentResponse,
        Event.VALIDATE_CONTAINER_ADJUSTMENT,
    ),
    Method(
        "RunPodSandbox",
        pb.RunPodSandboxRequest,
        pb.RunPodSandboxResponse,
        Event.RUN_POD_SANDBOX,
        notification=True,
    ),
    Method(
        "PostUpdatePodSandbox",
        pb.PostUpdatePodSandboxRequest,
        pb.PostUpdatePodSandboxResponse,
        Event.POST_UPDATE_POD_SANDBOX,
        notification=True,
    ),
    Method(
        "StopPodSandbox",
        pb.StopPodSandboxRequest,
        pb.StopPodSandboxResponse,
        Event.STOP_POD_SANDBOX,
        notification=True,
    ),
    Method(
        "RemovePodSandbox",
        pb.RemovePodSandboxRequest,
        pb.RemovePodSandboxResponse,
        Event.REMOVE_POD_SANDBOX,
        notification=True,
    ),
    Method(
        "PostCreateContainer",
        pb.PostCreateContainerRequest,
        pb.PostCreateContainerResponse,
        Event.POST_CREATE_CONTAINER,
        notification=True,
    ),
    Method(
        "StartContainer",
        pb.StartContainerRequest,
        pb.StartContainerResponse,
        Event.START_CONTAINER,
        notification=True,
    ),
    Method(
        "PostStartContainer",
        pb.PostStartContainerRequest,
        pb.PostStartContainerResponse,
        Event.POST_START_CONTAINER,
        notification=True,
    ),
    Method(
        "PostUpdateContainer",
        pb.PostUpdateContainerRequest,
        pb.PostUpdateContainerResponse,
        Event.POST_UPDATE_CONTAINER,
        notification=True,
    ),
    Method(
        "RemoveContainer",
        pb.RemoveContainerRequest,
        pb.RemoveContainerResponse,
        Event.REMOVE_CONTAINER,
        notification=True,
    ),
)

RUNTIME_METHODS: dict[str, Method] = _methods(
    Method("RegisterPlugin", pb.RegisterPluginRequest, pb.Empty),
    Method("UpdateContainers", pb.UpdateContainersRequest, pb.UpdateContainersResponse),
)

SERVICES: dict[str, dict[str, Method]] = {
    PLUGIN_SERVICE: PLUGIN_METHODS,
    RUNTIME_SERVICE: RUNTIME_METHODS,
}

# Event -> the v0.12 notification method that carries it (the rest come as StateChange).
NOTIFICATION_FOR_EVENT: dict[Event, Method] = {
    m.event: m for m in PLUGIN_METHODS.values() if m.notification and m.event is not None
}


def lookup(service: str, method: str) -> Method | None:
    return SERVICES.get(service, {}).get(method)


def decode(message_type: type[Message], payload: bytes, what: str) -> Message:
    """Parse a payload, turning protobuf's DecodeError into a protocol error that names
    the call (the caller answers INVALID_ARGUMENT and keeps the connection)."""
    msg = message_type()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise RemoteProtocolError(
            f"{what}: payload is not a valid {message_type.__name__}"
        ) from exc
    return msg
