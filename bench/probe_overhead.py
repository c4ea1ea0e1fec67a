"""What the run-queue latency probes (ebpf/runq.py) cost per scheduler event.

Two processes pinned to one CPU ping-pong a byte over two pipes: every round trip is two
wakeups and two context switches, the events the probes handle. Each round runs the same
number of round trips with no probe and then with each backend attached (created for the
round, closed after it), interleaved so drifting host load hits every mode alike. The
cost per event is

    (median round time with the probe - median without) / events per round

where the events are counted from the two workers' own context switch counters
(/proc/self/status: every switch out is a sched_switch; every voluntary one ends with a
sched_wakeup), so "none" and schedstat rounds are counted the same way as probe rounds.
The probe's own counters (CoreRunqSource.events()) are shown next to it as a cross-check
in the human-readable mode; they count every CPU, so they are higher.

    sudo python3 bench/probe_overhead.py [--backend core|bcc|schedstat] [--json]
    sudo python3 bench/probe_overhead.py --all        # every backend that loads here

``--json`` prints exactly {"backend": ..., "ns_per_event": x, "events": n} for one backend
(default: the best available one, as select_runq_source picks). Needs root for BPF.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ebpf.libbpf import BpfUnavailable  # noqa: E402
from ebpf.runq import (  # noqa: E402
    BACKENDS,
    BccRunqSource,
    CoreRunqSource,
    SchedstatRunqSource,
    select_runq_source,
)
from ebpf.watched import RunqSource, WatchedContainer  # noqa: E402


class BenchError(Exception):
    """The benchmark cannot run here; one line says why."""


def _switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of the calling process."""
    vol = nonvol = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            nonvol = int(line.split()[1])
    return vol, nonvol


def _worker(cpu: int, rx: int, tx: int, report: int, round_trips: int, first: bool) -> None:
    """One side of the ping-pong, in a forked child; reports ns and its switch counts."""
    os.sched_setaffinity(0, {cpu})
    byte = b"x"
    if first:
        os.read(rx, 1)  # the start signal from the peer: both are pinned and ready
    else:
        os.write(tx, byte)
    vol0, nonvol0 = _switches()
    start = time.perf_counter_ns()
    for _ in range(round_trips):
        if first:
            os.write(tx, byte)
            os.read(rx, 1)
        else:
            os.read(rx, 1)
            os.write(tx, byte)
    elapsed = time.perf_counter_ns() - start
    vol1, nonvol1 = _switches()
    os.write(report, f"{elapsed} {vol1 - vol0} {nonvol1 - nonvol0}\n".encode())


def ping_pong(cpu: int, round_trips: int) -> tuple[int, int, list[int]]:
    """(ns of the initiator's loop, scheduler events, pids); forks two pinned children."""
    a_to_b, b_to_a, report = os.pipe(), os.pipe(), os.pipe()
    pids = []
    for first in (True, False):
        pid = os.fork()
        if pid == 0:  # child
            try:
                rx, tx = (b_to_a[0], a_to_b[1]) if first else (a_to_b[0], b_to_a[1])
                _worker(cpu, rx, tx, report[1], round_trips, first)
            finally:
                os._exit(0)
        pids.append(pid)
    for fd in (*a_to_b, *b_to_a, report[1]):
        os.close(fd)
    lines: list[str] = []
    with os.fdopen(report[0]) as reports:
        lines = reports.read().split("\n")
    for pid in pids:
        os.waitpid(pid, 0)
    fields = [[int(x) for x in line.split()] for line in lines if line.strip()]
    if len(fields) != 2:
        raise BenchError("a ping-pong worker died without reporting")
    elapsed = max(f[0] for f in fields)
    events = sum(f[1] + f[2] for f in fields) + sum(f[1] for f in fields)
    return elapsed, events, pids


def open_backend(name: str) -> RunqSource:
    if name == "core":
        return CoreRunqSource()
    if name == "bcc":
        return BccRunqSource()
    if name == "schedstat":
        return SchedstatRunqSource()
    raise BenchError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")


