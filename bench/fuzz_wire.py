#!/usr/bin/env python3
"""Long fuzz run of the NRI decoders and the dispatch path, from mutated real captures.

The same engine as tests/fuzz/test_fuzz_captures.py (tests/fuzz/mutate.py makes the
inputs, tests/fuzz/oracle.py judges them; docs/fuzzing.md), for as long as asked:

    python3 bench/fuzz_wire.py --seconds 600 --out /tmp/fuzz-out
    python3 bench/fuzz_wire.py --seed 7 --inputs 20000 --json
    python3 bench/fuzz_wire.py --seconds 60 --live          # and a real plugin process

It prints the inputs run per kind, every distinct finding (oracle, exception type, last
traceback frame; with `--out`, one minimized reproducer each, replayable with
`--replay FILE.json`), every distinct exception dispatch.handle raised (answered fail-open
by the plugin; with `--out`, one reproducer each under policy-errors/), the slowest inputs,
the workers' max RSS (ru_maxrss) and inputs/s. Exit status 1 when there were findings.

`--live` then starts `python3 -m nri_plugin run --socket PATH` (a QosPolicy on a recorded
16-CPU topology, with a made-up host root so that no host file is touched, and its address
space capped by --live-memory-mib), listens on
PATH as the runtime would, and gives each mutated stream a fresh connection (the plugin
reconnects after each). After every `--live-batch` inputs the recorded session of a real
runtime is replayed on a clean connection: the process must be alive, register, and
answer a well-formed CreateContainer within its 2 s deadline; its VmRSS / VmHWM are read
from /proc/<pid>/status. Tracebacks in its log, other than a policy that raised, are
findings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz import oracle  # noqa: E402
from tests.fuzz.endtoend import PluginRun, exchange, run_plugin_input  # noqa: E402
from tests.fuzz.mutate import KINDS, FuzzInput, captures  # noqa: E402
from tests.fuzz.oracle import Report, Result, Seen  # noqa: E402
from tests.snapshots import plugin_host_root  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.replay:
        return _replay(args.replay)
    if args.inputs is None and args.seconds is None:
        args.seconds = 60.0
    kinds = _kinds(args.kinds)
    out = Path(args.out) if args.out else None
    results: dict[str, Result] = {}  # first result per finding / policy error key

    def remember(result: Result) -> None:
        for key in [f.key for f in result.findings] + [p.key for p in result.policy_errors]:
            results.setdefault(key, result)
        if args.progress and report_inputs[0] % 1000 == 0:
            print(f"... {report_inputs[0]} inputs", file=sys.stderr, flush=True)
        report_inputs[0] += 1

    report_inputs = [0]
    report = oracle.run_campaign(
        args.seed,
        args.inputs,
        args.seconds,
        start=args.start,
        workers=args.workers,
        slow=args.slow,
        memory_bytes=args.memory_mib << 20,
        kinds=kinds,
        plugin_every=args.plugin_every,
        on_result=remember,
    )
    saved: dict[str, str] = {}
    if out is not None:
        saved = _save_reproducers(report, results, out, kinds, args.minimize_seconds)
    live = None
    if args.live:
        live = asyncio.run(
            _live(
                args.seed,
                args.live_inputs,
                args.live_batch,
                kinds,
                args.live_start,
                args.live_memory_mib << 20,
                Path(args.live_log) if args.live_log else None,
            )
        )
    if args.json:
        body = report.to_json()
        body["reproducers"] = saved
        body["command"] = " ".join(sys.argv)
        if live is not None:
            body["live"] = asdict(live)
        print(json.dumps(body, indent=1, default=str))
    else:
        _print(report, saved, live, " ".join(sys.argv))
    failed = bool(report.findings) or (live is not None and bool(live.findings))
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--inputs", type=int, help="run this many inputs")
    budget.add_argument("--seconds", type=float, help="run for this long (default 60)")
    p.add_argument("--start", type=int, default=0, help="first input index (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--kinds", default="", help="comma-separated kinds or families only")
    p.add_argument("--slow", type=float, default=oracle.SLOW_SECONDS, help="slow bound, s")
    p.add_argument(
        "--memory-mib", type=int, default=1024, help="memory a worker may add (MiB, default 1024)"
    )
    p.add_argument(
        "--plugin-every",
        type=int,
        default=20,
        help="also run every Nth input through the real plugin in-process (0: never)",
    )
    p.add_argument("--out", help="save one minimized reproducer per finding here")
    p.add_argument("--minimize-seconds", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action="store_true", help="a line every 1000 inputs (stderr)")
    p.add_argument("--replay", help="run one saved reproducer (.json) and print its result")
    p.add_argument("--live", action="store_true", help="then drive a real plugin process")
    p.add_argument("--live-inputs", type=int, default=300, help="inputs sent to it")
    p.add_argument("--live-batch", type=int, default=50, help="health check every N inputs")
    p.add_argument("--live-start", type=int, default=1_000_000, help="its first input index")
    p.add_argument(
        "--live-memory-mib",
        type=int,
        default=2048,
        help="address-space cap of the plugin process (MiB, default 2048; 0: none)",
    )
    p.add_argument("--live-log", help="keep the plugin process's log here")
    return p


def _kinds(spec: str) -> list[str]:
    if not spec:
        return []
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    kinds = [k for k in KINDS if any(k == w or k.startswith(w + ".") for w in wanted)]
    if not kinds:
        raise SystemExit(f"--kinds {spec!r} matches none of: {', '.join(KINDS)}")
    return kinds


# --- reproducers -------------------------------------------------------------------------


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:80]


def _save_reproducers(
    report: Report,
    results: dict[str, Result],
    out: Path,
    kinds: Sequence[str],
    budget: float,
) -> dict[str, str]:
    saved: dict[str, str] = {}
    tables: list[tuple[str, dict[str, Seen]]] = [
        ("", report.findings),
        ("policy-errors", report.policy_errors),
    ]
    for sub, table in tables:
        for key in table:
            first = results.get(key)
            if first is None or first.kind == "?":
                continue
            inp = oracle.pick_input(report.seed, first.index, kinds)
            small = oracle.minimize_isolated(inp, key, budget)
            path = oracle.save_reproducer(out / sub if sub else out, _slug(key), small, key)
            saved[key] = str(path)
    return saved


def _replay(path: str) -> int:
    inp, key = oracle.load_reproducer(Path(path))
    oracle.memory_limit(1 << 30)
    result = oracle.run_input(inp)
    print(f"{path}: {inp.kind} from {inp.capture}, {inp.size} bytes in {len(inp.chunks)} chunks")
    print(f"  {inp.detail}")
    print(f"  recorded for: {key}")
    for f in result.findings:
        print(f"  finding: {f.key}: {f.message}")
    for p in result.policy_errors:
        print(f"  dispatch.handle raised ({p.method}): {p.key}: {p.message}")
    print(f"  {result.requests} requests, {result.fail_open} fail-open, {result.seconds:.3f} s")
    run = run_plugin_input(inp)
    print(f"  the real plugin: {run.answered} stream ids answered, probe {run.probe}")
    for f in run.findings:
        print(f"  plugin finding: {f.key}: {f.message}")
    return 1 if result.findings or run.findings else 0


# --- the live plugin process ---------------------------------------------------------------


@dataclass
class LiveReport:
    inputs: int = 0
    connections: int = 0
    seconds: float = 0.0
    health_checks: int = 0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_tracebacks: dict[str, int] = field(default_factory=dict)
    vm_rss_kib: list[int] = field(default_factory=list)  # after each health check
    vm_hwm_kib: int = 0
    exit_code: int | None = None


def _cap_memory(limit: int) -> None:
    """In the plugin child: cap its address space, so that an input that allocates
    without bound gets MemoryError there (and is seen) instead of taking this machine."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _tracebacks(log: Path) -> dict[str, int]:
    """Exceptions in the plugin's log, other than a policy that raised (expected)."""
    found: dict[str, int] = {}
    record: list[str] = []

    def close() -> None:
        traceback = record and any(line.startswith("Traceback") for line in record)
        if traceback and "policy raised" not in record[0]:
            last = record[-1].strip()[:200]
            if "never retrieved" in record[0]:  # asyncio, when the future is collected
                last = f"{oracle.UNRETRIEVED_EXCEPTION}: {last}"
            found[last] = found.get(last, 0) + 1

    for line in log.read_text(errors="replace").splitlines():
        if line[:4].isdigit():  # "2026-..." starts a record
            close()
            record = [line]
        else:
            record.append(line)
    close()
    return found


