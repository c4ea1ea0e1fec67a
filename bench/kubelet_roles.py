"""Container roles and in-place resize, shown: the plan before and after each scenario.

Drives the engine (the same one the plugin runs) through what a kubelet does on a 16-CPU,
two-NUMA-node host (node 0 = CPUs 0-3,8-11, node 1 = 4-7,12-15) and prints, for each
scenario, every container's pool, CPUs and memory nodes with the reason the plan gives,
the shared pool, and the notes of the event:

* init then app: a dedicated_cores pod's init container runs, exits, then the app starts;
* sidecar: a sidecar (restartable init container) starts first and keeps running;
* resize up / resize down: the app's CPU limit grows from 2 to 4, then shrinks to 2;
* resize that does not fit: the app asks for more than the host has free.

    python3 bench/kubelet_roles.py
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nri_plugin.policy.engine import Engine, EngineConfig, Step  # noqa: E402
from nri_plugin.policy.roles import KUBELET_TYPE_ANNOTATION, ROLES_ANNOTATION  # noqa: E402
from nri_plugin.policy.workload import SHARED, PlannerConfig  # noqa: E402
from nri_plugin.protocol.versions import infer_runtime  # noqa: E402
from qos_model.containers import Container, MemoryResources, Resources  # noqa: E402
from qos_model.cpulist import format_cpu_list  # noqa: E402
from tests.builders import MiB, container, kubelet_cpu, pod  # noqa: E402
from tests.policy.sysfs_builder import MachineShape  # noqa: E402

SHAPE = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)


def engine() -> Engine:
    e = Engine(SHAPE.expected_topology(), EngineConfig(planner=PlannerConfig()))
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    e.synchronize([], [])
    return e


def made(name: str, pod_name: str, millicores: int, kind: str) -> Container:
    """A container as a recent kubelet creates it (its type annotated)."""
    return replace(
        container(name, millicores, pod_name=pod_name),
        annotations={KUBELET_TYPE_ANNOTATION: kind},
    )


def resize(millicores: int) -> Resources:
    return Resources(cpu=kubelet_cpu(millicores), memory=MemoryResources(limit=256 * MiB))


def show(title: str, e: Engine, step: Step | None = None) -> None:
    print(f"  {title}:")
    for cid, plan in sorted(e.plan.containers.items()):
        mems = format_cpu_list(plan.mems.value) if plan.mems.value else "all"
        print(
            f"    {cid:<14} {plan.role:<8} {plan.qos_class:<16} pool {plan.pool:<10} "
            f"cpus {format_cpu_list(plan.cpus.value):<12} mems {mems}"
        )
        print(f"      reason: {plan.cpus.reason}")
    print(f"    {SHARED} pool: {format_cpu_list(e.plan.pools.shared)}")
    if step is not None:
        for note in step.intents.notes:
            if note.kind in ("role", "allocation"):
                print(f"    note [{note.kind}, {note.severity}]: {note.message}")


def init_then_app() -> None:
    e = engine()
    db = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    step = e.container_created(db, made("migrate", "db", 4000, "init"))
    show("before (init container running)", e, step)
    e.container_stopped(db, made("migrate", "db", 4000, "init"))
    step = e.container_created(db, made("db", "db", 4000, "container"))
    show("after (init exited, app started)", e, step)


def sidecar() -> None:
    e = engine()
    db = pod("db", "dedicated_cores", **{ROLES_ANNOTATION: '{"proxy": "sidecar"}'})
    step = e.container_created(db, made("proxy", "db", 1000, "init"))
    show("before (sidecar started first)", e, step)
    step = e.container_created(db, made("db", "db", 2000, "container"))
    show("after (app started, sidecar still running)", e, step)


def resizes() -> None:
    e = engine()
    db = pod("db", "dedicated_cores", memory={"numa_binding": "true"})
    web = pod("web", "shared_cores")
    e.container_created(web, made("web", "web", 1000, "container"))
    app = made("db", "db", 2000, "container")
    e.container_created(db, app)
    print("resize up (2 -> 4 CPUs)")
    show("before", e)
    step = e.container_updated(db, app, resize(4000))
    show("after", e, step)
    (reply,) = step.intents.reply_updates
    print(f"    reply to the kubelet's update: {reply.resources.cpu}")
    print("resize down (4 -> 2 CPUs)")
    show("before", e)
    step = e.container_updated(db, app, resize(2000))
    show("after", e, step)
    print("resize that does not fit (2 -> 12 CPUs, NUMA-bound: one node has 8)")
    show("before", e)
    step = e.container_updated(db, app, resize(12000))
    show("after", e, step)


def main() -> None:
    print("init then app")
    init_then_app()
    print("sidecar")
    sidecar()
    resizes()


if __name__ == "__main__":
    main()
