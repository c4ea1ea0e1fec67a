"""Pure tests of split Synchronize chunking (nri-protocol.md §7.6)."""

from __future__ import annotations

import pytest

from embedded_runtime.sync import Chunk, SyncError, SyncSplitter

MAX = 4 << 20


def run(splitter: SyncSplitter, rejected: dict[int, int]) -> list[Chunk]:
    """Drive the splitter like the runtime: attempt i is refused when listed in
    `rejected` (attempt -> refused size), otherwise answered correctly."""
    sent: list[Chunk] = []
    attempt = 0
    while not splitter.done:
        chunk = splitter.chunk()
        if attempt in rejected:
            splitter.oversized(rejected[attempt], MAX)
        else:
            sent.append(chunk)
            splitter.answered(chunk.more, 0)
        attempt += 1
    return sent


def sizes(chunks: list[Chunk]) -> list[tuple[int, int, bool]]:
    return [(c.pod_end - c.pod_start, c.ctr_end - c.ctr_start, c.more) for c in chunks]


def test_small_state_is_one_message() -> None:
    assert sizes(run(SyncSplitter(2, 3, split=True), {})) == [(2, 3, False)]


def test_empty_state_is_one_empty_message() -> None:
    assert sizes(run(SyncSplitter(0, 0, split=False), {})) == [(0, 0, False)]


def test_observed_split_of_250_pods_and_2500_containers() -> None:
    """The split the doc observed at containerd HEAD: 206+2060 (more), then 44+440."""
    chunks = run(SyncSplitter(250, 2500, split=True), {0: 5_089_000})
    assert sizes(chunks) == [(206, 2060, True), (44, 440, False)]
    assert (chunks[1].pod_start, chunks[1].ctr_start) == (206, 2060)


@pytest.mark.parametrize(
    ("pods", "ctrs", "rejected", "expected"),
    [
        pytest.param(
            10, 100, {0: MAX + 1}, [(9, 90, True), (1, 10, False)],
            id="slightly too big: the factor is capped at 0.9",
        ),
        pytest.param(
            100, 100, {0: 2 * MAX, 1: 2 * MAX}, [(25, 25, True)] * 3 + [(25, 25, False)],
            id="refused twice: shrunk twice",
        ),
        pytest.param(
            5, 5, {0: 10 * MAX}, [(4, 4, True), (1, 1, False)],
            id="fewer than 8 objects left after shrinking: 4 + 4",
        ),
    ],
)  # fmt: skip
def test_a_refused_chunk_shrinks_the_chunks_that_follow(
    pods: int, ctrs: int, rejected: dict[int, int], expected: list[tuple[int, int, bool]]
) -> None:
    assert sizes(run(SyncSplitter(pods, ctrs, split=True), rejected)) == expected


@pytest.mark.parametrize(
    ("more", "updates"),
    [(False, 0), (True, 1), (False, 3)],
    ids=["more=false, no updates", "more=true, 1 update", "more=false, 3 updates"],
)
def test_a_more_chunk_not_answered_with_more_and_no_updates_closes_the_plugin(
    more: bool, updates: int
) -> None:
    splitter = SyncSplitter(100, 100, split=True)
    splitter.oversized(2 * MAX, MAX)
    assert splitter.chunk().more
    with pytest.raises(SyncError, match="plugin does not handle split sync requests") as exc:
        splitter.answered(more, updates)
    assert exc.value.closes


def test_final_chunk_may_carry_updates() -> None:
    splitter = SyncSplitter(1, 1, split=True)
    assert splitter.answered(False, 5) and splitter.done
    with pytest.raises(SyncError):
        splitter.chunk()


def test_without_split_support_an_oversized_state_fails() -> None:
    splitter = SyncSplitter(100, 100, split=False)
    with pytest.raises(SyncError, match="exceeds maximum message size") as exc:
        splitter.oversized(2 * MAX, MAX)
    assert not exc.value.closes


def test_too_few_objects_to_split_fails() -> None:
    splitter = SyncSplitter(4, 4, split=True)
    with pytest.raises(SyncError, match="with split messages"):
        splitter.oversized(2 * MAX, MAX)


def test_one_pod_with_many_containers_spins_on_empty_chunks() -> None:
    """Upstream quirk, kept on purpose: the pods per message round down to 0 while the
    pod is still unsent, so after the containers the runtime sends empty more=true
    messages until its deadline."""
    splitter = SyncSplitter(1, 20, split=True)
    splitter.oversized(int(1.2 * MAX), MAX)
    seen = []
    for _ in range(6):
        chunk = splitter.chunk()
        seen.append((chunk.pod_end - chunk.pod_start, chunk.ctr_end - chunk.ctr_start, chunk.more))
        splitter.answered(True, 0)
    assert seen[0] == (0, 16, True) and seen[1] == (0, 4, True)
    assert seen[2:] == [(0, 0, True)] * 4
    assert not splitter.done
