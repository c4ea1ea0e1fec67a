#!/usr/bin/env python3
"""The engine alone, in this process: what each runtime event costs the policy thread.

No socket, no protobuf, no runtime: `nri_plugin.policy.engine.Engine` on a recorded
topology (`--sysfs`, default the 112-CPU `server`) with the mixed Katalyst population of
`population.py` (1,000 live containers). Measures, in milliseconds:

- Synchronize of the 1,000 containers as a restarted plugin sees them (each reports the
  CPUs and oom_score_adj a first engine gave it, so nothing needs to change);
- CreateContainer followed by StopContainer of the measured pairs (the same draw as
  `nri_latency.py`), p50 / p99 / max, and how many of them moved a pool;
- a pool move on its own: a dedicated container arriving and leaving, which moves the
  shared pool under hundreds of containers.

Use it to see the engine's share of `nri_latency.py`'s numbers without the noise of two
processes and a socket: `python3 bench/engine_steps.py [--json] [--samples N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import population as bench_population  # noqa: E402

from nri_plugin.policy.class_isolation import (  # noqa: E402
    Backend,
    HostSupport,
    IsolationConfig,
)
from nri_plugin.policy.engine import Engine, EngineConfig  # noqa: E402
from nri_plugin.protocol.versions import infer_runtime  # noqa: E402
from qos_model.containers import Container, ContainerState, CpuResources, Pod  # noqa: E402
from qos_model.cpulist import format_cpu_list  # noqa: E402
from tests.snapshots import SnapshotLibrary  # noqa: E402

LIVE = 1000


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
        "max": round(ordered[-1], 3),
    }


def _pair(i: int, spec: bench_population.Spec) -> tuple[Pod, Container]:
    return bench_population.demo_pod(i, spec), bench_population.demo_container(i, spec)


def _engine(topology: Any, isolation: bool = False) -> Engine:
    config = EngineConfig()
    if isolation:  # every backend up, as on a cgroup v2 host with resctrl and shaping
        on = Backend(True, "started")
        support = HostSupport(rdt=on, io=on, net=on, io_via_runtime=True)
        planner = replace(config.planner, isolation=IsolationConfig(host=support))
        config = replace(config, planner=planner)
    engine = Engine(topology, config)
    engine.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", True))
    engine.synchronize([], [])
    return engine


def _as_running(engine: Engine, container: Container, annotations: dict[str, str]) -> Container:
    """The container as the runtime reports it once our plan was applied."""
    plan = engine.plan.containers[container.id]
    res = container.resources
    assert res is not None
    mems = plan.mems.value
    cpu = replace(
        res.cpu or CpuResources(),
        cpus=format_cpu_list(plan.cpus.value),
        mems=format_cpu_list(mems) if mems else "",
    )
    return replace(
        container,
        state=ContainerState.RUNNING,
        resources=replace(res, cpu=cpu),
        oom_score_adj=plan.oom_score_adj.value,
        annotations={**container.annotations, **annotations},
    )


def measure(snapshot: str, samples: int, isolation: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nri-engine-bench-") as tmp:
        topology = SnapshotLibrary(Path(tmp)).topology(snapshot)
    mix = bench_population.Population.build("mixed", samples)
    pods: list[Pod] = []
    first = _engine(topology, isolation)
    running: list[tuple[Container, dict[str, str]]] = []
    for i, spec in enumerate(mix.live[:LIVE]):
        pod, container = _pair(i, spec)
        step = first.container_created(pod, container)
        assert step.intents.adjustment is not None
        pods.append(pod)
        running.append((container, dict(step.intents.adjustment.annotations)))
    reported = [_as_running(first, c, a) for c, a in running]

    sync: list[float] = []
    for _ in range(5):
        engine = _engine(topology, isolation)
        started = time.perf_counter()
        step = engine.synchronize(pods, reported)
        sync.append((time.perf_counter() - started) * 1000)
        assert not step.intents.reply_updates, "restart moved something"
        # RDT, I/O and network are re-applied to running containers by their controllers
        # (each skips what holds); nothing else may be asked of the host
        assert all(i.domain in ("rdt", "io", "net") for i in step.intents.host)

    creates: list[float] = []
    stops: list[float] = []
    moved = 0
    for n, spec in enumerate(mix.pairs[LIVE]):
        pod, container = (
            bench_population.demo_pod(500_000 + n, spec),
            bench_population.demo_container(500_000 + n, spec),
        )
        started = time.perf_counter()
        step = engine.container_created(pod, container)
        creates.append((time.perf_counter() - started) * 1000)
        moved += bool(step.intents.updates)
        started = time.perf_counter()
        engine.container_stopped(pod, container)
        stops.append((time.perf_counter() - started) * 1000)

    dedicated = next(s for s in mix.pairs[LIVE] if s.qos_level == "dedicated_cores")
    moves: list[float] = []
    members = 0
    for n in range(50):
        pod, container = (
            bench_population.demo_pod(900_000 + n, dedicated),
            bench_population.demo_container(900_000 + n, dedicated),
        )
        started = time.perf_counter()
        step = engine.container_created(pod, container)
        moves.append((time.perf_counter() - started) * 1000)
        members = len(step.intents.all_updates())
        engine.container_stopped(pod, container)
    return {
        "topology": snapshot,
        "live": LIVE,
        "synchronize_ms": _stats(sync),
        "create_ms": _stats(creates[bench_population.WARMUP :]),
        "stop_ms": _stats(stops[bench_population.WARMUP :]),
        "creates_that_moved_a_pool": f"{moved}/{len(creates)}",
        "pool_move_ms": _stats(moves),
        "pool_move_members": members,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sysfs", default="server")
    parser.add_argument(
        "--isolation", action="store_true", help="with RDT, I/O and network backends up"
    )
    args = parser.parse_args()
    result = measure(args.sysfs, args.samples, args.isolation)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
