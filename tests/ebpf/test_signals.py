"""The signal collectors against fake kernel trees (pyfakefs) in the kernel's own formats.

Each test writes the files a kernel would show at two moments and checks the window the
sampler reports between them: deltas (never lifetime totals), None on a first sighting
or after a counter reset, and a clean "unavailable, because ..." when a source is
missing. Formats: Documentation/accounting/psi.rst, admin-guide/cgroup-v2.rst and
cgroup-v1/{cpuacct,memory}.rst, filesystems/proc.rst (meminfo).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from ebpf.signals import cpustat, memory, psi
from ebpf.signals.cpi import CountersUnavailable, CpiReader
from ebpf.signals.sampler import LOG_BURST, SignalSampler
from ebpf.watched import RunqWindow, WatchedContainer
from isolation.errors import HostError
from isolation.rdt import DEFAULT_CLASSES, Resctrl
from qos_model.signals import Availability, MemoryUse, Pressure, RunqLatency
from tests.isolation.fake_resctrl import FakeResctrl

KIB = 1024
MIB = 1 << 20
V1_UNLIMITED = 9223372036854771712  # what v1 memory.limit_in_bytes shows with no limit


def psi_text(some_us: int, full_us: int | None = 0) -> str:
    line = "{} avg10=1.23 avg60=0.45 avg300=0.06 total={}\n"
    text = line.format("some", some_us)
    return text + (line.format("full", full_us) if full_us is not None else "")


def v2_cpu_stat(usage_us: int, throttling: tuple[int, int, int] | None = None) -> str:
    text = (
        f"usage_usec {usage_us}\nuser_usec {usage_us * 3 // 4}\n"
        f"system_usec {usage_us // 4}\nnice_usec 0\ncore_sched.force_idle_usec 0\n"
    )
    if throttling is not None:
        periods, throttled, throttled_us = throttling
        text += (
            f"nr_periods {periods}\nnr_throttled {throttled}\nthrottled_usec {throttled_us}\n"
            "nr_bursts 0\nburst_usec 0\n"
        )
    return text


def v1_cpu_stat(periods: int, throttled: int, throttled_ns: int) -> str:
    return (
        f"nr_periods {periods}\nnr_throttled {throttled}\nthrottled_time {throttled_ns}\n"
        "nr_bursts 0\nburst_time 0\nwait_sum 0\n"
    )


def oom_control(kills: int) -> str:
    return f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"


def memory_events(high: int, oom_kill: int) -> str:
    return f"low 0\nhigh {high}\nmax 3\noom 1\noom_kill {oom_kill}\noom_group_kill 0\n"


MEMINFO = """\
MemTotal:       24684092 kB
MemFree:        22900024 kB
MemAvailable:   24060844 kB
Buffers:           33516 kB
Cached:          1376068 kB
SwapCached:            0 kB
Active(file):     635524 kB
Inactive(file):   772024 kB
SReclaimable:     146544 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def node_meminfo(node: int, total_kb: int, free_kb: int, active_file_kb: int) -> str:
    return (
        f"Node {node} MemTotal:       {total_kb} kB\n"
        f"Node {node} MemFree:        {free_kb} kB\n"
        f"Node {node} MemUsed:        {total_kb - free_kb} kB\n"
        f"Node {node} Active(file):   {active_file_kb} kB\n"
        f"Node {node} Inactive(file): 1000 kB\n"
        f"Node {node} SReclaimable:   200 kB\n"
        f"Node {node} HugePages_Total:     0\n"
    )


