"""Cutting CPU sets along physical cores, from either end of the CPU range.

Pools are carved as whole cores: the reclaimed pool from the top of the range, named
pools from the bottom. Every event re-cuts the pools, and they take few distinct shapes,
so each cut is remembered with the topology (`Topology.derived`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from qos_model.topology import Topology


def _cores_in(topology: Topology, cpus: frozenset[int]) -> tuple[frozenset[int], ...]:
    """`cpus` grouped by physical core, cores in ascending order of their first CPU.

    Runs for every pool on every event: the core order is computed once per topology and
    the answer remembered per CPU set (pools take few distinct shapes)."""

    def group() -> tuple[frozenset[int], ...]:
        order = topology.derived("cores by first cpu", _core_order(topology))
        return tuple(core & cpus for core in order if not core.isdisjoint(cpus))

    return topology.derived(("cores in", cpus), group)


def _core_order(topology: Topology) -> Callable[[], tuple[frozenset[int], ...]]:
    return lambda: tuple(c.cpus for c in sorted(topology.cores, key=lambda c: c.first_cpu))


def _take_cores(cores: Iterable[frozenset[int]], count: int) -> frozenset[int]:
    taken: set[int] = set()
    for core in cores:
        if len(taken) >= count:
            break
        need = count - len(taken)
        taken.update(sorted(core)[:need])
    return frozenset(taken)


def top_cores(topology: Topology, cpus: frozenset[int], count: int) -> frozenset[int]:
    """`count` CPUs from the highest-numbered whole cores (reclaimed pool)."""
    return _cores_taken(topology, cpus, count, top=True)


def bottom_cores(topology: Topology, cpus: frozenset[int], count: int) -> frozenset[int]:
    return _cores_taken(topology, cpus, count, top=False)


def _cores_taken(topology: Topology, cpus: frozenset[int], count: int, top: bool) -> frozenset[int]:
    """Whole cores from one end of `cpus`, remembered: pools are cut on every event and
    take few distinct shapes."""

    def take() -> frozenset[int]:
        cores = _cores_in(topology, cpus)
        return _take_cores(reversed(cores) if top else cores, count)

    return topology.derived(("cores taken", cpus, count, top), take)
