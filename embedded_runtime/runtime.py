"""An NRI runtime in Python: the containerd/CRI-O side of the protocol, for tests, the
benchmarks and `nri-qos lab`.

It behaves like the runtime its `RuntimeFlavor` names (docs/nri-protocol.md and
the captures in tests/data/nri-captures): one-at-a-time accept loop with a registration
timeout; Configure, event-mask validation and (split) Synchronize; every lifecycle event
relayed to the subscribed plugins in idx order, sequentially, under one lock; request
timeouts that drop a plugin while the operation carries on; error statuses that block
the operation or are only logged depending on the event; CreateContainer adjustments
merged with NRI's ownership rules and applied with the runtime's rules; validators;
the v0.12 StateChange fallback; and UpdateContainers served under the same lock, which
reproduces the deadlock a plugin walks into when it calls UpdateContainers from inside
an event handler.

Decisions live in pure modules (`flavor`, `merge`, `sync`, `state`). This module is the
public facade, `EmbeddedRuntime`, with the CRI-like lifecycle; it wires the parts that
talk to plugins over `connection.PluginConnection`, each sharing one `RuntimeState`
(`runtime_state`): plugin bring-up (`bringup`), event relaying (`relay`), the Runtime
service the plugins call (`runtime_service`) and the calls to one plugin (`plugins`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path

from embedded_runtime.backend import ContainerBackend, InMemoryBackend
from embedded_runtime.bringup import PluginBringUp
from embedded_runtime.errors import (
    AdjustmentError,
    BackendError,
    InvalidOperationError,
    PluginFailedOperationError,
)
from embedded_runtime.flavor import CONTAINERD_2_3, RuntimeFlavor, registration_error
from embedded_runtime.launch import plugin_environment, spawn_plugin
from embedded_runtime.merge import apply_adjustment
from embedded_runtime.merge import apply_update as apply_resource_update
from embedded_runtime.records import ExchangeRecord, PluginInfo, PluginState
from embedded_runtime.relay import EventRelay
from embedded_runtime.runtime_service import RuntimeService
from embedded_runtime.runtime_state import RuntimeState
from embedded_runtime.state import (
    ContainerRecord,
    Moment,
    PodRecord,
    cgroups_path_for,
    container_model,
    container_spec,
    container_view,
    pod_view,
)
from embedded_runtime.validator import DefaultValidatorConfig
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.versions import Event
from qos_model import containers as model
from qos_model.containers import ContainerState


class EmbeddedRuntime:
    def __init__(
        self,
        socket_path: Path,
        *,
        flavor: RuntimeFlavor = CONTAINERD_2_3,
        request_timeout: float = 2.0,
        registration_timeout: float = 5.0,
        backend: ContainerBackend | None = None,
        default_validator: DefaultValidatorConfig | None = None,
    ) -> None:
        """`default_validator`: the runtime's built-in validator (containerd >= 2.2 and
        CRI-O >= 1.34 only; ignored by flavors without validation), see `validator`."""
        self.socket_path = Path(socket_path)
        self._state = RuntimeState(
            flavor=flavor,
            request_timeout=request_timeout,
            registration_timeout=registration_timeout,
            backend=backend if backend is not None else InMemoryBackend(),
            default_validator=default_validator,
        )
        self._relay = EventRelay(self._state)
        self._bringup = PluginBringUp(self._state, RuntimeService(self._state).serve)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- settings (shared with the bring-up, relay and Runtime service parts) -------------

    @property
    def flavor(self) -> RuntimeFlavor:
        return self._state.flavor

    @flavor.setter
    def flavor(self, flavor: RuntimeFlavor) -> None:
        self._state.flavor = flavor

    @property
    def request_timeout(self) -> float:
        return self._state.request_timeout

    @request_timeout.setter
    def request_timeout(self, seconds: float) -> None:
        self._state.request_timeout = seconds

    @property
    def registration_timeout(self) -> float:
        return self._state.registration_timeout

    @registration_timeout.setter
    def registration_timeout(self, seconds: float) -> None:
        self._state.registration_timeout = seconds

    @property
    def backend(self) -> ContainerBackend:
        return self._state.backend

    @backend.setter
    def backend(self, backend: ContainerBackend) -> None:
        self._state.backend = backend

    @property
    def log(self) -> list[ExchangeRecord]:
        """Every exchange so far, in either direction, in the order they completed."""
        return self._state.log

    @log.setter
    def log(self, records: list[ExchangeRecord]) -> None:
        self._state.log = records

    # --- public state --------------------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every plugin connection so far, in invocation (idx) order."""
        return [p.info() for p in sorted(self._state.plugins, key=lambda p: (p.idx, p.seq))]

    @property
    def pods(self) -> dict[str, model.Pod]:
        pods = self._state.pods
        return {pid: convert.pod_from_pb(pod_view(r, self.flavor)) for pid, r in pods.items()}

    @property
    def containers(self) -> dict[str, model.Container]:
        ctrs = self._state.containers
        return {cid: container_model(r, self.flavor) for cid, r in ctrs.items()}

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
        self._accept_task = asyncio.create_task(
            self._bringup.accept_loop(listener), name="nri-accept"
        )

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
        for plugin in self._state.plugins:
            plugin.conn.close(plugin.conn.close_reason or "runtime stopped")
            if plugin.process is not None:
                plugin.process.kill()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for plugin in self._state.plugins:
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
        plugin = await self._bringup.new_plugin(ours, external=False)
        plugin.name, plugin.idx, plugin.config, plugin.process = name, idx, config, process
        self._spawn(self._bringup.bring_up(plugin))

    async def wait_for_plugins(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` plugins are registered, configured and synchronized."""
        plugins = self._state.plugins
        try:
            async with asyncio.timeout(timeout):
                while sum(p.state is PluginState.READY for p in plugins) < count:
                    event = self._state.changed
                    await event.wait()
        except TimeoutError:
            states = ", ".join(f"{p.full_name}: {p.state.value}" for p in plugins)
            raise TimeoutError(
                f"{count} ready plugin(s) expected within {timeout}s; have {states or 'none'}"
            ) from None

    # --- pod and container lifecycle (the CRI calls) -------------------------------------

    async def run_pod_sandbox(self, pod: model.Pod | pb.PodSandbox) -> None:
        spec = _pod_pb(pod)
        if not spec.id:
            raise InvalidOperationError("a pod needs an id")
        async with self._state.lock:
            if spec.id in self._state.pods:
                raise InvalidOperationError(f"pod {spec.id!r} already exists")
            rec = PodRecord(spec)
            self._state.pods[spec.id] = rec
            try:
                await self._relay.notify(Event.RUN_POD_SANDBOX, pod_view(rec, self.flavor))
            except PluginFailedOperationError:
                del self._state.pods[spec.id]
                raise

    async def create_container(
        self, pod_id: str, container: model.Container | pb.Container
    ) -> model.Container:
        """Create a container; returns it as created, with the plugins' adjustments."""
        async with self._state.lock:
            pod = self._state.pod(pod_id)
            if pod.stopped:
                raise InvalidOperationError(f"pod {pod_id!r} is stopped")
            spec = container_spec(_container_pb(container), pod_id)
            if not spec.id:
                raise InvalidOperationError("a container needs an id")
            if not spec.linux.cgroups_path and pod.spec.linux.cgroup_parent:
                # containerd composes it from the sandbox's parent before relaying the event
                spec.linux.cgroups_path = cgroups_path_for(pod.spec.linux.cgroup_parent, spec.id)
            if spec.id in self._state.containers:
                raise InvalidOperationError(f"container {spec.id!r} already exists")
            rec = ContainerRecord(spec)
            pod_msg = pod_view(pod, self.flavor)
            pristine, merge, plugins = await self._relay.collect_adjustments(pod_msg, rec)
            result = merge.result()
            await self._relay.validate(pod_msg, pristine, result, plugins)
            changes = apply_adjustment(rec.spec, result.adjust, self.flavor)
            if changes.blockio_class is not None:
                rec.blockio_class = changes.blockio_class or None
            if changes.rdt_class is not None:
                rec.rdt_class = changes.rdt_class or None
            _, failed = await self._state.apply_updates(result.updates)
            if failed and self.flavor.create_fails_on_update_error:
                raise AdjustmentError(
                    f"failed to update containers {', '.join(failed)} requested during the "
                    f"creation of {rec.id}"
                )
            pid = await self._state.call_backend("create", rec)
            rec.state = ContainerState.CREATED
            rec.created_at = time.time_ns()
            rec.process_pid = pid or 0
            if self.flavor.pid_from_create:
                rec.pid = rec.process_pid
            self._state.containers[rec.id] = rec
            await self._relay.notify_logged(
                Event.POST_CREATE_CONTAINER, pod_msg, container_view(rec, self.flavor)
            )
            return container_model(rec, self.flavor)

    async def start_container(self, container_id: str) -> None:
        async with self._state.lock:
            rec = self._state.container(container_id)
            if rec.state is not ContainerState.CREATED:
                raise InvalidOperationError(
                    f"container {container_id!r} is {rec.state.name}, not CREATED"
                )
            pod_msg = pod_view(self._state.pod(rec.spec.pod_sandbox_id), self.flavor)
            rec.pid = rec.process_pid  # the task exists now (containerd creates it here)
            try:
                await self._relay.notify(
                    Event.START_CONTAINER, pod_msg, container_view(rec, self.flavor)
                )
            except PluginFailedOperationError:
                if not self.flavor.pid_from_create:
                    rec.pid = 0
                raise
            pid = await self._state.call_backend("start", rec)
            if pid:
                rec.pid = rec.process_pid = pid
            rec.state = ContainerState.RUNNING
            rec.started_at = time.time_ns()
            await self._relay.notify_logged(
                Event.POST_START_CONTAINER,
                pod_msg,
                container_view(rec, self.flavor, Moment.POST_START),
            )

    async def update_container(
        self, container_id: str, resources: model.Resources
    ) -> model.Container:
        """UpdateContainerResources: plugins may change the requested resources."""
        async with self._state.lock:
            rec = self._state.container(container_id)
            pod_msg = pod_view(self._state.pod(rec.spec.pod_sandbox_id), self.flavor)
            requested = convert.resources_to_pb(resources)
            requested.memory.SetInParent()
            requested.cpu.SetInParent()
            collector = await self._relay.update_container(pod_msg, rec, container_id, requested)
            new = pb.LinuxResources()
            new.CopyFrom(rec.spec.linux.resources)
            apply_resource_update(new, requested, self.flavor.update_scope)
            old = pb.LinuxResources()
            old.CopyFrom(rec.spec.linux.resources)
            rec.spec.linux.resources.CopyFrom(new)
            try:
                await self._state.call_backend("update", rec)
            except BackendError:
                rec.spec.linux.resources.CopyFrom(old)
                raise
            await self._state.apply_updates(collector.updates)
            await self._relay.notify_logged(
                Event.POST_UPDATE_CONTAINER, pod_msg, container_view(rec, self.flavor)
            )
            return container_model(rec, self.flavor)

    async def stop_container(self, container_id: str) -> None:
        async with self._state.lock:
            await self._stop_locked(self._state.container(container_id))

    async def remove_container(self, container_id: str) -> None:
        async with self._state.lock:
            rec = self._state.container(container_id)
            if not rec.exited:
                await self._stop_locked(rec)
            await self._remove_locked(rec)

    async def stop_pod_sandbox(self, pod_id: str) -> None:
        async with self._state.lock:
            await self._stop_pod_locked(self._state.pod(pod_id))

    async def remove_pod_sandbox(self, pod_id: str) -> None:
        async with self._state.lock:
            rec = self._state.pod(pod_id)
            await self._stop_pod_locked(rec)
            for ctr in self._state.pod_containers(pod_id):
                await self._remove_locked(ctr)
            pod_msg = pod_view(rec, self.flavor, removing=True)
            del self._state.pods[pod_id]
            await self._relay.notify_logged(Event.REMOVE_POD_SANDBOX, pod_msg)

    async def update_pod_sandbox(
        self, pod_id: str, overhead: model.Resources | None, resources: model.Resources | None
    ) -> None:
        """UpdatePodSandboxResources (NRI v0.10+: containerd 2.2+, CRI-O 1.34+)."""
        if not self.flavor.has_pod_update_and_validation:
            raise InvalidOperationError(
                f"{self.flavor} has no UpdatePodSandbox event (needs NRI v0.10 or newer)"
            )
        async with self._state.lock:
            rec = self._state.pod(pod_id)
            request = pb.UpdatePodSandboxRequest(pod=pod_view(rec, self.flavor))
            if overhead is not None:
                convert.resources_to_pb(overhead, request.overhead_linux_resources)
                request.overhead_linux_resources.SetInParent()
            if resources is not None:
                convert.resources_to_pb(resources, request.linux_resources)
                request.linux_resources.SetInParent()
            await self._relay.update_pod_sandbox(request)
            if overhead is not None:
                rec.spec.linux.pod_overhead.CopyFrom(request.overhead_linux_resources)
            if resources is not None:
                rec.spec.linux.pod_resources.CopyFrom(request.linux_resources)
            await self._relay.notify_logged(
                Event.POST_UPDATE_POD_SANDBOX, pod_view(rec, self.flavor)
            )

    # --- lifecycle internals (lock held) -------------------------------------------------

    async def _stop_locked(self, rec: ContainerRecord) -> None:
        if rec.exited:
            return  # CRI StopContainer is idempotent; no second event
        pod_msg = pod_view(self._state.pod(rec.spec.pod_sandbox_id), self.flavor)
        if self.flavor.stop_event_before_stop:
            updates = await self._relay.stop_container(pod_msg, rec)
            await self._stop_process(rec)
        else:
            await self._stop_process(rec)
            updates = await self._relay.stop_container(pod_msg, rec)
        await self._state.apply_updates(updates)

    async def _stop_process(self, rec: ContainerRecord) -> None:
        rec.exit_code = int(await self._state.call_backend("stop", rec) or 0)
        rec.state = ContainerState.STOPPED
        rec.finished_at = time.time_ns()
        if self.flavor.clear_pid_on_stop:
            rec.pid = 0

    async def _remove_locked(self, rec: ContainerRecord) -> None:
        pod_msg = pod_view(self._state.pod(rec.spec.pod_sandbox_id), self.flavor)
        ctr_msg = container_view(rec, self.flavor, Moment.REMOVE)
        await self._state.call_backend("remove", rec)
        del self._state.containers[rec.id]
        await self._relay.notify_logged(Event.REMOVE_CONTAINER, pod_msg, ctr_msg)

    async def _stop_pod_locked(self, rec: PodRecord) -> None:
        if rec.stopped:
            return
        for ctr in self._state.pod_containers(rec.spec.id):
            await self._stop_locked(ctr)
        rec.stopped = True
        await self._relay.notify_logged(Event.STOP_POD_SANDBOX, pod_view(rec, self.flavor))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- message builders --------------------------------------------------------------------


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
