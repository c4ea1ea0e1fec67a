#!/usr/bin/env python3
"""Instructions per lifecycle of the request path, counted by valgrind: an A/B measure
this noisy VM cannot spoil.

Wall-clock timings of the same code move by 20-50 % between minutes on a shared 2-vCPU
guest, which hides a change worth a few percent. The number of instructions executed is
the same from run to run to about 0.3 %. So this counts them: the in-process request
path of bench/request_cpu.py (the recorded requests of `--flavor`, `services.decode`,
then `dispatch.handle` on the qos policy `nri-qos run` builds) under
`valgrind --tool=callgrind`, once with no measured lifecycle and once with
`--lifecycles`, after `--live` live containers and 20 warm-up lifecycles; the difference
divided by `--lifecycles` is the cost of one lifecycle (CreateContainer ..
RemovePodSandbox, the events the policy subscribes to). Interpreter start-up and
imports cancel out.

    python3 bench/request_instructions.py --flavor containerd-2.3 --tree . --tree /tmp/before

Each `--tree` is a checkout of this repository (its own bench/ and code are run).
Needs valgrind (apt install valgrind). It does not measure the socket, the channel or
the threads: bench/nri_real_payloads.py does, in time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# Run by valgrind in the tree under test: the lifecycles of bench/request_cpu.py.
CHILD = """
import sys, tempfile
from pathlib import Path
tree, flavor, live, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree + "/bench")
sys.path.insert(0, tree)
import request_cpu as rc
from real_payloads import LIFECYCLE, LIVE_PART, load_templates
root = rc.this_machine_root(Path(tempfile.mkdtemp(prefix="nri-insn-")))
templates = load_templates(flavor)
runner = rc.Runner(templates, rc.build_policy(root), rc.Taps())
runner.start()
for k in range(live):
    for name, payload in runner.lifecycle(k, LIVE_PART):
        runner.call(name, payload)
next_id = 1_000_000
for _ in range(20 + n):
    for name, payload in list(runner.lifecycle(next_id, LIFECYCLE)):
        runner.call(name, payload)
    next_id += 1
"""

COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def instructions(tree: Path, flavor: str, live: int, lifecycles: int) -> int:
    """Instructions valgrind counted for one run of CHILD."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-c",
        CHILD,
        str(tree),
        flavor,
        str(live),
        str(lifecycles),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"valgrind run failed in {tree}:\n{tail}")
    return int(found.group(1))


def per_lifecycle(tree: Path, flavor: str, live: int, lifecycles: int) -> int:
    instructions(tree, flavor, live, 0)  # compiles the tree's .pyc files first
    base = instructions(tree, flavor, live, 0)
    return (instructions(tree, flavor, live, lifecycles) - base) // lifecycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="containerd-2.3")
    parser.add_argument("--live", type=int, default=110)
    parser.add_argument("--lifecycles", type=int, default=200)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout (repeatable)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt install valgrind")
    trees = args.tree or [BENCH.parent]
    print(f"# {args.flavor}, {args.live} live, {args.lifecycles} lifecycles, qos policy")
    first = None
    for tree in trees:
        count = per_lifecycle(tree.resolve(), args.flavor, args.live, args.lifecycles)
        versus = f" ({(count - first) / first * 100:+.1f} %)" if first else ""
        first = first or count
        print(f"{tree}: {count:,} instructions per lifecycle{versus}", flush=True)


if __name__ == "__main__":
    main()
