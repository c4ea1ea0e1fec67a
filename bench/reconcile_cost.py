"""What one drift reconciliation period costs at 1,000 containers.

A fake kubepods tree in the kernel's formats (tests/fake_kubepods.py: cgroup v1 cpuset,
cpu,cpuacct, memory and blkio hierarchies, one process per container, procfs files, and
a resctrl mount with one control group per RDT class) holds `--containers` running
containers, 10% of them foreign (never delivered: the Synchronize-gap scan must walk
them too). The engine has them all planned with the rdt and io controllers running (a
Synchronize with the planned cpusets, RDT groups and I/O weights, so nothing drifts at
rest). Each period is timed in its two phases, as the daemon runs them:

* read: `reconcile.read_host` (cpuset.cpus, cpuset.mems, cgroup.procs, each process's
  oom_score_adj and blkio.bfq.weight per container; the tasks of each resctrl control
  group once; the kubepods scan, the kubelet checkpoint);
* decide: `QosPolicy.reconcile` (the pure comparison in `policy.drift`).

`--drift N` changes N containers' cpusets before every period, so the repairs are
counted in the decide cost too. Prints p50/p99 ms per phase and per period as JSON.

    python3 bench/reconcile_cost.py --containers 1000 --periods 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nri_plugin.policy.class_intents import rdt_clos_id  # noqa: E402
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig  # noqa: E402
from nri_plugin.policy.engine import Engine, EngineConfig  # noqa: E402
from nri_plugin.policy.qos_policy import QosPolicy  # noqa: E402
from nri_plugin.policy.workload import PlannerConfig  # noqa: E402
from nri_plugin.protocol.versions import infer_runtime  # noqa: E402
from nri_plugin.reconcile import HostReader, Located, read_host  # noqa: E402
from qos_model.containers import ContainerState, Pod  # noqa: E402
from qos_model.cpulist import format_cpu_list  # noqa: E402
from tests.builders import container, pod  # noqa: E402
from tests.fake_kubepods import KubepodsTree  # noqa: E402
from tests.policy.sysfs_builder import MachineShape  # noqa: E402


def build(root: Path, count: int) -> tuple[QosPolicy, KubepodsTree]:
    topology = MachineShape(nodes_per_die=2, cores_per_l3=32).expected_topology()
    on = Backend(True, "started")
    isolation = IsolationConfig(host=HostSupport(rdt=on, io=on))
    planner = PlannerConfig(reclaimed_min_cpus=0, isolation=isolation)
    engine = Engine(topology, EngineConfig(planner=planner))
    engine.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    classes = ("shared_cores", "reclaimed_cores")
    pods: list[Pod] = []
    ctrs = []
    for i in range(count):
        name = f"c{i:04d}"
        pods.append(pod(name, classes[i % 2]))
        ctrs.append(container(name, 50, state=ContainerState.RUNNING, created_at=i + 1))
    engine.synchronize(pods, ctrs)
    tree = KubepodsTree(root, resctrl=True)
    for ctr in ctrs:
        p = engine.plan.containers[ctr.id]
        mems = p.mems.value
        rdt, weight = p.rdt_class.value, p.io_weight.value
        assert rdt is not None and weight is not None  # both controllers "run"
        tree.add(
            ctr.cgroups_path,
            format_cpu_list(p.cpus.value),
            format_cpu_list(mems) if mems else "0-1",
            p.oom_score_adj.value,
            key=ctr.id,
            io_weight=weight,
            rdt_group=rdt_clos_id(rdt),
        )
    for i in range(count // 10):  # running, never delivered
        tree.add(f"/kubepods/besteffort/podf{i:07d}/gap{i:04d}", "0-63", key=f"gap{i}")
    policy = QosPolicy(engine)
    return policy, tree


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--periods", type=int, default=50)
    parser.add_argument("--drift", type=int, default=0, help="cpusets changed per period")
    parser.add_argument(
        "--dir", default=None, help="where the fake tree lives (/dev/shm: in memory, like cgroupfs)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        policy, tree = build(Path(tmp), args.containers)
        host = tree.host()
        reader = HostReader(tree.root, cpu_manager_state="/var/lib/kubelet/cpu_manager_state")
        targets = policy.drift_targets()
        read_ms: list[float] = []
        decide_ms: list[float] = []
        targets_ms: list[float] = []
        repairs = 0
        files: dict[tuple[str, str], Located] = {}  # as the daemon's loop keeps
        started = frozenset({"oom", "rdt", "io"})  # the controllers the daemon started
        for n in range(args.periods):
            for k in range(args.drift):
                ref = targets[(n * args.drift + k) % len(targets)].ref
                tree.set_cpus(ref.cgroups_path, "63")
            t0 = time.perf_counter()
            targets = policy.drift_targets()
            t1 = time.perf_counter()
            observed = read_host(host, targets, reader, (), files, started)
            t2 = time.perf_counter()
            intents = policy.reconcile(observed)
            t3 = time.perf_counter()
            repairs += len(intents.all_updates()) + len(intents.host)
            for update in intents.all_updates():  # the runtime applies the repair
                cpu = update.resources.cpu
                assert cpu is not None
                ref = next(t.ref for t in targets if t.ref.id == update.container_id)
                tree.set_cpus(ref.cgroups_path, cpu.cpus)
            targets_ms.append((t1 - t0) * 1000)
            read_ms.append((t2 - t1) * 1000)
            decide_ms.append((t3 - t2) * 1000)
        total = [a + b + c for a, b, c in zip(targets_ms, read_ms, decide_ms, strict=True)]
        flagged = len(policy.drift.flagged())
    report = {
        "containers": args.containers,
        "tree": args.dir or tempfile.gettempdir(),
        "foreign_groups": args.containers // 10,
        "flagged_unknown": flagged,
        "periods": args.periods,
        "drift_per_period": args.drift,
        "repairs": repairs,
        "p50_ms": {
            "targets": round(statistics.median(targets_ms), 2),
            "read": round(statistics.median(read_ms), 2),
            "decide": round(statistics.median(decide_ms), 2),
            "period": round(statistics.median(total), 2),
        },
        "p99_ms": {
            "targets": round(percentile(targets_ms, 0.99), 2),
            "read": round(percentile(read_ms, 0.99), 2),
            "decide": round(percentile(decide_ms, 0.99), 2),
            "period": round(percentile(total, 0.99), 2),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
