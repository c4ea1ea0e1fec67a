"""The QoS policy: the plugin runtime's hooks, answered by the engine.

A thin adapter: each hook calls the matching `Engine` method and returns its intents. The
engine keeps the state and decides; this class only knows which runtime event means what
(a StopContainer and a RemoveContainer both end a container; a runtime-provided config
arrives with Configure) and turns a bad runtime-provided config into a note instead of an
error (the previous config stays in force).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from nri_plugin.policy.api import PolicyBase
from nri_plugin.policy.drift import DriftBook, Observation, Target, targets
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import NO_INTENTS, Intents, Note, Severity
from nri_plugin.policy.workload import UsageSample
from qos_model.containers import Container, Pod, Resources
from qos_model.runtime import RuntimeInfo
from qos_model.signals import SignalSnapshot

# Parses the config text a runtime hands a pre-installed plugin (conf.d) into an engine
# config; injected by the daemon, which owns the config format. Raises ValueError.
ConfigParser = Callable[[str], EngineConfig]


class QosPolicy(PolicyBase):
    """Every hook overridden here is an NRI event the runtime sends us synchronously on a
    pod's start or end path (`dispatch.wanted_events`), so each one is here only for a
    decision that depends on it (`EVENT_REASONS`, checked by the tests)."""

    name = "qos"

    # Why each subscribed event is needed: the decision that depends on it.
    EVENT_REASONS = {
        "create_container": "the container's plan: its cpuset, memory nodes, weights, OOM "
        "band, RDT class and I/O weight go in the CreateContainer adjustment; other "
        "containers whose pools moved get updates",
        "update_container": "an in-place resize grows or shrinks an exclusive set, and a "
        "kubelet cpuset (static CPU manager) is answered with our placement",
        "stop_container": "a stopped container's exclusive CPUs and pool share are freed "
        "at once (the kubelet may keep the dead container for long before removing it)",
        "remove_container": "a container removed without a StopContainer (created, never "
        "started) is forgotten",
        "remove_pod": "the pod's record, its container roles and its interference history "
        "are dropped; containers a runtime never stopped or removed go with it",
        "post_start_container": "only where something must happen once the container "
        "runs (Engine.needs_post_start): oom_score_adj on runtimes before NRI v0.7, an "
        "RDT group or blkio weight we write, network classification",
    }
    # Not subscribed: RunPodSandbox (the pod arrives with its first CreateContainer),
    # StopPodSandbox (RemovePodSandbox follows), UpdatePodSandbox (pod-level resources are
    # the kubelet's), PostCreate/Start/PostUpdate (nothing to decide there).

    def __init__(self, engine: Engine, config_parser: ConfigParser | None = None) -> None:
        self.engine = engine
        self._config_parser = config_parser
        # Drift across reconcile periods (policy thread only; the views show it).
        self.drift = DriftBook()

    def configure(self, runtime: RuntimeInfo, config: str) -> Intents:
        """A pre-installed plugin gets its config (/etc/nri/conf.d/NN-name.conf) here."""
        self.engine.connect(runtime)
        if not config.strip() or self._config_parser is None:
            return NO_INTENTS
        try:
            new = self._config_parser(config)
            if new == self.engine.config:
                return NO_INTENTS
            self.engine.reconfigure(new)
        except ValueError as exc:
            note = Note(
                "config",
                "node",
                f"runtime-provided config ignored, keeping the current one: {exc}",
                Severity.WARNING,
            )
            return Intents(notes=(note,))
        return Intents(notes=(Note("config", "node", "applied the runtime-provided config"),))

    def unneeded_hooks(self, runtime: RuntimeInfo) -> frozenset[str]:
        """PostStartContainer is a synchronous round trip on every container start: only
        subscribed when something must happen once the container runs (see
        `Engine.needs_post_start`)."""
        if self.engine.needs_post_start(runtime):
            return frozenset()
        return frozenset({"post_start_container"})

    def synchronize(self, pods: Sequence[Pod], containers: Sequence[Container]) -> Intents:
        return self.engine.synchronize(pods, containers).intents

    def remove_pod(self, pod: Pod) -> Intents:
        return self.engine.pod_removed(pod).intents

    def create_container(self, pod: Pod, container: Container) -> Intents:
        return self.engine.container_created(pod, container).intents

    def post_start_container(self, pod: Pod, container: Container) -> Intents:
        return self.engine.container_started(pod, container).intents

    def update_container(
        self, pod: Pod, container: Container, requested: Resources | None
    ) -> Intents:
        return self.engine.container_updated(pod, container, requested).intents

    def stop_container(self, pod: Pod, container: Container) -> Intents:
        return self.engine.container_stopped(pod, container).intents

    def remove_container(self, pod: Pod, container: Container) -> Intents:
        return self.engine.container_stopped(pod, container).intents

    def rebalance(self, usage: UsageSample) -> Intents:
        """New online usage (from the daemon's sampler): resize the reclaimed pool."""
        return self.engine.usage_sampled(usage).intents

    def protect(self, snapshot: SignalSnapshot) -> Intents:
        """One window of interference signals (from the daemon's collectors)."""
        return self.engine.signals_sampled(snapshot).intents

    def drift_targets(self) -> list[Target]:
        """What the reconcile loop reads on the host: every planned container."""
        return targets(self.engine.plan.containers, self.engine.table)

    def reconcile(self, observed: Observation) -> Intents:
        """One reconcile period (from the daemon's loop): repair what drifted."""
        return self.engine.drift_found(observed, self.drift).intents

    def pod_roles(self, pod_uid: str, roles: Mapping[str, str]) -> Intents:
        """A pod's container roles as its spec gives them (from the pod-spec watch,
        `nri_plugin.podspec`): its live containers re-planned when a role moves them."""
        return self.engine.pod_roles(pod_uid, roles).intents
