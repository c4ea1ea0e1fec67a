"""Short fuzz run: mutated real NRI captures through the decoders and the dispatch path.

A fixed seed and a few thousand inputs (tests/fuzz/mutate.py: wire, message and protobuf
mutations of the recorded containerd / CRI-O traffic), each judged by the oracles of
tests/fuzz/oracle.py, a sample of them also through the real plugin
(tests/fuzz/endtoend.py). Two forked workers, each under a memory cap. docs/fuzzing.md
says how to run the long version (bench/fuzz_wire.py) and what every oracle means.

Findings are grouped so that a failure says which promise broke. Known classes have a
name, a test of their own and a minimized reproducer in tests/fuzz/reproducers/: such a
test checks both the campaign and the reproducer, at the level where the promise is kept
(the plugin falls back when dispatch builds a reply over 4 MiB, so that class is judged
at the plugin). A class still open is xfail(strict=True): its test starts failing the day
it is fixed, and the mark comes off then. Exceptions dispatch.handle raises are answered
fail-open by the plugin and are not findings; their reproducers are under
reproducers/policy-errors/ and must still be answered.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fuzz.mutate import KINDS, generate
from tests.fuzz.oracle import (
    CONFIGURE_FAIL_OPEN_NO_EVENTS,
    CPU_LIST_MEMORY_BOMB,
    OVERSIZED_REPLY,
    PARTIAL_OVERSIZED,
    POLICY_POISONED,
    RETENTION_FIELDS,
    STREAM_ID_0,
    UNRETRIEVED_EXCEPTION,
    Finding,
    Report,
    Seen,
    load_reproducer,
    retention_in_subprocess,
    run_campaign,
    run_isolated,
)

SEED = 20_260_913
INPUTS = 2000
WORKERS = 2
PLUGIN_EVERY = 25  # every 25th input also goes through the real plugin
REPRODUCERS = Path(__file__).parent / "reproducers"
PLUGIN_ORACLES = ("plugin", "plugin-log")

# What each group of oracles promises (oracle names as in tests/fuzz/oracle.py).
GROUPS: dict[str, tuple[str, ...]] = {
    "decoders raise only protocol errors": ("receive-data", "decode"),
    "fail-open never raises and every reply is valid and fits": ("fail-open", "reply"),
    "refusals, replies and UpdateContainers calls are written": (
        "send-error",
        "send-response",
        "update-containers",
    ),
    "framing and chunking do not change what is decoded": ("reference", "chunking", "partial"),
    "no input takes more than a second": ("slow",),
    "no request exhausts memory": ("memory",),
    "one bad request does not break the policy for recorded ones": ("poisoned",),
    "the real plugin answers every request and stays up": PLUGIN_ORACLES,
    "no worker crashed or hung and the harness held": ("worker", "harness"),
}


@pytest.fixture(scope="module")
def report() -> Report:
    return run_campaign(
        SEED,
        INPUTS,
        workers=WORKERS,
        plugin_every=PLUGIN_EVERY,
        memory_bytes=512 << 20,
        hard_timeout=60.0,
    )


def _describe(found: list[Seen]) -> str:
    return "\n".join(
        f"{s.key} x{s.count} (kinds {sorted(s.kinds)}): {s.message}\n"
        f"    first: input {s.first_index} of seed {SEED}: {s.first_detail[:200]}\n"
        f"    rerun: python3 bench/fuzz_wire.py --seed {SEED} --start {s.first_index} "
        "--inputs 1 --workers 1"
        for s in found
    )


def test_every_kind_of_input_ran(report: Report) -> None:
    assert report.inputs == INPUTS
    assert set(report.by_kind) == set(KINDS)
    assert report.plugin_checked >= INPUTS // PLUGIN_EVERY
    assert report.requests > 10 * INPUTS  # most inputs carry a whole session of requests


@pytest.mark.parametrize("group", GROUPS)
def test_no_findings(report: Report, group: str) -> None:
    """Everything but the known classes (below), which have tests of their own."""
    found = [
        s for s in report.findings.values() if s.name not in KNOWN and s.oracle in GROUPS[group]
    ]
    assert not found, _describe(found)


def test_every_oracle_is_judged(report: Report) -> None:
    judged = {oracle for oracles in GROUPS.values() for oracle in oracles}
    assert {s.oracle for s in report.findings.values()} <= judged


# --- known classes -------------------------------------------------------------------------


SANS_IO, PLUGIN = "sans-io", "plugin"
BOTH = (SANS_IO, PLUGIN)


@dataclass(frozen=True)
class Known:
    reproducers: tuple[str, ...]
    # where it is judged: one call at a time (SANS_IO) and/or at the real plugin (PLUGIN)
    levels: tuple[str, ...]
    open_issue: str = ""  # why it is still there (then its test is xfail), "" once fixed


# The classes the fuzzer has found (docs/fuzzing.md); an open one has `open_issue` and its
# test is xfail(strict=True) until the fix lands.
KNOWN: dict[str, Known] = {
    STREAM_ID_0: Known(("stream-id-0-refusal-raises",), BOTH),
    CONFIGURE_FAIL_OPEN_NO_EVENTS: Known(("configure-fail-open-events-0",), BOTH),
    # dispatch.handle still builds the reply (the one-call oracle says so); the promise is
    # that the plugin answers something else
    OVERSIZED_REPLY: Known(("oversized-reply",), (PLUGIN,)),
    CPU_LIST_MEMORY_BOMB: Known(
        ("cpu-list-range-memory-bomb", "cpu-list-range-memory-bomb-config"), (SANS_IO,)
    ),
    UNRETRIEVED_EXCEPTION: Known(("unretrieved-exception",), (PLUGIN,)),
    POLICY_POISONED: Known(
        ("policy-poisoned-nan-headroom", "policy-poisoned-plan-of-assertion"), (SANS_IO,)
    ),
    PARTIAL_OVERSIZED: Known(("partial-state-ignores-oversized-skip",), (SANS_IO,)),
}


def _known_params() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=known.open_issue))
        if known.open_issue
        else name
        for name, known in KNOWN.items()
    ]


def _at_levels(
    findings: list[Finding] | list[Seen], name: str, levels: tuple[str, ...]
) -> list[str]:
    return [
        f"{f.key}: {f.message}"
        for f in findings
        if f.name == name and (PLUGIN if f.oracle in PLUGIN_ORACLES else SANS_IO) in levels
    ]


@pytest.mark.parametrize("name", _known_params())
def test_known_finding_is_gone(report: Report, name: str) -> None:
    known = KNOWN[name]
    found = _at_levels(list(report.findings.values()), name, known.levels)
    for reproducer in known.reproducers:
        inp, _ = load_reproducer(REPRODUCERS / f"{reproducer}.json")
        result = run_isolated(inp, plugin=PLUGIN in known.levels)
        assert not [f for f in result.findings if f.oracle == "worker"], result.findings
        found += [f"{reproducer}: {f}" for f in _at_levels(result.findings, name, known.levels)]
    assert not found, "\n".join(found)


def test_known_classes_have_their_reproducers() -> None:
    names = {path.stem for path in REPRODUCERS.glob("*.json")}
    wanted = {r for known in KNOWN.values() for r in known.reproducers}
    assert names == wanted


@pytest.mark.parametrize(
    "path", sorted((REPRODUCERS / "policy-errors").glob("*.json")), ids=lambda p: p.stem
)
def test_policy_errors_are_answered(path: Path) -> None:
    """Inputs on which dispatch.handle raises: the plugin answers them (fail-open) and
    every oracle holds, at the protocol core and at the real plugin."""
    inp, _ = load_reproducer(path)
    result = run_isolated(inp, plugin=True)
    assert not result.findings, result.findings


# --- memory a stopped container leaves behind ----------------------------------------------

RETAINED_MAX_KIB = 16 << 10


@pytest.mark.parametrize("field", RETENTION_FIELDS)
def test_stopped_containers_leave_no_memory_behind(field: str) -> None:
    """The class cache-retains-runtime-strings: 32 containers, each with another 1 MiB value
    in `field`, created and stopped (in a fresh interpreter, so that the caches start
    empty). Caches bounded by entries, not bytes, used to keep 288 MiB of names
    (qos._SCOPED_KEYS) and 32 MiB of annotation texts (state._ORIGINALS)."""
    retained = retention_in_subprocess([field], 32)[field]
    assert retained < RETAINED_MAX_KIB, f"{retained // 1024} MiB retained"


# --- determinism ---------------------------------------------------------------------------


def _fingerprint(seed: int, count: int) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        inp = generate(seed, index)
        digest.update(f"{inp.kind}|{inp.capture}|{inp.detail}|{len(inp.chunks)}|".encode())
        digest.update(inp.data)
    return digest.hexdigest()


def test_inputs_depend_on_seed_and_index_only() -> None:
    """The same inputs in another process with another hash seed (and out of order)."""
    here = _fingerprint(SEED, 40)
    code = (
        "from tests.fuzz.test_fuzz_captures import _fingerprint, SEED; "
        "from tests.fuzz.mutate import generate; generate(SEED, 39); "
        "print(_fingerprint(SEED, 40))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    there = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert there.stdout.strip() == here
    assert _fingerprint(SEED + 1, 5) != _fingerprint(SEED, 5)
