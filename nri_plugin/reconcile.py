"""The daemon's drift reconciliation loop: every period, read what the host shows for each
planned container on the host thread, compare it with the plan on the policy thread, and
re-apply what drifted.

The shape is `nri_plugin.protect`'s: the period (`[reconcile] period_s`, 10 s by default)
is the loop's one timer, and it only runs while a runtime is connected and something is
planned. Per period:

1. policy thread: the targets (`QosPolicy.drift_targets`: each container's ref and
   planned cpus, mems, oom_score_adj, rdt_class, io_weight);
2. host thread, under the executor's deadline: `read_host` reads each container's
   cpuset.cpus / cpuset.mems (v1 or v2, cgroupfs or systemd paths, through
   `isolation.host`) and the oom_score_adj of its processes; while the rdt controller
   runs, which resctrl group holds those processes (`isolation.rdt.membership`: one
   `tasks` read per control group, not per container); while the io controller runs,
   the cgroup's io.weight (v2) or blkio.bfq.weight (v1); the oom_score_adj writes the
   kernel refused (`LinuxHost.oom_refused`); lists the pod container groups under the
   kubepods tree (`isolation.kubepods`) and reads the kubelet's CPU manager checkpoint
   (`isolation.kubelet`);
3. policy thread: `QosPolicy.reconcile` (pure: `policy.drift`) answers with intents;
4. the cpuset repairs go out in one UpdateContainers call, the oom_score_adj repairs and
   the notes to the executor, as after any event.

Evidence that the kubelet's CPU manager asked for other cpusets arrives as engine notes
on the request path; `ReconcileState.observe_intents` (an executor observer) collects
them for the next period and counts them at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from isolation.cgroups import CgroupError
from isolation.host import IO_WEIGHT_MAX, LinuxHost, StateFiles, WeightFile
from isolation.kubelet import read_cpu_manager_state
from isolation.kubepods import container_dirs, populated
from isolation.rdt.membership import ROOT_GROUP, task_groups
from nri_plugin.control.executor import HostExecutor
from nri_plugin.metrics import ReconcileMetrics
from nri_plugin.plugin import IntentSink, NotConnected, NriPlugin, hand_over
from nri_plugin.policy.drift import (
    CPU_MANAGER_KIND,
    DRIFT_KIND,
    EVIDENCE,
    FIELDS,
    HostGroup,
    Observation,
    Seen,
    Target,
)
from nri_plugin.policy.intents import Intents, PlaceInRdtClass, SetIoWeight
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.protect import reraise_if_cancelled
from nri_plugin.protocol.errors import RpcError

log = logging.getLogger("nri_qos.reconcile")

RDT_DOMAIN, IO_DOMAIN = PlaceInRdtClass.domain, SetIoWeight.domain

# Request-path notes kept for the next period at most (a runaway kubelet must not grow it).
MAX_PENDING_REQUESTS = 256


@dataclass(frozen=True, slots=True)
class HostReader:
    """What `read_host` needs besides the host adapter."""

    root: Path
    unknown_containers: bool = True
    max_pids: int = 32
    cpu_manager_state: str = ""  # absolute path below root; "" skips the checkpoint
    resctrl_mount: str = "sys/fs/resctrl"  # below root, as [rdt] mount


@dataclass(frozen=True, slots=True)
class Located:
    """One container's files, resolved once while it lives (None: not readable)."""

    state: StateFiles | None
    weight: WeightFile | None