@dataclass
class Samples:
    ns: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    probe_events: list[int] = field(default_factory=list)


def _poll(source: RunqSource, stop: threading.Event) -> None:
    """Collect every 100 ms while a round runs, as the agent would (schedstat's only cost)."""
    me = WatchedContainer(id="bench", name="bench/probe_overhead", pids=(os.getpid(),))
    while not stop.wait(0.1):
        source.collect([me])


def run_round(mode: str, cpu: int, round_trips: int, samples: Samples) -> None:
    source = None if mode == "none" else open_backend(mode)
    stop = threading.Event()
    poller = None
    try:
        before = source.events() if isinstance(source, CoreRunqSource | BccRunqSource) else None
        if source is not None:
            poller = threading.Thread(target=_poll, args=(source, stop), daemon=True)
            poller.start()
        ns, events, _ = ping_pong(cpu, round_trips)
        samples.ns.append(ns)
        samples.events.append(events)
        if before is not None and isinstance(source, CoreRunqSource | BccRunqSource):
            after = source.events()
            samples.probe_events.append(
                after["switch"] - before["switch"] + after["wakeup"] - before["wakeup"]
            )
    finally:
        stop.set()
        if poller is not None:
            poller.join()
        if source is not None:
            source.close()


def measure(backends: list[str], rounds: int, round_trips: int, cpu: int) -> dict[str, Samples]:
    results = {mode: Samples() for mode in ["none", *backends]}
    run_round("none", cpu, round_trips // 4, Samples())  # warm-up: page cache, CPU clocks
    for _ in range(rounds):
        for mode in results:
            run_round(mode, cpu, round_trips, results[mode])
    return results


def ns_per_event(results: dict[str, Samples], mode: str) -> tuple[float, int]:
    base = statistics.median(results["none"].ns)
    with_probe = statistics.median(results[mode].ns)
    events = int(statistics.median(results[mode].events))
    return (with_probe - base) / events, events


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    ok, why_not = [], {}
    for name in names:
        try:
            open_backend(name).close()
            ok.append(name)
        except BpfUnavailable as exc:
            why_not[name] = str(exc).splitlines()[0]
    return ok, why_not


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, help="default: the best available")
    parser.add_argument("--all", action="store_true", help="every backend that loads here")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU both workers share")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cpu not in os.sched_getaffinity(0):
            raise BenchError(f"CPU {args.cpu} is not available to this process")
        others = os.sched_getaffinity(0) - {args.cpu}
        if others:  # keep the parent (and schedstat's poller) off the measured CPU
            os.sched_setaffinity(0, others)
        if args.backend:
            backends = [args.backend]
        elif args.all and not args.json:
            backends, why_not = available(list(BACKENDS))
            for name, reason in why_not.items():
                print(f"{name}: not measured: {reason}")
        else:
            best = select_runq_source()
            backends = [best.name]
            best.close()
        results = measure(backends, args.rounds, args.round_trips, args.cpu)
    except (BenchError, BpfUnavailable) as exc:
        print(f"probe_overhead: {exc}", file=sys.stderr)
        return 1
    if args.json:
        cost, events = ns_per_event(results, backends[0])
        print(
            json.dumps({"backend": backends[0], "ns_per_event": round(cost, 1), "events": events})
        )
        return 0
    base = results["none"]
    print(
        f"ping-pong on CPU {args.cpu}: {args.round_trips} round trips x {args.rounds} rounds; "
        f"none: median {statistics.median(base.ns) / args.round_trips / 1000:.2f} us/round trip, "
        f"{int(statistics.median(base.events))} events/round"
    )
    for mode in backends:
        cost, events = ns_per_event(results, mode)
        per_rt = statistics.median(results[mode].ns) / args.round_trips / 1000
        probe = results[mode].probe_events
        seen = f", probe counted {int(statistics.median(probe))}" if probe else ""
        print(
            f"{mode:>9}: median {per_rt:.2f} us/round trip, {cost:+.0f} ns/event "
            f"({events} events/round{seen})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