class Tree:
    """A fake host: node files plus one hybrid container (v2 group for usage and PSI, v1
    cpu and memory groups), whose counters a test moves between samples."""

    def __init__(self, fs: FakeFilesystem, cid: str = "c1") -> None:
        self.fs = fs
        self.v2 = Path(f"/sys/fs/cgroup/unified/kubepods/{cid}")
        self.cpu = Path(f"/sys/fs/cgroup/cpu/kubepods/{cid}")
        self.mem = Path(f"/sys/fs/cgroup/memory/kubepods/{cid}")
        self.container = WatchedContainer(
            id=cid,
            name=f"default/pod/{cid}",
            cgroup2_dir=self.v2,
            cpu_dir=self.cpu,
            memory_dir=self.mem,
        )
        self.set("/proc/meminfo", MEMINFO)
        self.set("/proc/pressure/memory", psi_text(0))
        self.set("/sys/devices/system/node/node0/meminfo", node_meminfo(0, 1000, 100, 400))
        self.set("/sys/devices/system/node/node1/meminfo", node_meminfo(1, 2000, 1500, 0))
        self.set("/sys/devices/system/node/online", "0-1\n")
        self.counters(usage_us=0, psi_us=0, throttling=(0, 0, 0), usage_bytes=MIB, kills=0)

    def set(self, path: str | Path, text: str) -> None:
        if self.fs.exists(path):
            self.fs.get_object(path).set_contents(text)
        else:
            self.fs.create_file(path, contents=text)

    def counters(
        self,
        *,
        usage_us: int,
        psi_us: int,
        throttling: tuple[int, int, int],
        usage_bytes: int,
        kills: int,
    ) -> None:
        self.set(self.v2 / "cpu.stat", v2_cpu_stat(usage_us))
        for resource in psi.RESOURCES:
            self.set(self.v2 / f"{resource}.pressure", psi_text(psi_us))
        self.set(self.cpu / "cpu.stat", v1_cpu_stat(*throttling))
        self.set(self.mem / "memory.usage_in_bytes", f"{usage_bytes}\n")
        self.set(self.mem / "memory.limit_in_bytes", f"{64 * MIB}\n")
        self.set(self.mem / "memory.oom_control", oom_control(kills))


class FakeCounters:
    """An injected CounterSource: (cycles, instructions) set by the test."""

    name = "fake-pmu"

    def __init__(self) -> None:
        self.counts: dict[Path, tuple[int, int]] = {}
        self.opened: list[Path] = []
        self.closed: list[Path] = []

    def open(self, cgroup2_dir: Path) -> object:
        self.opened.append(cgroup2_dir)
        return cgroup2_dir

    def read(self, handle: object) -> tuple[int, int]:
        assert isinstance(handle, Path)
        return self.counts.get(handle, (0, 0))

    def close(self, handle: object) -> None:
        assert isinstance(handle, Path)
        self.closed.append(handle)


class NoPmu(FakeCounters):
    def open(self, cgroup2_dir: Path) -> object:
        self.opened.append(cgroup2_dir)
        raise CountersUnavailable("no hardware counters: perf_event_open cycles: ENOENT")


