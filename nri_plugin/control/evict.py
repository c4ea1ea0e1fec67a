"""The evict controller: carries out the eviction policy's decisions.

The Kubernetes Eviction API is the way to remove a pod: it honours the pod's
PodDisruptionBudget, its grace period and preStop hooks, and its owner replaces it.
When a budget forbids the eviction now (429), that is the answer: the outcome says
"not now" with the budget's message and nothing else is done, whatever else is
configured; the policy decides again later. Killing the container's processes through
its cgroup is a fallback an operator must ask for (`[eviction] kill_fallback`), used only
when the API server cannot be reached or fails: it relieves the node at once, but it is
not an eviction (the kubelet restarts the container as its restartPolicy says, and no
budget is consulted). Without the fallback a failed eviction is raised as a transient
HostError, so the executor retries it. Optional: a node without API access still runs.

Eviction loops: before evicting through the API, the pod is read and its controller
ownerReference (the real owner, whatever made it: a ReplicaSet, an operator's custom
resource) is checked against the owners this controller evicted a pod of within
`owner_window_s`. The engine already refuses loops it can see in the pod's labels
(`policy.eviction.owner_of`); this catches the owners labels do not name. A refused
eviction is an outcome ("not evicted: ..."), never an error, and is reported as a
Warning Event ("EvictionLoop") on the pod, as is each `ReportEvictionLoop` the engine
asks for.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from isolation.errors import HostError
from isolation.evict import (
    CgroupKiller,
    EvictorUnavailable,
    EvictOutcome,
    EvictResult,
    KubernetesEvictor,
    PodController,
)
from isolation.host import LinuxHost
from isolation.writes import HostChange, HostWriter
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import Evict, HostIntent, ReportEvictionLoop

log = logging.getLogger("nri_qos.control.evict")

API_MODES = ("auto", "in-cluster", "kubeconfig", "off")


@dataclass(frozen=True, slots=True)
class EvictSettings:
    enabled: bool = True
    api: str = "auto"  # "auto" | "in-cluster" | "kubeconfig" | "off"
    kubeconfig: str = ""  # a kubeconfig file, for nodes where nri-qos runs outside a pod
    kill_fallback: bool = False  # kill the container's processes when the API fails
    dry_run: bool = False  # decide and report, evict and kill nothing
    owner_window_s: float = 600.0  # an owner evicted within this long is not again (0: off)


LOOP_EVENT_REASON = "EvictionLoop"


class EvictController(Controller):
    name = "evict"
    domain = Evict.domain
    mode = Mode.OPTIONAL

    def __init__(
        self,
        settings: EvictSettings,
        host: LinuxHost,
        writer: HostWriter,
        evictor: KubernetesEvictor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        # (namespace, kind, name) of an owner -> (when one of its pods was evicted, pod)
        self._evicted_owners: dict[tuple[str, str, str], tuple[float, str]] = {}
        self.host = host
        # A dry run of this controller alone must not act through a shared real writer.
        self.writer = writer if writer.dry_run or not settings.dry_run else HostWriter(dry_run=True)
        self.evictor = evictor
        self._owns_evictor = False
        self.api_unavailable = ""  # why there is no API evictor (kill fallback only)
        self.killer = CgroupKiller(host, self.writer)

    @property
    def dry_run(self) -> bool:
        return self.writer.dry_run

    def start(self) -> None:
        s = self.settings
        if not s.enabled:
            raise ControllerUnavailable("disabled by [eviction] enabled = false")
        if s.api not in API_MODES:
            raise ControllerUnavailable(
                f"[eviction] api = {s.api!r} is not one of {', '.join(API_MODES)}"
            )
        if self.evictor is None:
            try:
                self.evictor = self._build()
                self._owns_evictor = True
            except EvictorUnavailable as exc:
                self.api_unavailable = str(exc)
        if self.evictor is not None:
            return
        if not s.kill_fallback:
            raise ControllerUnavailable(
                f"{self.api_unavailable} (or set [eviction] kill_fallback = true to kill "
                "the container's processes instead)"
            )
        missing = self.host.missing()
        if missing:
            raise ControllerUnavailable(f"{self.api_unavailable}; and no kill fallback: {missing}")
        log.warning(
            "evict: %s; evictions will kill the container's processes instead "
            "([eviction] kill_fallback = true)",
            self.api_unavailable,
        )

    def stop(self) -> None:
        if self.evictor is not None and self._owns_evictor:
            self.evictor.close()
            self.evictor = None

    def post_update(self, intent: HostIntent) -> str:
        if isinstance(intent, ReportEvictionLoop):
            return self._report(intent.namespace, intent.pod, intent.pod_uid, intent.reason)
        if not isinstance(intent, Evict):
            raise TypeError(f"the evict controller cannot apply {type(intent).__name__}")
        if self.dry_run:
            return self._plan(intent)
        if self.evictor is None:
            return self._kill(intent, f"no API server ({self.api_unavailable})")
        owner = self._owner(intent)
        if owner is not None:
            loop = self._loop(intent, owner)
            if loop:
                posted = self._report(intent.namespace, intent.pod, intent.pod_uid, loop)
                return f"not evicted: {loop} ({posted})"
        result = self.evictor.evict(
            intent.namespace,
            intent.pod,
            intent.reason,
            grace_period_s=intent.grace_period_s,
            uid=intent.pod_uid or None,
        )
        if result.outcome is EvictOutcome.EVICTED:
            if owner is not None:
                key = (intent.namespace, owner.kind, owner.name)
                self._evicted_owners[key] = (self._clock(), f"{intent.namespace}/{intent.pod}")
            return f"evicted pod {intent.namespace}/{intent.pod}: {intent.reason}"
        if result.outcome is EvictOutcome.NOT_NOW:
            # A budget said no: respected, never escalated (the policy asks again later).
            after = f" (retry after {result.retry_after_s:g}s)" if result.retry_after_s else ""
            return f"not now: {result.message}{after}"
        if result.outcome is EvictOutcome.GONE:
            return f"already gone: {result.message}"
        if self.settings.kill_fallback:
            return self._kill(intent, f"eviction failed ({result.message})")
        raise HostError(self.evictor.server, _errno(result), f"eviction failed: {result.message}")

    def _owner(self, intent: Evict) -> PodController | None:
        """The pod's real controller, when loops are guarded and the API tells."""
        if self.settings.owner_window_s <= 0 or self.evictor is None:
            return None
        return self.evictor.controller(intent.namespace, intent.pod)

    def _loop(self, intent: Evict, owner: PodController) -> str:
        """Why evicting this pod would be a loop ("" when it would not)."""
        now = self._clock()
        window = self.settings.owner_window_s
        for key, (when, _) in list(self._evicted_owners.items()):
            if now - when >= window:
                del self._evicted_owners[key]
        seen = self._evicted_owners.get((intent.namespace, owner.kind, owner.name))
        if seen is None:
            return ""
        when, earlier = seen
        return (
            f"pod {intent.namespace}/{intent.pod}: its owner {owner.kind} "
            f"{intent.namespace}/{owner.name} lost pod {earlier} here {now - when:.0f} s ago "
            f"(window {window:g} s), so it is being rescheduled onto this node in a loop; "
            "keep it off this node (a taint it does not tolerate, or node anti-affinity), "
            "or have the scheduler place reclaimed pods by the node's published "
            "reclaimable resources"
        )

    def _report(self, namespace: str, pod: str, uid: str, message: str) -> str:
        """A Warning Event on the pod; the outcome line says whether it was posted."""
        if self.evictor is None:
            return f"no event posted: no API server ({self.api_unavailable})"
        if self.dry_run:
            return f"dry-run: would post event {LOOP_EVENT_REASON} on pod {namespace}/{pod}"
        result = self.evictor.report(namespace, pod, uid, LOOP_EVENT_REASON, message)
        if result.outcome is EvictOutcome.FAILED:
            return f"event not posted: {result.message}"
        return f"event {LOOP_EVENT_REASON} posted on pod {namespace}/{pod}"

    def _kill(self, intent: Evict, why: str) -> str:
        """The fallback: kill the container's processes (ForeignCgroup propagates as
        a refusal; processes that survive every pass are retried)."""
        ref = intent.container
        result = self.killer.kill(ref.cgroups_path, ref.id, f"{intent.reason}; {why}")
        if result.outcome is EvictOutcome.FAILED:
            raise HostError(ref.cgroups_path, errno.EAGAIN, f"{why}; kill: {result.message}")
        return f"{why}; killed container {ref.name or ref.id}: {result.message}"

    def _plan(self, intent: Evict) -> str:
        """Dry run: the whole decision, recorded in the writer, nothing sent or killed."""
        ref = intent.container
        grace = "" if intent.grace_period_s is None else f"grace period {intent.grace_period_s}s"
        target = f"{intent.namespace}/{intent.pod}"
        if self.evictor is not None:
            self.writer.apply(HostChange("evict pod", target, grace, intent.reason), lambda: None)
            what = f"would evict pod {target} (uid {intent.pod_uid or '?'}"
            what += f", {grace})" if grace else ")"
            if self.settings.kill_fallback:
                what += f"; if the API server fails, kill container {ref.name or ref.id}"
        else:
            # The killer plans in dry-run mode: ownership checked, the members counted.
            killed = self.killer.kill(ref.cgroups_path, ref.id, intent.reason)
            what = (
                f"no API server ({self.api_unavailable}); container {ref.name or ref.id} of "
                f"pod {target}: {killed.message}"
            )
        return f"dry-run: {what}: {intent.reason}"

    def _build(self) -> KubernetesEvictor:
        """The API evictor the settings ask for; EvictorUnavailable says why not."""
        s = self.settings
        if s.api == "off":
            raise EvictorUnavailable("the Eviction API is off ([eviction] api = off)")
        if s.api == "kubeconfig" or (s.api == "auto" and s.kubeconfig):
            if not s.kubeconfig:
                raise EvictorUnavailable("[eviction] api = kubeconfig needs [eviction] kubeconfig")
            return KubernetesEvictor.from_kubeconfig(s.kubeconfig, self.writer)
        return KubernetesEvictor.in_cluster(self.writer)


def _errno(result: EvictResult) -> int:
    """Whether retrying may help: no answer or a server error may pass (EAGAIN); a
    refusal for want of rights (401/403) or a request the server rejects does not."""
    code = result.http_status
    if code is None or code >= 500:
        return errno.EAGAIN
    if code in (401, 403):
        return errno.EACCES
    return errno.EINVAL
