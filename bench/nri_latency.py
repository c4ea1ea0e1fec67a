#!/usr/bin/env python3
"""NRI round-trip latency: embedded runtime (this process) <-> nri-qos plugin (a child
process), over a real unix socket.

What is measured, as the runtime sees it (request written -> reply decoded, taken from the
runtime's exchange log):
- CreateContainer with 0, 100 and 1,000 live containers (p50 / p99): at each level, 20
  warm-up create/remove pairs, then `--samples` measured pairs that keep the level's count
  live (only the CreateContainer exchanges are timed; a create a plugin fails is counted,
  not timed);
- Synchronize of 1,000 containers: a fresh plugin connecting to a runtime that already runs
  them (median of `--sync-rounds` connects).
The runtime is the embedded one, containerd 2.3 flavor, with in-memory containers; every
(plugin checkout, policy) pair gets its own runtime and plugin process, `--repeat` times,
and every number reported is the median over the repeats.

Options beyond the defaults (no flags = the no-op policy, the `uniform` population, this
machine's own topology, this checkout's plugin):
- `--policy recording|qos|both`: `both` runs the no-op and the real policy in the same
  invocation, interleaved per repeat (recording, qos, recording, qos, ...), and prints them
  side by side with the ratio qos / no-op of each p50, p99 and the Synchronize time.
- `--sysfs NAME`: the plugin plans against a recorded machine (tests/data/sysfs-topologies,
  e.g. `server`: 112 CPUs, 6 NUMA nodes of which 2 are memory-only) instead of this VM:
  the snapshot is extracted into a temp dir given to the plugin as `[host] root`, with an
  empty cgroup2 mount and a procfs holding only its mountinfo (the host adapter needs them
  to start; containerd 2.3 applies oom_score_adj itself, so nothing is written there).
- `--population uniform|mixed` (below).
- `--plugin-repo PATH` (repeatable): the plugin child runs from that checkout
  (PYTHONPATH=PATH, cwd=PATH; checked before measuring), so an older commit's plugin and
  this one are measured in one run against the same runtime side. Interleaved per repeat
  like the policies.

Populations: see bench/population.py (`uniform`, the default, and `mixed`).

Honesty checks: a plugin that exits or does not become ready within 30 s stops the bench
with its stderr; a CreateContainer that fails is counted (`failed_creates`), not timed; and
since a policy that raises still answers (with no change), the ERROR records the plugin
logs are counted (`plugin_errors`, with the first one) and shown next to its numbers.

Targets (issue 2): CreateContainer p99 <= 1 ms, Synchronize of 1,000 <= 100 ms on a 2-core
machine. With one plugin and one policy, `--json` prints {"create_container_ms": {"0":
{"p50": x, "p99": y}, ...}, "synchronize_1000_ms": z} as before; otherwise one object with
every (checkout, policy) pair, its medians, each repeat's numbers and the qos / no-op ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python3 bench/nri_latency.py` puts bench/ first on the path; tests.snapshots needs the root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from population import LEVELS, WARMUP, Population, Spec, demo_container, demo_pod

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend
from embedded_runtime.records import Outcome, PluginState
from qos_model.cpulist import parse_cpu_list
from tests.snapshots import SNAPSHOTS, plugin_host_root

REPO = Path(__file__).resolve().parent.parent
REGISTRATION_TIMEOUT = 30.0  # seconds for a plugin child to register, configure and sync
MEASURED_ID_BASE = 100_000  # ids of the measured (and warm-up) pairs, above the live ones


POLICIES = ("recording", "qos")


class BenchError(RuntimeError):
    """The bench cannot measure what it was asked to (plugin did not start, bad checkout)."""


async def _add(runtime: EmbeddedRuntime, i: int, spec: Spec) -> None:
    await runtime.run_pod_sandbox(demo_pod(i, spec))
    await runtime.create_container(f"pod-{i:05d}", demo_container(i, spec))


async def _drop(runtime: EmbeddedRuntime, i: int) -> None:
    await runtime.remove_container(f"ctr-{i:05d}")
    await runtime.remove_pod_sandbox(f"pod-{i:05d}")


# --- the plugin child ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkout:
    """A checkout of this repository whose plugin is measured."""

    path: Path
    commit: str
    dirty: bool

    @property
    def label(self) -> str:
        return f"{self.path} @ {self.commit}{'+changes' if self.dirty else ''}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.path)}

    @staticmethod
    def at(path: Path) -> Checkout:
        """Check that the plugin child would import its code from `path`, not elsewhere."""
        path = path.resolve()
        if not (path / "nri_plugin" / "__main__.py").is_file():
            raise BenchError(f"--plugin-repo {path}: no nri_plugin/__main__.py there")
        probe = subprocess.run(
            [sys.executable, "-c", "import nri_plugin; print(nri_plugin.__file__)"],
            env={**os.environ, "PYTHONPATH": str(path)},
            cwd=path,
            capture_output=True,
            text=True,
            check=False,
        )
        where = Path(probe.stdout.strip() or "?").resolve()
        if probe.returncode != 0 or not where.is_relative_to(path):
            raise BenchError(
                f"--plugin-repo {path}: the child would import nri_plugin from {where} "
                f"(exit {probe.returncode}): {probe.stderr.strip()[-500:]}"
            )
        git = ["git", "-C", str(path)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = head.stdout.strip() if head.returncode == 0 else "?"
        return Checkout(path, commit, bool(status.stdout.strip()))


class PluginChild:
    """`python3 -m nri_plugin run` from a checkout; its stderr goes to a file."""

    def __init__(self, checkout: Checkout, socket_path: Path, config: Path, log: Path) -> None:
        self.checkout = checkout
        self.log = log
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nri_plugin",
                    "run",
                    "--socket",
                    str(socket_path),
                    "--config",
                    str(config),
                    "--log-level",
                    "warning",
                ],
                env=checkout.env(),
                cwd=checkout.path,
                stderr=stderr,
            )

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self, runtime: EmbeddedRuntime) -> None:
        """Wait until the runtime lists it as ready; fail loudly if it exits or never does."""
        waiter = asyncio.create_task(runtime.wait_for_plugins(1, timeout=REGISTRATION_TIMEOUT))
        try:
            while not waiter.done():
                code = self.process.poll()
                if code is not None:
                    raise BenchError(
                        f"plugin ({self.checkout.label}) exited with {code} before registering; "
                        f"its stderr:\n{self.stderr_tail()}"
                    )
                await asyncio.wait({waiter}, timeout=0.05)
            waiter.result()
        except TimeoutError as exc:
            raise BenchError(
                f"plugin ({self.checkout.label}) never became ready: {exc}; its stderr:\n"
                f"{self.stderr_tail()}"
            ) from None
        finally:
            waiter.cancel()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _until_no_ready_plugin(runtime: EmbeddedRuntime) -> None:
    """The runtime notices a plugin's exit on its next read; wait for that."""
    for _ in range(1000):
        if not any(p.state is PluginState.READY for p in runtime.plugins):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the runtime still lists the stopped plugin as ready")


