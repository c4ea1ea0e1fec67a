#!/usr/bin/env python3
"""CPU cost of one runtime request inside the plugin, in this process, per stage.

No socket, no second process: the requests are the real recorded containerd 2.3.4 ones
(`--flavor`; tests/data/nri-captures, cut and re-identified per lifecycle with
bench/real_payloads.py's `load_templates` / `Templates.request`), and each goes through
the very functions the plugin's policy thread calls: `services.decode`, then
`dispatch.handle(policy, method, request, sync_collector)`. The policy is the one
`nri-qos run --policy qos` builds (`daemon.build_services` on `[policy] name = "qos"`,
`rebalance_interval_ms = 0`), with a `[host] root` holding a copy of this machine's CPU
topology (bench/nri_real_payloads.py's `this_machine_root`: an empty cgroup tree, no real
process or cgroup reachable); its controllers are stopped once it is built, since
nothing here carries intents out.

Sequence per `--live` level: Configure (the recorded request), an empty Synchronize,
the live containers (RunPodSandbox .. PostStartContainer, each event only if the
Configure reply subscribed to it, as the runtime does), `--warmup` lifecycles, then
`--pairs` measured lifecycles (Create .. RemovePodSandbox, subscribed events only).

Stages, per request (ns, perf_counter_ns wrappers installed by monkeypatching, only the
outermost call of a stage counts):
- decode: services.decode (protobuf parse);
- convert_in: protobuf -> qos_model (pod_for_policy, container_for_policy, ...);
- policy: the QosPolicy hook (the engine);
- convert_out: qos_model -> protobuf reply (adjustment_to_pb, updates_to_pb);
- rest: the rest of dispatch.handle;
- total: decode + dispatch.handle.

`--cold on` walks a few MB of bytes and Python objects between requests (`--thrash-mb`),
so each request starts with cold CPU caches, as in the real plugin where the event loop,
the channel and the ttrpc layer run between two policy calls. `both` (default) measures
warm and cold back to back at each level.

`--check FILE` writes every measured request's reply (serialized) and intents (a
canonical text form) to FILE, to compare two trees' behaviour byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from nri_real_payloads import _config_text, this_machine_root  # noqa: E402
from real_payloads import (  # noqa: E402
    FLAVORS,
    LIFECYCLE,
    LIVE_PART,
    Templates,
    load_templates,
    timed,
)

from nri_plugin import dispatch  # noqa: E402
from nri_plugin.config import parse_config  # noqa: E402
from nri_plugin.daemon import build_services  # noqa: E402
from nri_plugin.policy.qos_policy import QosPolicy  # noqa: E402
from nri_plugin.protocol import convert, services  # noqa: E402
from nri_plugin.protocol import nri_pb2 as pb  # noqa: E402

STAGES = ("decode", "convert_in", "policy", "convert_out", "rest", "total")
CONVERT_IN = ("pod_for_policy", "container_for_policy", "resources_for_policy", "resources_from_pb")
CONVERT_OUT = ("adjustment_to_pb", "updates_to_pb")
HOOKS = (*dispatch.HOOK_EVENTS, "synchronize", "configure")


class Taps:
    """Per-request stage sums, filled by wrappers around the stage functions."""

    def __init__(self) -> None:
        self.current: dict[str, Any] = {}

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """real_payloads' stage wrapper: only the outermost call of a stage counts."""
        return timed(self, stage, fn)

    def install(self) -> None:
        for stage, names in (("convert_in", CONVERT_IN), ("convert_out", CONVERT_OUT)):
            for name in names:
                if hasattr(convert, name):  # an older tree may lack resources_for_policy
                    setattr(convert, name, self.timed(stage, getattr(convert, name)))
        for hook in HOOKS:
            if hook in vars(QosPolicy):
                setattr(QosPolicy, hook, self.timed("policy", getattr(QosPolicy, hook)))


