"""What one embedded runtime knows, shared by the modules that act on it.

`EmbeddedRuntime` (`runtime`) owns one `RuntimeState` and hands it to plugin bring-up
(`bringup`), event relaying (`relay`) and the Runtime service (`runtime_service`). Next
to the settings the facade exposes and the tables of plugins, pods and containers, it
holds what all of them share: NRI's runtime-wide lock, the wake-up of everyone waiting
for a plugin state change, the backend calls and the runtime's update path (§6.8).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from embedded_runtime.backend import ContainerBackend
from embedded_runtime.connection import PluginConnection
from embedded_runtime.errors import BackendError, EmbeddedRuntimeError, UnknownObjectError
from embedded_runtime.flavor import RuntimeFlavor, is_subscribed
from embedded_runtime.merge import apply_update as apply_resource_update
from embedded_runtime.plugins import ConnectedPlugin
from embedded_runtime.records import ExchangeRecord, PluginState
from embedded_runtime.state import ContainerRecord, PodRecord, container_model
from embedded_runtime.validator import DefaultValidatorConfig
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.versions import Event

# Every module of the runtime logs under the name it had as a single module.
log = logging.getLogger("embedded_runtime.runtime")


@dataclass(slots=True, eq=False)
class RuntimeState:
    flavor: RuntimeFlavor
    request_timeout: float
    registration_timeout: float
    backend: ContainerBackend
    # the built-in default validator (None or not enabled: none), see `validator`
    default_validator: DefaultValidatorConfig | None = None
    log: list[ExchangeRecord] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one event at a time
    plugins: list[ConnectedPlugin] = field(default_factory=list)
    by_conn: dict[PluginConnection, ConnectedPlugin] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        """Wake everyone waiting for a plugin state change."""
        self.changed.set()
        self.changed = asyncio.Event()

    # --- plugins -------------------------------------------------------------------------

    def active(self) -> list[ConnectedPlugin]:
        ready = [p for p in self.plugins if p.state is PluginState.READY]
        return sorted(ready, key=lambda p: p.idx)

    def subscribed(self, event: Event) -> list[ConnectedPlugin]:
        return [p for p in self.active() if is_subscribed(p.events, event)]

    # --- pods and containers -------------------------------------------------------------

    def pod(self, pod_id: str) -> PodRecord:
        try:
            return self.pods[pod_id]
        except KeyError:
            raise UnknownObjectError(f"no pod sandbox {pod_id!r}") from None

    def container(self, container_id: str) -> ContainerRecord:
        try:
            return self.containers[container_id]
        except KeyError:
            raise UnknownObjectError(f"no container {container_id!r}") from None

    def pod_containers(self, pod_id: str) -> list[ContainerRecord]:
        return [r for r in self.containers.values() if r.spec.pod_sandbox_id == pod_id]

    async def call_backend(self, operation: str, rec: ContainerRecord) -> int | None:
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

    async def apply_updates(self, updates: Iterable[pb.ContainerUpdate]) -> tuple[int, list[str]]:
        """Apply container updates through the runtime's update path (§6.8); unknown
        and exited containers are skipped. Returns how many were applied and the ids
        whose update failed without ignore_failure."""
        applied = 0
        failed = []
        for upd in updates:
            rec = self.containers.get(upd.container_id)
            if rec is None or rec.exited or not upd.linux.HasField("resources"):
                continue
            old = pb.LinuxResources()
            old.CopyFrom(rec.spec.linux.resources)
            apply_resource_update(
                rec.spec.linux.resources, upd.linux.resources, self.flavor.update_scope
            )
            try:
                await self.call_backend("update", rec)
            except BackendError as exc:
                rec.spec.linux.resources.CopyFrom(old)
                log.warning("update of %s failed: %s", upd.container_id, exc)
                if not upd.ignore_failure:
                    failed.append(upd.container_id)
            else:
                applied += 1
        return applied, failed
