"""One `SignalSnapshot` per call: every watched container's signals over the window since
the previous call, the node's memory, and which source produced each signal kind.

The kernel's counters are cumulative; the detector wants per-window amounts. The sampler
keeps each container's previous readings and reports differences. A container seen for
the first time has no previous reading, so its window amounts are None (its lifetime
totals would look like one huge burst); so is any counter that went backwards (the
container was restarted into a new group under the same path). Containers no longer
watched are forgotten, with their open perf handles.

Every signal kind degrades on its own: a missing file, PSI turned off, no PMU, no
resctrl leaves that kind None for the containers concerned and says why in `sources`. One
container's failure never stops the others; its reason is logged once (again only when
it changes), and at most `LOG_BURST` such lines a minute reach the log.
"""

from __future__ import annotations

import errno as errno_codes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from ebpf.signals import cpustat, memory, psi, rdt
from ebpf.signals.cpi import CounterSource, CpiReader, PerfCounters
from ebpf.watched import RunqSource, RunqWindow, WatchedContainer
from isolation.errors import HostError
from isolation.rdt import MonSample, Resctrl
from qos_model.signals import (
    Availability,
    ContainerSignals,
    NodeMemory,
    Pressure,
    SignalSnapshot,
)

log = logging.getLogger("nri_qos.signals")

T = TypeVar("T")
LOG_BURST = 20  # complaint lines per minute, at most
PSI_KINDS = {"cpu": "cpu_pressure", "memory": "memory_pressure", "io": "io_pressure"}
# why a kind came from cgroup v1: what its better (v2) source lacked
V1_BECAUSE = {
    "cpu_usage": "no usage_usec in the cgroup2 cpu.stat",
    "throttling": "the cgroup2 cpu controller is off (its cpu.stat has no nr_periods)",
    "memory": "the cgroup2 memory controller is off (no memory.current)",
}


class _Expected(Exception):
    """A signal the container cannot have by construction (no cgroup2 directory, no
    monitoring group): reported in `sources`, never logged."""


class _Failed(Exception):
    """This container's signal failed; the message is already the one-line reason."""


class _HostWide(Exception):
    """The host lacks the signal for every container (PSI disabled): reported in
    `sources` and logged once for the host, not once per container."""


@dataclass(slots=True)
class _Previous:
    """A container's readings at the end of its last window."""

    at_s: float
    cpu: cpustat.CpuCounters | None = None
    psi: dict[str, psi.PsiTotals] = field(default_factory=dict)
    memory: memory.MemCounters | None = None
    rdt: MonSample | None = None


@dataclass(slots=True)
class _Tally:
    """Which sources served a signal kind this window, and why some containers got none."""

    used: dict[str, int] = field(default_factory=dict)
    missed: int = 0
    reason: str = ""

    def ok(self, source: str) -> None:
        self.used[source] = self.used.get(source, 0) + 1

    def fail(self, reason: str) -> None:
        self.missed += 1
        self.reason = self.reason or reason

    def availability(self, kind: str) -> Availability:
        if not self.used:
            return Availability("none", self.reason or "no containers watched")
        source = "+".join(sorted(self.used))
        why = [V1_BECAUSE[kind]] if "cgroup1" in self.used and kind in V1_BECAUSE else []
        if self.missed:
            total = self.missed + sum(self.used.values())
            why.append(f"{self.missed} of {total} containers without it: {self.reason}")
        return Availability(source, "; ".join(why))


class _Complaints:
    """Log each (subject, kind) reason once, and no more than LOG_BURST lines a minute."""

    def __init__(self) -> None:
        self._said: dict[tuple[str, str], str] = {}
        self._minute_start = float("-inf")
        self._lines = 0
        self._suppressed = 0

    def note(self, subject: str, kind: str, reason: str, now_s: float, label: str = "") -> None:
        """`subject` is a container id ("host" for the node); `label` names it in the log."""
        if self._said.get((subject, kind)) == reason:
            return
        self._said[(subject, kind)] = reason
        if now_s - self._minute_start >= 60.0:
            self._minute_start, self._lines = now_s, 0
        if self._lines >= LOG_BURST:
            self._suppressed += 1
            return
        self._lines += 1
        extra = f" ({self._suppressed} more suppressed)" if self._suppressed else ""
        self._suppressed = 0
        log.warning("%s: %s unavailable: %s%s", label or subject, kind, reason, extra)

    def clear(self, subject: str, kind: str) -> None:
        self._said.pop((subject, kind), None)

    def forget(self, subject: str) -> None:
        for key in [k for k in self._said if k[0] == subject]:
            del self._said[key]


