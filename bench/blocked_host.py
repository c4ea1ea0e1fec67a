"""Container starts while one host file hangs: the hardening issue's first finding, measured.

A real `python3 -m nri_plugin run` (from `--plugin-repo`, default this checkout) serves an
embedded runtime that behaves like containerd 1.7.13 (NRI v0.4: the runtime cannot apply
oom_score_adj, so nri-qos writes it itself after each start). Its `[host] root` is a
directory laid out like the kernel's (`tests/faults/hostroot.py`: a cgroup2 tree, one
procfs entry per container process, a sysfs CPU topology). With `--blocked`, the first
container's `/proc/<pid>/oom_score_adj` is a FIFO that nobody reads: a write to it hangs
in open(2), as a write to a hung cgroupfs or procfs file does.

For each container (a reclaimed_cores pod: the band nri-qos writes is nonzero), it reports
the CreateContainer and StartContainer round trips as the runtime sees them, and then how
many of the other containers' oom_score_adj files hold the planned value after a grace
period (writes the plugin owed but never made show up here).

    python3 bench/blocked_host.py --containers 60 [--plugin-repo PATH]... [--json]

Each `--plugin-repo` is measured healthy and blocked, one after the other, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nri_latency import BenchError, Checkout, PluginChild  # noqa: E402

from embedded_runtime import CONTAINERD_1_7, EmbeddedRuntime, InMemoryBackend  # noqa: E402
from tests.builders import MiB, container, pod  # noqa: E402
from tests.faults.hostroot import HostRoot  # noqa: E402
from tests.policy.sysfs_builder import MachineShape, write_sysfs  # noqa: E402

FIRST_PID = 40000


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    checkout: Checkout, containers: int, blocked: bool, grace: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nri-blocked-") as tmp:
        tree = HostRoot(Path(tmp) / "host")
        write_sysfs(MachineShape(cores_per_l3=8), tree.root)
        names = [f"b{i:03d}" for i in range(containers)]
        for i, name in enumerate(names):
            tree.add_container(f"ctr-{name}", [FIRST_PID + i], pod=f"pod-{name}")
        if blocked:
            tree.block(FIRST_PID)
        config = Path(tmp) / "config.toml"
        config.write_text(
            '[policy]\nname = "qos"\nrebalance_interval_ms = 0\n'
            f"[host]\nroot = {json.dumps(str(tree.root))}\n"
        )
        sock = Path(tmp) / "nri.sock"
        runtime = EmbeddedRuntime(
            sock, flavor=CONTAINERD_1_7, backend=InMemoryBackend(first_pid=FIRST_PID)
        )
        await runtime.start()
        plugin = PluginChild(checkout, sock, config, Path(tmp) / "plugin.stderr")
        try:
            await plugin.ready(runtime)
            create, start = [], []
            for name in names:
                await runtime.run_pod_sandbox(pod(name, "reclaimed_cores"))
                t0 = time.monotonic()
                await runtime.create_container(f"pod-{name}", container(name, 100, memory=64 * MiB))
                t1 = time.monotonic()
                await runtime.start_container(f"ctr-{name}")
                create.append((t1 - t0) * 1000)
                start.append((time.monotonic() - t1) * 1000)
            await asyncio.sleep(grace)
            others = range(1, containers)  # the first one's FIFO is not read: it would free it
            values = [tree.oom(FIRST_PID + i) for i in others]
            band = max((v for v in values if v is not None), default=0)
            applied = sum(1 for v in values if v == band and band != 0)
        finally:
            plugin.stop()
            if blocked:
                tree.release_all()
            await runtime.stop()
    return {
        "plugin": checkout.label,
        "blocked": blocked,
        "containers": containers,
        "create_ms": _stats(create),
        "start_ms": _stats(start),
        "others_applied": applied,
        "others": len(values),
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 2),
        "p99": round(_percentile(values, 0.99), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=60)
    parser.add_argument("--grace", type=float, default=3.0, help="seconds before counting")
    parser.add_argument("--plugin-repo", type=Path, action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        checkouts = [Checkout.at(p) for p in (args.plugin_repo or [REPO])]
    except BenchError as exc:
        sys.exit(f"blocked_host: {exc}")
    results = []
    for checkout in checkouts:
        for blocked in (False, True):
            results.append(asyncio.run(measure(checkout, args.containers, blocked, args.grace)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        "| plugin | first oom file | CreateContainer p50 / p99 / max "
        "| StartContainer p50 / p99 / max | others' oom_score_adj applied |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        c, s = r["create_ms"], r["start_ms"]
        print(
            f"| {r['plugin']} | {'hangs' if r['blocked'] else 'healthy'} "
            f"| {c['p50']} / {c['p99']} / {c['max']} ms | {s['p50']} / {s['p99']} / {s['max']} ms "
            f"| {r['others_applied']} of {r['others']} |"
        )


if __name__ == "__main__":
    main()
