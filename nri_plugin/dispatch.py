"""From a decoded NRI request to a policy call and back to a protobuf reply.

Pure and synchronous: the plugin runtime runs `handle` in its policy thread under a
deadline, and uses `fail_open` when the deadline passes or anything raises.
Keeping this free of asyncio makes every method's mapping testable in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from nri_plugin.policy.api import PolicyBase
from nri_plugin.policy.intents import NO_INTENTS, Intents
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.services import Method
from nri_plugin.protocol.versions import Event, event_mask, infer_runtime, valid_event_mask
from qos_model.containers import Container, Pod
from qos_model.runtime import V0_4, RuntimeInfo


class SyncOverflow(Exception):
    """A split Synchronize went past a SyncCollector bound; the partial state is dropped.

    Not a policy failure: the runtime is sending more than any node has, or never ends
    the exchange. The plugin closes the connection (the runtime starts over after a
    reconnect) rather than keep accumulating. `limit` names the bound, for the metric.
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


# A runtime splits Synchronize at ~4 MiB a chunk (~2,000 containers with their pods, as
# observed), so a node of 1,000 containers fits in one chunk and 64 chunks are 100,000+
# containers; the bound keeps a runtime that never sends the last chunk to 256 MiB of
# wire data at the very most.
MAX_SYNC_CHUNKS = 64
MAX_SYNC_OBJECTS = 200_000  # pods + containers of one (split) Synchronize


@dataclass(slots=True)
class SyncCollector:
    """Accumulates split Synchronize chunks (`more=true`) until the final one, within
    bounds: at most `max_chunks` chunks and `max_objects` pods + containers in all."""

    pods: list[pb.PodSandbox] = field(default_factory=list)
    containers: list[pb.Container] = field(default_factory=list)
    chunks: int = 0
    max_chunks: int = MAX_SYNC_CHUNKS
    max_objects: int = MAX_SYNC_OBJECTS

    def add(self, request: pb.SynchronizeRequest) -> bool:
        """Add a chunk; True when it was the last one. Raises SyncOverflow (after
        dropping what was collected) when the chunk would exceed a bound."""
        chunks = self.chunks + 1
        objects = (
            len(self.pods) + len(self.containers) + len(request.pods) + len(request.containers)
        )
        if chunks > self.max_chunks:
            self.reset()
            raise SyncOverflow(
                "sync_chunks",
                f"split Synchronize went past {self.max_chunks} chunks without a final one",
            )
        if objects > self.max_objects:
            self.reset()
            raise SyncOverflow(
                "sync_objects",
                f"split Synchronize went past {self.max_objects} pods and containers "
                f"({objects} after chunk {chunks})",
            )
        self.pods.extend(request.pods)
        self.containers.extend(request.containers)
        self.chunks = chunks
        return not request.more

    def reset(self) -> None:
        self.pods.clear()
        self.containers.clear()
        self.chunks = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: Message
    intents: Intents = NO_INTENTS  # what is carried out after the reply is written
    runtime: RuntimeInfo | None = None  # set by Configure
    events: int = 0  # the mask Configure subscribed to


# Which hook of PolicyBase handles which event: the subscription is derived from the hooks
# a policy overrides (containerd's stub does the same), so it cannot drift from the code.
HOOK_EVENTS: dict[str, Event] = {
    "run_pod": Event.RUN_POD_SANDBOX,
    "stop_pod": Event.STOP_POD_SANDBOX,
    "remove_pod": Event.REMOVE_POD_SANDBOX,
    "update_pod": Event.UPDATE_POD_SANDBOX,
    "create_container": Event.CREATE_CONTAINER,
    "post_create_container": Event.POST_CREATE_CONTAINER,
    "start_container": Event.START_CONTAINER,
    "post_start_container": Event.POST_START_CONTAINER,
    "update_container": Event.UPDATE_CONTAINER,
    "post_update_container": Event.POST_UPDATE_CONTAINER,
    "stop_container": Event.STOP_CONTAINER,
    "remove_container": Event.REMOVE_CONTAINER,
}


