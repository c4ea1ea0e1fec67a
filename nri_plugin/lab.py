"""`nri-qos lab`: the plugin against the embedded runtime, on a machine without one.

Two processes over a real unix socket, exactly as in production: this process runs the
embedded NRI runtime (behaving like containerd 2.3 by default), and the plugin is a
child process (`nri-qos run --socket ...`) that connects to it. The lab then plays a
small cluster's worth of pods — one per QoS class, plus one that was already running
before the plugin came up (so it arrives through Synchronize) — and reports, read back
from the host, what each container got and why.

As root on a host with cgroups, containers are real: cgroups under a lab parent and a
real process each (the embedded runtime's host backend applies what the plugin asks for
the way runc would). Without root it falls back to simulated containers and says so.
Everything the lab creates is removed when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedded_runtime import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    CRIO_1_36,
    ContainerBackend,
    EmbeddedRuntime,
    ExchangeRecord,
    InMemoryBackend,
    RuntimeFlavor,
)
from embedded_runtime.host_backend import lab_backend
from isolation.cgroups import CgroupError, CgroupFs
from isolation.rdt import Resctrl
from isolation.sysfs import discover_topology
from nri_plugin.debug.client import DebugClient
from nri_plugin.lab_host import (
    LabNetwork,
    TaskMoves,
    io_weight_of,
    rdt_class_of,
    simulated_resctrl,
)
from nri_plugin.policy.kube_qos import CFS_PERIOD_US, kubelet_quota, kubelet_shares
from nri_plugin.policy.qos import ANNOTATION_MEMORY_ENHANCEMENT as MEMORY_ENHANCEMENT
from nri_plugin.policy.qos import ANNOTATION_QOS_LEVEL as QOS
from nri_plugin.protocol import convert
from nri_plugin.protocol import nri_pb2 as pb
from qos_model.containers import Container, ContainerState, CpuResources, MemoryResources, Pod
from qos_model.containers import Resources as Res
from qos_model.cpulist import format_cpu_list

FLAVOR_NAMES: dict[str, RuntimeFlavor] = {
    "containerd-1.7": CONTAINERD_1_7,
    "containerd-2.3": CONTAINERD_2_3,
    "cri-o-1.36": CRIO_1_36,
}
LAB_PREFIX = "nri-qos-lab-"
MiB = 1 << 20
BURNER = (
    sys.executable,
    "-c",
    "import time\nend = time.time() + 30\nwhile time.time() < end: pass",
)
SLEEPER = ("sleep", "300")


@dataclass(frozen=True, slots=True)
class DemoPod:
    """One pod of the demo: what a kubelet would hand the runtime for it."""

    name: str
    namespace: str
    annotations: dict[str, str]
    container: str
    args: tuple[str, ...]
    millicores: int  # request = limit (Guaranteed) unless `burstable`
    memory: int | None
    oom_score_adj: int  # the kubelet's value for its QoS class
    burstable: bool = False
    best_effort: bool = False

    def resources(self) -> Res:
        if self.best_effort:
            cpu = CpuResources(shares=kubelet_shares(0), period=CFS_PERIOD_US)
            return Res(cpu=cpu, memory=MemoryResources())
        limit = self.millicores * (2 if self.burstable else 1)
        return Res(
            cpu=CpuResources(
                shares=kubelet_shares(self.millicores),
                quota=kubelet_quota(limit),
                period=CFS_PERIOD_US,
            ),
            memory=MemoryResources(limit=self.memory),
        )


def demo_pods(numa_nodes: int) -> list[DemoPod]:
    bind = {MEMORY_ENHANCEMENT: json.dumps({"numa_binding": "true"})} if numa_nodes else {}
    return [
        DemoPod("node-agent", "kube-system", {QOS: "system_cores"}, "agent", SLEEPER,
                100, 64 * MiB, -997),
        DemoPod("database", "prod", {QOS: "dedicated_cores", **bind}, "postgres", SLEEPER,
                1000, 256 * MiB, -997),
        DemoPod("frontend", "prod", {QOS: "shared_cores"}, "web", SLEEPER,
                500, 128 * MiB, 500, burstable=True),
        DemoPod("nightly-etl", "batch", {QOS: "reclaimed_cores"}, "spark", BURNER,
                0, None, 1000, best_effort=True),
    ]  # fmt: skip


PRE_EXISTING = DemoPod(
    "legacy-cron", "prod", {}, "cron", SLEEPER, 200, 64 * MiB, 900, burstable=True
)


@dataclass
class LabRun:
    flavor: str
    real: bool
    note: str
    runtime_info: dict[str, Any] = field(default_factory=dict)
    containers: list[dict[str, Any]] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    plugin_log: str = ""


def _make_pod(demo: DemoPod, lab_id: str, netns: str = "") -> Pod:
    uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{lab_id}.{demo.name}"))
    return Pod(
        namespaces={"network": netns} if netns else {},
        id=f"sandbox-{demo.name}",
        name=demo.name,
        namespace=demo.namespace,
        uid=uid,
        labels={"app": demo.name},
        annotations=dict(demo.annotations),
        cgroup_parent=f"/{LAB_PREFIX}{lab_id}/pod{uid}",
    )


def _make_container(demo: DemoPod, pod: Pod) -> Container:
    cid = f"ctr-{demo.name}"
    return Container(
        id=cid,
        pod_id=pod.id,
        name=demo.container,
        state=ContainerState.CREATED,
        labels={"io.kubernetes.container.name": demo.container},
        args=demo.args,
        resources=demo.resources(),
        oom_score_adj=demo.oom_score_adj,
    )


# --- host backend ------------------------------------------------------------------------------


def _host_backend(
    lab_id: str, resctrl: Path | None = None
) -> tuple[ContainerBackend, bool, str, Callable[[Container], dict[str, Any]]]:
    """The real backend when we can use it, else simulated containers, and why."""
    simulated = InMemoryBackend()

    def from_runtime(container: Container) -> dict[str, Any]:
        res = container.resources
        cpu = res.cpu if res is not None else None
        return {
            "cpus": cpu.cpus if cpu else "",
            "mems": cpu.mems if cpu else "",
            "oom_score_adj": container.oom_score_adj,
            "pids": [container.pid] if container.pid else [],
            "cpu_shares": cpu.shares if cpu else None,
            "source": "simulated (runtime state, not the host)",
        }

    if os.geteuid() != 0:
        return (
            simulated,
            False,
            "not root: containers are simulated (run as root for real cgroups)",
            from_runtime,
        )
    try:
        return lab_backend(lab_id, resctrl=resctrl)
    except CgroupError as exc:
        return simulated, False, f"cgroups unusable ({exc}): containers are simulated", from_runtime


# --- the run -----------------------------------------------------------------------------------


async def _settle(runtime: EmbeddedRuntime, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Wait until the plugin's deferred UpdateContainers calls have come and gone."""
    deadline = time.monotonic() + limit
    seen = len(runtime.log)
    calm_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if len(runtime.log) != seen:
            seen, calm_since = len(runtime.log), time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return


