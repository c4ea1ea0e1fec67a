"""Run-queue latency per container, and who ran on the CPU meanwhile: three backends.

The detector needs "how long did this container's runnable tasks wait for a CPU" and,
to act on the right neighbour, "whose tasks were on that CPU during the wait". Hosts
differ in what they allow (host-capabilities.md, "eBPF"), so there are three backends
behind one ``RunqSource`` protocol (ebpf/watched.py), in order of preference:

- ``CoreRunqSource`` ("core"): the committed CO-RE object ``ebpf/objects/runq.bpf.o``
  (ebpf/runq.bpf.c) on ``tp_btf/sched_*``, loaded by ebpf/libbpf.py. Needs BTF
  (/sys/kernel/btf/vmlinux) and libbpf, nothing else: no compiler, headers or tracefs.
  Keys by the cgroup2 id and the v1 cpu cgroup id, log2 histogram, blame matrix.
- ``BccRunqSource`` ("bcc"): the same measurement compiled at start by bcc, for a kernel
  without BTF. Tracepoint arguments carry pids only, so the cgroup of a task is learnt
  when it is switched out (``bpf_get_current_cgroup_id()`` while it is still current),
  there is no v1 id, and a task's first wait after it was created is not attributed.
- ``SchedstatRunqSource`` ("schedstat"): no BPF; sums ``/proc/<pid>/schedstat``
  (run_delay, timeslices). Counts and totals only: no histogram, no blame.

``select_runq_source`` tries them in order and says, in ``.availability``, why each
better one was not used.

Windows: every backend reports deltas since its previous ``collect``; the first call
only starts the window (it returns zero waits for every container it can measure). A
container whose cgroup cannot be resolved (no directory given, directory gone) is left
out of ``latency``: "unknown", not "zero".
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpf.build import OBJECTS_DIR
from ebpf.libbpf import BpfLink, BpfMap, BpfObject, BpfUnavailable
from ebpf.watched import RunqSource, RunqWindow, WatchedContainer
from qos_model.signals import RUNQ_BUCKETS, Availability, RunqLatency

RUNQ_OBJECT = OBJECTS_DIR / "runq.bpf.o"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
TRACEFS = Path("/sys/kernel/tracing")
DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-bpfcc lives here
KERNEL_HEADERS = Path("/usr/src")

CORE_PROGRAMS = ("runq_wakeup", "runq_wakeup_new", "runq_switch")

# Map layouts shared by runq.bpf.c and the bcc program below (little-endian u64s).
_NR_SLOTS = 32  # slots in the BPF value; only the first RUNQ_BUCKETS are ever written
_PAIR = struct.Struct("<QQ")  # (cgroup2 id, v1 cpu cgroup id)
_HIST = struct.Struct(f"<QQ{_NR_SLOTS}Q")  # count, total_ns, slots
_BLAME_KEY = struct.Struct("<QQQQ")  # victim pair, runner pair
_U64 = struct.Struct("<Q")
_EVENT_NAMES = ("switch", "wakeup", "map_full")

_PRUNE_AT = 0.75  # share of max_entries above which keys nobody watches are deleted

Pair = tuple[int, int]


class RunqUnavailable(BpfUnavailable):
    """This backend cannot run here; the message is one line: what is missing, what to do.
    A BpfUnavailable, so callers that already handle that need nothing new."""


@dataclass(frozen=True, slots=True)
class _Hist:
    count: int
    total_ns: int
    buckets: tuple[int, ...]

    def minus(self, older: _Hist | None) -> _Hist:
        """The window's part; a key that was deleted and recreated restarts from zero."""
        if older is None:
            return self
        buckets = tuple(a - b for a, b in zip(self.buckets, older.buckets, strict=True))
        if self.count < older.count or self.total_ns < older.total_ns or min(buckets) < 0:
            return self
        return _Hist(self.count - older.count, self.total_ns - older.total_ns, buckets)


_EMPTY = _Hist(0, 0, (0,) * RUNQ_BUCKETS)