# --- one run ---------------------------------------------------------------------------------


def _creates(runtime: EmbeddedRuntime, since: int) -> tuple[list[float], int]:
    """Latencies (ms) of the CreateContainer exchanges that succeeded; how many did not."""
    records = [r for r in runtime.log[since:] if r.method == "CreateContainer"]
    ok = [r.latency * 1000 for r in records if r.outcome is Outcome.OK]
    return ok, len(records) - len(ok)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _dedicated_exclusive(runtime: EmbeddedRuntime, live: Sequence[Spec]) -> tuple[int, int]:
    """(dedicated containers whose cpuset no other container shares, dedicated containers)."""
    containers = runtime.containers
    cpus: dict[str, frozenset[int]] = {}
    for cid, ctr in containers.items():
        text = ctr.resources.cpu.cpus if ctr.resources and ctr.resources.cpu else ""
        cpus[cid] = parse_cpu_list(text) if text else frozenset()
    holders = Counter(cpu for s in cpus.values() for cpu in s)
    dedicated = [f"ctr-{i:05d}" for i, s in enumerate(live) if s.qos_level == "dedicated_cores"]
    exclusive = sum(
        1 for cid in dedicated if cpus.get(cid) and all(holders[c] == 1 for c in cpus[cid])
    )
    return exclusive, len(dedicated)


