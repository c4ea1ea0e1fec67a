"""The interface between the plugin runtime and a policy.

The plugin runtime (nri_plugin.plugin) owns the protocol: deadlines, fail-open, split
Synchronize, StateChange vs per-event RPCs, the event subscription. A policy sees only
typed pods and containers and answers every hook with `Intents` (intents.py): the new
container's adjustment, updates in the reply, updates of live containers to send after the
reply, host intents for the controllers, and notes. It is called from one worker thread,
one call at a time, so it needs no locks; it does no I/O, because every call runs under the
runtime's request deadline and a late answer is dropped (fail-open).

`PolicyBase` gives every hook a no-op default; the plugin subscribes to exactly the events
whose hooks a policy overrides (`nri_plugin.dispatch.wanted_events`), as containerd's
stub does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nri_plugin.policy.intents import NO_INTENTS, Intents
from qos_model.containers import Container, Pod, Resources
from qos_model.runtime import RuntimeInfo


class PolicyBase:
    """No-op policy hooks. Subclasses override what they need."""

    name = "noop"

    def configure(self, runtime: RuntimeInfo, config: str) -> Intents:
        """Called once per connection before Synchronize; `config` is the runtime-provided
        plugin config (pre-installed plugins) or ""."""
        return NO_INTENTS

    def unneeded_hooks(self, runtime: RuntimeInfo) -> frozenset[str]:
        """Hooks this policy overrides but does not need with this runtime (hook names,
        e.g. "post_start_container"): their events are not subscribed, so the runtime
        makes no round trip for them on a pod's start path."""
        return frozenset()

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        """The runtime's full state (after a connect or reconnect). Rebuild from it; the
        updates for containers that must change go in `reply_updates`."""
        return NO_INTENTS

    def run_pod(self, pod: Pod) -> Intents:
        return NO_INTENTS

    def stop_pod(self, pod: Pod) -> Intents:
        return NO_INTENTS

    def remove_pod(self, pod: Pod) -> Intents:
        return NO_INTENTS

    def update_pod(
        self, pod: Pod, overhead: Resources | None, resources: Resources | None
    ) -> Intents:
        return NO_INTENTS

    def create_container(self, pod: Pod, container: Container) -> Intents:
        """The new container's changes go in `adjustment`; other containers never go in
        the reply (`updates` are sent after it)."""
        return NO_INTENTS

    def post_create_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def start_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def post_start_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Intents:
        return NO_INTENTS

    def post_update_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def stop_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def remove_container(self, pod: Pod, container: Container) -> Intents:
        return NO_INTENTS

    def disconnected(self) -> None:
        """The runtime connection ended; state will be rebuilt by the next Synchronize."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One thing a policy saw; RecordingPolicy keeps a list of these."""

    event: str
    pod: Pod | None = None
    container: Container | None = None
    detail: dict[str, object] = field(default_factory=dict)


class RecordingPolicy(PolicyBase):
    """Records everything it sees and asks for nothing.

    It proves the protocol path end to end (tests and `nri-qos lab` read `observations`)
    without changing any container, and is the no-op baseline of the benchmarks. As a
    daemon's policy (`[policy] name = "recording"`) it runs for as long as the node:
    `observations` keeps the last `keep` to twice `keep` of them, not every one.
    """

    name = "recording"
    KEEP = 10_000

    def __init__(self, keep: int = KEEP) -> None:
        self.observations: list[Observation] = []
        self.runtime: RuntimeInfo | None = None
        self.keep = max(1, keep)

    def _saw(
        self,
        event: str,
        pod: Pod | None = None,
        container: Container | None = None,
        **detail: object,
    ) -> Intents:
        self.observations.append(Observation(event, pod, container, dict(detail)))
        if len(self.observations) > 2 * self.keep:
            del self.observations[: -self.keep]  # now and then, so appending stays cheap
        return NO_INTENTS

    def configure(self, runtime: RuntimeInfo, config: str) -> Intents:
        self.runtime = runtime
        return self._saw(
            "Configure",
            runtime=runtime.name,
            version=runtime.version,
            nri_version=str(runtime.nri_version),
            config=config,
        )

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        return self._saw("Synchronize", pods=len(pods), containers=len(containers))

    def run_pod(self, pod: Pod) -> Intents:
        return self._saw("RunPodSandbox", pod)

    def stop_pod(self, pod: Pod) -> Intents:
        return self._saw("StopPodSandbox", pod)

    def remove_pod(self, pod: Pod) -> Intents:
        return self._saw("RemovePodSandbox", pod)

    def update_pod(
        self, pod: Pod, overhead: Resources | None, resources: Resources | None
    ) -> Intents:
        return self._saw("UpdatePodSandbox", pod, resources=resources)

    def create_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("CreateContainer", pod, container)

    def post_create_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("PostCreateContainer", pod, container)

    def start_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("StartContainer", pod, container)

    def post_start_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("PostStartContainer", pod, container)

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Intents:
        return self._saw("UpdateContainer", pod, container, requested=requested)

    def post_update_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("PostUpdateContainer", pod, container)

    def stop_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("StopContainer", pod, container)

    def remove_container(self, pod: Pod, container: Container) -> Intents:
        return self._saw("RemoveContainer", pod, container)
