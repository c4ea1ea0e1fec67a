#!/usr/bin/env python3
"""How much memory one request touches when it starts with cold caches, counted by
valgrind's cache simulator: the footprint a request pays for after an idle gap.

On this VM a request that follows another back to back finds its code and data in the
CPU caches; one that comes after a few ms of idle (as every container event does on a
node, tens of ms apart) does not, and the qos CreateContainer then takes 0.45 ms instead
of 0.3 (bench/nri_real_payloads.py --gap-ms, docs/benchmarks.md). What it costs is how
many distinct cache lines it touches, code and data, not how many instructions it runs.
Wall time measures that too noisily here, so this counts it.

The request path is bench/request_cpu.py's, in process (the recorded requests of
`--flavor`, `services.decode`, then `dispatch.handle` on the qos policy `nri-qos run`
builds), after `--live` live containers and 20 warm-up lifecycles. Then, `--requests`
times: a whole lifecycle, where each request of `--method` is preceded by a walk over
`--thrash-mb` of memory (which evicts everything from the simulated caches) and runs
inside functools.reduce, the one C function callgrind collects in
(`--toggle-collect`): only that request is counted, each time from cold caches.

Per request it prints:
- instructions;
- I1 and D1 misses (32 KiB, 8-way, 64-byte lines): what did not stay in the first level
  within the request;
- LL misses (a 4 MiB last level): with the walk, every line the request touches first;
  times 64 bytes, what it brings in from memory. This is the footprint. "Of it code" is
  machine code (the interpreter, protobuf's upb); the rest is data, which includes the
  Python bytecode.

    python3 bench/request_footprint.py --method CreateContainer --tree . --tree /tmp/before

`--part` counts one part of the request instead: decode, convert (protobuf -> model) or
policy (the hook alone); the parts before it run after the walk, uncounted, as they do
before it in the plugin. What the whole request brings in beyond the three is the
reply's building and encoding, and dispatch.

Each `--tree` is a checkout of this repository (its own bench/ and code are run). Needs
valgrind (apt install valgrind). `--thrash-mb 0`: no walk, warm caches.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# Run by valgrind in the tree under test.
CHILD = """
import functools, sys, tempfile
from pathlib import Path
tree, flavor, method, part = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[7]
live, n, thrash_mb = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
sys.path.insert(0, tree + "/bench")
sys.path.insert(0, tree)
import request_cpu as rc
from real_payloads import LIFECYCLE, LIVE_PART, load_templates
from nri_plugin.protocol import convert, services
from nri_plugin.protocol import nri_pb2 as pb

def whole(name, payload):  # decode, decide, build the reply and encode it
    runner.call(name, payload)[1].reply.SerializeToString()

def decode_only(name, payload):
    return services.decode(services.PLUGIN_METHODS[name].request, payload, name)

def converted(request):  # what dispatch.handle gives the policy hook
    args = [convert.pod_for_policy(request.pod), convert.container_for_policy(request.container)]
    if isinstance(request, pb.UpdateContainerRequest):
        has = request.HasField("linux_resources")
        args.append(convert.resources_for_policy(request.linux_resources) if has else None)
    return args

HOOKS = {
    "CreateContainer": "create_container",
    "UpdateContainer": "update_container",
    "StopContainer": "stop_container",
}

root = rc.this_machine_root(Path(tempfile.mkdtemp(prefix="nri-footprint-")))
runner = rc.Runner(load_templates(flavor), rc.build_policy(root), rc.Taps())
runner.start()
for k in range(live):
    for name, payload in runner.lifecycle(k, LIVE_PART):
        runner.call(name, payload)
next_id = 1_000_000
for _ in range(20):
    for name, payload in list(runner.lifecycle(next_id, LIFECYCLE)):
        runner.call(name, payload)
    next_id += 1
if part == "policy" and method not in HOOKS:
    raise SystemExit(f"--part policy: one of {', '.join(HOOKS)}")