@dataclass(slots=True)
class ReconcileState:
    """The loop's own numbers (event loop), and the request-path evidence it collects."""

    periods: int = 0
    last_read_s: float = 0.0
    last_decide_s: float = 0.0
    last_repairs: int = 0
    pending_requests: list[str] = field(default_factory=list)
    metrics: ReconcileMetrics | None = None
    _requests_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_intents(self, intents: Intents) -> None:
        """Executor observer (called from the policy thread): keep the CPU manager notes
        of update requests."""
        for note in intents.notes:
            if note.kind == CPU_MANAGER_KIND and note.subject != "node":
                with self._requests_lock:
                    if len(self.pending_requests) < MAX_PENDING_REQUESTS:
                        self.pending_requests.append(f"{note.subject}: {note.message}")
                if self.metrics is not None:
                    self.metrics.cpu_manager_requests.inc()

    def take_requests(self) -> tuple[str, ...]:
        """In the loop: what the observer kept (the lock: it appends from another thread)."""
        with self._requests_lock:
            taken, self.pending_requests = self.pending_requests, []
        return tuple(taken)


def read_host(
    host: LinuxHost,
    targets: Sequence[Target],
    reader: HostReader,
    requests: tuple[str, ...] = (),
    cache: dict[tuple[str, str], Located] | None = None,
    started: frozenset[str] = frozenset(),
    clock: Callable[[], float] = time.perf_counter,
) -> Observation:
    """One period's host reading (host thread). Unreadable values are None, not drift.
    `cache` keeps each container's resolved files across periods (its cgroups_path does
    not change while it lives); entries of containers no longer listed are dropped.
    `started`: the domains whose controllers run; RDT and I/O are read only for those
    (and only for containers whose plan has a value)."""
    start = clock()
    files = cache if cache is not None else {}
    seen: dict[str, Seen] = {}
    keys = set()
    rdt_groups = None
    if RDT_DOMAIN in started and any(t.planned.rdt_class is not None for t in targets):
        rdt_groups = task_groups(reader.root / reader.resctrl_mount.strip("/"))
    read_io = IO_DOMAIN in started
    refused = host.oom_refused
    for t in targets:
        ref = t.ref
        key = (ref.id, ref.cgroups_path)
        keys.add(key)
        where = files.get(key)
        if where is None:
            where = files[key] = Located(
                host.state_files(ref.cgroups_path, ref.id),
                host.weight_file(ref.cgroups_path, ref.id) if read_io else None,
            )
        elif read_io and where.weight is None and where.state is not None:
            where = files[key] = Located(where.state, host.weight_file(ref.cgroups_path, ref.id))
        if where.state is None:
            seen[ref.id] = Seen(t.planned, oom_refused=refused.get(ref.id))
            continue
        cpus, mems, ooms = host.read_state(where.state, ref.pid, reader.max_pids)
        rdt: tuple[tuple[int, str], ...] = ()
        if rdt_groups is not None and t.planned.rdt_class is not None:
            rdt = tuple((pid, rdt_groups.get(pid, ROOT_GROUP)) for pid, _ in ooms)
        io_weight, io_max = None, IO_WEIGHT_MAX
        if read_io and where.weight is not None and t.planned.io_weight is not None:
            io_weight, io_max = host.read_weight(where.weight), where.weight.maximum
        seen[ref.id] = Seen(
            t.planned, cpus, mems, ooms, rdt, io_weight, io_max, refused.get(ref.id)
        )
    for stale in [k for k in files if k not in keys]:
        del files[stale]
    ids = {t.ref.id for t in targets}
    for gone in [c for c in refused if c not in ids]:
        refused.pop(gone, None)
    groups = None
    if reader.unknown_containers:
        known = ids | {t.ref.pod_id for t in targets}
        groups = tuple(_foreign_groups(_hierarchy(host), known))
    policy = None
    if reader.cpu_manager_state:
        checkpoint = read_cpu_manager_state(reader.root, Path(reader.cpu_manager_state.lstrip("/")))
        policy = checkpoint.policy if checkpoint is not None else None
    return Observation(seen, groups, policy, requests, clock() - start, started)


