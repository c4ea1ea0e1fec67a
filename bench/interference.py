#!/usr/bin/env python3
"""Detection and mitigation times of the interference loop, and the agent's own cost.

Two measurements, both on real processes in real cgroups (root):

* `--trials N` runs `nri-qos lab --scenario interference` N times (each with its quiet
  run) and reports the median and max of the detection and mitigation times, and the
  false positives: quiet runs that acted, plus runs that named the wrong container or
  touched the innocent one.
  `python3 bench/interference.py --json --trials 20` prints
  `{"detection_s": {"median": x, "max": y}, "mitigation_s": {"median": x, "max": y},
  "false_positives": n}` (plus the per-trial details under "trials").
* `--agent-cpu N` makes N containers (cgroups with a sleeping process each), attaches
  the best run-queue probe and samples every signal of all of them every 0.5 s for
  `--seconds`, and reports the CPU time the sampling took, as a share of one CPU.

Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ebpf.runq import select_runq_source  # noqa: E402
from ebpf.signals.sampler import SignalSampler  # noqa: E402
from ebpf.watched import WatchedContainer  # noqa: E402
from nri_plugin.lab_interference import run_scenario  # noqa: E402


def trials(n: int) -> dict[str, Any]:
    runs = []
    for i in range(n):
        result = asyncio.run(run_scenario(lambda _m: None))
        runs.append(result)
        print(
            f"trial {i + 1}/{n}: detected={result['detected']} "
            f"detection={result['detection_s']} mitigation={result['mitigation_s']} "
            f"quiet actions={result['quiet_run']['actions']}",
            file=sys.stderr,
        )
    detections = [r["detection_s"] for r in runs if r["detection_s"] is not None]
    mitigations = [r["mitigation_s"] for r in runs if r["mitigation_s"] is not None]
    false_positives = sum(r["quiet_run"]["actions"] > 0 for r in runs) + sum(
        (r["detected"] and r["antagonist"] != "lab/antagonist/antagonist")
        or not r["innocent_untouched"]
        for r in runs
    )

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"median": None, "max": None}
        return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}

    return {
        "detection_s": stats(detections),
        "mitigation_s": stats(mitigations),
        "false_positives": false_positives,
        "missed": sum(not r["detected"] for r in runs),
        "trials": [
            {k: r[k] for k in ("detected", "detection_s", "mitigation_s", "victim_delay_ms")}
            | {"quiet_actions": r["quiet_run"]["actions"]}
            for r in runs
        ],
    }


def agent_cpu(containers: int, seconds: float) -> dict[str, Any]:
    top = Path("/sys/fs/cgroup/unified") / f"nri-qos-bench-{uuid.uuid4().hex[:6]}"
    v1 = Path("/sys/fs/cgroup/cpu") / top.name
    procs = []
    watched = []
    runq = select_runq_source()
    try:
        for i in range(containers):
            d2, d1 = top / f"c{i}", v1 / f"c{i}"
            d2.mkdir(parents=True)
            d1.mkdir(parents=True)
            p = subprocess.Popen(["sleep", "600"])
            procs.append(p)
            (d2 / "cgroup.procs").write_text(str(p.pid))
            (d1 / "cgroup.procs").write_text(str(p.pid))
            watched.append(WatchedContainer(f"c{i}", f"bench/c{i}", d2, d1))
        sampler = SignalSampler(Path("/"), runq=runq)
        sampler.sample(watched, time.monotonic())
        cpu0, wall0, windows = time.process_time(), time.monotonic(), 0
        end = wall0 + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            sampler.sample(watched, time.monotonic())
            windows += 1
        used = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        sampler.close()
        return {
            "containers": containers,
            "probe_backend": runq.name,
            "windows": windows,
            "cpu_s": round(used, 3),
            "cpu_share_of_one_cpu": round(used / wall, 4),
            "ms_per_window": round(used / windows * 1000, 2) if windows else None,
        }
    finally:
        runq.close()
        for p in procs:
            p.kill()
            p.wait()
        for base in (top, v1):
            for d in sorted(p for p in base.glob("c[0-9]*") if p.is_dir()):
                os.rmdir(d)
            if base.exists():
                os.rmdir(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trials", type=int, default=0)
    parser.add_argument("--agent-cpu", type=int, default=0, metavar="CONTAINERS")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/interference.py needs root (real cgroups and BPF)")
    out: dict[str, Any] = {}
    if args.trials:
        out.update(trials(args.trials))
    if args.agent_cpu:
        out["agent"] = agent_cpu(args.agent_cpu, args.seconds)
    if not out:
        out.update(trials(3))
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
