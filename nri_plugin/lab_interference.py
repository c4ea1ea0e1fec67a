"""`nri-qos lab --scenario interference`: the detection -> mitigation loop on real
processes in real cgroups, with the engine, the real collectors and real host writes.

Three containers, made by the embedded runtime's host backend (real cgroups, real
processes, resources applied the way runc applies them):
* `victim` (shared_cores, an online service): a process that sleeps 1 ms, works 0.3 ms,
  and records how late each wakeup was — the latency its users would see;
* `innocent` (reclaimed_cores): a CPU burner on the other CPU;
* `antagonist` (reclaimed_cores): CPU burners on the victim's CPU, started after a
  quiet period. It is a Burstable pod with a 4-CPU request that someone annotated
  reclaimed_cores: the kubelet sizes the *pod's* cgroup weight from its requests
  (4096), and the lowest container weight nri-qos sets (2) only counts among the pod's
  own containers, so across pods it still outweighs the victim 4:1 — the case the
  weight cannot fix and the loop must.
Processes pin themselves to their CPU (as many applications do), so the scenario does
not depend on the host's CPU count beyond two.

The loop is the daemon's: every window the collectors measure (run-queue latency per
cgroup with the blame matrix from the best backend, PSI, cpu.stat), the engine decides
(`Engine.signals_sampled`), and its updates are applied to the containers' cgroups; an
eviction stops the container. A second run without the antagonist checks that nothing is
done when nothing is wrong. The result is the JSON `--json` prints (stable keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ebpf.runq import select_runq_source
from ebpf.signals.sampler import SignalSampler
from ebpf.watched import RunqSource
from embedded_runtime.host_backend import HostBackend
from isolation.cgroups import CgroupFs
from isolation.host import LinuxHost
from isolation.sysfs import discover_topology
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import Evict, Intents
from nri_plugin.policy.interference import OVERRIDE_ANNOTATION
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.protect import watched
from nri_plugin.protocol.versions import infer_runtime
from qos_model.containers import (
    Container,
    ContainerState,
    CpuResources,
    MemoryResources,
    Pod,
    Resources,
    flat_updates,
    merge_requested,
)

WINDOW_S = 0.5
PREFIX = "nri-qos-lab-intf-"

VICTIM = """
import json, os, sys, time
os.sched_setaffinity(0, {%(cpu)d})
out = open(sys.argv[1], "a", buffering=1)
batch, started = [], time.monotonic()
while True:
    t = time.perf_counter()
    time.sleep(0.001)
    late = (time.perf_counter() - t - 0.001) * 1000
    batch.append(late)
    end = time.perf_counter() + 0.0003
    while time.perf_counter() < end:
        pass
    now = time.monotonic()
    if now - started >= 0.25:
        batch.sort()
        out.write(json.dumps({"t": now, "p90": batch[int(len(batch) * 0.9)]}) + "\\n")
        batch, started = [], now