class _Resolver:
    """cgroup ids -> container ids for one collect: the cgroup2 id (st_ino of cgroup2_dir)
    first, the v1 cpu cgroup id (st_ino of cpu_dir) when the cgroup2 one is unknown."""

    def __init__(self, containers: Sequence[WatchedContainer]) -> None:
        self.by_v2: dict[int, str] = {}
        self.by_v1: dict[int, str] = {}
        self.measurable: list[str] = []
        for c in containers:
            v2 = _inode(c.cgroup2_dir)
            v1 = _inode(c.cpu_dir)
            if v2:
                self.by_v2[v2] = c.id
            if v1:
                self.by_v1[v1] = c.id
            if v2 or v1:
                self.measurable.append(c.id)

    def container(self, pair: Pair) -> str | None:
        return self.by_v2.get(pair[0]) or self.by_v1.get(pair[1])


def _inode(directory: Path | None) -> int:
    if directory is None:
        return 0
    try:
        return os.stat(directory).st_ino
    except OSError:
        return 0


def _sum_slots(values: Iterable[bytes]) -> _Hist:
    count = total = 0
    slots = [0] * _NR_SLOTS
    for raw in values:
        fields = _HIST.unpack_from(raw)
        count += fields[0]
        total += fields[1]
        for i, n in enumerate(fields[2:]):
            slots[i] += n
    # The BPF side caps the index at RUNQ_BUCKETS - 1; fold anything beyond it defensively.
    buckets = slots[:RUNQ_BUCKETS]
    buckets[-1] += sum(slots[RUNQ_BUCKETS:])
    return _Hist(count, total, tuple(buckets))


class _MapRunqSource:
    """What the two BPF backends share: read the cumulative maps, turn them into window
    deltas per key, resolve keys to containers, keep the maps from filling up."""

    name = "bpf"

    def __init__(self, hist: BpfMap, blame: BpfMap, events: BpfMap, reason: str) -> None:
        self._hist_map = hist
        self._blame_map = blame
        self._events_map = events
        self.availability = Availability(self.name, reason)
        self._prev_hist: dict[Pair, _Hist] | None = None
        self._prev_blame: dict[tuple[Pair, Pair], int] = {}

    def _read(self) -> tuple[dict[Pair, _Hist], dict[tuple[Pair, Pair], int]]:
        hist: dict[Pair, _Hist] = {}
        for key, value in self._hist_map.items():
            pair = _PAIR.unpack(key)
            hist[pair] = _sum_slots(self._hist_map.per_cpu_values(value))
        blame: dict[tuple[Pair, Pair], int] = {}
        for key, value in self._blame_map.items():
            v2, v1, r2, r1 = _BLAME_KEY.unpack(key)
            ns = sum(_U64.unpack_from(s)[0] for s in self._blame_map.per_cpu_values(value))
            blame[((v2, v1), (r2, r1))] = ns
        return hist, blame

    def events(self) -> dict[str, int]:
        """Cumulative handled events (switch, wakeup) and failed map inserts (map_full)."""
        out = {}
        for index, name in enumerate(_EVENT_NAMES):
            raw = self._events_map.lookup(struct.pack("<I", index))
            slots = self._events_map.per_cpu_values(raw) if raw else []
            out[name] = sum(_U64.unpack_from(s)[0] for s in slots)
        return out

    def collect(self, containers: Sequence[WatchedContainer]) -> RunqWindow:
        resolver = _Resolver(containers)
        hist, blame = self._read()
        first = self._prev_hist is None
        prev_hist = self._prev_hist or {}
        latency_acc: dict[str, _Hist] = {cid: _EMPTY for cid in resolver.measurable}
        blame_acc: dict[tuple[str, str], int] = {}
        if not first:
            for pair, cumulative in hist.items():
                cid = resolver.container(pair)
                if cid is None:
                    continue
                d = cumulative.minus(prev_hist.get(pair))
                acc = latency_acc[cid]
                latency_acc[cid] = _Hist(
                    acc.count + d.count,
                    acc.total_ns + d.total_ns,
                    tuple(a + b for a, b in zip(acc.buckets, d.buckets, strict=True)),
                )
            for (victim, runner), ns in blame.items():
                vid = resolver.container(victim)
                if vid is None:
                    continue
                older = self._prev_blame.get((victim, runner), 0)
                delta = ns - older if ns >= older else ns
                if delta:
                    key = (vid, resolver.container(runner) or "")
                    blame_acc[key] = blame_acc.get(key, 0) + delta
        self._prev_hist, self._prev_blame = hist, blame
        self._prune(resolver, hist, blame)
        return RunqWindow(
            latency={
                cid: RunqLatency(h.count, h.total_ns, h.buckets) for cid, h in latency_acc.items()
            },
            blame=blame_acc,
            availability=self.availability,
        )

    def _prune(
        self,
        resolver: _Resolver,
        hist: dict[Pair, _Hist],
        blame: dict[tuple[Pair, Pair], int],
    ) -> None:
        """Delete keys of cgroups nobody watches once a map is 3/4 full, so a node that
        creates and removes many cgroups never makes the probe drop watched waits. Their
        values were read already and nothing reports them, so nothing is lost."""
        if len(hist) > _PRUNE_AT * self._hist_map.info.max_entries:
            for pair in [p for p in hist if resolver.container(p) is None]:
                self._hist_map.delete(_PAIR.pack(*pair))
                del hist[pair]
        if len(blame) > _PRUNE_AT * self._blame_map.info.max_entries:
            for key in [k for k in blame if resolver.container(k[0]) is None]:
                self._blame_map.delete(_BLAME_KEY.pack(*key[0], *key[1]))
                del blame[key]

    def close(self) -> None:
        raise NotImplementedError

    def _close_maps(self) -> None:
        for bpf_map in (self._hist_map, self._blame_map, self._events_map):
            bpf_map.close()


