"""Random kubelet-like histories through the engine: init, sidecar and app containers of
several pods, in the order a kubelet creates, starts, stops and removes them, with
in-place resizes, and init containers that exit silently (the runtime does not always send
StopContainer for a container that exits on its own; the kubelet removes it much later).

After every step: no exited container holds an exclusive CPU, no CPU is in two exclusive
sets or in an exclusive set and another container's cpuset, no init container is ever
dedicated, and a resized dedicated container kept the CPUs it had (growth) or kept only
CPUs it had (shrink).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.roles import KUBELET_TYPE_ANNOTATION, ROLES_ANNOTATION
from nri_plugin.policy.workload import DEDICATED, PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import Container, MemoryResources, Pod, Resources
from tests.builders import QOS, MiB, annotations, container, kubelet_cpu
from tests.policy.sysfs_builder import MachineShape

SHAPE = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)  # 16 CPUs


@dataclass(frozen=True)
class PodSpec:
    qos: str
    numa_binding: bool
    inits: int
    sidecar: str  # "" none, "annotation", "pod-spec" (the adapter), "unmarked"
    sidecar_dedicated: bool
    app_millicores: int


@dataclass
class PodRun:
    """Where the kubelet is with one pod: the containers it will create, in order."""

    spec: PodSpec
    pod: Pod
    todo: list[tuple[str, str]]  # (container name, kubelet type)
    running: list[str] = field(default_factory=list)
    exited: list[str] = field(default_factory=list)  # exited, not removed yet
    current: str = ""  # the init container the kubelet waits for, if any
    sizes: dict[str, int] = field(default_factory=dict)
    started: bool = False


pod_specs = st.builds(
    PodSpec,
    qos=st.sampled_from(["dedicated_cores", "shared_cores", "reclaimed_cores"]),
    numa_binding=st.booleans(),
    inits=st.integers(0, 2),
    sidecar=st.sampled_from(["", "annotation", "pod-spec", "unmarked"]),
    sidecar_dedicated=st.booleans(),
    app_millicores=st.sampled_from([1000, 2000, 3000, 4000]),
)
actions = st.lists(
    st.tuples(
        st.sampled_from(["advance", "resize", "resize", "remove-exited", "terminate"]),
        st.integers(0, 3),  # which pod
        st.sampled_from([1000, 2000, 4000, 6000, 12000]),  # a resize's new size
        st.booleans(),  # an init container's exit is silent
    ),
    max_size=60,
)


def make_pod(index: int, spec: PodSpec, generation: int = 0) -> PodRun:
    name = f"p{index}g{generation}"
    extra: dict[str, str] = {}
    if spec.sidecar == "annotation":
        extra[ROLES_ANNOTATION] = json.dumps({f"{name}-proxy": "sidecar"})
    if spec.sidecar_dedicated:
        extra[f"{QOS}/container.{name}-proxy"] = "dedicated_cores"
    memory = {"numa_binding": "true"} if spec.numa_binding else None
    pod = Pod(
        id=f"pod-{name}",
        name=name,
        namespace="default",
        uid=f"uid-{name}",
        annotations=annotations(spec.qos, memory=memory, **extra),
    )
    todo = [(f"{name}-init{i}", "init") for i in range(spec.inits)]
    if spec.sidecar:
        todo.append((f"{name}-proxy", "init"))  # a sidecar is an init container to the kubelet
    todo.append((f"{name}-app", "container"))
    return PodRun(spec, pod, todo)


def kubelet_container(run: PodRun, name: str, kind: str, millicores: int) -> Container:
    base = container(name, millicores, pod_name=run.pod.name)
    return replace(base, annotations={KUBELET_TYPE_ANNOTATION: kind})


def resources(millicores: int) -> Resources:
    return Resources(cpu=kubelet_cpu(millicores), memory=MemoryResources(limit=256 * MiB))


class History:
    def __init__(self, specs: list[PodSpec]) -> None:
        self.engine = Engine(SHAPE.expected_topology(), EngineConfig(planner=PlannerConfig()))
        runtime = infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True)
        self.engine.connect(runtime)
        self.engine.synchronize([], [])
        self.pods = [make_pod(i, s) for i, s in enumerate(specs)]
        self.gone: set[str] = set()  # exited containers, removed or not
        self.inits: set[str] = set()
        self.generation = 0

    def step(self, action: str, index: int, size: int, silent: bool) -> None:
        run = self.pods[index % len(self.pods)]
        e = self.engine
        app_runs = f"{run.pod.name}-app" in run.running
        if action == "advance" or (action == "resize" and not app_runs):
            self.advance(run, silent)  # a resize waits for the app: the kubelet goes on
        elif action == "resize":
            cid = f"ctr-{run.pod.name}-app"
            before = e.plan.containers[cid]
            app = kubelet_container(run, f"{run.pod.name}-app", "container", run.sizes[cid])
            e.container_updated(run.pod, app, resources(size))
            run.sizes[cid] = size
            after = e.plan.containers[cid]
            if before.pool == DEDICATED:  # never sent to the shared pool by a resize
                assert after.pool == DEDICATED, after.cpus.reason
                old, new = before.cpus.value, after.cpus.value
                kept = old <= new if len(new) >= len(old) else new <= old
                assert kept, (sorted(old), sorted(new), after.cpus.reason)
        elif action == "remove-exited":
            for name in run.exited:
                e.container_stopped(run.pod, container(name, pod_name=run.pod.name))
            run.exited.clear()
        elif action == "terminate" and run.started:
            for name in reversed(run.running):  # the kubelet stops app, then sidecars
                e.container_stopped(run.pod, container(name, pod_name=run.pod.name))
                self.gone.add(f"ctr-{name}")
            run.running.clear()
            e.pod_removed(run.pod)  # a ReplicaSet makes the next one, with a new name
            slot = index % len(self.pods)
            self.generation += 1
            self.pods[slot] = make_pod(slot, run.spec, self.generation)

    def advance(self, run: PodRun, silent: bool) -> None:
        e = self.engine
        if not run.started:
            run.started = True
            e.pod_started(run.pod)
            if run.spec.sidecar == "pod-spec":
                e.pod_roles(run.pod.uid, {n: "sidecar" for n, _ in run.todo if "proxy" in n})
        if run.current:  # the init container the kubelet waited for exits
            cid = f"ctr-{run.current}"
            run.running.remove(run.current)
            run.exited.append(run.current)
            self.gone.add(cid)
            if not silent:
                e.container_stopped(run.pod, container(run.current, pod_name=run.pod.name))
            run.current = ""
            return
        if not run.todo:
            return
        name, kind = run.todo.pop(0)
        size = run.spec.app_millicores
        ctr = kubelet_container(run, name, kind, size)
        e.container_created(run.pod, ctr)
        e.container_started(run.pod, ctr)
        run.running.append(name)
        run.sizes[ctr.id] = size
        if kind == "init" and "proxy" not in name:
            run.current = name
            self.inits.add(ctr.id)

    def check(self) -> None:
        plans = self.engine.plan.containers
        held: dict[int, str] = {}
        for cid, plan in plans.items():
            if plan.pool != DEDICATED:
                continue
            assert cid not in self.gone, f"{cid} exited but holds {sorted(plan.cpus.value)}"
            assert cid not in self.inits, f"init container {cid} holds exclusive CPUs"
            for cpu in plan.cpus.value:
                assert cpu not in held, f"CPU {cpu} held by {held.get(cpu)} and {cid}"
                held[cpu] = cid
        for cid, plan in plans.items():
            if plan.pool != DEDICATED:
                shared = {c: held[c] for c in plan.cpus.value if c in held}
                assert not shared, f"{cid} runs on exclusive CPUs {shared}"


@settings(max_examples=200, deadline=None)
@given(st.lists(pod_specs, min_size=1, max_size=4), actions)
def test_kubelet_histories_keep_exclusive_cpus_exclusive_and_released(
    specs: list[PodSpec], steps: list[tuple[str, int, int, bool]]
) -> None:
    history = History(specs)
    for action, index, size, silent in steps:
        history.step(action, index, size, silent)
        history.check()
