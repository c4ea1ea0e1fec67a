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
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from isolation.errors import HostError
from isolation.evict import (
    CgroupKiller,
    EvictorUnavailable,
    EvictOutcome,
    EvictResult,
    KubernetesEvictor,
)
from isolation.host import LinuxHost
from isolation.writes import HostChange, HostWriter
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import Evict, HostIntent

log = logging.getLogger("nri_qos.control.evict")

API_MODES = ("auto", "in-cluster", "kubeconfig", "off")


@dataclass(frozen=True, slots=True)
class EvictSettings:
    enabled: bool = True
    api: str = "auto"  # "auto" | "in-cluster" | "kubeconfig" | "off"
    kubeconfig: str = ""  # a kubeconfig file, for nodes where nri-qos runs outside a pod
    kill_fallback: bool = False  # kill the container's processes when the API fails
    dry_run: bool = False  # decide and report, evict and kill nothing


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
    ) -> None:
        self.settings = settings
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
        if not isinstance(intent, Evict):
            raise TypeError(f"the evict controller cannot apply {type(intent).__name__}")
        if self.dry_run:
            return self._plan(intent)
        if self.evictor is None:
            return self._kill(intent, f"no API server ({self.api_unavailable})")
        result = self.evictor.evict(
            intent.namespace,
            intent.pod,
            intent.reason,
            grace_period_s=intent.grace_period_s,
            uid=intent.pod_uid or None,
        )
        if result.outcome is EvictOutcome.EVICTED:
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