def _logged_errors(log: Path) -> list[str]:
    """The ERROR / CRITICAL records the plugin logged: a policy that raises still answers
    (with no change), so its latencies alone would look fine."""
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if " ERROR " in line or " CRITICAL " in line]


def _config_text(policy: str, host_root: Path | None) -> str:
    text = f'[policy]\nname = "{policy}"\n'
    if policy == "qos":
        text += "rebalance_interval_ms = 0\n"
    if host_root is not None:
        text += f"[host]\nroot = {json.dumps(str(host_root))}\n"
    return text


async def measure(
    sync_rounds: int,
    policy: str,
    population: Population,
    checkout: Checkout,
    host_root: Path | None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nri-bench-") as tmp:
        sock = Path(tmp) / "nri.sock"
        config = Path(tmp) / "config.toml"
        config.write_text(_config_text(policy, host_root))
        log = Path(tmp) / "plugin.stderr"
        runtime = EmbeddedRuntime(sock, flavor=CONTAINERD_2_3, backend=InMemoryBackend())
        await runtime.start()
        plugin = PluginChild(checkout, sock, config, log)
        try:
            await plugin.ready(runtime)
            results: dict[str, dict[str, float]] = {}
            failed = 0
            live = 0
            next_id = MEASURED_ID_BASE
            dedicated: tuple[int, int] = (0, 0)
            for level in LEVELS:
                while live < level:
                    await _add(runtime, live, population.live[live])
                    live += 1
                # warm-up, then measured create/remove pairs that keep `level` live
                pairs = population.pairs[level]
                mark = 0
                for n, spec in enumerate(pairs):
                    if n == WARMUP:
                        mark = len(runtime.log)
                    await _add(runtime, next_id, spec)
                    await _drop(runtime, next_id)
                    next_id += 1
                lat, bad = _creates(runtime, mark)
                failed += bad
                if not lat:
                    raise BenchError(
                        f"no CreateContainer succeeded at {level} live ({bad} failed); plugin "
                        f"stderr:\n{plugin.stderr_tail()}"
                    )
                results[str(level)] = {
                    "p50": round(statistics.median(lat), 3),
                    "p99": round(_percentile(lat, 0.99), 3),
                }
            if policy == "qos":
                await asyncio.sleep(0.2)  # let the plugin's UpdateContainers land
                dedicated = _dedicated_exclusive(runtime, population.live[:live])
            # Synchronize: 1,000 live containers, a fresh plugin connecting each round
            sync: list[float] = []
            for _ in range(sync_rounds):
                plugin.stop()
                await _until_no_ready_plugin(runtime)
                mark = len(runtime.log)
                plugin = PluginChild(checkout, sock, config, log)
                await plugin.ready(runtime)
                sync += [
                    r.latency * 1000
                    for r in runtime.log[mark:]
                    if r.method == "Synchronize" and r.outcome is Outcome.OK
                ]
            if sync_rounds and not sync:
                raise BenchError("no Synchronize succeeded")
            out: dict[str, Any] = {
                "create_container_ms": results,
                "synchronize_1000_ms": round(statistics.median(sync), 3) if sync else None,
                "failed_creates": failed,
            }
            if policy == "qos" and dedicated[1]:
                out["dedicated_exclusive_1000"] = list(dedicated)
            errors = _logged_errors(log)
            if errors:
                out["plugin_errors"] = len(errors)
                out["plugin_first_error"] = errors[0]
            return out
        finally:
            plugin.stop()
            await runtime.stop()


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Same shape as one run; every number is the median over the runs (counts: summed)."""
    levels = runs[0]["create_container_ms"]
    syncs = [r["synchronize_1000_ms"] for r in runs if r["synchronize_1000_ms"] is not None]
    out: dict[str, Any] = {
        "create_container_ms": {
            level: {
                q: round(statistics.median(r["create_container_ms"][level][q] for r in runs), 3)
                for q in ("p50", "p99")
            }
            for level in levels
        },
        "synchronize_1000_ms": round(statistics.median(syncs), 3) if syncs else None,
    }
    failed = sum(r["failed_creates"] for r in runs)
    if failed:
        out["failed_creates"] = failed
    errors = sum(r.get("plugin_errors", 0) for r in runs)
    if errors:
        out["plugin_errors"] = errors
        out["plugin_first_error"] = next(
            r["plugin_first_error"] for r in runs if "plugin_first_error" in r
        )
    dedicated = [r["dedicated_exclusive_1000"] for r in runs if "dedicated_exclusive_1000" in r]
    if dedicated:
        # the population is the same every run; the worst run is the honest one
        out["dedicated_exclusive_1000"] = min(dedicated)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def _ratios(qos: dict[str, Any], noop: dict[str, Any]) -> dict[str, Any]:
    return {
        "create_container": {
            level: {
                q: _ratio(stats[q], noop["create_container_ms"][level][q]) for q in ("p50", "p99")
            }
            for level, stats in qos["create_container_ms"].items()
        },
        "synchronize_1000": _ratio(qos["synchronize_1000_ms"], noop["synchronize_1000_ms"]),
    }


# --- reporting -------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _print_single(result: dict[str, Any]) -> None:
    for level, stats in result["create_container_ms"].items():
        print(
            f"CreateContainer, {level:>4} live containers: "
            f"p50 {stats['p50']:.3f} ms  p99 {stats['p99']:.3f} ms"
        )
    print(f"Synchronize of 1,000 containers: {_fmt(result['synchronize_1000_ms'], ' ms')} (median)")
    _print_notes(result, "")


def _print_notes(result: dict[str, Any], prefix: str) -> None:
    if "dedicated_exclusive_1000" in result:
        have, total = result["dedicated_exclusive_1000"]
        print(f"{prefix}dedicated containers with exclusive CPUs at 1,000 live: {have}/{total}")
    if result.get("failed_creates"):
        print(f"{prefix}WARNING: {result['failed_creates']} CreateContainer calls failed")
    if result.get("plugin_errors"):
        print(
            f"{prefix}WARNING: the plugin logged {result['plugin_errors']} errors; these numbers "
            f"do not measure a working policy. First: {result['plugin_first_error']}"
        )


def _print_table(report: dict[str, Any]) -> None:
    print(
        f"topology: {report['topology']}; population: {report['population']}; "
        f"{report['samples']} measured creates per level; medians of {report['repeat']} runs"
    )
    for plugin in report["plugins"]:
        policies: dict[str, Any] = plugin["policies"]
        names = list(policies)
        ratios = plugin.get("ratio_qos_over_noop")
        print(f"\nplugin: {plugin['label']}")
        head = f"{'':<22}" + "".join(f"{name + ' p50 / p99 ms':>24}" for name in names)
        if ratios:
            head += f"{'qos/no-op p50 / p99':>24}"
        print(head)
        for level in LEVELS:
            row = f"CreateContainer {level:>4}  "
            for name in names:
                stats = policies[name]["median"]["create_container_ms"][str(level)]
                row += f"{_fmt(stats['p50']) + ' / ' + _fmt(stats['p99']):>24}"
            if ratios:
                r = ratios["create_container"][str(level)]
                row += f"{_fmt_ratio(r['p50']) + ' / ' + _fmt_ratio(r['p99']):>24}"
            print(row)
        row = f"{'Synchronize 1,000':<22}"
        for name in names:
            row += f"{_fmt(policies[name]['median']['synchronize_1000_ms']):>24}"
        if ratios:
            row += f"{_fmt_ratio(ratios['synchronize_1000']):>24}"
        print(row)
        for name in names:
            _print_notes(policies[name]["median"], f"{name}: ")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=500, help="creates measured per level")
    parser.add_argument("--sync-rounds", type=int, default=5)
    parser.add_argument(
        "--policy",
        choices=[*POLICIES, "both"],
        default="recording",
        help="both: the no-op and the qos policy, interleaved per repeat, with ratios",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run N times and report each value's median (a single p99 is noisy on a VM)",
    )
    parser.add_argument(
        "--sysfs",
        choices=sorted(SNAPSHOTS),
        help="plan against this recorded topology (tests/data/sysfs-topologies) "
        "instead of this machine's",
    )
    parser.add_argument(
        "--population",
        choices=["uniform", "mixed"],
        default="uniform",
        help="uniform: identical shared pods (default); mixed: Katalyst classes (see above)",
    )
    parser.add_argument(
        "--plugin-repo",
        type=Path,
        action="append",
        metavar="PATH",
        help="run the plugin from this checkout (repeatable; default: this one)",
    )
    args = parser.parse_args()
    if args.samples < 1 or args.sync_rounds < 0:
        parser.error("--samples must be >= 1 and --sync-rounds >= 0")
    try:
        report = run(args)
    except BenchError as exc:
        sys.exit(f"nri_latency: {exc}")
    if args.json:
        _warn_about_errors(report)
    if "single" in report:
        if args.json:
            print(json.dumps(report["single"]))
        else:
            _print_single(report["single"])
    elif args.json:
        print(json.dumps(report))
    else:
        _print_table(report)


def _warn_about_errors(report: dict[str, Any]) -> None:
    """On stderr, whatever the output format: a plugin that logged errors."""
    if "single" in report:
        medians = [("", report["single"])]
    else:
        medians = [
            (f"{plugin['label']}, {name}: ", entry["median"])
            for plugin in report["plugins"]
            for name, entry in plugin["policies"].items()
        ]
    for prefix, median in medians:
        if median.get("plugin_errors"):
            print(
                f"nri_latency: WARNING: {prefix}the plugin logged {median['plugin_errors']} "
                f"errors, first: {median['plugin_first_error']}",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkouts = [Checkout.at(p) for p in (args.plugin_repo or [REPO])]
    policies = list(POLICIES) if args.policy == "both" else [args.policy]
    population = Population.build(args.population, args.samples)
    repeat = max(1, args.repeat)
    with tempfile.TemporaryDirectory(prefix="nri-bench-sysfs-") as tmp:
        host_root = plugin_host_root(args.sysfs, Path(tmp)) if args.sysfs else None
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {
            (n, p): [] for n in range(len(checkouts)) for p in policies
        }
        for _ in range(repeat):
            for n, checkout in enumerate(checkouts):
                for policy in policies:
                    runs[n, policy].append(
                        asyncio.run(
                            measure(
                                args.sync_rounds,
                                policy,
                                population,
                                checkout,
                                host_root,
                            )
                        )
                    )
    if len(runs) == 1:
        return {"single": _median_of(next(iter(runs.values())))}
    plugins = []
    for n, checkout in enumerate(checkouts):
        entry: dict[str, Any] = {
            "repo": str(checkout.path),
            "commit": checkout.commit,
            "uncommitted_changes": checkout.dirty,
            "label": checkout.label,
            "policies": {
                p: {"median": _median_of(runs[n, p]), "runs": runs[n, p]} for p in policies
            },
        }
        if len(policies) == 2:
            entry["ratio_qos_over_noop"] = _ratios(
                entry["policies"]["qos"]["median"], entry["policies"]["recording"]["median"]
            )
        plugins.append(entry)
    return {
        "topology": args.sysfs or "this machine",
        "population": population.name,
        "samples": args.samples,
        "sync_rounds": args.sync_rounds,
        "repeat": repeat,
        "runtime": "embedded, containerd 2.3 flavor, in-memory containers",
        "plugins": plugins,
    }


if __name__ == "__main__":
    main()
