#!/usr/bin/env python3
"""NRI round-trip latency: embedded runtime (this process) <-> nri-qos plugin (a child
process), over a real unix socket.

Measures, as the runtime sees them (request written -> reply decoded):
- CreateContainer with 0, 100 and 1,000 live containers (p50 / p99), the plugin
  running the no-op recording policy (`--policy qos` runs the real one instead);
- Synchronize of 1,000 containers: a fresh plugin connecting to a runtime that already
  runs them (median of several connects).

Targets (issue 2): CreateContainer p99 <= 1 ms, Synchronize of 1,000 <= 100 ms on a 2-core
machine. `--json` prints {"create_container_ms": {"0": {"p50": x, "p99": y}, ...},
"synchronize_1000_ms": z}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend
from embedded_runtime.records import Outcome, PluginState
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
)

LEVELS = (0, 100, 1000)
REPO = Path(__file__).resolve().parent.parent


def _pod(i: int) -> Pod:
    return Pod(
        id=f"pod-{i:05d}",
        name=f"bench-{i}",
        namespace="bench",
        uid=f"uid-{i:05d}",
        annotations={"katalyst.kubewharf.io/qos_level": "shared_cores"},
        cgroup_parent=f"/bench/pod-{i:05d}",
    )


def _container(i: int) -> Container:
    return Container(
        id=f"ctr-{i:05d}",
        pod_id=f"pod-{i:05d}",
        name="app",
        state=ContainerState.CREATED,
        args=("sleep", "3600"),
        env=("A=1",),
        resources=Resources(
            cpu=CpuResources(shares=102, quota=10_000, period=100_000),
            memory=MemoryResources(limit=64 << 20),
        ),
        oom_score_adj=900,
    )


def _start_plugin(socket_path: Path, config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nri_plugin",
            "run",
            "--socket",
            str(socket_path),
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        env=env,
    )


async def _add(runtime: EmbeddedRuntime, i: int) -> None:
    await runtime.run_pod_sandbox(_pod(i))
    await runtime.create_container(f"pod-{i:05d}", _container(i))


async def _drop(runtime: EmbeddedRuntime, i: int) -> None:
    await runtime.remove_container(f"ctr-{i:05d}")
    await runtime.remove_pod_sandbox(f"pod-{i:05d}")


async def _until_no_ready_plugin(runtime: EmbeddedRuntime) -> None:
    """The runtime notices a plugin's exit on its next read; wait for that."""
    for _ in range(1000):
        if not any(p.state is PluginState.READY for p in runtime.plugins):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the runtime still lists the stopped plugin as ready")


def _create_latencies(runtime: EmbeddedRuntime, since: int) -> list[float]:
    return [
        r.latency * 1000
        for r in runtime.log[since:]
        if r.method == "CreateContainer" and r.outcome is Outcome.OK
    ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def measure(samples: int, sync_rounds: int, policy: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nri-bench-") as tmp:
        sock = Path(tmp) / "nri.sock"
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[policy]\nname = "{policy}"\n'
            + ("rebalance_interval_ms = 0\n" if policy == "qos" else "")
        )
        runtime = EmbeddedRuntime(sock, flavor=CONTAINERD_2_3, backend=InMemoryBackend())
        await runtime.start()
        plugin = _start_plugin(sock, config)
        try:
            await runtime.wait_for_plugins(1, timeout=30)
            results: dict[str, dict[str, float]] = {}
            live = 0
            next_id = 100_000
            for level in LEVELS:
                while live < level:
                    await _add(runtime, live)
                    live += 1
                # warm-up, then measured create/remove pairs that keep `level` live
                for _ in range(20):
                    await _add(runtime, next_id)
                    await _drop(runtime, next_id)
                    next_id += 1
                mark = len(runtime.log)
                for _ in range(samples):
                    await _add(runtime, next_id)
                    await _drop(runtime, next_id)
                    next_id += 1
                lat = _create_latencies(runtime, mark)
                results[str(level)] = {
                    "p50": round(statistics.median(lat), 3),
                    "p99": round(_percentile(lat, 0.99), 3),
                }
            # Synchronize: 1,000 live containers, a fresh plugin connecting each round
            sync: list[float] = []
            for _ in range(sync_rounds):
                plugin.terminate()
                plugin.wait(10)
                await _until_no_ready_plugin(runtime)
                mark = len(runtime.log)
                plugin = _start_plugin(sock, config)
                await runtime.wait_for_plugins(1, timeout=30)
                sync += [
                    r.latency * 1000
                    for r in runtime.log[mark:]
                    if r.method == "Synchronize" and r.outcome is Outcome.OK
                ]
            return {
                "create_container_ms": results,
                "synchronize_1000_ms": round(statistics.median(sync), 3),
            }
        finally:
            plugin.terminate()
            try:
                plugin.wait(10)
            except subprocess.TimeoutExpired:
                plugin.kill()
            await runtime.stop()


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Same shape as one run; every number is the median over the runs."""
    levels = runs[0]["create_container_ms"]
    return {
        "create_container_ms": {
            level: {
                q: round(statistics.median(r["create_container_ms"][level][q] for r in runs), 3)
                for q in ("p50", "p99")
            }
            for level in levels
        },
        "synchronize_1000_ms": round(statistics.median(r["synchronize_1000_ms"] for r in runs), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=500, help="creates measured per level")
    parser.add_argument("--sync-rounds", type=int, default=5)
    parser.add_argument("--policy", choices=["recording", "qos"], default="recording")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run N times and report each value's median (a single p99 is noisy on a VM)",
    )
    args = parser.parse_args()
    runs = [
        asyncio.run(measure(args.samples, args.sync_rounds, args.policy))
        for _ in range(max(1, args.repeat))
    ]
    result = _median_of(runs)
    if args.json:
        print(json.dumps(result))
        return
    for level, stats in result["create_container_ms"].items():
        print(
            f"CreateContainer, {level:>4} live containers: "
            f"p50 {stats['p50']:.3f} ms  p99 {stats['p99']:.3f} ms"
        )
    print(f"Synchronize of 1,000 containers: {result['synchronize_1000_ms']:.3f} ms (median)")


if __name__ == "__main__":
    main()