def _hierarchy(host: LinuxHost) -> Path | None:
    """The hierarchy root whose kubepods tree is listed: cpuset's (v1) or cgroup2."""
    fs = host.cgroupfs
    for controller in ("cpuset", "cpu", "memory"):
        try:
            return fs.group_dir("/", controller)
        except CgroupError:  # not mounted: try the next, then the cgroup2 tree
            continue
    return fs.unified_dir("/")


def _foreign_groups(hierarchy: Path | None, known: set[str]) -> Iterable[HostGroup]:
    """Container groups with processes whose name stands for no target (their pod's
    sandbox is judged against the engine's pods on the policy thread)."""
    if hierarchy is None:
        return
    for d in container_dirs(hierarchy):
        if known.isdisjoint(d.names) and populated(d.directory):
            yield HostGroup(d.names, str(d.group))


async def reconcile_loop(
    plugin: NriPlugin,
    policy: QosPolicy,
    host: LinuxHost,
    executor: HostExecutor,
    reader: HostReader,
    period_s: float,
    state: ReconcileState,
) -> None:
    metrics = state.metrics
    files: dict[tuple[str, str], Located] = {}  # owned by the host thread
    while True:
        await plugin.configured.wait()
        await asyncio.sleep(period_s)
        if not plugin.configured.is_set():
            continue
        try:
            targets = await plugin.in_policy_thread(policy.drift_targets)
            if not targets:
                continue
            requests = state.take_requests()
            started = frozenset(s.domain for s in executor.controllers.status() if s.enabled)
            read = functools.partial(read_host, host, targets, reader, requests, files, started)
            observed = await executor.run(read, key="reconcile")
            decided, intents = await plugin.in_policy_thread(
                functools.partial(_timed_reconcile, policy, observed, executor.submit)
            )
            state.periods += 1
            state.last_read_s, state.last_decide_s = observed.read_seconds, decided
            state.last_repairs = len(intents.all_updates()) + len(intents.host)
            if metrics is not None:
                metrics.periods.inc()
                metrics.seconds.labels("read").observe(observed.read_seconds)
                metrics.seconds.labels("decide").observe(decided)
                for note in intents.notes:
                    if note.kind == DRIFT_KIND:
                        metrics.repairs.labels(note.message.partition(" ")[0]).inc()
            await plugin.send_updates(intents)
            if metrics is not None:
                await plugin.in_policy_thread(functools.partial(_show, policy, metrics))
        except (NotConnected, RpcError, TimeoutError, ConnectionError) as exc:
            reraise_if_cancelled()
            log.warning("reconcile period: %s", exc or type(exc).__name__)
        except Exception:
            reraise_if_cancelled()
            log.exception("reconcile period failed; will retry")


def _timed_reconcile(
    policy: QosPolicy, observed: Observation, submit: IntentSink
) -> tuple[float, Intents]:
    """The comparison, timed where it runs (policy thread; queueing not counted); its
    repairs are handed over there (`hand_over`)."""
    start = time.perf_counter()
    intents = policy.reconcile(observed)
    seconds = time.perf_counter() - start
    return seconds, hand_over(intents, submit)


def _show(policy: QosPolicy, metrics: ReconcileMetrics) -> None:
    """Gauges from the drift book (policy thread, which owns it)."""
    book = policy.drift
    conflicts = {f: 0 for f in FIELDS}
    for _, fld in book.conflicts:
        conflicts[fld] = conflicts.get(fld, 0) + 1
    for fld, n in conflicts.items():
        metrics.conflicts.labels(fld).set(n)
    metrics.unknown.set(len(book.flagged()))
    evidence = book.fighting()
    for kind in EVIDENCE:
        metrics.cpu_manager.labels(kind).set(1.0 if kind in evidence else 0.0)


def new_metrics(registry: CollectorRegistry) -> ReconcileMetrics:
    """The loop's metrics on `registry` (every label value made up front)."""
    metrics = ReconcileMetrics(registry, FIELDS)
    for kind in EVIDENCE:
        metrics.cpu_manager.labels(kind).set(0.0)
    return metrics