walk = bytearray(thrash_mb << 20)
marks = [bytes([i]) * (len(walk) // 64) for i in (1, 2)]
seen = 0
for i in range(n * 50):
    if seen >= n:
        break
    for name, payload in list(runner.lifecycle(next_id, LIFECYCLE)):
        if name != method:
            runner.call(name, payload)
            continue
        if walk:
            walk[::64] = marks[i % 2]  # a write to every line: evicts the simulated caches
        if part == "decode":
            functools.reduce(lambda _, p: decode_only(name, p), (payload,), None)
            runner.call(name, payload)
        elif part == "convert":  # decoded cold, then converted (counted)
            request = decode_only(name, payload)
            functools.reduce(lambda _, r: converted(r), (request,), None)
            runner.call(name, payload)
        elif part == "policy":  # decoded and converted cold, then the hook alone (counted)
            hook = getattr(runner.policy, HOOKS[name])
            args = converted(decode_only(name, payload))
            functools.reduce(lambda _, a: hook(*a), (args,), None)
        else:
            functools.reduce(lambda _, p: whole(name, p), (payload,), None)
        seen += 1
    next_id += 1
if seen < n:
    raise SystemExit(f"{method} never came in a lifecycle of {flavor}")
"""

EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def counts(
    tree: Path, flavor: str, method: str, live: int, n: int, thrash_mb: int, part: str
) -> dict[str, int]:
    """Callgrind's totals over the `n` collected requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--cache-sim=yes",
            "--I1=32768,8,64",
            "--D1=32768,8,64",
            "--LL=4194304,16,64",
            "--collect-atstart=no",
            "--toggle-collect=functools_reduce",
            sys.executable,
            "-c",
            CHILD,
            str(tree),
            flavor,
            method,
            str(live),
            str(n),
            str(thrash_mb),
            part,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            tail = "\n".join(done.stderr.splitlines()[-15:])
            raise SystemExit(f"valgrind run failed in {tree}:\n{tail}")
        names: list[str] = []
        totals: list[int] = []
        for line in out.read_text().splitlines():
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith(("summary:", "totals:")):
                totals = [int(v) for v in line.split()[1:]]
        totals += [0] * (len(names) - len(totals))  # callgrind leaves out trailing zeros
        found = dict(zip(names, totals, strict=True))
        missing = [e for e in EVENTS if e not in found]
        if missing:
            raise SystemExit(f"callgrind gave no {', '.join(missing)} in {tree}")
        return {e: found[e] for e in EVENTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="containerd-2.3")
    parser.add_argument("--method", default="CreateContainer")
    parser.add_argument("--live", type=int, default=110)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--thrash-mb", type=int, default=16)
    parser.add_argument(
        "--part",
        choices=["request", "decode", "convert", "policy"],
        default="request",
        help="what is counted: decode, decide, build and encode the reply (request); or one "
        "part, the parts before it run uncounted after the walk: decode, convert "
        "(protobuf -> model), policy (the hook; CreateContainer, UpdateContainer, "
        "StopContainer)",
    )
    parser.add_argument("--tree", type=Path, action="append", help="a checkout (repeatable)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt install valgrind")
    trees = args.tree or [BENCH.parent]
    walk = f"after a {args.thrash_mb} MiB walk" if args.thrash_mb else "warm"
    print(
        f"# {args.flavor}, {args.method}, {args.live} live, {args.requests} requests, {walk}, "
        "qos policy; per request:"
    )
    heads = ("instructions", "I1 miss", "D1 miss", "LL miss", "of it code", "KiB in")
    print(f"{'tree':<24} " + " ".join(f"{h:>12}" for h in heads))
    first: float | None = None
    for tree in trees:
        c = counts(
            tree.resolve(),
            args.flavor,
            args.method,
            args.live,
            args.requests,
            args.thrash_mb,
            args.part,
        )
        n = args.requests
        ll = (c["ILmr"] + c["DLmr"] + c["DLmw"]) / n
        versus = f" ({(ll - first) / first * 100:+.1f} % LL)" if first else ""
        first = first or ll
        print(
            f"{tree!s:<24} {c['Ir'] / n:>12,.0f} {c['I1mr'] / n:>12,.0f} "
            f"{(c['D1mr'] + c['D1mw']) / n:>12,.0f} {ll:>12,.0f} {c['ILmr'] / n:>12,.0f} "
            f"{ll * 64 / 1024:>12,.0f}{versus}",
            flush=True,
        )


if __name__ == "__main__":
    main()