"""
BURNER = "import os\nos.sched_setaffinity(0, {%(cpu)d})\nwhile True: pass\n"


@dataclass
class Run:
    actions: list[dict[str, Any]] = field(default_factory=list)
    detected_at: float | None = None
    mitigated_at: float | None = None
    antagonist_named: str = ""
    touched: set[str] = field(default_factory=set)


def _pod(name: str, qos: str, lab: str, extra: dict[str, str] | None = None) -> Pod:
    annotations = {"katalyst.kubewharf.io/qos_level": qos, **(extra or {})}
    uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{lab}.{name}"))
    return Pod(id=f"sandbox-{name}", name=name, namespace="lab", uid=uid, annotations=annotations)


def _container(name: str, pod: Pod, lab: str, args: tuple[str, ...], millicores: int) -> Container:
    cpu = CpuResources(shares=max(2, millicores * 1024 // 1000), period=100_000)
    if millicores:
        cpu = replace(cpu, quota=millicores * 100)
    return Container(
        id=f"ctr-{name}",
        pod_id=pod.id,
        name=name,
        state=ContainerState.CREATED,
        args=args,
        resources=Resources(cpu=cpu, memory=MemoryResources()),
        cgroups_path=f"/{PREFIX}{lab}/pod{pod.uid}/ctr-{name}",
        oom_score_adj=1000 if not millicores else 500,
    )


class Scenario:
    """One run: an engine, a sampler and a host backend of its own."""

    def __init__(self, lab: str, runq: RunqSource, log_dir: Path) -> None:
        topology = discover_topology()
        # eviction is carried out by stopping the container (there is no API server)
        stops = HostSupport(evict=Backend(True, "the lab stops the container"))
        planner = PlannerConfig(
            reclaimed_overlap_shared=True, isolation=IsolationConfig(host=stops)
        )
        config = EngineConfig(planner=planner)
        self.engine = Engine(topology, config)
        self.engine.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", True))
        self.engine.synchronize([], [])
        self.cgroupfs = CgroupFs()
        self.backend = HostBackend(self.cgroupfs, parent=f"/{PREFIX}{lab}")
        self.host = LinuxHost.at(Path("/"))
        self.sampler = SignalSampler(Path("/"), runq=runq)
        self.lab = lab
        self.log_dir = log_dir
        self.containers: dict[str, Container] = {}
        self.pods: dict[str, Pod] = {}
        self.run = Run()
        self.t0 = time.monotonic()

    async def start(self, name: str, qos: str, code: str, cpu: int, copies: int = 1,
                    millicores: int = 0, extra: dict[str, str] | None = None) -> None:  # fmt: skip
        pod = _pod(name, qos, self.lab, extra)
        args: tuple[str, ...]
        if copies == 1:
            args = (sys.executable, "-c", code % {"cpu": cpu}, str(self.log_dir / f"{name}.log"))
        else:  # several burners: a shell starting them (all in the container's cgroup)
            one = f"{sys.executable} -c '{BURNER % {'cpu': cpu}}' &"
            args = ("sh", "-c", " ".join([one] * copies) + " wait")
        ctr = _container(name, pod, self.lab, args, millicores)
        step = self.engine.container_created(pod, ctr)
        adj = step.intents.adjustment
        if adj is not None and adj.resources is not None:
            ctr = ctr.with_resources(merge_requested(ctr.resources, adj.resources))
        pid = await self.backend.create(ctr)
        if millicores:  # the pod-level weight the kubelet derives from the requests
            pod_group = PurePosixPath(ctr.cgroups_path).parent
            self.cgroupfs.set_cpu_shares(pod_group, max(2, millicores * 1024 // 1000))
        ctr = replace(ctr, pid=pid, state=ContainerState.RUNNING)
        self.engine.container_started(pod, ctr)
        self.containers[ctr.id], self.pods[ctr.id] = ctr, pod

    async def stop(self, cid: str) -> None:
        ctr = self.containers.pop(cid, None)
        if ctr is None:
            return
        await self.backend.stop(ctr)
        await self.backend.remove(ctr)
        self.engine.container_stopped(self.pods[cid], ctr)

    async def window(self) -> Intents:
        await asyncio.sleep(WINDOW_S)
        refs = self.engine.watch_list()
        snapshot = self.sampler.sample(watched(self.host, refs), time.monotonic())
        intents = self.engine.signals_sampled(snapshot).intents
        await self._carry_out(intents)
        return intents

    async def _carry_out(self, intents: Intents) -> None:
        now = time.monotonic() - self.t0
        run = self.run
        for note in intents.notes:
            if note.kind in ("interference", "mitigation", "eviction"):
                run.actions.append({"t": round(now, 2), "kind": note.kind,
                                    "subject": note.subject, "message": note.message})  # fmt: skip
            if (
                note.kind == "interference"
                and run.detected_at is None
                and "neighbours" in note.message
            ):
                run.detected_at = now
        for update in flat_updates(intents.updates):
            ctr = self.containers.get(update.container_id)
            if ctr is None:
                continue
            ctr = ctr.with_resources(merge_requested(ctr.resources, update.resources))
            self.containers[ctr.id] = ctr
            await self.backend.update(ctr)
            run.touched.add(ctr.id)
            if run.mitigated_at is None and run.detected_at is not None:
                run.mitigated_at = now
        for intent in intents.host:
            if isinstance(intent, Evict):
                run.touched.add(intent.container.id)
                await self.stop(intent.container.id)
                if run.mitigated_at is None:
                    run.mitigated_at = now
        for d in self.engine.protection.last_detections.values():
            if d.antagonists and run.detected_at is None:
                run.detected_at = now
            if d.antagonists and not run.antagonist_named:
                top = d.antagonists[0].container_id
                plan = self.engine.plan.containers.get(top)
                run.antagonist_named = plan.name if plan is not None else top

    def victim_delays(self) -> list[tuple[float, float]]:
        path = self.log_dir / "victim.log"
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    row = json.loads(line)
                    out.append((float(row["t"]) - self.t0, float(row["p90"])))
        return out

    async def close(self) -> None:
        for cid in list(self.containers):
            with contextlib.suppress(Exception):
                await self.stop(cid)
        await self.backend.cleanup()
        self.sampler.close()


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else round(moment - start, 2)


def _p90(rows: list[tuple[float, float]], start: float, end: float) -> float | None:
    values = sorted(v for t, v in rows if start <= t < end)
    if not values:
        return None
    return round(values[int(len(values) * 0.9)] if len(values) > 1 else values[0], 2)


async def run_scenario(progress: Callable[[str], None], quiet_s: float = 6.0) -> dict[str, Any]:
    lab = uuid.uuid4().hex[:8]
    runq = select_runq_source(("core", "bcc", "schedstat"))
    backend_name = runq.name
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
    # a latency-critical service declares its budget: p90 wakeup delay 0.5 ms, CPU stalls
    # in at most 10 % of a window (the defaults suit a general online service)
    victim_annotations = {OVERRIDE_ANNOTATION: json.dumps({"runq_ms": "0.5", "psi_some": "0.1"})}
    try:
        s = Scenario(lab, runq, tmp)
        try:
            await s.start("victim", "shared_cores", VICTIM, cpu=1, millicores=1000,
                          extra=victim_annotations)  # fmt: skip
            await s.start("innocent", "reclaimed_cores", BURNER, cpu=0, copies=2)
            progress(f"victim and innocent running; probe backend: {backend_name}")
            for _ in range(6):  # 3 s before: the victim's normal
                await s.window()
            started = time.monotonic() - s.t0
            await s.start("antagonist", "reclaimed_cores", BURNER, cpu=1, copies=3,
                          millicores=4000)  # fmt: skip
            progress("antagonist started on the victim's CPU")
            for _ in range(16):  # 8 s: detection, mitigation, recovery
                await s.window()
            ended = time.monotonic() - s.t0
            rows = s.victim_delays()
            run = s.run
            mitigated = run.mitigated_at if run.mitigated_at is not None else ended
            result: dict[str, Any] = {
                "detected": run.detected_at is not None,
                "detection_s": _since(run.detected_at, started),
                "mitigation_s": _since(run.mitigated_at, started),
                "antagonist": run.antagonist_named,
                "innocent_untouched": "ctr-innocent" not in run.touched,
                "victim_delay_ms": {
                    "before": _p90(rows, 0.0, started),
                    "during": _p90(rows, started, mitigated),
                    "after": _p90(rows, mitigated + 1.0, ended),
                },
                "actions": run.actions,
                "probe_backend": backend_name,
                "victim_series": [[round(t - started, 2), round(v, 2)] for t, v in rows],
            }  # fmt: skip
        finally:
            await s.close()
        quiet = Scenario(lab + "q", runq, tmp)
        try:
            await quiet.start("victim", "shared_cores", VICTIM, cpu=1, millicores=1000,
                              extra=victim_annotations)  # fmt: skip
            await quiet.start("innocent", "reclaimed_cores", BURNER, cpu=0, copies=2)
            windows = max(1, round(quiet_s / WINDOW_S))
            for _ in range(windows):
                await quiet.window()
            acted = [a for a in quiet.run.actions if a["kind"] in ("mitigation", "eviction")]
            result["quiet_run"] = {
                "duration_s": round(windows * WINDOW_S, 1),
                "actions": len(acted) + (1 if quiet.run.detected_at is not None else 0),
            }
        finally:
            await quiet.close()
        return result
    finally:
        runq.close()
        with contextlib.suppress(OSError):
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


def _chart(series: list[list[float]], result: dict[str, Any], width: int = 60) -> list[str]:
    """The victim's delay over time, one row per sample, with the loop's moments marked."""
    marks: list[tuple[float, str]] = []
    if result["detection_s"] is not None:
        marks.append((result["detection_s"], "detected"))
    if result["mitigation_s"] is not None:
        marks.append((result["mitigation_s"], "mitigated"))
    top = max([v for _, v in series] + [1.0])
    lines = []
    pending = sorted(marks)
    for t, v in series:
        label = ""
        while pending and pending[0][0] <= t:
            label += f" <- {pending.pop(0)[1]}"
        bar = "#" * max(1, round(v / top * width)) if v > 0 else ""
        lines.append(f"{t:6.2f}s {v:6.2f} ms |{bar}{label}")
    return lines


def run_interference_lab(as_json: bool) -> int:
    progress: Callable[[str], None] = (lambda _m: None) if as_json else print
    try:
        result = asyncio.run(run_scenario(progress))
    except Exception as exc:
        print(f"nri-qos lab: interference scenario: {exc}", file=sys.stderr)
        return 2
    if as_json:
        out = {k: v for k, v in result.items() if k != "victim_series"}
        print(json.dumps(out, indent=2))
        return 0
    print("victim wakeup delay (p90 per 250 ms; time from the antagonist's start):")
    for line in _chart(result["victim_series"], result):
        print("  " + line)
    print()
    for key in ("detected", "detection_s", "mitigation_s", "antagonist", "innocent_untouched",
                "victim_delay_ms", "quiet_run", "probe_backend"):  # fmt: skip
        print(f"{key:20} {result[key]}")
    print("actions:")
    for a in result["actions"]:
        print(f"  {a['t']:6.2f}s [{a['kind']}] {a['subject']}: {a['message']}")
    return 0
