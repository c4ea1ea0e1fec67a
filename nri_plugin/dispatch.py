"""From a decoded NRI request to a policy call and back to a protobuf reply.

Pure and synchronous: the plugin runtime runs `handle` in its policy thread under a
deadline, and uses `fail_open_reply` when the deadline passes or anything raises.
Keeping this free of asyncio makes every method's mapping testable in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import Message

from nri_plugin.policy.api import PolicyBase
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.services import Method
from nri_plugin.protocol.versions import Event, event_mask, infer_runtime, valid_event_mask
from qos_model.containers import Update
from qos_model.runtime import RuntimeInfo


@dataclass(slots=True)
class SyncCollector:
    """Accumulates split Synchronize chunks (`more=true`) until the final one."""

    pods: list[pb.PodSandbox] = field(default_factory=list)
    containers: list[pb.Container] = field(default_factory=list)
    chunks: int = 0

    def add(self, request: pb.SynchronizeRequest) -> bool:
        """Add a chunk; True when it was the last one."""
        self.pods.extend(request.pods)
        self.containers.extend(request.containers)
        self.chunks += 1
        return not request.more

    def reset(self) -> None:
        self.pods.clear()
        self.containers.clear()
        self.chunks = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: Message
    deferred: tuple[Update, ...] = ()  # for UpdateContainers after the reply is sent
    runtime: RuntimeInfo | None = None  # set by Configure
    events: int = 0  # the mask Configure subscribed to


def subscription_mask(wanted: frozenset[Event], runtime: RuntimeInfo) -> int:
    """The events to subscribe to: what the policy wants, limited to what the runtime
    knows. Never 0 (that means "everything", which makes us a validator on v0.10+)."""
    wanted = wanted - {Event.VALIDATE_CONTAINER_ADJUSTMENT}
    mask = event_mask(wanted) & valid_event_mask(runtime.nri_version)
    return mask or Event.CREATE_CONTAINER.bit


def fail_open(method: Method, request: Message | None) -> Outcome:
    """The reply that changes nothing, for when the handler was late or failed.

    Mostly an empty response of the right type, with two exceptions that keep the
    connection alive: a Synchronize chunk marked `more` must still be answered
    `more=true` (else the runtime drops us for not handling split sync), and Configure
    must still subscribe to a valid, non-zero event mask.
    """
    if isinstance(request, pb.ConfigureRequest):
        runtime = _runtime_of(request)
        mask = subscription_mask(PolicyBase().events(), runtime)
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
        policy.configure(runtime, request.config)
        mask = subscription_mask(policy.events(), runtime)
        return Outcome(pb.ConfigureResponse(events=mask), runtime=runtime, events=mask)
    if isinstance(request, pb.SynchronizeRequest):
        if not sync.add(request):
            return Outcome(pb.SynchronizeResponse(more=True))
        pods = [convert.pod_from_pb(p) for p in sync.pods]
        containers = [convert.container_from_pb(c) for c in sync.containers]
        sync.reset()
        updates = policy.synchronize(pods, containers)
        reply = pb.SynchronizeResponse()
        convert.updates_to_pb(updates, reply.update)
        return _with_deferred(policy, reply)
    if isinstance(request, pb.CreateContainerRequest):
        result = policy.create_container(
            convert.pod_from_pb(request.pod), convert.container_from_pb(request.container)
        )
        create_reply = pb.CreateContainerResponse()
        if not result.adjustment.is_empty():
            create_reply.adjust.CopyFrom(convert.adjustment_to_pb(result.adjustment))
        convert.updates_to_pb(result.updates, create_reply.update)
        return _with_deferred(policy, create_reply)
    if isinstance(request, pb.UpdateContainerRequest):
        requested = (
            convert.resources_from_pb(request.linux_resources)
            if request.HasField("linux_resources")
            else None
        )
        updates = policy.update_container(
            convert.pod_from_pb(request.pod),
            convert.container_from_pb(request.container),
            requested,
        )
        update_reply = pb.UpdateContainerResponse()
        convert.updates_to_pb(updates, update_reply.update)
        return _with_deferred(policy, update_reply)
    if isinstance(request, pb.StopContainerRequest):
        updates = policy.stop_container(
            convert.pod_from_pb(request.pod), convert.container_from_pb(request.container)
        )
        stop_reply = pb.StopContainerResponse()
        convert.updates_to_pb(updates, stop_reply.update)
        return _with_deferred(policy, stop_reply)
    if isinstance(request, pb.UpdatePodSandboxRequest):
        policy.update_pod(
            convert.pod_from_pb(request.pod),
            convert.resources_from_pb(request.overhead_linux_resources)
            if request.HasField("overhead_linux_resources")
            else None,
            convert.resources_from_pb(request.linux_resources)
            if request.HasField("linux_resources")
            else None,
        )
        return _with_deferred(policy, method.response())
    if isinstance(request, pb.StateChangeEvent):
        container_pb = request.container if request.HasField("container") else None
        notify(policy, Event(request.event), request.pod, container_pb)
        return _with_deferred(policy, method.response())
    if method.notification and method.event is not None:
        has_container = "container" in request.DESCRIPTOR.fields_by_name and request.HasField(
            "container"
        )
        notify(
            policy,
            method.event,
            request.pod,  # type: ignore[attr-defined]
            request.container if has_container else None,  # type: ignore[attr-defined]
        )
        return _with_deferred(policy, method.response())
    # Shutdown, ValidateContainerAdjustment (we never subscribe, so we accept): no-ops.
    return Outcome(method.response())


def _with_deferred(policy: PolicyBase, reply: Message) -> Outcome:
    return Outcome(reply, deferred=tuple(policy.take_deferred_updates()))


def notify(
    policy: PolicyBase, event: Event, pod_pb: pb.PodSandbox, container_pb: pb.Container | None
) -> None:
    """Deliver a pure notification, whether it came as StateChange or its own RPC."""
    pod = convert.pod_from_pb(pod_pb)
    if container_pb is None:
        pod_hooks = {
            Event.RUN_POD_SANDBOX: policy.run_pod,
            Event.STOP_POD_SANDBOX: policy.stop_pod,
            Event.REMOVE_POD_SANDBOX: policy.remove_pod,
        }
        hook = pod_hooks.get(event)  # POST_UPDATE_POD_SANDBOX adds nothing to UpdatePodSandbox
        if hook is not None:
            hook(pod)
        return
    container = convert.container_from_pb(container_pb)
    container_hooks = {
        Event.POST_CREATE_CONTAINER: policy.post_create_container,
        Event.START_CONTAINER: policy.start_container,
        Event.POST_START_CONTAINER: policy.post_start_container,
        Event.POST_UPDATE_CONTAINER: policy.post_update_container,
        Event.REMOVE_CONTAINER: policy.remove_container,
    }
    chook = container_hooks.get(event)
    if chook is not None:
        chook(pod, container)
