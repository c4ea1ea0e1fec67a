"""Relaying lifecycle events to the plugins and merging their answers.

Every event goes to the subscribed, ready plugins in idx order, one after the other, by
the dedicated v0.12 RPC or StateChange (the per-plugin fallback after UNIMPLEMENTED
included). A dropped plugin counts as having answered nothing; an error status stops the
relay and is raised. CreateContainer adjustments are merged with NRI's ownership rules
and put to the validators; UpdateContainer and StopContainer replies are collected into
container updates. The caller (`EmbeddedRuntime`) holds the runtime's lock.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import Message

from embedded_runtime.errors import (
    AdjustmentError,
    PluginFailedOperationError,
    ValidationRejectedError,
)
from embedded_runtime.flavor import falls_back_to_state_change, is_subscribed, method_for_event
from embedded_runtime.merge import CreateMerge, CreateResult, Owners, UpdateCollector
from embedded_runtime.plugins import ConnectedPlugin, Reply, call, code_name
from embedded_runtime.records import parse
from embedded_runtime.runtime_state import RuntimeState, log
from embedded_runtime.state import ContainerRecord, container_view, create_request_view
from embedded_runtime.validator import VALIDATOR_NAME, required_plugins_rejection
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol import services
from nri_plugin.protocol.errors import Code, RemoteProtocolError
from nri_plugin.protocol.versions import Event


class EventRelay:
    def __init__(self, state: RuntimeState) -> None:
        self._state = state

    def owners(self) -> Owners:
        return Owners(legacy_messages=not self._state.flavor.field_names_in_conflicts)

    # --- notifications -------------------------------------------------------------------

    async def notify(
        self, event: Event, pod: pb.PodSandbox, container: pb.Container | None = None
    ) -> None:
        """Relay a notification to every subscribed plugin; the first error status
        stops the relay and is raised (NRI's loop returns it to the runtime)."""
        for plugin in self._state.subscribed(event):
            await self.event_call(plugin, event, notification(event, pod, container))

    async def notify_logged(
        self, event: Event, pod: pb.PodSandbox, container: pb.Container | None = None
    ) -> None:
        """A notification whose errors the runtime only logs (Post*, Stop*, Remove*)."""
        try:
            await self.notify(event, pod, container)
        except PluginFailedOperationError as exc:
            log.warning("%s: %s", event.name, exc)

    # --- events with answers -------------------------------------------------------------

    async def collect_adjustments(
        self, pod_msg: pb.PodSandbox, rec: ContainerRecord
    ) -> tuple[pb.Container, CreateMerge, list[ConnectedPlugin]]:
        """CreateContainer through every subscribed plugin; returns the request's
        container before any plugin changed it (what validators get), the merge and
        the plugins that took part."""
        request_ctr = create_request_view(rec)
        pristine = pb.Container()
        pristine.CopyFrom(request_ctr)
        merge = CreateMerge(request_ctr, self._state.flavor)
        plugins = self._state.active()
        for plugin in plugins:
            if not is_subscribed(plugin.events, Event.CREATE_CONTAINER):
                continue
            request = pb.CreateContainerRequest(pod=pod_msg, container=request_ctr)
            reply = await self.event_call(plugin, Event.CREATE_CONTAINER, request)
            if reply is None:
                continue
            response = decode_reply(plugin, "CreateContainer", reply)
            assert isinstance(response, pb.CreateContainerResponse)
            plugin.counters.evictions_ignored += len(response.evict)
            merge.apply(plugin.full_name, response)
        for note in merge.ignored:
            log.warning("container %s: adjustment ignored: %s", rec.id, note)
        return pristine, merge, plugins

    async def validate(
        self,
        pod_msg: pb.PodSandbox,
        pristine: pb.Container,
        result: CreateResult,
        plugins: list[ConnectedPlugin],
    ) -> None:
        if not self._state.flavor.has_pod_update_and_validation:
            return
        builtin = self._state.default_validator
        if builtin is not None and builtin.enable:
            # the built-in validator runs beside the plugins; any rejection fails creation
            present = [(p.name, p.idx) for p in plugins]
            why = required_plugins_rejection(builtin, pod_msg.annotations, pristine.name, present)
            if why is not None:
                raise ValidationRejectedError(
                    VALIDATOR_NAME,
                    f'validator "{VALIDATOR_NAME}" rejected container adjustment, reason: {why}',
                )
        validators = [
            p
            for p in self._state.active()
            if is_subscribed(p.events, Event.VALIDATE_CONTAINER_ADJUSTMENT)
        ]
        if not validators:
            return
        request = pb.ValidateContainerAdjustmentRequest(pod=pod_msg, container=pristine)
        request.adjust.CopyFrom(result.adjust)
        request.update.extend(result.updates)
        request.owners.CopyFrom(result.owners)
        for plugin in plugins:
            request.plugins.add(name=plugin.name, index=plugin.idx)
        outcomes = await asyncio.gather(*(self._validate_one(p, request) for p in validators))
        for failure in outcomes:
            if failure is not None:
                raise failure

    async def _validate_one(
        self, plugin: ConnectedPlugin, request: pb.ValidateContainerAdjustmentRequest
    ) -> ValidationRejectedError | None:
        method = "ValidateContainerAdjustment"
        deadline = asyncio.get_running_loop().time() + self._state.request_timeout
        reply = await self._call(plugin, method, request, deadline)
        if reply is None:
            return ValidationRejectedError(
                plugin.full_name,
                f"validator plugin {plugin.full_name} failed: {plugin.conn.close_reason}",
            )
        if reply.code != Code.OK:
            return ValidationRejectedError(
                plugin.full_name,
                f"validator plugin {plugin.full_name} failed: {code_name(reply.code)}: "
                f"{reply.message}",
            )
        response = parse(pb.ValidateContainerAdjustmentResponse, reply.payload)
        if not isinstance(response, pb.ValidateContainerAdjustmentResponse):
            return ValidationRejectedError(
                plugin.full_name, f"validator plugin {plugin.full_name} sent an invalid reply"
            )
        if response.reject:
            reason = response.reason or "unknown rejection reason"
            return ValidationRejectedError(
                plugin.full_name,
                f'validator "{plugin.full_name}" rejected container adjustment, reason: {reason}',
            )
        return None

    async def update_container(
        self,
        pod_msg: pb.PodSandbox,
        rec: ContainerRecord,
        container_id: str,
        requested: pb.LinuxResources,
    ) -> UpdateCollector:
        """UpdateContainer through every subscribed plugin; their entries for the
        container are folded into `requested`, the others are in the collector."""
        collector = UpdateCollector(self.owners(), target_id=container_id, requested=requested)
        ctr_msg = container_view(rec, self._state.flavor)
        for plugin in self._state.subscribed(Event.UPDATE_CONTAINER):
            request = pb.UpdateContainerRequest(pod=pod_msg, container=ctr_msg)
            request.linux_resources.CopyFrom(requested)
            reply = await self.event_call(plugin, Event.UPDATE_CONTAINER, request)
            if reply is None:
                continue
            response = decode_reply(plugin, "UpdateContainer", reply)
            assert isinstance(response, pb.UpdateContainerResponse)
            plugin.counters.evictions_ignored += len(response.evict)
            collector.add(plugin.full_name, response.update)
        return collector

    async def update_pod_sandbox(self, request: pb.UpdatePodSandboxRequest) -> None:
        for plugin in self._state.subscribed(Event.UPDATE_POD_SANDBOX):
            await self.event_call(plugin, Event.UPDATE_POD_SANDBOX, request)

    async def stop_container(
        self, pod_msg: pb.PodSandbox, rec: ContainerRecord
    ) -> list[pb.ContainerUpdate]:
        """StopContainer through every subscribed plugin; returns the updates they ask
        for (none when the event failed)."""
        collector = UpdateCollector(self.owners())
        ctr_msg = container_view(rec, self._state.flavor)
        try:
            for plugin in self._state.subscribed(Event.STOP_CONTAINER):
                request = pb.StopContainerRequest(pod=pod_msg, container=ctr_msg)
                reply = await self.event_call(plugin, Event.STOP_CONTAINER, request)
                if reply is None:
                    continue
                response = decode_reply(plugin, "StopContainer", reply)
                assert isinstance(response, pb.StopContainerResponse)
                collector.add(plugin.full_name, response.update)
        except (PluginFailedOperationError, AdjustmentError) as exc:
            # The runtime only logs a failed StopContainer; the stop goes on, the
            # plugins' updates are lost with the failed event.
            log.warning("StopContainer of %s: %s", rec.id, exc)
            return []
        return collector.updates

    # --- one event to one plugin ---------------------------------------------------------

    async def event_call(
        self, plugin: ConnectedPlugin, event: Event, request: Message
    ) -> Reply | None:
        """Deliver one event to one plugin. Returns its reply, None when the plugin was
        dropped (timeout, closed: the operation continues as if it had answered
        nothing); raises PluginFailedOperationError on an error status."""
        deadline = asyncio.get_running_loop().time() + self._state.request_timeout
        method = method_for_event(self._state.flavor, event, plugin.uses_state_change)
        note = ""
        if method == "StateChange":
            note = event.name
            if not isinstance(request, pb.StateChangeEvent):
                request = state_change(event, request)
        reply = await self._call(plugin, method, request, deadline, note)
        if reply is not None and falls_back_to_state_change(self._state.flavor, method, reply.code):
            plugin.uses_state_change = True
            plugin.counters.state_change_fallbacks += 1
            log.warning(
                "plugin %s uses deprecated StateChange instead of a dedicated %s RPC call",
                plugin.full_name,
                method,
            )
            method = "StateChange"
            note = f"{event.name}, re-sent after UNIMPLEMENTED"
            reply = await self._call(plugin, method, state_change(event, request), deadline, note)
        if reply is not None and reply.code != Code.OK:
            raise PluginFailedOperationError(plugin.full_name, method, reply.code, reply.message)
        return reply

    async def _call(
        self,
        plugin: ConnectedPlugin,
        method: str,
        request: Message,
        deadline: float,
        note: str = "",
    ) -> Reply | None:
        state = self._state
        return await call(
            plugin, method, request, deadline, note, flavor=state.flavor, exchanges=state.log
        )


def decode_reply(plugin: ConnectedPlugin, method: str, reply: Reply) -> Message:
    spec = services.PLUGIN_METHODS[method]
    try:
        return services.decode(spec.response, reply.payload, method)
    except RemoteProtocolError as exc:
        raise PluginFailedOperationError(plugin.full_name, method, Code.INTERNAL, str(exc)) from exc


# --- message builders --------------------------------------------------------------------


def notification(event: Event, pod: pb.PodSandbox, container: pb.Container | None) -> Message:
    """The dedicated v0.12 request for a notification (converted to StateChange by the
    caller when the plugin or the runtime needs that)."""
    spec = services.NOTIFICATION_FOR_EVENT.get(event)
    if spec is None:
        return state_change_event(event, pod, container)
    msg = spec.request()
    msg.pod.CopyFrom(pod)  # type: ignore[attr-defined]
    if container is not None:
        msg.container.CopyFrom(container)  # type: ignore[attr-defined]
    return msg


def state_change(event: Event, request: Message) -> pb.StateChangeEvent:
    pod = getattr(request, "pod", None)
    container = None
    if request.DESCRIPTOR.fields_by_name.get("container") is not None and request.HasField(
        "container"
    ):
        container = request.container  # type: ignore[attr-defined]
    return state_change_event(event, pod, container)


def state_change_event(
    event: Event, pod: pb.PodSandbox | None, container: pb.Container | None
) -> pb.StateChangeEvent:
    msg = pb.StateChangeEvent(event=int(event))  # type: ignore[arg-type]
    if pod is not None:
        msg.pod.CopyFrom(pod)
    if container is not None:
        msg.container.CopyFrom(container)
    return msg
