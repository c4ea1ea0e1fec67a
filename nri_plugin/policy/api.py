"""The interface between the plugin runtime and a policy.

The plugin runtime (nri_plugin.plugin) owns the protocol: deadlines, fail-open, split
Synchronize, StateChange vs per-event RPCs, UpdateContainers outside event handlers. A
policy sees only typed pods and containers and answers with typed adjustments and
updates. It is called from one worker thread, one call at a time, so it needs no locks;
it must not block on I/O for long, because every call runs under the runtime's request
deadline and a late answer is dropped (fail-open).

`PolicyBase` gives every hook a no-op default, so a policy implements only what it needs
and `events()` says which events to subscribe to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nri_plugin.protocol.versions import Event
from qos_model.containers import NO_ADJUSTMENT, Adjustment, Container, Pod, Resources, Update
from qos_model.runtime import RuntimeInfo


@dataclass(frozen=True, slots=True)
class CreateResult:
    adjustment: Adjustment = NO_ADJUSTMENT
    updates: tuple[Update, ...] = ()  # for *other* containers only


@dataclass(frozen=True, slots=True)
class Observation:
    """One thing a policy saw; RecordingPolicy keeps a list of these."""

    event: str
    pod: Pod | None = None
    container: Container | None = None
    detail: dict[str, object] = field(default_factory=dict)


class PolicyBase:
    """No-op policy hooks. Subclasses override what they need."""

    name = "noop"

    def events(self) -> frozenset[Event]:
        """Events to subscribe to; the runtime's version may remove some, never all."""
        return frozenset(
            {
                Event.RUN_POD_SANDBOX,
                Event.STOP_POD_SANDBOX,
                Event.REMOVE_POD_SANDBOX,
                Event.CREATE_CONTAINER,
                Event.POST_CREATE_CONTAINER,
                Event.START_CONTAINER,
                Event.POST_START_CONTAINER,
                Event.UPDATE_CONTAINER,
                Event.POST_UPDATE_CONTAINER,
                Event.STOP_CONTAINER,
                Event.REMOVE_CONTAINER,
                Event.UPDATE_POD_SANDBOX,
            }
        )

    def configure(self, runtime: RuntimeInfo, config: str) -> None:
        """Called once per connection before Synchronize; `config` is the runtime-provided
        plugin config (launched plugins) or ""."""

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Sequence[Update]:
        """The runtime's full state (after a connect or reconnect). Rebuild from it."""
        return ()

    def run_pod(self, pod: Pod) -> None: ...
    def stop_pod(self, pod: Pod) -> None: ...
    def remove_pod(self, pod: Pod) -> None: ...

    def update_pod(
        self, pod: Pod, overhead: Resources | None, resources: Resources | None
    ) -> None: ...

    def create_container(self, pod: Pod, container: Container) -> CreateResult:
        return CreateResult()

    def post_create_container(self, pod: Pod, container: Container) -> None: ...
    def start_container(self, pod: Pod, container: Container) -> None: ...
    def post_start_container(self, pod: Pod, container: Container) -> None: ...

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Sequence[Update]:
        return ()

    def post_update_container(self, pod: Pod, container: Container) -> None: ...

    def stop_container(self, pod: Pod, container: Container) -> Sequence[Update]:
        return ()

    def remove_container(self, pod: Pod, container: Container) -> None: ...

    def take_deferred_updates(self) -> Sequence[Update]:
        """Updates to send with UpdateContainers once the current reply is on the wire.

        Never sent from inside an event handler: the runtime holds its NRI lock while
        it relays an event, so a synchronous UpdateContainers would deadlock until the
        request timeout and get the plugin disconnected.
        """
        return ()

    def after_reply(self) -> None:
        """Called in the policy thread after each reply is written, outside any deadline:
        the place for host writes the runtime cannot do for us (e.g. oom_score_adj of
        running processes on runtimes older than NRI v0.7)."""

    def disconnected(self) -> None:
        """The runtime connection ended; state will be rebuilt by the next Synchronize."""

    def snapshot(self) -> dict[str, object]:
        """The policy's state as JSON-ready data, for the status socket."""
        return {"policy": self.name}


class RecordingPolicy(PolicyBase):
    """Records everything it sees and asks for nothing.

    The foundation's default policy: it proves the protocol path end to end (tests and
    `nri-qos lab` read `observations`) without changing any container.
    """

    name = "recording"

    def __init__(self) -> None:
        self.observations: list[Observation] = []
        self.runtime: RuntimeInfo | None = None

    def _saw(
        self,
        event: str,
        pod: Pod | None = None,
        container: Container | None = None,
        **detail: object,
    ) -> None:
        self.observations.append(Observation(event, pod, container, dict(detail)))

    def configure(self, runtime: RuntimeInfo, config: str) -> None:
        self.runtime = runtime
        self._saw(
            "Configure",
            runtime=runtime.name,
            version=runtime.version,
            nri_version=str(runtime.nri_version),
            config=config,
        )

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Sequence[Update]:
        self._saw("Synchronize", pods=len(pods), containers=len(containers))
        return ()

    def run_pod(self, pod: Pod) -> None:
        self._saw("RunPodSandbox", pod)

    def stop_pod(self, pod: Pod) -> None:
        self._saw("StopPodSandbox", pod)

    def remove_pod(self, pod: Pod) -> None:
        self._saw("RemovePodSandbox", pod)

    def update_pod(self, pod: Pod, overhead: Resources | None, resources: Resources | None) -> None:
        self._saw("UpdatePodSandbox", pod, resources=resources)

    def create_container(self, pod: Pod, container: Container) -> CreateResult:
        self._saw("CreateContainer", pod, container)
        return CreateResult()

    def post_create_container(self, pod: Pod, container: Container) -> None:
        self._saw("PostCreateContainer", pod, container)

    def start_container(self, pod: Pod, container: Container) -> None:
        self._saw("StartContainer", pod, container)

    def post_start_container(self, pod: Pod, container: Container) -> None:
        self._saw("PostStartContainer", pod, container)

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Sequence[Update]:
        self._saw("UpdateContainer", pod, container, requested=requested)
        return ()

    def post_update_container(self, pod: Pod, container: Container) -> None:
        self._saw("PostUpdateContainer", pod, container)

    def stop_container(self, pod: Pod, container: Container) -> Sequence[Update]:
        self._saw("StopContainer", pod, container)
        return ()

    def remove_container(self, pod: Pod, container: Container) -> None:
        self._saw("RemoveContainer", pod, container)

    def snapshot(self) -> dict[str, object]:
        return {"policy": self.name, "observations": [o.event for o in self.observations]}