async def _live(
    seed: int,
    inputs: int,
    batch: int,
    kinds: Sequence[str],
    first: int,
    memory_bytes: int,
    keep_log: Path | None,
) -> LiveReport:
    live = LiveReport()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nri-fuzz-live-") as tmp:
        tmp_path = Path(tmp)
        root = plugin_host_root("sample1", tmp_path / "host")
        sock = tmp_path / "nri.sock"
        config = tmp_path / "config.toml"
        config.write_text(
            "[plugin]\nregistration_timeout_ms = 2000\nbackoff_initial_ms = 10\n"
            'backoff_max_ms = 50\n[log]\nlevel = "warning"\n'
            f"[policy]\nrebalance_interval_ms = 0\n[host]\nroot = {json.dumps(str(root))}\n"
        )
        log = tmp_path / "plugin.log"
        connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await connections.put((reader, writer))

        server = await asyncio.start_unix_server(accepted, path=str(sock))
        argv = [sys.executable, "-m", "nri_plugin", "run", "--socket", str(sock)]
        argv += ["--config", str(config)]
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                preexec_fn=(lambda: _cap_memory(memory_bytes)) if memory_bytes else None,
            )
        try:
            index = first
            while live.inputs < inputs:
                for _ in range(min(batch, inputs - live.inputs)):
                    inp = oracle.pick_input(seed, index, kinds)
                    run = await _one_connection(connections, inp, live)
                    _note(live, inp, run)
                    live.inputs += 1
                    index += 1
                await _health_check(connections, process, live)
                if process.poll() is not None:
                    break
        finally:
            live.exit_code = process.poll()
            if live.exit_code is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            server.close()
            await server.wait_closed()
            live.log_tracebacks = _tracebacks(log)
            if keep_log is not None:
                shutil.copyfile(log, keep_log)
            for text, count in live.log_tracebacks.items():
                live.findings.setdefault(
                    f"plugin log: {text}", {"count": count, "first": "see the plugin log"}
                )
    live.seconds = round(time.monotonic() - began, 1)
    return live