# --- core: libbpf CO-RE ------------------------------------------------------------------


class CoreRunqSource(_MapRunqSource):
    """The CO-RE probe (ebpf/runq.bpf.c) through libbpf; see the module docstring."""

    name = "core"

    def __init__(
        self,
        object_path: Path = RUNQ_OBJECT,
        *,
        btf: Path = VMLINUX_BTF,
        reason: str = "core: libbpf CO-RE on tp_btf/sched_*",
    ) -> None:
        if not btf.exists():
            raise RunqUnavailable(f"no {btf} (kernel without BTF)")
        obj = BpfObject.load(object_path)
        links: list[BpfLink] = []
        try:
            for program in CORE_PROGRAMS:
                links.append(obj.attach(program))
            maps = (obj.map("runq_hist"), obj.map("runq_blame"), obj.map("runq_events"))
        except BaseException:
            for link in links:
                link.close()
            obj.close()
            raise
        self._obj: BpfObject | None = obj
        self._links = links
        super().__init__(*maps, reason=reason)

    def close(self) -> None:
        """Detach and free everything (the maps die with their last fd)."""
        for link in self._links:
            link.close()
        self._links = []
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        self._close_maps()


# --- bcc ---------------------------------------------------------------------------------

# Our own bcc program: the same maps and layouts as runq.bpf.c, fed by tracepoint args.
# prev_state in the sched_switch tracepoint is 0 for a runnable task and TASK_REPORT_MAX
# (the bit above all reported states) for a preempted one.
_BCC_PROGRAM = rb"""
#define NR_SLOTS 32
#define LAST_SLOT 26
#define RING 8

struct cg_pair { u64 cg2; u64 cg1; };
struct runq_hist { u64 count; u64 total_ns; u64 slots[NR_SLOTS]; };
struct blame_key { struct cg_pair victim; struct cg_pair runner; };
struct segment { struct cg_pair who; u64 start; u64 end; };
struct cpu_history {
    struct cg_pair cur; u64 cur_start; u32 head; u32 pad; struct segment ring[RING];
};

BPF_TABLE("lru_hash", u32, u64, runq_stamp, 65536);     /* tid -> runnable since (ns) */
BPF_TABLE("lru_hash", u32, u64, runq_cgroup, 65536);    /* tid -> cgroup2 id, seen as prev */
BPF_F_TABLE("percpu_hash", struct cg_pair, struct runq_hist, runq_hist, 8192, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash", struct blame_key, u64, runq_blame, 32768, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(runq_cpu, struct cpu_history, 1);
BPF_PERCPU_ARRAY(runq_events, u64, 3);

static __always_inline void count_event(int which)
{
    u64 *n = runq_events.lookup(&which);
    if (n)
        *n += 1;
}

static __always_inline u64 log2_floor(u64 v)
{
    u64 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) r += 1;
    return r;
}

static __always_inline void record_wait(struct cg_pair *victim, u64 wait_ns)
{
    struct runq_hist zero = {};
    struct runq_hist *h = runq_hist.lookup_or_try_init(victim, &zero);
    u64 slot;

    if (!h) {
        count_event(2);
        return;
    }
    slot = log2_floor(wait_ns / 1000);
    if (slot > LAST_SLOT)
        slot = LAST_SLOT;
    asm volatile("%0 &= 31" : "+r"(slot));
    h->count += 1;
    h->total_ns += wait_ns;
    h->slots[slot] += 1;
}

static __always_inline void blame(struct cg_pair *victim, struct cg_pair *runner, u64 ns)
{
    struct blame_key key = {};
    u64 zero = 0, *v;

    if (runner->cg2 == 0 && runner->cg1 == 0)
        return;
    key.victim = *victim;
    key.runner = *runner;
    v = runq_blame.lookup_or_try_init(&key, &zero);
    if (v)
        *v += ns;
    else
        count_event(2);
}

static __always_inline void stamp(u32 tid, u64 now)
{
    runq_stamp.update(&tid, &now);
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    count_event(1);
    stamp(args->pid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    count_event(1);
    stamp(args->pid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid, next = args->next_pid, zero = 0;
    struct cg_pair victim = {};
    struct cpu_history *hist;
    u64 *since_p, *cg, since;
    long state = args->prev_state;
    int i;

    count_event(0);
    if (prev) {
        u64 cur = bpf_get_current_cgroup_id(); /* still prev's context here */
        u64 *known = runq_cgroup.lookup(&prev);
        if (!known || *known != cur) /* a lookup is cheaper than an update */
            runq_cgroup.update(&prev, &cur);
        if (state == 0 || (state & TASK_REPORT_MAX))
            stamp(prev, now);
        else
            runq_stamp.delete(&prev);
    }

    hist = runq_cpu.lookup(&zero);
    if (!hist)
        return 0;
    if (next) {
        cg = runq_cgroup.lookup(&next);
        if (cg)
            victim.cg2 = *cg;
    }

    since_p = next ? runq_stamp.lookup(&next) : 0;
    if (since_p) {
        since = *since_p;
        runq_stamp.delete(&next);
        if (victim.cg2 && since < now) {
            record_wait(&victim, now - since);
            if (hist->cur_start) {
                blame(&victim, &hist->cur,
                      now - (since > hist->cur_start ? since : hist->cur_start));
                #pragma unroll
                for (i = 1; i <= RING; i++) {
                    struct segment *seg = &hist->ring[(hist->head - i) & (RING - 1)];
                    if (seg->end <= since || seg->end == 0)
                        break;
                    blame(&victim, &seg->who,
                          seg->end - (since > seg->start ? since : seg->start));
                }
            }
        }
    }

    if (!hist->cur_start || hist->cur.cg2 != victim.cg2) {
        if (hist->cur_start) {
            struct segment *seg = &hist->ring[hist->head & (RING - 1)];
            seg->who = hist->cur;
            seg->start = hist->cur_start;
            seg->end = now;
            hist->head += 1;
        }
        hist->cur = victim;
        hist->cur_start = now;
    }
    return 0;
}
"""

