"""An NRI runtime in Python: the containerd/CRI-O side of the protocol, for tests, the
benchmarks and `nri-qos lab`.

It behaves like the runtime its `RuntimeFlavor` names (shared/docs/nri-protocol.md and
the captures in shared/nri-captures): one-at-a-time accept loop with a registration
timeout; Configure, event-mask validation and (split) Synchronize; every lifecycle event
relayed to the subscribed plugins in idx order, sequentially, under one lock; request
timeouts that drop a plugin while the operation carries on; error statuses that block
the operation or are only logged depending on the event; CreateContainer adjustments
merged with NRI's ownership rules and applied with the runtime's rules; validators;
the v0.12 StateChange fallback; and UpdateContainers served under the same lock, which
reproduces the deadlock a plugin walks into when it calls UpdateContainers from inside
an event handler.

Decisions live in pure modules (`flavor`, `merge`, `sync`, `state`); this module wires
them to `connection.PluginConnection`, the only code that touches sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from nri_plugin import model
from nri_plugin.embedded.backend import ContainerBackend, InMemoryBackend
from nri_plugin.embedded.connection import CallResult, CallStatus, PluginConnection
from nri_plugin.embedded.errors import (
    AdjustmentError,
    BackendError,
    EmbeddedRuntimeError,
    InvalidOperationError,
    PluginFailedOperationError,
    UnknownObjectError,
    ValidationRejectedError,
)
from nri_plugin.embedded.flavor import (
    CONTAINERD_2_3,
    InvalidEventMaskError,
    RuntimeFlavor,
    falls_back_to_state_change,
    is_subscribed,
    method_for_event,
    registration_error,
    subscribed_events,
)
from nri_plugin.embedded.launch import LaunchedProcess, plugin_environment, spawn_plugin
from nri_plugin.embedded.merge import (
    CreateMerge,
    CreateResult,
    Owners,
    UpdateCollector,
    apply_adjustment,
)
from nri_plugin.embedded.merge import apply_update as apply_resource_update
from nri_plugin.embedded.records import (
    TO_PLUGIN,
    TO_RUNTIME,
    CounterSet,
    ExchangeRecord,
    Outcome,
    PluginInfo,
    PluginState,
    parse,
)
from nri_plugin.embedded.state import (
    ContainerRecord,
    Moment,
    PodRecord,
    cgroups_path_for,
    container_model,
    container_spec,
    container_view,
    create_request_view,
    pod_view,
)
from nri_plugin.embedded.sync import SyncError, SyncSplitter
from nri_plugin.model import ContainerState
from nri_plugin.protocol import convert, services
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.connection import RequestReceived
from nri_plugin.protocol.errors import Code, RemoteProtocolError
from nri_plugin.protocol.services import PLUGIN_SERVICE, RUNTIME_SERVICE
from nri_plugin.protocol.versions import Event

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Plugin:
    seq: int
    conn: PluginConnection
    external: bool
    registered: asyncio.Future[str | None]  # None = accepted, else the refusal
    name: str = ""
    idx: str = ""
    config: str = ""
    process: LaunchedProcess | None = None
    events: int = 0
    state: PluginState = PluginState.CONNECTED
    nri_version: str = ""
    uses_state_change: bool = False
    counters: CounterSet = field(default_factory=CounterSet)

    @property
    def full_name(self) -> str:
        return f"{self.idx or '??'}-{self.name or 'plugin'}"  # Go's naming before registration

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self.conn.peer_pid

    def info(self) -> PluginInfo:
        return PluginInfo(
            name=self.name,
            idx=self.idx,
            events=self.events,
            pid=self.pid,
            state=self.state,
            external=self.external,
            nri_version=self.nri_version,
            uses_state_change=self.uses_state_change,
            close_reason=self.conn.close_reason,
            counters=self.counters.frozen(),
        )


@dataclass(frozen=True, slots=True)
class _Reply:
    code: int
    message: str
    payload: bytes


class EmbeddedRuntime:
    def __init__(
        self,
        socket_path: Path,
        *,
        flavor: RuntimeFlavor = CONTAINERD_2_3,
        request_timeout: float = 2.0,
        registration_timeout: float = 5.0,
        backend: ContainerBackend | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.flavor = flavor
        self.request_timeout = request_timeout
        self.registration_timeout = registration_timeout
        self.backend: ContainerBackend = backend if backend is not None else InMemoryBackend()
        self.log: list[ExchangeRecord] = []
        self._lock = asyncio.Lock()  # NRI's runtime-wide lock: one event at a time
        self._plugins: list[_Plugin] = []
        self._by_conn: dict[PluginConnection, _Plugin] = {}
        self._pods: dict[str, PodRecord] = {}
        self._containers: dict[str, ContainerRecord] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._seq = 0

    # --- public state --------------------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every plugin connection so far, in invocation (idx) order."""
        return [p.info() for p in sorted(self._plugins, key=lambda p: (p.idx, p.seq))]

    @property
    def pods(self) -> dict[str, model.Pod]:
        return {pid: convert.pod_from_pb(pod_view(r, self.flavor)) for pid, r in self._pods.items()}

    @property
    def containers(self) -> dict[str, model.Container]:
        return {cid: container_model(r, self.flavor) for cid, r in self._containers.items()}

    # --- lifecycle of the runtime --------------------------------------------------------

    async def start(self) -> None:
        """Listen on the socket (re-created, parent made with mode 0700), accept plugins."""
        if self._listener is not None:
            raise InvalidOperationError("runtime already started")
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(16)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_loop(), name="nri-accept")

    async def stop(self) -> None:
        """Close every plugin connection and the listener; remove the socket. Launched
        plugins are killed (the real runtimes never send Shutdown)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        for task in list(self._tasks):
            task.cancel()
        for plugin in self._plugins:
            plugin.conn.close(plugin.conn.close_reason or "runtime stopped")
            if plugin.process is not None:
                plugin.process.kill()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for plugin in self._plugins:
            await plugin.conn.wait_closed()
            if plugin.process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(plugin.process.wait(), 5.0)

    async def __aenter__(self) -> EmbeddedRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def launch_plugin(
        self,
        argv: Sequence[str],
        name: str,
        idx: str,
        config: str = "",
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start a pre-installed plugin: fd 3 = socketpair end, environment = only
        NRI_PLUGIN_NAME/IDX/SOCKET (+ `env`, for tests). Name and index come from here,
        not from its RegisterPlugin. Returns once the process runs; registration,
        Configure and (v0.7+) Synchronize proceed in the background."""
        refusal = registration_error(self.flavor, name, idx)
        if refusal is not None:  # the runtime's discovery refuses such an `NN-name` file
            raise InvalidOperationError(f"cannot launch plugin {idx}-{name}: {refusal}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = spawn_plugin(argv, plugin_environment(name, idx, env), theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        plugin = await self._new_plugin(ours, external=False)
        plugin.name, plugin.idx, plugin.config, plugin.process = name, idx, config, process
        self._spawn(self._bring_up(plugin))

    async def wait_for_plugins(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` plugins are registered, configured and synchronized."""
        try:
            async with asyncio.timeout(timeout):
                while sum(p.state is PluginState.READY for p in self._plugins) < count:
                    event = self._changed
                    await event.wait()
        except TimeoutError:
            states = ", ".join(f"{p.full_name}: {p.state.value}" for p in self._plugins)
            raise TimeoutError(
                f"{count} ready plugin(s) expected within {timeout}s; have {states or 'none'}"
            ) from None

    # --- pod and container lifecycle (the CRI calls) -------------------------------------

    async def run_pod_sandbox(self, pod: model.Pod | pb.PodSandbox) -> None:
        spec = _pod_pb(pod)
        if not spec.id:
            raise InvalidOperationError("a pod needs an id")
        async with self._lock:
            if spec.id in self._pods:
                raise InvalidOperationError(f"pod {spec.id!r} already exists")
            rec = PodRecord(spec)
            self._pods[spec.id] = rec
            try:
                await self._notify(Event.RUN_POD_SANDBOX, pod_view(rec, self.flavor))
            except PluginFailedOperationError:
                del self._pods[spec.id]
                raise

    async def create_container(
        self, pod_id: str, container: model.Container | pb.Container
    ) -> model.Container:
        """Create a container; returns it as created, with the plugins' adjustments."""
        async with self._lock:
            pod = self._pod(pod_id)
            if pod.stopped:
                raise InvalidOperationError(f"pod {pod_id!r} is stopped")
            spec = container_spec(_container_pb(container), pod_id)
            if not spec.id:
                raise InvalidOperationError("a container needs an id")
            if not spec.linux.cgroups_path and pod.spec.linux.cgroup_parent:
                # containerd composes it from the sandbox's parent before relaying the event
                spec.linux.cgroups_path = cgroups_path_for(pod.spec.linux.cgroup_parent, spec.id)
            if spec.id in self._containers:
                raise InvalidOperationError(f"container {spec.id!r} already exists")
            rec = ContainerRecord(spec)
            pod_msg = pod_view(pod, self.flavor)
            pristine, merge, plugins = await self._collect_adjustments(pod_msg, rec)
            result = merge.result()
            await self._validate(pod_msg, pristine, result, plugins)
            changes = apply_adjustment(rec.spec, result.adjust, self.flavor)
            if changes.blockio_class is not None:
                rec.blockio_class = changes.blockio_class or None
            if changes.rdt_class is not None:
                rec.rdt_class = changes.rdt_class or None
            _, failed = await self._apply_updates(result.updates)
            if failed and self.flavor.create_fails_on_update_error:
                raise AdjustmentError(
                    f"failed to update containers {', '.join(failed)} requested during the "
                    f"creation of {rec.id}"
                )
            pid = await self._backend("create", rec)
            rec.state = ContainerState.CREATED
            rec.created_at = time.time_ns()
            rec.process_pid = pid or 0
            if self.flavor.pid_from_create:
                rec.pid = rec.process_pid
            self._containers[rec.id] = rec
            await self._notify_logged(
                Event.POST_CREATE_CONTAINER, pod_msg, container_view(rec, self.flavor)
            )
            return container_model(rec, self.flavor)

    async def start_container(self, container_id: str) -> None:
        async with self._lock:
            rec = self._container(container_id)
            if rec.state is not ContainerState.CREATED:
                raise InvalidOperationError(
                    f"container {container_id!r} is {rec.state.name}, not CREATED"
                )
            pod_msg = pod_view(self._pod(rec.spec.pod_sandbox_id), self.flavor)
            rec.pid = rec.process_pid  # the task exists now (containerd creates it here)
            try:
                await self._notify(Event.START_CONTAINER, pod_msg, container_view(rec, self.flavor))
            except PluginFailedOperationError:
                if not self.flavor.pid_from_create:
                    rec.pid = 0
                raise
            pid = await self._backend("start", rec)
            if pid:
                rec.pid = rec.process_pid = pid
            rec.state = ContainerState.RUNNING
            rec.started_at = time.time_ns()
            await self._notify_logged(
                Event.POST_START_CONTAINER,
                pod_msg,
                container_view(rec, self.flavor, Moment.POST_START),
            )

    async def update_container(
        self, container_id: str, resources: model.Resources
    ) -> model.Container:
        """UpdateContainerResources: plugins may change the requested resources."""
        async with self._lock:
            rec = self._container(container_id)
            pod_msg = pod_view(self._pod(rec.spec.pod_sandbox_id), self.flavor)
            requested = convert.resources_to_pb(resources)
            requested.memory.SetInParent()
            requested.cpu.SetInParent()
            collector = UpdateCollector(self._owners(), target_id=container_id, requested=requested)
            ctr_msg = container_view(rec, self.flavor)
            for plugin in self._subscribed(Event.UPDATE_CONTAINER):
                request = pb.UpdateContainerRequest(pod=pod_msg, container=ctr_msg)
                request.linux_resources.CopyFrom(requested)
                reply = await self._event_call(plugin, Event.UPDATE_CONTAINER, request)
                if reply is None:
                    continue
                response = self._decode_reply(plugin, "UpdateContainer", reply)
                assert isinstance(response, pb.UpdateContainerResponse)
                plugin.counters.evictions_ignored += len(response.evict)
                collector.add(plugin.full_name, response.update)
            new = pb.LinuxResources()
            new.CopyFrom(rec.spec.linux.resources)
            apply_resource_update(new, requested, self.flavor.update_scope)
            old = pb.LinuxResources()
            old.CopyFrom(rec.spec.linux.resources)
            rec.spec.linux.resources.CopyFrom(new)
            try:
                await self._backend("update", rec)
            except BackendError:
                rec.spec.linux.resources.CopyFrom(old)
                raise
            await self._apply_updates(collector.updates)
            await self._notify_logged(
                Event.POST_UPDATE_CONTAINER, pod_msg, container_view(rec, self.flavor)
            )
            return container_model(rec, self.flavor)

    async def stop_container(self, container_id: str) -> None:
        async with self._lock:
            await self._stop_locked(self._container(container_id))

    async def remove_container(self, container_id: str) -> None:
        async with self._lock:
            rec = self._container(container_id)
            if not rec.exited:
                await self._stop_locked(rec)
            await self._remove_locked(rec)

    async def stop_pod_sandbox(self, pod_id: str) -> None:
        async with self._lock:
            await self._stop_pod_locked(self._pod(pod_id))

    async def remove_pod_sandbox(self, pod_id: str) -> None:
        async with self._lock:
            rec = self._pod(pod_id)
            await self._stop_pod_locked(rec)
            for ctr in self._pod_containers(pod_id):
                await self._remove_locked(ctr)
            pod_msg = pod_view(rec, self.flavor, removing=True)
            del self._pods[pod_id]
            await self._notify_logged(Event.REMOVE_POD_SANDBOX, pod_msg)

    async def update_pod_sandbox(
        self, pod_id: str, overhead: model.Resources | None, resources: model.Resources | None
    ) -> None:
        """UpdatePodSandboxResources (NRI v0.10+: containerd 2.2+, CRI-O 1.34+)."""
        if not self.flavor.has_pod_update_and_validation:
            raise InvalidOperationError(
                f"{self.flavor} has no UpdatePodSandbox event (needs NRI v0.10 or newer)"
            )
        async with self._lock:
            rec = self._pod(pod_id)
            request = pb.UpdatePodSandboxRequest(pod=pod_view(rec, self.flavor))
            if overhead is not None:
                convert.resources_to_pb(overhead, request.overhead_linux_resources)
                request.overhead_linux_resources.SetInParent()
            if resources is not None:
                convert.resources_to_pb(resources, request.linux_resources)
                request.linux_resources.SetInParent()
            for plugin in self._subscribed(Event.UPDATE_POD_SANDBOX):
                await self._event_call(plugin, Event.UPDATE_POD_SANDBOX, request)
            if overhead is not None:
                rec.spec.linux.pod_overhead.CopyFrom(request.overhead_linux_resources)
            if resources is not None:
                rec.spec.linux.pod_resources.CopyFrom(request.linux_resources)
            await self._notify_logged(Event.POST_UPDATE_POD_SANDBOX, pod_view(rec, self.flavor))

    # --- lifecycle internals (lock held) -------------------------------------------------

    async def _stop_locked(self, rec: ContainerRecord) -> None:
        if rec.exited:
            return  # CRI StopContainer is idempotent; no second event
        pod_msg = pod_view(self._pod(rec.spec.pod_sandbox_id), self.flavor)
        if self.flavor.stop_event_before_stop:
            updates = await self._stop_event(pod_msg, rec)
            await self._stop_process(rec)
        else:
            await self._stop_process(rec)
            updates = await self._stop_event(pod_msg, rec)
        await self._apply_updates(updates)

    async def _stop_process(self, rec: ContainerRecord) -> None:
        rec.exit_code = int(await self._backend("stop", rec) or 0)
        rec.state = ContainerState.STOPPED
        rec.finished_at = time.time_ns()
        if self.flavor.clear_pid_on_stop:
            rec.pid = 0

    async def _stop_event(
        self, pod_msg: pb.PodSandbox, rec: ContainerRecord
    ) -> list[pb.ContainerUpdate]:
        collector = UpdateCollector(self._owners())
        ctr_msg = container_view(rec, self.flavor)
        try:
            for plugin in self._subscribed(Event.STOP_CONTAINER):
                request = pb.StopContainerRequest(pod=pod_msg, container=ctr_msg)
                reply = await self._event_call(plugin, Event.STOP_CONTAINER, request)
                if reply is None:
                    continue
                response = self._decode_reply(plugin, "StopContainer", reply)
                assert isinstance(response, pb.StopContainerResponse)
                collector.add(plugin.full_name, response.update)
        except (PluginFailedOperationError, AdjustmentError) as exc:
            # The runtime only logs a failed StopContainer; the stop goes on, the
            # plugins' updates are lost with the failed event.
            log.warning("StopContainer of %s: %s", rec.id, exc)
            return []
        return collector.updates

    async def _remove_locked(self, rec: ContainerRecord) -> None:
        pod_msg = pod_view(self._pod(rec.spec.pod_sandbox_id), self.flavor)
        ctr_msg = container_view(rec, self.flavor, Moment.REMOVE)
        await self._backend("remove", rec)
        del self._containers[rec.id]
        await self._notify_logged(Event.REMOVE_CONTAINER, pod_msg, ctr_msg)

    async def _stop_pod_locked(self, rec: PodRecord) -> None:
        if rec.stopped:
            return
        for ctr in self._pod_containers(rec.spec.id):
            await self._stop_locked(ctr)
        rec.stopped = True
        await self._notify_logged(Event.STOP_POD_SANDBOX, pod_view(rec, self.flavor))

    async def _collect_adjustments(
        self, pod_msg: pb.PodSandbox, rec: ContainerRecord
    ) -> tuple[pb.Container, CreateMerge, list[_Plugin]]:
        """CreateContainer through every subscribed plugin; returns the request's
        container before any plugin changed it (what validators get), the merge and
        the plugins that took part."""
        request_ctr = create_request_view(rec)
        pristine = pb.Container()
        pristine.CopyFrom(request_ctr)
        merge = CreateMerge(request_ctr, self.flavor)
        plugins = self._active()
        for plugin in plugins:
            if not is_subscribed(plugin.events, Event.CREATE_CONTAINER):
                continue
            request = pb.CreateContainerRequest(pod=pod_msg, container=request_ctr)
            reply = await self._event_call(plugin, Event.CREATE_CONTAINER, request)
            if reply is None:
                continue
            response = self._decode_reply(plugin, "CreateContainer", reply)
            assert isinstance(response, pb.CreateContainerResponse)
            plugin.counters.evictions_ignored += len(response.evict)
            merge.apply(plugin.full_name, response)
        for note in merge.ignored:
            log.warning("container %s: adjustment ignored: %s", rec.id, note)
        return pristine, merge, plugins

    async def _validate(
        self,
        pod_msg: pb.PodSandbox,
        pristine: pb.Container,
        result: CreateResult,
        plugins: list[_Plugin],
    ) -> None:
        if not self.flavor.has_pod_update_and_validation:
            return
        validators = [
            p
            for p in self._active()
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
        self, plugin: _Plugin, request: pb.ValidateContainerAdjustmentRequest
    ) -> ValidationRejectedError | None:
        method = "ValidateContainerAdjustment"
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        reply = await self._call(plugin, method, request, deadline)
        if reply is None:
            return ValidationRejectedError(
                plugin.full_name,
                f"validator plugin {plugin.full_name} failed: {plugin.conn.close_reason}",
            )
        if reply.code != Code.OK:
            return ValidationRejectedError(
                plugin.full_name,
                f"validator plugin {plugin.full_name} failed: {_code_name(reply.code)}: "
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

    async def _apply_updates(self, updates: Iterable[pb.ContainerUpdate]) -> tuple[int, list[str]]:
        """Apply container updates through the runtime's update path (§6.8); unknown
        and exited containers are skipped. Returns how many were applied and the ids
        whose update failed without ignore_failure."""
        applied = 0
        failed = []
        for upd in updates:
            rec = self._containers.get(upd.container_id)
            if rec is None or rec.exited or not upd.linux.HasField("resources"):
                continue
            old = pb.LinuxResources()
            old.CopyFrom(rec.spec.linux.resources)
            apply_resource_update(
                rec.spec.linux.resources, upd.linux.resources, self.flavor.update_scope
            )
            try:
                await self._backend("update", rec)
            except BackendError as exc:
                rec.spec.linux.resources.CopyFrom(old)
                log.warning("update of %s failed: %s", upd.container_id, exc)
                if not upd.ignore_failure:
                    failed.append(upd.container_id)
            else:
                applied += 1
        return applied, failed

    async def _backend(self, operation: str, rec: ContainerRecord) -> int | None:
        ctr = container_model(rec, self.flavor)
        try:
            if operation == "create":
                return await self.backend.create(ctr)
            if operation == "start":
                return await self.backend.start(ctr)
            if operation == "update":
                await self.backend.update(ctr)
                return None
            if operation == "stop":
                return await self.backend.stop(ctr)
            await self.backend.remove(ctr)
            return None
        except EmbeddedRuntimeError:
            raise
        except Exception as exc:
            raise BackendError(f"backend {operation} of {rec.id} failed: {exc}") from exc

    # --- relaying events -----------------------------------------------------------------

    def _active(self) -> list[_Plugin]:
        ready = [p for p in self._plugins if p.state is PluginState.READY]
        return sorted(ready, key=lambda p: p.idx)

    def _subscribed(self, event: Event) -> list[_Plugin]:
        return [p for p in self._active() if is_subscribed(p.events, event)]

    def _owners(self) -> Owners:
        return Owners(legacy_messages=not self.flavor.field_names_in_conflicts)

    async def _notify(
        self, event: Event, pod: pb.PodSandbox, container: pb.Container | None = None
    ) -> None:
        """Relay a notification to every subscribed plugin; the first error status
        stops the relay and is raised (NRI's loop returns it to the runtime)."""
        for plugin in self._subscribed(event):
            await self._event_call(plugin, event, _notification(event, pod, container))

    async def _notify_logged(
        self, event: Event, pod: pb.PodSandbox, container: pb.Container | None = None
    ) -> None:
        """A notification whose errors the runtime only logs (Post*, Stop*, Remove*)."""
        try:
            await self._notify(event, pod, container)
        except PluginFailedOperationError as exc:
            log.warning("%s: %s", event.name, exc)

    async def _event_call(self, plugin: _Plugin, event: Event, request: Message) -> _Reply | None:
        """Deliver one event to one plugin. Returns its reply, None when the plugin was
        dropped (timeout, closed: the operation continues as if it had answered
        nothing); raises PluginFailedOperationError on an error status."""
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        method = method_for_event(self.flavor, event, plugin.uses_state_change)
        note = ""
        if method == "StateChange":
            note = event.name
            if not isinstance(request, pb.StateChangeEvent):
                request = _state_change(event, request)
        reply = await self._call(plugin, method, request, deadline, note)
        if reply is not None and falls_back_to_state_change(self.flavor, method, reply.code):
            plugin.uses_state_change = True
            plugin.counters.state_change_fallbacks += 1
            log.warning(
                "plugin %s uses deprecated StateChange instead of a dedicated %s RPC call",
                plugin.full_name,
                method,
            )
            method = "StateChange"
            note = f"{event.name}, re-sent after UNIMPLEMENTED"
            reply = await self._call(plugin, method, _state_change(event, request), deadline, note)
        if reply is not None and reply.code != Code.OK:
            raise PluginFailedOperationError(plugin.full_name, method, reply.code, reply.message)
        return reply

    def _decode_reply(self, plugin: _Plugin, method: str, reply: _Reply) -> Message:
        spec = services.PLUGIN_METHODS[method]
        try:
            return services.decode(spec.response, reply.payload, method)
        except RemoteProtocolError as exc:
            raise PluginFailedOperationError(
                plugin.full_name, method, Code.INTERNAL, str(exc)
            ) from exc

    async def _call(
        self, plugin: _Plugin, method: str, request: Message, deadline: float, note: str = ""
    ) -> _Reply | None:
        """One runtime -> plugin call, logged. None = fatal (the plugin was dropped)."""
        loop = asyncio.get_running_loop()
        payload = request.SerializeToString()
        metadata = self.flavor.metadata_for(method)
        started = loop.time()
        plugin.counters.requests += 1
        result = await plugin.conn.call(PLUGIN_SERVICE, method, payload, deadline, metadata)
        latency = loop.time() - started
        self._record_call(plugin, method, payload, metadata, result, latency, note)
        if result.status is CallStatus.REPLIED:
            assert result.reply is not None
            if result.reply.code != Code.OK:
                plugin.counters.errors += 1
            return _Reply(result.reply.code, result.reply.message, result.reply.payload)
        if result.status is CallStatus.NOT_SENT:
            # Go's client refuses > 4 MiB with RESOURCE_EXHAUSTED: a plain error, not fatal.
            return _Reply(Code.RESOURCE_EXHAUSTED, result.detail, b"")
        if result.status is CallStatus.TIMEOUT:
            plugin.counters.timeouts += 1
        self._drop(plugin, f"failed to handle {method} request: {result.status.value}")
        return None

    def _record_call(
        self,
        plugin: _Plugin,
        method: str,
        payload: bytes,
        metadata: tuple[tuple[str, str], ...],
        result: CallResult,
        latency: float,
        note: str = "",
    ) -> None:
        outcome = {
            CallStatus.TIMEOUT: Outcome.TIMEOUT,
            CallStatus.CLOSED: Outcome.CLOSED,
            CallStatus.NOT_SENT: Outcome.NOT_SENT,
        }.get(result.status, Outcome.OK)
        reply = result.reply
        if reply is not None and reply.code != Code.OK:
            outcome = Outcome.ERROR
        self.log.append(
            ExchangeRecord(
                plugin=plugin.full_name,
                direction=TO_PLUGIN,
                conn=1,
                stream_id=result.stream_id,
                service=PLUGIN_SERVICE,
                method=method,
                payload=payload,
                timeout_nano=result.timeout_nano,
                metadata=metadata,
                outcome=outcome,
                code=reply.code if reply is not None else 0,
                message=reply.message if reply is not None else result.detail,
                reply=reply.payload if reply is not None else b"",
                latency=latency,
                note=note,
            )
        )

    def _drop(self, plugin: _Plugin, reason: str) -> None:
        """Close a plugin the runtime gives up on (and kill it if launched and the
        flavor does so)."""
        plugin.conn.close(reason)
        if plugin.process is not None and self.flavor.kill_dropped_plugins:
            plugin.process.kill()

    # --- plugin connections --------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                log.info("stopped accepting plugin connections (%s)", exc)
                return
            try:
                plugin = await self._new_plugin(sock, external=True)
                # One at a time, like the real runtimes: a plugin that hangs in
                # registration, Configure or Synchronize delays every later one.
                await self._bring_up(plugin)
            except (OSError, EmbeddedRuntimeError) as exc:
                log.warning("failed to start external plugin: %s", exc)

    async def _new_plugin(self, sock: socket.socket, *, external: bool) -> _Plugin:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        conn = PluginConnection(reader, writer, self._serve, self._on_closed)
        self._seq += 1
        registered: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        plugin = _Plugin(self._seq, conn, external, registered)
        self._plugins.append(plugin)
        self._by_conn[conn] = plugin
        conn.start()
        self._bump()
        return plugin

    def _on_closed(self, conn: PluginConnection) -> None:
        plugin = self._by_conn.get(conn)
        if plugin is None:
            return
        plugin.state = PluginState.CLOSED
        if not plugin.registered.done():
            plugin.registered.set_exception(ConnectionError(conn.close_reason))
            plugin.registered.exception()  # retrieved here; the waiter re-raises it
        log.info("connection to plugin %s closed: %s", plugin.full_name, conn.close_reason)
        self._bump()

    async def _bring_up(self, plugin: _Plugin) -> None:
        """Registration, Configure, Synchronize: what must succeed before events flow.
        Whatever goes wrong, only this plugin pays: the accept loop must survive."""
        try:
            await self._bring_up_steps(plugin)
        except Exception as exc:
            log.exception("bringing up plugin %s failed", plugin.full_name)
            self._drop_unconditionally(plugin, f"internal error: {exc}")

    async def _bring_up_steps(self, plugin: _Plugin) -> None:
        try:
            async with asyncio.timeout(self.registration_timeout):
                refusal = await asyncio.shield(plugin.registered)
        except TimeoutError:
            self._drop_unconditionally(plugin, "plugin registration timed out")
            return
        except ConnectionError:
            return
        if refusal is not None:
            plugin.state = PluginState.REJECTED  # upstream leaves the connection open
            self._bump()
            return
        plugin.state = PluginState.REGISTERED
        if not await self._configure(plugin):
            return
        plugin.state = PluginState.CONFIGURED
        if plugin.external or self.flavor.syncs_launched_plugins:
            async with self._lock:
                ok = await self._synchronize(plugin)
            if not ok:
                return
        plugin.state = PluginState.READY
        log.info("plugin %s connected and synchronized", plugin.full_name)
        self._bump()

    def _drop_unconditionally(self, plugin: _Plugin, reason: str) -> None:
        plugin.conn.close(reason)
        if plugin.process is not None:
            plugin.process.kill()

    async def _configure(self, plugin: _Plugin) -> bool:
        request = pb.ConfigureRequest(
            config=plugin.config,
            runtime_name=self.flavor.runtime_name,
            runtime_version=self.flavor.runtime_version,
        )
        if self.flavor.configure_sends_timeouts:
            request.registration_timeout = int(self.registration_timeout * 1000)
            request.request_timeout = int(self.request_timeout * 1000)
        if self.flavor.configure_sends_nri_version:
            request.NRI_version = str(self.flavor.nri_version)
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        reply = await self._call(plugin, "Configure", request, deadline)
        failure = None
        if reply is None:
            failure = plugin.conn.close_reason
        elif reply.code != Code.OK:
            failure = f"failed to configure plugin: {_code_name(reply.code)}: {reply.message}"
        else:
            response = parse(pb.ConfigureResponse, reply.payload)
            if not isinstance(response, pb.ConfigureResponse):
                failure = "failed to configure plugin: invalid ConfigureResponse"
            else:
                try:
                    plugin.events = subscribed_events(self.flavor, response.events)
                except InvalidEventMaskError as exc:
                    failure = str(exc)
        if failure is not None:
            self._drop_unconditionally(plugin, failure)
            return False
        return True

    async def _synchronize(self, plugin: _Plugin) -> bool:
        pods = [pod_view(r, self.flavor) for r in self._pods.values()]
        ctrs = [container_view(r, self.flavor) for r in self._containers.values() if not r.exited]
        splitter = SyncSplitter(len(pods), len(ctrs), split=self.flavor.split_sync)
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        updates: Sequence[pb.ContainerUpdate] = ()
        try:
            while not splitter.done:
                chunk = splitter.chunk()
                request = pb.SynchronizeRequest(
                    pods=pods[chunk.pods], containers=ctrs[chunk.containers], more=chunk.more
                )
                reply = await self._sync_call(plugin, request, deadline, splitter)
                if reply is None:
                    continue  # refused as oversized; the splitter shrank the chunks
                response = parse(pb.SynchronizeResponse, reply.payload)
                if not isinstance(response, pb.SynchronizeResponse):
                    raise SyncError("invalid SynchronizeResponse")
                if splitter.answered(response.more, len(response.update)):
                    updates = response.update
        except SyncError as exc:
            if plugin.conn.closed:
                return False
            if self.flavor.closes_plugin_on_sync_failure or exc.closes:
                self._drop(plugin, f"failed to synchronize plugin: {exc}")
            else:
                plugin.state = PluginState.UNSYNCED  # v0.4/v0.11: left open, never added
                log.warning("failed to synchronize plugin %s: %s", plugin.full_name, exc)
                self._bump()
            return False
        await self._apply_updates(updates)
        return True

    async def _sync_call(
        self,
        plugin: _Plugin,
        request: pb.SynchronizeRequest,
        deadline: float,
        splitter: SyncSplitter,
    ) -> _Reply | None:
        loop = asyncio.get_running_loop()
        payload = request.SerializeToString()
        started = loop.time()
        plugin.counters.requests += 1
        result = await plugin.conn.call(PLUGIN_SERVICE, "Synchronize", payload, deadline)
        note = f"{len(request.pods)} pods, {len(request.containers)} containers"
        note += ", more" if request.more else ""
        latency = loop.time() - started
        self._record_call(plugin, "Synchronize", payload, (), result, latency, note)
        if result.status is CallStatus.NOT_SENT:
            splitter.oversized(result.length, result.max_length)
            return None
        if result.status is not CallStatus.REPLIED or result.reply is None:
            if result.status is CallStatus.TIMEOUT:
                plugin.counters.timeouts += 1
            self._drop(plugin, f"failed to synchronize plugin: {result.status.value}")
            raise SyncError(result.status.value)
        if result.reply.code != Code.OK:
            plugin.counters.errors += 1
            raise SyncError(f"{_code_name(result.reply.code)}: {result.reply.message}")
        return _Reply(result.reply.code, result.reply.message, result.reply.payload)

    # --- the Runtime service (plugin -> runtime, mux conn 2) -----------------------------

    async def _serve(self, conn: PluginConnection, req: RequestReceived) -> None:
        plugin = self._by_conn[conn]
        loop = asyncio.get_running_loop()
        started = loop.time()
        code: int
        try:
            if req.service != RUNTIME_SERVICE:
                code, message, reply = Code.UNIMPLEMENTED, f"service {req.service}", b""
            elif req.method == "RegisterPlugin":
                code, message, reply = await self._register(plugin, req)
            elif req.method == "UpdateContainers":
                code, message, reply = await self._update_containers(plugin, req)
            else:
                code, message, reply = Code.UNIMPLEMENTED, f"method {req.method}", b""
        except EmbeddedRuntimeError as exc:  # e.g. a backend failure while applying
            log.exception("serving %s for %s failed", req.method, plugin.full_name)
            code, message, reply = Code.UNKNOWN, str(exc), b""
        outcome = Outcome.OK if code == Code.OK else Outcome.ERROR
        if conn.closed:
            outcome = Outcome.DROPPED
        else:
            if code == Code.OK:
                await conn.respond(req.stream_id, reply)
            else:
                await conn.respond_error(req.stream_id, code, message)
        self.log.append(
            ExchangeRecord(
                plugin=plugin.full_name,
                direction=TO_RUNTIME,
                conn=2,
                stream_id=req.stream_id,
                service=req.service,
                method=req.method,
                payload=req.payload,
                timeout_nano=req.timeout_nano,
                metadata=req.metadata,
                outcome=outcome,
                code=int(code),
                message=message,
                reply=reply,
                latency=loop.time() - started,
            )
        )
        if req.method == "RegisterPlugin" and not plugin.registered.done():
            plugin.registered.set_result(message if code != Code.OK else None)

    async def _register(self, plugin: _Plugin, req: RequestReceived) -> tuple[int, str, bytes]:
        msg = parse(pb.RegisterPluginRequest, req.payload)
        if not isinstance(msg, pb.RegisterPluginRequest):
            return Code.INVALID_ARGUMENT, "invalid RegisterPluginRequest", b""
        if plugin.registered.done():
            log.warning("plugin %s registered twice; ignored", plugin.full_name)
            return Code.OK, "", b""
        if plugin.external:
            refusal = registration_error(self.flavor, msg.plugin_name, msg.plugin_idx)
            if refusal is not None:
                return Code.UNKNOWN, refusal, b""
            plugin.name, plugin.idx = msg.plugin_name, msg.plugin_idx
        plugin.nri_version = msg.NRI_version
        log.info("plugin %s registered (NRI version %s)", plugin.full_name, msg.NRI_version or "?")
        return Code.OK, "", b""

    async def _update_containers(
        self, plugin: _Plugin, req: RequestReceived
    ) -> tuple[int, str, bytes]:
        msg = parse(pb.UpdateContainersRequest, req.payload)
        if not isinstance(msg, pb.UpdateContainersRequest):
            return Code.INVALID_ARGUMENT, "invalid UpdateContainersRequest", b""
        plugin.counters.update_requests += 1
        plugin.counters.evictions_ignored += len(msg.evict)
        # The trap (§7.4): served under the same lock as event relaying, so a plugin
        # that waits for this reply inside an event handler blocks until that event's
        # request timeout drops it.
        async with self._lock:
            if plugin.conn.closed:
                # Dropped while waiting (typically by the timeout of the very event it
                # was handling). Go's handler is racing a closed connection here; the
                # embedded runtime does not apply updates of a plugin it dropped.
                return Code.CANCELLED, "plugin closed while waiting for the runtime", b""
            applied, failed = await self._apply_updates(msg.update)
        plugin.counters.updates_applied += applied
        if failed:
            return Code.UNKNOWN, "NRI update of some containers failed", b""
        return Code.OK, "", pb.UpdateContainersResponse().SerializeToString()

    # --- helpers -------------------------------------------------------------------------

    def _pod(self, pod_id: str) -> PodRecord:
        try:
            return self._pods[pod_id]
        except KeyError:
            raise UnknownObjectError(f"no pod sandbox {pod_id!r}") from None

    def _container(self, container_id: str) -> ContainerRecord:
        try:
            return self._containers[container_id]
        except KeyError:
            raise UnknownObjectError(f"no container {container_id!r}") from None

    def _pod_containers(self, pod_id: str) -> list[ContainerRecord]:
        return [r for r in self._containers.values() if r.spec.pod_sandbox_id == pod_id]

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bump(self) -> None:
        """Wake everyone waiting for a plugin state change."""
        self._changed.set()
        self._changed = asyncio.Event()


# --- message builders --------------------------------------------------------------------


def _notification(event: Event, pod: pb.PodSandbox, container: pb.Container | None) -> Message:
    """The dedicated v0.12 request for a notification (converted to StateChange by the
    caller when the plugin or the runtime needs that)."""
    spec = services.NOTIFICATION_FOR_EVENT.get(event)
    if spec is None:
        return _state_change_event(event, pod, container)
    msg = spec.request()
    msg.pod.CopyFrom(pod)  # type: ignore[attr-defined]
    if container is not None:
        msg.container.CopyFrom(container)  # type: ignore[attr-defined]
    return msg


def _state_change(event: Event, request: Message) -> pb.StateChangeEvent:
    pod = getattr(request, "pod", None)
    container = None
    if request.DESCRIPTOR.fields_by_name.get("container") is not None and request.HasField(
        "container"
    ):
        container = request.container  # type: ignore[attr-defined]
    return _state_change_event(event, pod, container)


def _state_change_event(
    event: Event, pod: pb.PodSandbox | None, container: pb.Container | None
) -> pb.StateChangeEvent:
    msg = pb.StateChangeEvent(event=int(event))  # type: ignore[arg-type]
    if pod is not None:
        msg.pod.CopyFrom(pod)
    if container is not None:
        msg.container.CopyFrom(container)
    return msg


def _pod_pb(pod: model.Pod | pb.PodSandbox) -> pb.PodSandbox:
    if isinstance(pod, pb.PodSandbox):
        copy = pb.PodSandbox()
        copy.CopyFrom(pod)
        return copy
    return convert.pod_to_pb(pod)


def _container_pb(container: model.Container | pb.Container) -> pb.Container:
    if isinstance(container, pb.Container):
        return container
    return convert.container_to_pb(container)


def _code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"code {code}"