async def _one_connection(
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    inp: FuzzInput,
    live: LiveReport,
) -> PluginRun:
    try:
        reader, writer = await asyncio.wait_for(connections.get(), 15)
    except TimeoutError:
        run = PluginRun()
        run.findings.append(
            oracle.Finding("live", "no connection", "", "the plugin did not connect")
        )
        return run
    live.connections += 1
    try:
        return await exchange(reader, writer, inp, wait=5.0)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _health_check(
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    process: subprocess.Popen[bytes],
    live: LiveReport,
) -> None:
    live.health_checks += 1
    if process.poll() is not None:
        what = f"the plugin process exited with {process.returncode}"
        live.findings.setdefault("live: process died", {"count": 1, "first": what})
        return
    clean = _clean_input(live.health_checks)
    run = await _one_connection(connections, clean, live)
    if run.probe != "answered" or run.findings:
        key = "live: health check failed"
        entry = live.findings.setdefault(key, {"count": 0, "first": ""})
        entry["count"] += 1
        entry["first"] = entry["first"] or f"probe {run.probe}; {run.findings[:2]}"
    status = _status(process.pid)
    live.vm_rss_kib.append(status.get("VmRSS", 0))
    live.vm_hwm_kib = max(live.vm_hwm_kib, status.get("VmHWM", 0))


def _clean_input(n: int) -> FuzzInput:
    """A recorded session as it was (another runtime each time)."""
    cap = captures()[n % len(captures())]
    return FuzzInput(0, -n, "clean", cap.id, "health check", (cap.stream,))


def _note(live: LiveReport, inp: FuzzInput, run: PluginRun) -> None:
    for f in run.findings:
        entry = live.findings.setdefault(f"live: {f.key}", {"count": 0, "first": ""})
        entry["count"] += 1
        if not entry["first"]:
            entry["first"] = f"input {inp.index} ({inp.kind}): {inp.detail[:160]}; {f.message}"


# --- output ------------------------------------------------------------------------------


def _print(report: Report, saved: dict[str, str], live: LiveReport | None, command: str) -> None:
    print(f"command: {command}")
    print(
        f"seed {report.seed}: {report.inputs} inputs in {report.seconds:.1f} s "
        f"({report.inputs_per_second:.0f}/s, {report.workers} worker process(es)); "
        f"max RSS {report.max_rss_kib / 1024:.0f} MiB"
    )
    print(
        f"  {report.requests} requests served, {report.fail_open} answered fail-open, "
        f"{report.connection_errors} streams ended in a protocol error, "
        f"{report.plugin_checked} inputs also through the real plugin"
    )
    print("\ninputs by kind:")
    for kind in sorted(report.by_kind):
        n = report.by_kind[kind]
        ms = 1000 * report.kind_seconds.get(kind, 0.0) / n
        print(f"  {kind:30} {n:7}  {ms:7.1f} ms/input")
    print(f"\nfindings ({len(report.findings)} distinct):")
    for seen in report.findings.values():
        _print_seen(seen, saved)
    if not report.findings:
        print("  none")
    print(f"\ndispatch.handle raised ({len(report.policy_errors)} distinct; answered fail-open):")
    for seen in report.policy_errors.values():
        _print_seen(seen, saved)
    print("\nslowest inputs:")
    for seconds, index, kind, detail in report.slowest:
        print(f"  {seconds:6.3f} s  #{index} {kind}: {detail[:110]}")
    if live is not None:
        print(
            f"\nlive plugin process: {live.inputs} inputs on {live.connections} connections in "
            f"{live.seconds} s, {live.health_checks} health checks, exit code {live.exit_code}"
        )
        rss = live.vm_rss_kib
        if rss:
            print(
                f"  VmRSS {rss[0] // 1024} -> {rss[-1] // 1024} MiB (max {max(rss) // 1024}), "
                f"VmHWM {live.vm_hwm_kib // 1024} MiB"
            )
        for key, entry in live.findings.items():
            print(f"  {key} x{entry['count']}: {entry['first']}")
        if not live.findings:
            print("  no findings")


def _print_seen(seen: Seen, saved: dict[str, str]) -> None:
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(seen.kinds.items(), key=lambda kv: -kv[1]))
    print(f"  {seen.key}  x{seen.count}")
    if seen.methods:
        print(f"    methods: {', '.join(f'{m} x{n}' for m, n in seen.methods.items())}")
    print(f"    kinds: {kinds}")
    print(f"    {seen.message[:200]}")
    print(f"    first: #{seen.first_index}: {seen.first_detail[:160]}")
    if seen.key in saved:
        print(f"    reproducer: {saved[seen.key]}")


if __name__ == "__main__":
    sys.exit(main())