class SignalSampler:
    """Reads every signal of the watched containers; see the module docstring.

    `root` prefixes the node files (/proc, /sys); containers' directories are used as
    given (the host adapter resolved them). `runq` is optional; `counters` defaults to
    perf_event_open and `resctrl` to the one under `root`."""

    def __init__(
        self,
        root: Path = Path("/"),
        runq: RunqSource | None = None,
        counters: CounterSource | None = None,
        resctrl: Resctrl | None = None,
    ) -> None:
        self.root = root
        self.runq = runq
        self.resctrl = resctrl if resctrl is not None else Resctrl(root)
        self.cpi = CpiReader(counters if counters is not None else PerfCounters(root))
        self._prev: dict[str, _Previous] = {}
        self._last_s: float | None = None
        self._node_psi: psi.PsiTotals | None = None
        self._complaints = _Complaints()

    def close(self) -> None:
        """Close the perf handles (the runq source belongs to the caller)."""
        self.cpi.close()

    # ------------------------------------------------------------------ the window

    def sample(self, containers: Sequence[WatchedContainer], now_s: float) -> SignalSnapshot:
        window_s = 0.0 if self._last_s is None else max(0.0, now_s - self._last_s)
        self._last_s = now_s
        unique = list({c.id: c for c in containers}.values())
        self._forget_unwatched({c.id for c in unique})
        tallies: dict[str, _Tally] = {}
        rdt_reason = self._rdt_missing()
        signals = {c.id: self._container(c, now_s, tallies, rdt_reason) for c in unique}
        sources = {kind: tally.availability(kind) for kind, tally in sorted(tallies.items())}
        sources["cpi"] = self._cpi_availability(tallies.get("cpi"))
        if "rdt" in sources:
            sources["mbm"] = sources["llc"] = sources.pop("rdt")
        blame: dict[tuple[str, str], int] = {}
        runq_window, sources["runq"] = self._runq(unique, now_s)
        if runq_window is not None:
            for c in unique:
                latency = runq_window.latency.get(c.id)
                if latency is not None:
                    signals[c.id] = replace(signals[c.id], runq=latency)
            blame = dict(runq_window.blame)
        node, sources["node_memory"] = self._node_memory(window_s, now_s)
        numa, sources["numa_memory"] = self._numa(now_s)
        return SignalSnapshot(
            end_s=now_s,
            window_s=window_s,
            containers=signals,
            blame=blame,
            node_memory=node,
            numa_memory=numa,
            sources=sources,
        )

    def _forget_unwatched(self, watched: set[str]) -> None:
        for gone in [i for i in self._prev if i not in watched]:
            del self._prev[gone]
            self.cpi.forget(gone)
            self._complaints.forget(gone)

    # ------------------------------------------------------------------ one container

    def _container(
        self,
        c: WatchedContainer,
        now_s: float,
        tallies: dict[str, _Tally],
        rdt_reason: str,
    ) -> ContainerSignals:
        prev = self._prev.get(c.id)
        cur = _Previous(at_s=now_s)
        self._prev[c.id] = cur
        window_s = now_s - prev.at_s if prev is not None else 0.0

        def guard(kind: str, read: Callable[[], tuple[T, str]]) -> T | None:
            tally = tallies.setdefault(kind, _Tally())
            try:
                value, source = read()
            except _Expected as exc:
                tally.fail(str(exc))
                return None
            except _HostWide as exc:
                tally.fail(str(exc))
                self._complaints.note("host", kind, str(exc), now_s)
                return None
            except Exception as exc:  # one container's failure must not stop the others
                expected = isinstance(exc, HostError | OSError | ValueError | _Failed)
                reason = str(exc) if expected and str(exc) else f"{type(exc).__name__}: {exc}"
                tally.fail(reason)
                self._complaints.note(c.id, kind, reason, now_s, f"{c.name} ({c.id[:12]})")
                return None
            tally.ok(source)
            self._complaints.clear(c.id, kind)
            return value

        counters = guard("cpu_usage", lambda: self._read_cpu(c))
        usage, throttling = (None, None)
        if counters is not None:
            cur.cpu = counters
            usage, throttling = cpustat.between(prev.cpu if prev else None, counters)
            self._tally_throttling(tallies, c, counters)
        else:
            tallies.setdefault("throttling", _Tally()).fail("no cpu.stat readable")

        pressures: dict[str, Pressure | None] = {}
        for resource, kind in PSI_KINDS.items():
            totals = guard(kind, partial(self._read_psi, c, resource))
            if totals is not None:
                cur.psi[resource] = totals
                before = prev.psi.get(resource) if prev else None
                pressures[kind] = psi.share(before, totals, window_s)

        mem = guard("memory", lambda: _with_source(memory.read_memory(c)))
        mem_use = None
        if mem is not None:
            cur.memory = mem
            mem_use = memory.between(prev.memory if prev else None, mem)

        mbm_total = mbm_local = llc = None
        sample = guard("rdt", lambda: self._read_rdt(c, rdt_reason))
        if sample is not None:
            cur.rdt = sample
            mbm_total, mbm_local, llc = rdt.between(prev.rdt if prev else None, sample)

        cpi = guard("cpi", lambda: self._read_cpi(c))
        return ContainerSignals(
            cpu_usage_ns=usage,
            cpu_pressure=pressures.get("cpu_pressure"),
            memory_pressure=pressures.get("memory_pressure"),
            io_pressure=pressures.get("io_pressure"),
            throttling=throttling,
            memory=mem_use,
            mbm_total_bytes=mbm_total,
            mbm_local_bytes=mbm_local,
            llc_occupancy_bytes=llc,
            cpi=cpi,
        )

    @staticmethod
    def _read_cpu(c: WatchedContainer) -> tuple[cpustat.CpuCounters, str]:
        counters = cpustat.read_cpu(c)
        if counters.usage_ns is None:
            raise _Expected("no usage counter (no cgroup2 cpu.stat, no v1 cpuacct.usage)")
        return counters, counters.usage_source

    @staticmethod
    def _tally_throttling(
        tallies: dict[str, _Tally], c: WatchedContainer, counters: cpustat.CpuCounters
    ) -> None:
        tally = tallies.setdefault("throttling", _Tally())
        if counters.throttling_source != "none":
            tally.ok(counters.throttling_source)
        else:
            tally.fail(
                "no CFS bandwidth counters (the cgroup2 cpu controller is off and no v1 "
                "cpu directory is known)"
            )

    @staticmethod
    def _read_psi(c: WatchedContainer, resource: str) -> tuple[psi.PsiTotals, str]:
        if c.cgroup2_dir is None:
            raise _Expected("no cgroup2 directory")
        try:
            return psi.read_psi(psi.group_path(c.cgroup2_dir, resource)), "psi"
        except HostError as exc:
            if exc.errno == errno_codes.EOPNOTSUPP:
                raise _HostWide(psi.explain(exc)) from exc
            raise _Failed(psi.explain(exc)) from exc

    def _rdt_missing(self) -> str:
        """Why no container can have RDT counters this window ("" when resctrl is there)."""
        if not (self.resctrl.mount / "info").is_dir():
            return f"no resctrl mounted at {self.resctrl.mount}"
        return ""

    def _read_rdt(self, c: WatchedContainer, missing: str) -> tuple[MonSample, str]:
        if missing:
            raise _Expected(missing)
        try:
            return rdt.read_rdt(self.resctrl, c), "resctrl"
        except rdt.NotMonitored as exc:
            raise _Expected(str(exc)) from exc

    def _read_cpi(self, c: WatchedContainer) -> tuple[float | None, str]:
        if c.cgroup2_dir is None:
            raise _Expected("no cgroup2 directory")
        return self.cpi.sample(c.id, c.cgroup2_dir), self.cpi.source.name

    def _cpi_availability(self, tally: _Tally | None) -> Availability:
        if self.cpi.unavailable:
            return Availability("none", self.cpi.unavailable)
        return (
            tally.availability("cpi")
            if tally is not None
            else Availability("none", "no containers watched")
        )

    # ------------------------------------------------------------------ node-wide

    def _runq(
        self, containers: Sequence[WatchedContainer], now_s: float
    ) -> tuple[RunqWindow | None, Availability]:
        if self.runq is None:
            return None, Availability("none", "no run-queue source configured")
        try:
            window = self.runq.collect(containers)
        except Exception as exc:
            reason = f"{self.runq.name} failed: {exc or type(exc).__name__}"
            self._complaints.note("host", "runq", reason, now_s)
            return None, Availability("none", reason)
        self._complaints.clear("host", "runq")
        return window, window.availability

    def _node_memory(self, window_s: float, now_s: float) -> tuple[NodeMemory | None, Availability]:
        pressure: Pressure | None = None
        psi_reason = ""
        try:
            totals = psi.read_psi(psi.node_path(self.root, "memory"))
        except HostError as exc:
            psi_reason = psi.explain(exc)
            self._node_psi = None
        except ValueError as exc:
            psi_reason = str(exc)
            self._node_psi = None
        else:
            pressure = psi.share(self._node_psi, totals, window_s)
            self._node_psi = totals
        try:
            node = memory.read_node(self.root, pressure)
        except (HostError, ValueError) as exc:
            self._complaints.note("host", "node_memory", str(exc), now_s)
            return None, Availability("none", str(exc))
        self._complaints.clear("host", "node_memory")
        return node, Availability(
            "meminfo", psi_reason and f"no node memory pressure: {psi_reason}"
        )

    def _numa(self, now_s: float) -> tuple[dict[int, NodeMemory], Availability]:
        try:
            nodes = memory.read_numa(self.root)
        except (HostError, ValueError) as exc:
            self._complaints.note("host", "numa_memory", str(exc), now_s)
            return {}, Availability("none", str(exc))
        if not nodes:
            return {}, Availability("none", "no NUMA nodes in sys/devices/system/node")
        return nodes, Availability("sysfs", "MemFree + half the file LRU and reclaimable slab")


def _with_source(counters: memory.MemCounters) -> tuple[memory.MemCounters, str]:
    return counters, counters.source