def wanted_events(policy: PolicyBase, runtime: RuntimeInfo | None = None) -> frozenset[Event]:
    """The events whose hooks `policy` overrides, minus those it says it does not need
    with `runtime` (each subscribed event is a round trip the runtime makes)."""
    cls = type(policy)
    unneeded = policy.unneeded_hooks(runtime) if runtime is not None else frozenset()
    return frozenset(
        event
        for hook, event in HOOK_EVENTS.items()
        if getattr(cls, hook) is not getattr(PolicyBase, hook) and hook not in unneeded
    )


def subscription_mask(wanted: frozenset[Event], runtime: RuntimeInfo) -> int:
    """The events to subscribe to: what the policy wants, limited to what the runtime
    knows. Never 0 (that means "everything", which makes us a validator on v0.10+)."""
    wanted = wanted - {Event.VALIDATE_CONTAINER_ADJUSTMENT}
    mask = event_mask(wanted) & valid_event_mask(runtime.nri_version)
    return mask or Event.CREATE_CONTAINER.bit


# Who we say is on the other end when its ConfigureRequest could not be decoded: the
# oldest NRI we support, so the subscription below is one every runtime accepts.
UNKNOWN_RUNTIME = RuntimeInfo(
    "unknown",
    "unknown",
    V0_4,
    "the ConfigureRequest could not be decoded; assuming the oldest supported NRI",
)


def fail_open(method: Method, request: Message | None, policy: PolicyBase) -> Outcome:
    """The reply that changes nothing, for when the handler was late or failed, or the
    request could not be decoded (`request` None).

    Mostly an empty response of the right type, with two exceptions that keep the
    connection alive: a Synchronize chunk marked `more` must still be answered
    `more=true` (else the runtime drops us for not handling split sync), and Configure
    must still subscribe to the policy's valid, non-zero event mask (0 would mean every
    event, and make us a validator on NRI v0.10+). Configure also names the runtime, so
    the session counts as configured: the runtime goes on to send events either way.
    """
    if method.response is pb.ConfigureResponse:
        if isinstance(request, pb.ConfigureRequest):
            runtime = _runtime_of(request)
        else:
            runtime = UNKNOWN_RUNTIME
        mask = subscription_mask(wanted_events(policy, runtime), runtime)
        return Outcome(pb.ConfigureResponse(events=mask), runtime=runtime, events=mask)
    reply = method.response()
    if isinstance(reply, pb.SynchronizeResponse) and isinstance(request, pb.SynchronizeRequest):
        reply.more = request.more
    return Outcome(reply)


def _runtime_of(request: pb.ConfigureRequest) -> RuntimeInfo:
    return infer_runtime(
        request.runtime_name,
        request.runtime_version,
        request.NRI_version,
        has_timeouts=request.registration_timeout > 0 or request.request_timeout > 0,
    )