# include/linux/sched.h: TASK_REPORT_MAX = (TASK_REPORT_IDLE << 1) = 0x100 on 4.14+.
_TASK_REPORT_MAX = 0x100


def _import_bcc() -> Any:
    """bcc's Python module (Debian's python3-bpfcc lives outside this interpreter's path)."""
    if DIST_PACKAGES not in sys.path:
        sys.path.insert(0, DIST_PACKAGES)
    try:
        import bcc
    except ImportError as exc:
        raise RunqUnavailable(
            f"bcc is not importable ({exc}); apt install python3-bpfcc bpfcc-tools"
        ) from exc
    return bcc


def _headers_tree(scratch: Path, root: Path = KERNEL_HEADERS) -> Path:
    """One kernel source tree for bcc: Debian splits headers into -common and -<arch>, and
    BCC_KERNEL_SOURCE takes one directory, so merge them as symlinks (no root path is
    touched). The newest pair wins; it need not match the running kernel, which is why the
    program only uses tracepoint args and helpers, never kernel struct offsets."""
    arch_dirs = sorted(glob.glob(str(root / "linux-headers-*-amd64")))
    arch_dirs += sorted(glob.glob(str(root / "linux-headers-*-arm64")))
    for arch_dir in reversed(arch_dirs):
        version = Path(arch_dir).name.removeprefix("linux-headers-").rsplit("-", 1)[0]
        common = root / f"linux-headers-{version}-common"
        if not common.is_dir():
            continue
        merged = scratch / "kernel"
        for command in (
            ["cp", "-as", str(common), str(merged)],
            ["cp", "-as", "--remove-destination", f"{arch_dir}/.", f"{merged}/"],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RunqUnavailable(f"cannot merge kernel headers: {done.stderr.strip()}")
        return merged
    raise RunqUnavailable(
        f"no kernel headers under {root} (linux-headers-*-common and -amd64); "
        "apt install linux-headers-amd64"
    )


def _is_mounted(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == str(path) for line in mounts)
    except OSError:
        return False


@contextlib.contextmanager
def _tracefs_mounted(path: Path = TRACEFS) -> Iterator[None]:
    """tracefs at `path` for the duration (bcc reads tracepoint formats and ids there);
    unmounted again afterwards if we mounted it: the attached perf events do not need it."""
    if _is_mounted(path):
        yield
        return
    done = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RunqUnavailable(
            f"tracefs is not mounted at {path} and mounting it failed: {done.stderr.strip()}"
        )
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


class BccRunqSource(_MapRunqSource):
    """The bcc fallback (no BTF needed): see the module docstring for its limits."""

    name = "bcc"

    def __init__(self, *, reason: str = "bcc: tracepoint probes compiled by bcc") -> None:
        bcc = _import_bcc()
        with tempfile.TemporaryDirectory(prefix="runq-bcc-") as scratch:
            kernel = _headers_tree(Path(scratch))
            old = os.environ.get("BCC_KERNEL_SOURCE")
            os.environ["BCC_KERNEL_SOURCE"] = str(kernel)
            try:
                with _tracefs_mounted():
                    bpf = bcc.BPF(
                        text=_BCC_PROGRAM, cflags=[f"-DTASK_REPORT_MAX={_TASK_REPORT_MAX:#x}"]
                    )
            except RunqUnavailable:
                raise
            except Exception as exc:  # bcc raises Exception for compile and load errors
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise RunqUnavailable(f"bcc could not load the probe: {first}") from exc
            finally:
                if old is None:
                    os.environ.pop("BCC_KERNEL_SOURCE", None)
                else:
                    os.environ["BCC_KERNEL_SOURCE"] = old
        self._bpf: Any = bpf
        try:
            hist, blame, events = (
                BpfMap(os.dup(bpf[name.encode()].map_fd), name=name)
                for name in ("runq_hist", "runq_blame", "runq_events")
            )
        except BaseException:
            bpf.cleanup()
            raise
        super().__init__(hist, blame, events, reason=reason)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._close_maps()


# --- schedstat: no BPF -------------------------------------------------------------------


def _read_ints(path: Path) -> list[int] | None:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return None


class SchedstatRunqSource:
    """Sums of ``/proc/<tid>/schedstat`` (field 2: run_delay ns, field 3: timeslices,
    i.e. waits) over a container's threads. No histogram, no blame. The kernel keeps
    these per thread, so each thread's delta is taken separately: a thread that exited
    simply stops contributing (never a negative delta), and a thread that appeared in a
    container measured before counts from its start."""

    name = "schedstat"

    def __init__(
        self,
        procfs: Path = Path("/proc"),
        *,
        reason: str = "schedstat: /proc/<pid>/schedstat sums (no histogram, no blame)",
    ) -> None:
        self.procfs = procfs
        if _read_ints(procfs / "self" / "schedstat") is None:
            raise RunqUnavailable(f"no {procfs}/self/schedstat (kernel without CONFIG_SCHED_INFO)")
        self.availability = Availability(self.name, reason)
        self._prev: dict[str, dict[int, tuple[int, int]]] = {}
        self._started = False

    def _pids(self, c: WatchedContainer) -> list[int]:
        if c.pids:
            return list(c.pids)
        for directory in (c.cgroup2_dir, c.cpu_dir):
            if directory is None:
                continue
            numbers = _read_ints(directory / "cgroup.procs")
            if numbers:
                return numbers
        return []

    def _threads(self, pid: int) -> dict[int, tuple[int, int]]:
        """tid -> (run_delay ns, timeslices) of a process; {} when it is gone."""
        try:
            tids = [int(t) for t in os.listdir(self.procfs / str(pid) / "task")]
        except (OSError, ValueError):
            tids = [pid]  # no task/ listing (a fake procfs, or a thread id): the pid alone
        out = {}
        for tid in tids:
            path = self.procfs / str(pid) / "task" / str(tid) / "schedstat"
            fields = _read_ints(path)
            if fields is None and tid == pid:
                fields = _read_ints(self.procfs / str(pid) / "schedstat")
            if fields is not None and len(fields) >= 3:
                out[tid] = (fields[1], fields[2])
        return out

    def collect(self, containers: Sequence[WatchedContainer]) -> RunqWindow:
        latency: dict[str, RunqLatency] = {}
        current: dict[str, dict[int, tuple[int, int]]] = {}
        for c in containers:
            pids = self._pids(c)
            if not pids and c.cgroup2_dir is None and c.cpu_dir is None:
                continue  # nothing to go on: unknown, not zero
            now: dict[int, tuple[int, int]] = {}
            for pid in pids:
                now.update(self._threads(pid))
            current[c.id] = now
            seen_before = c.id in self._prev
            before = self._prev.get(c.id, {})
            count = total = 0
            if self._started:
                for tid, (delay, slices) in now.items():
                    old = before.get(tid)
                    if old is None:
                        if not seen_before:
                            continue  # a container new to us: this call is its baseline
                        old = (0, 0)
                    if delay < old[0] or slices < old[1]:
                        old = (0, 0)  # a recycled tid
                    total += delay - old[0]
                    count += slices - old[1]
            latency[c.id] = RunqLatency(count=count, total_ns=total)
        self._prev = current
        self._started = True
        return RunqWindow(latency=latency, blame={}, availability=self.availability)

    def close(self) -> None:
        self._prev = {}


# --- choosing ----------------------------------------------------------------------------

BACKENDS = ("core", "bcc", "schedstat")


def select_runq_source(
    prefer: Sequence[str] = BACKENDS,
    procfs: Path = Path("/proc"),
    *,
    core_object: Path = RUNQ_OBJECT,
    btf: Path = VMLINUX_BTF,
) -> RunqSource:
    """The first backend of `prefer` that works here. Its ``.availability`` says which one
    it is and, one line each, why every better one was not used. Raises RunqUnavailable
    (all the reasons, "; "-joined) when none works."""
    why_not: list[str] = []
    factories: dict[str, Callable[[str], _MapRunqSource | SchedstatRunqSource]] = {
        "core": lambda reason: CoreRunqSource(core_object, btf=btf, reason=reason),
        "bcc": lambda reason: BccRunqSource(reason=reason),
        "schedstat": lambda reason: SchedstatRunqSource(procfs, reason=reason),
    }
    for index, name in enumerate(prefer):
        factory = factories.get(name)
        if factory is None:
            why_not.append(f"{name}: unknown backend (known: {', '.join(BACKENDS)})")
            continue
        if why_not:
            reason = "\n".join(why_not)
        else:
            rest = [n for n in prefer[index + 1 :] if n in factories]
            reason = f"{name}: first choice, works" + (
                f" ({', '.join(rest)} not needed)" if rest else ""
            )
        try:
            return factory(reason)
        except BpfUnavailable as exc:
            why_not.append(f"{name}: {_one_line(exc)}")
    raise RunqUnavailable("no run-queue latency backend works: " + "; ".join(why_not))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