class Thrash:
    """Evicts the CPU caches: writes one byte per cache line of a buffer larger than the
    last-level cache and walks a list of small Python objects."""

    def __init__(self, mb: int) -> None:
        self.buf = bytearray(mb << 20)
        self.zeros = bytes(len(self.buf) // 64)
        self.objects = [{"k": i, "v": (i, str(i))} for i in range(mb * 4096)]
        self.turn = 0

    def __call__(self) -> None:
        self.turn += 1
        self.buf[::64] = self.zeros if self.turn % 2 else b"\x01" * len(self.zeros)
        n = 0
        for o in self.objects:
            n += o["k"]


def build_policy(host_root: Path) -> QosPolicy:
    """The policy `nri-qos run` builds with `[policy] name = "qos"`; controllers stopped."""
    config = parse_config(_config_text("qos", host_root), "bench config")
    built = build_services(config)
    built.executor.close()
    policy = built.policy
    assert isinstance(policy, QosPolicy), policy
    return policy


def canon(value: Any) -> Any:
    """A deterministic, comparable form of intents (sets sorted, dataclasses by field)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [type(value).__name__] + [
            [f.name, canon(getattr(value, f.name))] for f in dataclasses.fields(value)
        ]
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, frozenset | set):
        return sorted(canon(v) for v in value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return [[canon(k), canon(v)] for k, v in value.items()]
    if isinstance(value, tuple | list):
        return [canon(v) for v in value]
    return value


@dataclasses.dataclass
class Runner:
    templates: Templates
    policy: QosPolicy
    taps: Taps
    mask: int = 0
    sync: dispatch.SyncCollector = dataclasses.field(default_factory=dispatch.SyncCollector)
    check: list[Any] | None = None

    def call(self, name: str, payload: bytes) -> tuple[dict[str, int], dispatch.Outcome]:
        method = services.PLUGIN_METHODS[name]
        perf = time.perf_counter_ns
        self.taps.current = cur = {}
        t0 = perf()
        request = services.decode(method.request, payload, method.name)
        t1 = perf()
        outcome = dispatch.handle(self.policy, method, request, self.sync)
        t2 = perf()
        cur["decode"] = t1 - t0
        inner = sum(cur.get(k, 0) for k in ("convert_in", "policy", "convert_out"))
        cur["rest"] = t2 - t1 - inner
        cur["total"] = t2 - t0
        if self.check is not None:
            self.check.append(
                [name, outcome.reply.SerializeToString().hex(), canon(outcome.intents)]
            )
        return cur, outcome

    def start(self) -> None:
        _, outcome = self.call("Configure", self.templates.configure)
        self.mask = outcome.events
        self.call("Synchronize", pb.SynchronizeRequest().SerializeToString())

    def subscribed(self, event: int) -> bool:
        return bool(self.mask & (1 << (event - 1)))

    def lifecycle(self, n: int, events: tuple[int, ...]) -> Iterator[tuple[str, bytes]]:
        t = self.templates
        for e in events:
            if self.subscribed(e):
                yield t.by_event[e].method, t.request(e, n)


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stats(values: list[int]) -> dict[str, float]:
    ms = 1e-6
    return {
        "n": len(values),
        "p50": round(statistics.median(values) * ms, 4),
        "p99": round(_pct(values, 0.99) * ms, 4),
    }


def measure(args: argparse.Namespace, host_root: Path, check: list[Any] | None) -> dict[str, Any]:
    templates = load_templates(args.flavor)
    taps = Taps()
    taps.install()
    thrash = Thrash(args.thrash_mb)
    results: dict[str, Any] = {}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.cold]
    for level in args.live:
        for cold in modes:
            # a fresh policy per block: the same history before every measurement
            runner = Runner(templates, build_policy(host_root), taps)
            runner.start()
            for n in range(level):
                for name, payload in runner.lifecycle(n, LIVE_PART):
                    runner.call(name, payload)
            next_id = 1_000_000
            for _ in range(args.warmup):
                for name, payload in runner.lifecycle(next_id, LIFECYCLE):
                    runner.call(name, payload)
                next_id += 1
            if check is not None and not cold:
                runner.check = check
            samples: dict[str, dict[str, list[int]]] = {}
            gc.collect()
            for _ in range(args.pairs):
                for name, payload in list(runner.lifecycle(next_id, LIFECYCLE)):
                    if cold:
                        thrash()
                    stages, _ = runner.call(name, payload)
                    per = samples.setdefault(name, {s: [] for s in STAGES})
                    for s in STAGES:
                        per[s].append(stages.get(s, 0))
                next_id += 1
            runner.check = None
            key = f"{level} live, {'cold' if cold else 'warm'}"
            results[key] = {m: {s: _stats(v) for s, v in per.items()} for m, per in samples.items()}
            print(_table(key, results[key]), flush=True)
    return results


def _table(key: str, block: dict[str, dict[str, dict[str, float]]]) -> str:
    head = f"{'method':<22}" + "".join(f"{s:>18}" for s in STAGES)
    lines = [f"\n## {key} (ms, p50 / p99)", head]
    for method, per in block.items():
        cells = "".join(f"{per[s]['p50']:>9.4f}/{per[s]['p99']:<8.4f}" for s in STAGES)
        lines.append(f"{method:<22}{cells}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    from google.protobuf.internal import api_implementation

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "protobuf": api_implementation.Type(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="containerd-2.3")
    parser.add_argument("--live", type=lambda s: [int(x) for x in s.split(",")], default=[0, 110])
    parser.add_argument("--pairs", type=int, default=300, help="measured lifecycles")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--cold", choices=["off", "on", "both"], default="both")
    parser.add_argument("--thrash-mb", type=int, default=2, help="memory walked (--cold)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", type=Path, help="write replies and intents to FILE")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the controllers' "disabled on this host" lines
    info = machine()
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    check: list[Any] | None = [] if args.check else None
    with tempfile.TemporaryDirectory(prefix="nri-qos-request-cpu-") as tmp:
        host_root = this_machine_root(Path(tmp) / "host")
        results = measure(args, host_root, check)
    if args.check and check is not None:
        args.check.write_text("\n".join(json.dumps(c) for c in check) + "\n")
    if args.json:
        print(json.dumps({"machine": info, "argv": sys.argv, "results": results}))


if __name__ == "__main__":
    main()