def sampler(counters: FakeCounters | None = None, **kwargs: object) -> SignalSampler:
    return SignalSampler(Path("/"), counters=counters or FakeCounters(), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- parsers


def test_psi_totals_in_the_kernels_format() -> None:
    assert psi.parse_psi(psi_text(1553184423, 7)) == psi.PsiTotals(1553184423, 7)
    assert psi.parse_psi(psi_text(5, None)) == psi.PsiTotals(5, None)  # cpu before 5.13
    with pytest.raises(ValueError, match="no 'some"):
        psi.parse_psi("garbage\n")


def test_psi_share_is_the_total_delta_over_the_window() -> None:
    before, after = psi.PsiTotals(1_000, 0), psi.PsiTotals(251_000, 100_000)
    assert psi.share(before, after, 1.0) == Pressure(some=0.25, full=0.1)
    assert psi.share(None, after, 1.0) is None  # first window
    assert psi.share(after, before, 1.0) is None  # went backwards: a new group
    assert psi.share(before, psi.PsiTotals(5_000_000), 1.0) == Pressure(some=1.0)  # clamped


def test_cpu_stat_v2_with_the_cpu_controller_gives_throttling_in_ns() -> None:
    counters = cpustat.parse_keyed(v2_cpu_stat(100, (10, 4, 2500)))
    assert counters["nr_throttled"] == 4 and counters["throttled_usec"] == 2500


def test_meminfo_parses_host_and_node_formats() -> None:
    host = memory.parse_meminfo(MEMINFO)
    assert host["MemAvailable"] == 24060844 * KIB and host["HugePages_Total"] == 0
    node = memory.parse_meminfo(node_meminfo(1, 2000, 1500, 0))
    assert node["MemFree"] == 1500 * KIB and node["Active(file)"] == 0


# ---------------------------------------------------------------------- the sampler


def test_first_window_has_no_deltas_then_deltas_follow(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    tree.counters(usage_us=5_000_000, psi_us=9_000_000, throttling=(500, 400, 9), usage_bytes=MIB,
                  kills=4)  # fmt: skip
    s = sampler()
    first = s.sample([tree.container], now_s=100.0)
    one = first.containers["c1"]
    # lifetime totals are not a window: nothing to report yet but the levels
    assert first.window_s == 0.0
    assert one.cpu_usage_ns is None and one.throttling is None and one.cpu_pressure is None
    assert one.memory == MemoryUse(usage_bytes=MIB, limit_bytes=64 * MIB, oom_kills=0)

    tree.counters(usage_us=5_500_000, psi_us=9_200_000, throttling=(510, 406, 3_000_000),
                  usage_bytes=2 * MIB, kills=5)  # fmt: skip
    fs.get_object("/proc/pressure/memory").set_contents(psi_text(100_000, 50_000))
    second = s.sample([tree.container], now_s=102.0)
    one = second.containers["c1"]
    assert second.window_s == 2.0
    assert one.cpu_usage_ns == 500_000_000
    assert one.cpu_pressure == Pressure(some=0.1, full=0.0)
    assert one.io_pressure == one.memory_pressure == Pressure(some=0.1, full=0.0)
    assert one.throttling is not None
    assert (one.throttling.periods, one.throttling.throttled_periods) == (10, 6)
    assert one.throttling.throttled_ns == 2_999_991 and one.throttling.ratio == 0.6
    assert one.memory == MemoryUse(usage_bytes=2 * MIB, limit_bytes=64 * MIB, oom_kills=1)
    assert second.node_memory is not None
    assert second.node_memory.available_bytes == 24060844 * KIB
    assert second.node_memory.pressure == Pressure(some=0.05, full=0.025)
    assert second.sources["cpu_usage"] == Availability("cgroup2")
    assert second.sources["throttling"] == Availability(
        "cgroup1", "the cgroup2 cpu controller is off (its cpu.stat has no nr_periods)"
    )
    assert second.sources["cpu_pressure"] == Availability("psi")
    assert second.sources["memory"] == Availability(
        "cgroup1", "the cgroup2 memory controller is off (no memory.current)"
    )


def test_numa_nodes_estimate_available_memory(fs: FakeFilesystem) -> None:
    Tree(fs)
    snap = sampler().sample([], now_s=1.0)
    # MemFree + (Active(file) + Inactive(file)) / 2 + SReclaimable / 2
    assert snap.numa_memory[0].available_bytes == (100 + 700 + 100) * KIB
    # 1500 + 500 + 100 is more than the node has: capped at MemTotal
    assert snap.numa_memory[1].available_bytes == snap.numa_memory[1].total_bytes == 2000 * KIB
    assert snap.sources["numa_memory"].source == "sysfs"


def test_a_restarted_container_gives_no_negative_deltas(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    tree.counters(usage_us=9_000_000, psi_us=800_000, throttling=(900, 50, 7_000), usage_bytes=MIB,
                  kills=3)  # fmt: skip
    s = sampler()
    s.sample([tree.container], now_s=10.0)
    # same path, new group: every counter starts over
    tree.counters(usage_us=1_000, psi_us=10, throttling=(2, 0, 0), usage_bytes=MIB, kills=0)
    one = s.sample([tree.container], now_s=11.0).containers["c1"]
    assert one.cpu_usage_ns is None and one.throttling is None
    assert one.cpu_pressure is None and one.io_pressure is None
    assert one.memory is not None and one.memory.oom_kills == 0
    # and the window after the restart is measured from the new counters
    tree.counters(usage_us=501_000, psi_us=10, throttling=(12, 0, 0), usage_bytes=MIB, kills=1)
    one = s.sample([tree.container], now_s=12.0).containers["c1"]
    assert one.cpu_usage_ns == 500_000_000 and one.memory is not None
    assert one.memory.oom_kills == 1 and one.cpu_pressure == Pressure(some=0.0, full=0.0)


def test_v2_memory_and_throttling_when_the_v2_controllers_are_on(fs: FakeFilesystem) -> None:
    v2 = Path("/sys/fs/cgroup/kubepods/c2")
    fs.create_file(v2 / "cpu.stat", contents=v2_cpu_stat(1_000, (100, 10, 500)))
    fs.create_file(v2 / "memory.current", contents=f"{3 * MIB}\n")
    fs.create_file(v2 / "memory.max", contents="max\n")
    fs.create_file(v2 / "memory.events", contents=memory_events(high=7, oom_kill=0))
    for resource in psi.RESOURCES:
        fs.create_file(v2 / f"{resource}.pressure", contents=psi_text(0))
    fs.create_file("/proc/meminfo", contents=MEMINFO)
    container = WatchedContainer(id="c2", name="ns/p/c2", cgroup2_dir=v2)
    s = sampler()
    s.sample([container], now_s=0.0)
    fs.get_object(v2 / "cpu.stat").set_contents(v2_cpu_stat(3_000, (120, 30, 4_500)))
    fs.get_object(v2 / "memory.events").set_contents(memory_events(high=9, oom_kill=1))
    snap = s.sample([container], now_s=1.0)
    one = snap.containers["c2"]
    assert one.cpu_usage_ns == 2_000_000
    assert one.throttling is not None and one.throttling.throttled_ns == 4_000_000
    assert one.throttling.ratio == 1.0
    assert one.memory == MemoryUse(3 * MIB, None, oom_kills=1, high_events=2)
    assert snap.sources["throttling"] == Availability("cgroup2")
    assert snap.sources["memory"] == Availability("cgroup2")
    # no NUMA sysfs, no node PSI in this tree: said, not raised
    assert snap.numa_memory == {} and snap.sources["numa_memory"].source == "none"
    assert snap.sources["node_memory"].reason.startswith("no node memory pressure: no PSI file")


def test_v1_memory_without_a_limit(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    fs.get_object(tree.mem / "memory.limit_in_bytes").set_contents(f"{V1_UNLIMITED}\n")
    assert memory.read_memory(tree.container).limit_bytes is None


def test_disabled_psi_is_unavailable_and_said_once(
    fs: FakeFilesystem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """psi=0: the kernel answers EOPNOTSUPP on every group's pressure files."""
    tree, other = Tree(fs), Tree(fs, "c9")
    real_read_file = psi.read_file

    def read_file(path: Path) -> str:
        # what the kernel answers a read of a group's pressure file under psi=0
        if path.name.endswith(".pressure") and "unified" in str(path):
            raise HostError(path, errno.EOPNOTSUPP, "Operation not supported")
        return real_read_file(path)

    monkeypatch.setattr(psi, "read_file", read_file)
    s = sampler()
    with caplog.at_level(logging.WARNING, logger="nri_qos.signals"):
        for now in (1.0, 2.0, 3.0):
            snap = s.sample([tree.container, other.container], now_s=now)
    assert snap.containers["c1"].cpu_pressure is None
    assert snap.containers["c9"].io_pressure is None
    assert snap.containers["c1"].cpu_usage_ns == 0  # the rest still works
    reason = snap.sources["cpu_pressure"]
    assert reason.source == "none" and reason.reason.startswith(
        "PSI is disabled (booted with psi=0"
    )
    lines = [r.getMessage() for r in caplog.records]
    # once per kind for the host, not once per container and window
    assert sum("cpu_pressure unavailable: PSI is disabled" in m for m in lines) == 1
    assert len(lines) == 3


def test_missing_psi_files_are_unavailable_with_the_reason(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    fs.remove_object(str(tree.v2 / "io.pressure"))
    snap = sampler().sample([tree.container], now_s=1.0)
    assert snap.sources["io_pressure"].source == "none"
    assert "no PSI file" in snap.sources["io_pressure"].reason
    assert snap.sources["cpu_pressure"] == Availability("psi")


def test_one_bad_container_does_not_spoil_the_others(
    fs: FakeFilesystem, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = Tree(fs), Tree(fs, "bad")
    fs.remove_object(str(bad.v2 / "cpu.stat"))
    fs.remove_object(str(bad.cpu / "cpu.stat"))
    fs.get_object(bad.mem / "memory.usage_in_bytes").set_contents("garbage\n")
    s = sampler()
    with caplog.at_level(logging.WARNING, logger="nri_qos.signals"):
        s.sample([good.container, bad.container], now_s=1.0)
        good.counters(usage_us=10, psi_us=0, throttling=(1, 0, 0), usage_bytes=MIB, kills=0)
        snap = s.sample([good.container, bad.container], now_s=2.0)
    assert snap.containers["c1"].cpu_usage_ns == 10_000
    assert snap.containers["bad"].cpu_usage_ns is None and snap.containers["bad"].memory is None
    assert snap.containers["bad"].cpu_pressure == Pressure(some=0.0, full=0.0)
    assert snap.sources["cpu_usage"].source == "cgroup2"
    assert snap.sources["cpu_usage"].reason.startswith(
        "1 of 2 containers without it: no cpu.stat or cpuacct.usage [ENOENT: "
    )
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # cpu_usage and memory, each once over two windows
    assert all(m.startswith("default/pod/bad (bad): ") for m in lines)
    assert lines[1].endswith("memory.usage_in_bytes is not a number: 'garbage'")
    # a container that is no longer watched is forgotten, its complaints too
    s.sample([good.container], now_s=3.0)
    with caplog.at_level(logging.WARNING, logger="nri_qos.signals"):
        s.sample([good.container, bad.container], now_s=4.0)
    assert len(caplog.records) == 4


def test_forgotten_containers_start_over(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    counters = FakeCounters()
    counters.counts[tree.v2] = (1, 1)
    s = sampler(counters)
    s.sample([tree.container], now_s=1.0)
    assert s.sample([], now_s=2.0).containers == {}
    assert counters.closed == [tree.v2]  # its perf handle went with it
    tree.counters(usage_us=99, psi_us=99, throttling=(9, 9, 9), usage_bytes=MIB, kills=9)
    back = s.sample([tree.container], now_s=3.0).containers["c1"]
    assert back.cpu_usage_ns is None and back.cpi is None  # a first sighting again


def test_cpi_from_injected_counter_deltas(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    counters = FakeCounters()
    counters.counts[tree.v2] = (1_000_000, 900_000)
    s = sampler(counters)
    assert s.sample([tree.container], now_s=1.0).containers["c1"].cpi is None
    counters.counts[tree.v2] = (4_000_000, 2_900_000)
    snap = s.sample([tree.container], now_s=2.0)
    assert snap.containers["c1"].cpi == 1.5
    assert snap.sources["cpi"] == Availability("fake-pmu")
    assert counters.opened == [tree.v2]  # one handle, kept open
    counters.counts[tree.v2] = (4_000_001, 2_900_000)  # nothing retired: no ratio
    assert s.sample([tree.container], now_s=3.0).containers["c1"].cpi is None


def test_no_hardware_counters_is_said_and_not_retried(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    counters = NoPmu()
    s = sampler(counters)
    for now in (1.0, 2.0):
        snap = s.sample([tree.container], now_s=now)
    assert snap.containers["c1"].cpi is None
    assert snap.sources["cpi"] == Availability(
        "none", "no hardware counters: perf_event_open cycles: ENOENT"
    )
    assert counters.opened == [tree.v2]


def test_cpi_reader_reopens_after_a_failed_read() -> None:
    class Flaky(FakeCounters):
        def read(self, handle: object) -> tuple[int, int]:
            raise OSError(errno.ENODEV, "gone")

    source = Flaky()
    reader = CpiReader(source)
    with pytest.raises(OSError):
        reader.sample("c", Path("/g"))
    assert source.closed == [Path("/g")]
    assert reader.unavailable == ""


def test_rdt_deltas_unavailable_and_backwards_counters(fs: FakeFilesystem) -> None:
    kernel = FakeResctrl(fs, l3_domains=(0, 1))
    tree = Tree(fs)
    resctrl = Resctrl()
    resctrl.ensure_class("reclaimed", DEFAULT_CLASSES["reclaimed"], resctrl.probe())
    resctrl.ensure_mon_group("reclaimed", "c1", "test")
    container = WatchedContainer(
        id="c1", name="ns/p/c1", cgroup2_dir=tree.v2, rdt_group="nri-qos-reclaimed", rdt_mon="c1"
    )
    group = "nri-qos-reclaimed"

    def counters(total: int | str, local: int, llc: int) -> None:
        for domain in (0, 1):
            kernel.set_counter(group, "mbm_total_bytes", total, mon="c1", domain=domain)
            kernel.set_counter(group, "mbm_local_bytes", local, mon="c1", domain=domain)
            kernel.set_counter(group, "llc_occupancy", llc, mon="c1", domain=domain)

    s = sampler(resctrl=resctrl)
    counters(1000, 100, 4096)
    first = s.sample([container], now_s=1.0).containers["c1"]
    assert (first.mbm_total_bytes, first.llc_occupancy_bytes) == (None, 8192)
    counters(1500, 300, 2048)
    snap = s.sample([container], now_s=2.0)
    one = snap.containers["c1"]
    assert (one.mbm_total_bytes, one.mbm_local_bytes, one.llc_occupancy_bytes) == (1000, 400, 4096)
    assert snap.sources["mbm"] == Availability("resctrl")
    counters("Unavailable", 50, 2048)  # local went backwards: a new RMID
    one = s.sample([container], now_s=3.0).containers["c1"]
    assert (one.mbm_total_bytes, one.mbm_local_bytes) == (None, None)


def test_no_resctrl_and_unmonitored_containers(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    snap = sampler().sample([tree.container], now_s=1.0)
    assert snap.sources["mbm"] == Availability("none", "no resctrl mounted at /sys/fs/resctrl")
    FakeResctrl(fs)
    snap = sampler().sample([tree.container], now_s=1.0)
    assert snap.sources["llc"] == Availability("none", "no resctrl monitoring group")


class FakeRunq:
    name = "fake-core"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def collect(self, containers: Sequence[WatchedContainer]) -> RunqWindow:
        if self.fail:
            raise RuntimeError("ring buffer lost")
        return RunqWindow(
            latency={c.id: RunqLatency(count=2, total_ns=3000) for c in containers},
            blame={("c1", ""): 1500},
            availability=Availability("core", ""),
        )

    def close(self) -> None:
        pass


def test_runq_and_blame_come_from_the_runq_source(fs: FakeFilesystem) -> None:
    tree = Tree(fs)
    snap = sampler(runq=FakeRunq()).sample([tree.container], now_s=1.0)
    assert snap.containers["c1"].runq == RunqLatency(count=2, total_ns=3000)
    assert snap.blame == {("c1", ""): 1500}
    assert snap.sources["runq"] == Availability("core", "")
    failed = sampler(runq=FakeRunq(fail=True)).sample([tree.container], now_s=1.0)
    assert failed.containers["c1"].runq is None
    assert failed.sources["runq"] == Availability("none", "fake-core failed: ring buffer lost")
    none = sampler().sample([tree.container], now_s=1.0)
    assert none.sources["runq"] == Availability("none", "no run-queue source configured")


def test_complaints_are_rate_limited(fs: FakeFilesystem, caplog: pytest.LogCaptureFixture) -> None:
    Tree(fs)
    gone = [
        WatchedContainer(id=f"g{i}", name=f"ns/p/g{i}", cgroup2_dir=Path(f"/gone/g{i}"))
        for i in range(30)
    ]
    s = sampler()
    with caplog.at_level(logging.WARNING, logger="nri_qos.signals"):
        snap = s.sample(gone, now_s=1.0)
        assert len(caplog.records) == LOG_BURST
        s.sample([WatchedContainer(id="late", name="ns/p/late")], now_s=70.0)
    assert snap.sources["cpu_usage"].source == "none"
    assert "more suppressed" in caplog.records[LOG_BURST].getMessage()