def _plugin_config(online_cpus: int, resctrl: Path, simulated_rdt: bool, net: str) -> str:
    reserved = "0" if online_cpus >= 4 else ""
    text = (
        "[policy]\n"
        'name = "qos"\n'
        f'reserved_cpus = "{reserved}"\n'
        "system_namespaces_to_system_cores = true\n"
        "rebalance_interval_ms = 0\n"
        "[rdt]\n"
        f'mount = "{resctrl}"\n'
    )
    if simulated_rdt:
        text += "monitor = false\n"  # a plain tree cannot make a group's files on mkdir
    return text + net


HOST_RESCTRL = Path("/sys/fs/resctrl")


async def run(flavor_name: str, log: Callable[[str], None]) -> LabRun:
    flavor = FLAVOR_NAMES[flavor_name]
    lab_id = uuid.uuid4().hex[:8]
    topology = discover_topology()
    tmp = Path(tempfile.mkdtemp(prefix=LAB_PREFIX))
    simulated_rdt = not (HOST_RESCTRL / "info").is_dir()
    resctrl = simulated_resctrl(tmp) if simulated_rdt else HOST_RESCTRL
    backend, real, note, read_back = _host_backend(lab_id, resctrl)
    result = LabRun(flavor_name, real, note)
    if simulated_rdt:
        result.note += f"; RDT: this host has no resctrl, a tree laid out like one at {resctrl}"
    moves = TaskMoves(resctrl) if simulated_rdt else None
    network = LabNetwork(f"{LAB_PREFIX}{lab_id}", tmp) if real else None
    if network is not None and network.available:
        result.note += f"; pods share network namespace {network.path}, shaped on eth0"
    elif network is not None:
        result.note += f"; no network namespace for the pods ({network.why})"
    net_config = network.config() if network is not None else ""
    sock, status, config = tmp / "nri.sock", tmp / "debug.sock", tmp / "nri-qos.toml"
    config.write_text(_plugin_config(len(topology.online_cpus), resctrl, simulated_rdt, net_config))
    plugin_log = tmp / "plugin.log"
    runtime = EmbeddedRuntime(sock, flavor=flavor, backend=backend)
    plugin: subprocess.Popen[bytes] | None = None
    netns = network.path if network is not None and network.available else ""
    pods = [
        (demo, _make_pod(demo, lab_id, netns))
        for demo in [PRE_EXISTING, *demo_pods(len(topology.cpu_nodes))]
    ]
    try:
        await runtime.start()
        log(
            f"embedded runtime: {flavor.runtime_name} {flavor.runtime_version} "
            f"(NRI {flavor.nri_version}) on {sock}"
        )
        log(f"containers: {note}")
        # A pod that runs before the plugin exists: the plugin learns of it via Synchronize.
        demo, pod = pods[0]
        await _start_pod(runtime, demo, pod)
        log(f"started {pod.namespace}/{pod.name} before the plugin (no NRI calls yet)")

        with plugin_log.open("wb") as out:
            plugin = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nri_plugin",
                    "run",
                    "--socket",
                    str(sock),
                    "--config",
                    str(config),
                    "--debug-socket",
                    str(status),
                    "--log-level",
                    "info",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        await runtime.wait_for_plugins(1, timeout=30)
        info = runtime.plugins[0]
        log(
            f"plugin {info.idx}-{info.name} (pid {info.pid}) registered, events "
            f"{info.events:#x}, synchronized"
        )
        for demo, pod in pods[1:]:
            await _start_pod(runtime, demo, pod)
            log(f"started {pod.namespace}/{pod.name}")
        await _settle(runtime)

        answer, events = await asyncio.to_thread(ask_plugin, status)
        result.plan = answer
        result.events = events
        result.runtime_info = {
            "name": flavor.runtime_name,
            "version": flavor.runtime_version,
            "nri_version": str(flavor.nri_version),
        }
        planned: dict[str, Any] = answer.get("containers", {})  # type: ignore[assignment]
        current = runtime.containers
        for demo, pod in pods:
            cid = f"ctr-{demo.name}"
            container = current[cid]
            plan = planned.get(cid, {})
            seen = read_back(container)
            isolation = _isolation_read_back(container, resctrl, moves, real)
            isolation["net_class"] = (
                network.net_class_of(container.cgroups_path, real)
                if network is not None
                else {"value": None, "simulated": False, "source": "simulated containers"}
            )
            entry: dict[str, Any] = {
                "pod": f"{pod.namespace}/{pod.name}",
                "name": container.name,
                "id": cid,
                "class": plan.get("class", "unknown"),
                "pool": plan.get("pool", ""),
                **seen,
                **isolation,
                "planned": {
                    k: plan.get(k)
                    for k in (
                        "cpus",
                        "mems",
                        "oom_score_adj",
                        "cpu_shares",
                        "rdt_class",
                        "io_weight",
                        "net_class",
                    )
                },
                "reasons": plan.get("reasons", {}),
                "classification": plan.get("classification", ""),
            }
            entry["notes"] = _notes(entry)
            result.containers.append(entry)
        result.exchanges = [_exchange_line(r) for r in runtime.log]

        for demo, pod in reversed(pods):
            await _stop_pod(runtime, pod, f"ctr-{demo.name}")
        log("stopped and removed every pod")
    finally:
        if plugin is not None:
            plugin.terminate()
            try:
                plugin.wait(10)
            except subprocess.TimeoutExpired:
                plugin.kill()
        with contextlib.suppress(Exception):
            await runtime.stop()
        cleanup = getattr(backend, "cleanup", None)
        if cleanup is not None:
            await cleanup()
        with contextlib.suppress(OSError):
            result.plugin_log = plugin_log.read_text(errors="replace")
        for path in (sock, status, config, plugin_log):
            with contextlib.suppress(OSError):
                path.unlink()
        if network is not None:
            network.close()
        if moves is not None:
            moves.close()
        if simulated_rdt:
            shutil.rmtree(resctrl, ignore_errors=True)
        else:
            _remove_lab_rdt_groups(resctrl)
        with contextlib.suppress(OSError):
            tmp.rmdir()
    return result


