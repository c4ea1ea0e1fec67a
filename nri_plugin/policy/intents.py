"""What the engine asks of the world, as typed values: the engine's only output.

The engine never talks to the runtime or the host. Each runtime event (and each usage
sample) yields one `Intents` value, which the plumbing carries out after the event's reply:

* `adjustment` — the new container's changes, in the CreateContainer reply itself;
* `reply_updates` — updates carried in the event's own reply (UpdateContainer answers with
  our placement of the container being updated);
* `updates` — live containers whose plan moved, sent in one UpdateContainers call after
  the reply (never from inside the event: the runtime holds its NRI lock while relaying it);
  the members of a pool that moved all get the same resources, as one `BulkUpdate`;
* `host` — `HostIntent`s, one per host domain action, applied by that domain's controller
  (`nri_plugin.control`) after the reply, off the request path;
* `notes` — what was decided or could not be honoured, for the log and the decision
  events; the engine has no clock and no logger, the plumbing stamps and records them.

A host intent names the phase of the container's life it belongs to (the containers/
nri-plugins control model): PRE_CREATE (prepare the host before the container starts),
POST_START (act on its first processes), POST_UPDATE (its plan moved while it runs) and
POST_STOP (clean up after it). Every intent carries the reason a person will be shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from qos_model.containers import Adjustment, BulkUpdate, Container, Update, flat_updates


class Phase(StrEnum):
    PRE_CREATE = "pre-create"
    POST_START = "post-start"
    POST_UPDATE = "post-update"
    POST_STOP = "post-stop"


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """What a controller needs to find a container on the host. Runtime input: a
    controller checks the cgroup is the container's own before touching processes."""

    id: str
    name: str  # "<namespace>/<pod>/<container>", for people
    pod_id: str
    cgroups_path: str
    pid: int | None

    @classmethod
    def of(cls, container: Container, name: str) -> ContainerRef:
        return cls(container.id, name, container.pod_id, container.cgroups_path, container.pid)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostIntent:
    """One action for one host domain's controller."""

    domain: ClassVar[str]
    phase: Phase
    container: ContainerRef
    reason: str
    # Run the intent again this many seconds after it succeeded (then after the next
    # delay...): work that races the container's own forks is checked again once they
    # settled. A newer intent for the same container and domain cancels the rechecks.
    recheck_after: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SetOomScoreAdj(HostIntent):
    """Write oom_score_adj for every process of the container (the runtime cannot: NRI
    before v0.7, or a container that was running before we planned it)."""

    domain: ClassVar[str] = "oom"
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaceInRdtClass(HostIntent):
    """Put the container's processes into its RDT class's resctrl group (None: back into
    the root group), where the runtime could not do it at creation (NRI before v0.11),
    and give it a monitoring group of its own when `monitor` (bandwidth and cache
    occupancy per container)."""

    domain: ClassVar[str] = "rdt"
    rdt_class: str | None
    monitor: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRdt(HostIntent):
    """The container is gone: remove the monitoring group we made for it (its RMID is
    scarce)."""

    domain: ClassVar[str] = "rdt"
    rdt_class: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetIoWeight(HostIntent):
    """The container's I/O weight, written by us where the runtime cannot (cgroup v1:
    blkio.bfq.weight and the class's blkio throttle caps)."""

    domain: ClassVar[str] = "io"
    weight: int
    qos_class: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetNetClass(HostIntent):
    """Classify the container's egress traffic into its network class (None: stop
    classifying it). `netns`: the pod's network namespace path ("" for host network)."""

    domain: ClassVar[str] = "net"
    net_class: str | None
    netns: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseNetClass(HostIntent):
    """The container is gone: forget its classification."""

    domain: ClassVar[str] = "net"
    netns: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Evict(HostIntent):
    """Evict the container's pod: through the Kubernetes Eviction API (a PodDisruption-
    Budget may say "not now"), and only where configured by killing its processes."""

    domain: ClassVar[str] = "evict"
    namespace: str
    pod: str
    pod_uid: str
    grace_period_s: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportEvictionLoop(HostIntent):
    """The pod was NOT evicted: its owner lost a pod on this node a short while ago and
    is being rescheduled here in a loop. The evict controller tells the cluster (a
    Warning Event on the pod); `reason` says what to do about it."""

    domain: ClassVar[str] = "evict"
    namespace: str
    pod: str
    pod_uid: str
    owner: str  # "ReplicaSet ns/name"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"  # a Required controller failed: isolation the user counts on is missing


@dataclass(frozen=True, slots=True)
class Note:
    """One decision or problem, for the log and the decision events."""

    kind: str  # "plan", "pool", "classification", "allocation", "sync", "config", ...
    subject: str  # the container or pool it is about
    message: str
    severity: Severity = Severity.INFO


@dataclass(frozen=True, slots=True)
class Intents:
    adjustment: Adjustment | None = None
    reply_updates: tuple[Update, ...] = ()
    updates: tuple[Update | BulkUpdate, ...] = ()
    host: tuple[HostIntent, ...] = ()
    notes: tuple[Note, ...] = ()

    def all_updates(self) -> list[Update]:
        """`updates`, one Update per container."""
        return flat_updates(self.updates)

    def __add__(self, other: Intents) -> Intents:
        """Both sets of intents: an event's own and its consequences (the engine never
        updates one container twice in one event)."""
        if other is NO_INTENTS:  # the usual consequence of an event: none
            return self
        if self is NO_INTENTS:
            return other
        return Intents(
            adjustment=other.adjustment if other.adjustment is not None else self.adjustment,
            reply_updates=self.reply_updates + other.reply_updates,
            updates=self.updates + other.updates,
            host=self.host + other.host,
            notes=self.notes + other.notes,
        )


NO_INTENTS = Intents()