def handle(policy: PolicyBase, method: Method, request: Message, sync: SyncCollector) -> Outcome:
    """Call the policy for one request and build the reply."""
    if isinstance(request, pb.ConfigureRequest):
        runtime = _runtime_of(request)
        intents = policy.configure(runtime, request.config)
        mask = subscription_mask(wanted_events(policy, runtime), runtime)
        return Outcome(pb.ConfigureResponse(events=mask), intents, runtime=runtime, events=mask)
    if isinstance(request, pb.SynchronizeRequest):
        if not sync.add(request):
            return Outcome(pb.SynchronizeResponse(more=True))
        pods = [convert.pod_for_policy(p) for p in sync.pods]
        containers = [convert.container_for_policy(c) for c in sync.containers]
        sync.reset()
        intents = policy.synchronize(pods, containers)
        reply = pb.SynchronizeResponse()
        convert.updates_to_pb(intents.reply_updates, reply.update)
        return Outcome(reply, intents)
    if isinstance(request, pb.CreateContainerRequest):
        intents = policy.create_container(
            convert.pod_for_policy(request.pod), convert.container_for_policy(request.container)
        )
        create_reply = pb.CreateContainerResponse()
        adjustment = intents.adjustment
        if adjustment is not None and not adjustment.is_empty():
            convert.adjustment_to_pb(adjustment, create_reply.adjust)
            create_reply.adjust.SetInParent()
        convert.updates_to_pb(intents.reply_updates, create_reply.update)
        return Outcome(create_reply, intents)
    if isinstance(request, pb.UpdateContainerRequest):
        requested = (
            convert.resources_for_policy(request.linux_resources)
            if request.HasField("linux_resources")
            else None
        )
        intents = policy.update_container(
            convert.pod_for_policy(request.pod),
            convert.container_for_policy(request.container),
            requested,
        )
        update_reply = pb.UpdateContainerResponse()
        convert.updates_to_pb(intents.reply_updates, update_reply.update)
        return Outcome(update_reply, intents)
    if isinstance(request, pb.StopContainerRequest):
        intents = policy.stop_container(
            convert.pod_for_policy(request.pod), convert.container_for_policy(request.container)
        )
        stop_reply = pb.StopContainerResponse()
        convert.updates_to_pb(intents.reply_updates, stop_reply.update)
        return Outcome(stop_reply, intents)
    if isinstance(request, pb.UpdatePodSandboxRequest):
        intents = policy.update_pod(
            convert.pod_for_policy(request.pod),
            convert.resources_from_pb(request.overhead_linux_resources)
            if request.HasField("overhead_linux_resources")
            else None,
            convert.resources_from_pb(request.linux_resources)
            if request.HasField("linux_resources")
            else None,
        )
        return Outcome(method.response(), intents)
    if isinstance(request, pb.StateChangeEvent):
        try:
            event = Event(request.event)
        except ValueError:  # a newer runtime's event, or garbage: nothing we act on
            return Outcome(method.response())
        container_pb = request.container if request.HasField("container") else None
        intents = notify(policy, event, request.pod, container_pb)
        return Outcome(method.response(), intents)
    if method.notification and method.event is not None:
        has_container = "container" in request.DESCRIPTOR.fields_by_name and request.HasField(
            "container"
        )
        intents = notify(
            policy,
            method.event,
            request.pod,  # type: ignore[attr-defined]
            request.container if has_container else None,  # type: ignore[attr-defined]
        )
        return Outcome(method.response(), intents)
    # Shutdown, ValidateContainerAdjustment (we never subscribe, so we accept): no-ops.
    return Outcome(method.response())


def notify(
    policy: PolicyBase, event: Event, pod_pb: pb.PodSandbox, container_pb: pb.Container | None
) -> Intents:
    """Deliver a pure notification, whether it came as StateChange or its own RPC."""
    pod = convert.pod_for_policy(pod_pb)
    if container_pb is None:
        name = _POD_HOOKS.get(event)  # POST_UPDATE_POD_SANDBOX adds nothing to UpdatePodSandbox
        if name is None:
            return NO_INTENTS
        hook: Callable[[Pod], Intents] = getattr(policy, name)
        return hook(pod)
    container = convert.container_for_policy(container_pb)
    name = _CONTAINER_HOOKS.get(event)
    if name is None:
        return NO_INTENTS
    chook: Callable[[Pod, Container], Intents] = getattr(policy, name)
    return chook(pod, container)


# The hook of each notification (by name: looked up on the policy per call, no dict of
# bound methods built for each request).
_POD_HOOKS: dict[Event, str] = {
    Event.RUN_POD_SANDBOX: "run_pod",
    Event.STOP_POD_SANDBOX: "stop_pod",
    Event.REMOVE_POD_SANDBOX: "remove_pod",
}
_CONTAINER_HOOKS: dict[Event, str] = {
    Event.POST_CREATE_CONTAINER: "post_create_container",
    Event.START_CONTAINER: "start_container",
    Event.POST_START_CONTAINER: "post_start_container",
    Event.POST_UPDATE_CONTAINER: "post_update_container",
    Event.REMOVE_CONTAINER: "remove_container",
}