def ask_plugin(socket: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plugin's plan view and its decisions, over its debug API (blocking)."""
    with DebugClient(socket) as client:
        plan: dict[str, Any] = json.loads(client.containers(include_plan_json=True).plan_json)
        events = [
            {"time": e.time, "kind": e.kind, "subject": e.subject, "message": e.message}
            for e in client.events()
        ]
    return plan, events


def _isolation_read_back(
    container: Container, resctrl: Path, moves: TaskMoves | None, real: bool
) -> dict[str, Any]:
    """rdt_class, io_weight and net_class as the host shows them."""
    pid = container.pid if real else None
    blkio = None
    if real and container.cgroups_path:
        with contextlib.suppress(CgroupError):
            cgroupfs = CgroupFs()
            blkio = cgroupfs.group_dir(cgroupfs.resolve(container.cgroups_path), "blkio")
    return {
        "rdt_class": rdt_class_of(resctrl, pid, moves is not None, moves),
        "io_weight": io_weight_of(blkio),
    }


def _remove_lab_rdt_groups(resctrl: Path) -> None:
    """On a host with real resctrl: the class groups the lab's plugin made, once empty."""
    for group in resctrl.glob(Resctrl.PREFIX + "*"):
        with contextlib.suppress(OSError):
            if not (group / "tasks").read_text().split():
                group.rmdir()


async def _start_pod(runtime: EmbeddedRuntime, demo: DemoPod, pod: Pod) -> None:
    await runtime.run_pod_sandbox(pod)
    container = _make_container(demo, pod)
    await runtime.create_container(pod.id, container)
    await runtime.start_container(container.id)


async def _stop_pod(runtime: EmbeddedRuntime, pod: Pod, container_id: str) -> None:
    await runtime.stop_container(container_id)
    await runtime.remove_container(container_id)
    await runtime.stop_pod_sandbox(pod.id)
    await runtime.remove_pod_sandbox(pod.id)


def _exchange_line(record: ExchangeRecord) -> str:
    """The runtime's log line, plus what the plugin answered or asked for."""
    text = record.describe()
    request, reply = record.request_message(), record.reply_message()
    detail = ""
    if isinstance(reply, pb.ConfigureResponse):
        detail = f"subscribed events {reply.events:#x}"
    elif isinstance(reply, pb.CreateContainerResponse) and reply.HasField("adjust"):
        adj = convert.adjustment_from_pb(reply.adjust)
        cpu = adj.resources.cpu if adj.resources else None
        parts = []
        if cpu and cpu.cpus:
            parts.append(f"cpus={cpu.cpus}")
        if cpu and cpu.mems:
            parts.append(f"mems={cpu.mems}")
        if cpu and cpu.shares is not None:
            parts.append(f"shares={cpu.shares}")
        if adj.oom_score_adj is not None:
            parts.append(f"oom_score_adj={adj.oom_score_adj}")
        parts += [f"+annotation {k}" for k in adj.annotations]
        detail = "adjust " + " ".join(parts) if parts else "no adjustment"
    elif isinstance(request, pb.UpdateContainersRequest):
        detail = "update " + ", ".join(
            f"{u.container_id} cpus={u.linux.resources.cpu.cpus or '-'}" for u in request.update
        )
    elif isinstance(reply, pb.SynchronizeResponse | pb.UpdateContainerResponse) and reply.update:
        detail = f"{len(reply.update)} update(s)"
    return f"{text}  {detail}" if detail else text


def _notes(entry: dict[str, Any]) -> list[str]:
    notes = []
    want = entry["planned"].get("oom_score_adj")
    got = entry.get("oom_score_adj")
    if want is not None and got is not None and want != got:
        notes.append(
            f"planned oom_score_adj {want}, host has {got}"
            + (
                ": lowering needs CAP_SYS_RESOURCE, which this host does not give"
                if want < got
                else ""
            )
        )
    if (
        entry["planned"].get("cpus")
        and entry.get("cpus")
        and entry["planned"]["cpus"] != entry["cpus"]
    ):
        notes.append(f"planned cpus {entry['planned']['cpus']}, host enforces {entry['cpus']}")
    return notes


# --- output --------------------------------------------------------------------------------


def _text(run_: LabRun) -> str:
    lines = [""]
    lines.append("NRI exchanges (runtime view):")
    lines += [f"  {line}" for line in run_.exchanges]
    pools = run_.plan.get("pools", {})
    lines.append("")
    lines.append("Pools:")
    for key in ("system", "shared", "reclaimed"):
        reason = pools.get("reasons", {}).get(key, "")
        lines.append(f"  {key:<9} {pools.get(key) or '-':<8} {reason}")
    for name, cpus in pools.get("dedicated", {}).items():
        lines.append(f"  dedicated {cpus:<8} {name}")
    lines.append("")
    lines.append("Reclaimable per NUMA node:")
    for node, r in run_.plan.get("reclaimable", {}).items():
        lines.append(
            f"  node {node}: {r['millicores']}m CPU ({r['cpus'] or '-'}), "
            f"{r['memory_bytes'] // MiB} MiB"
        )
    lines.append("")
    source = "read back from the host" if run_.real else "simulated"
    lines.append(f"Containers ({source}):")
    for c in run_.containers:
        lines.append(f"  {c['pod']}/{c['name']}  class={c['class']} pool={c['pool']}")
        lines.append(
            f"      cpus={c['cpus'] or '-'} mems={c['mems'] or '-'} "
            f"oom_score_adj={c['oom_score_adj']} pids={c['pids']}"
        )
        lines.append("      " + " ".join(_isolation_text(c, k) for k in ISOLATION_FIELDS))
        if c.get("classification"):
            lines.append(f"      class: {c['classification']}")
        for fieldname in ("cpus", "mems", "oom_score_adj", "cpu_shares", *ISOLATION_FIELDS):
            reason = c["reasons"].get(fieldname)
            if reason:
                lines.append(f"      {fieldname}: {reason}")
        for note in c["notes"]:
            lines.append(f"      note: {note}")
    if run_.events:
        lines.append("")
        lines.append("Decisions:")
        for e in run_.events:
            lines.append(f"  [{e['kind']}] {e['subject']}: {e['message']}")
    return "\n".join(lines)


ISOLATION_FIELDS = ("rdt_class", "io_weight", "net_class")


def _isolation_text(entry: dict[str, Any], key: str) -> str:
    seen = entry.get(key) or {}
    value = seen.get("value")
    mark = " (simulated)" if seen.get("simulated") else ""
    return f"{key}={'-' if value is None else value}{mark}"


def run_lab(flavor: str = "containerd-2.3", as_json: bool = False) -> int:
    progress: Callable[[str], None] = (lambda _msg: None) if as_json else print

    async def main() -> LabRun:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel if task else (lambda: None))
        return await run(flavor, progress)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        print("nri-qos lab: interrupted; everything it created was removed", file=sys.stderr)
        return 130
    if as_json:
        print(
            json.dumps(
                {
                    "flavor": result.flavor,
                    "real_containers": result.real,
                    "note": result.note,
                    "runtime": result.runtime_info,
                    "pools": result.plan.get("pools", {}),
                    "reclaimable": result.plan.get("reclaimable", {}),
                    "containers": result.containers,
                    "exchanges": result.exchanges,
                    "events": result.events,
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(_text(result))
    return 0


__all__ = ["FLAVOR_NAMES", "demo_pods", "format_cpu_list", "run_lab"]
