"""Pressure stall information (PSI): per cgroup2 group and node-wide, as window shares.

The kernel keeps, per resource, a cumulative stall time in microseconds ("total=") next
to its own 10/60/300 s averages (Documentation/accounting/psi.rst):

    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

The averages are over fixed horizons that do not match our window, so we use the totals:
share = delta(total) / window, which is exact for any window length.

PSI can be missing: a kernel without CONFIG_PSI has no files (ENOENT), and one booted with
`psi=0` (or built with CONFIG_PSI_DEFAULT_DISABLED and no `psi=1`) has no
/proc/pressure and answers EOPNOTSUPP on the cgroup files. `explain` turns each into one
line for `Availability`.
"""

from __future__ import annotations

import errno as errno_codes
from dataclasses import dataclass
from pathlib import Path

from isolation.errors import HostError
from isolation.writes import read_file
from qos_model.signals import Pressure

RESOURCES = ("cpu", "memory", "io")


@dataclass(frozen=True, slots=True)
class PsiTotals:
    """Cumulative stall times in microseconds ("full" is absent for cpu on kernels
    before 5.13)."""

    some_us: int
    full_us: int | None = None


def parse_psi(text: str) -> PsiTotals:
    """The totals of one pressure file; ValueError when there is no "some" line."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "total":
                totals[kind] = int(value)
    if "some" not in totals:
        raise ValueError(f"no 'some ... total=' line in pressure data {text[:80]!r}")
    return PsiTotals(some_us=totals["some"], full_us=totals.get("full"))


def group_path(cgroup2_dir: Path, resource: str) -> Path:
    return cgroup2_dir / f"{resource}.pressure"


def node_path(root: Path, resource: str) -> Path:
    return root / "proc/pressure" / resource


def read_psi(path: Path) -> PsiTotals:
    """Read and parse one pressure file; HostError (with its errno) when it cannot be read,
    ValueError when it does not look like PSI."""
    return parse_psi(read_file(path))


def share(prev: PsiTotals | None, cur: PsiTotals, window_s: float) -> Pressure | None:
    """The window's stall shares, or None when there is no previous reading, no window, or
    a total went backwards (the group was recreated under the same path)."""
    if prev is None or window_s <= 0:
        return None
    some = cur.some_us - prev.some_us
    if some < 0:
        return None
    full: float | None = None
    if cur.full_us is not None and prev.full_us is not None:
        delta_full = cur.full_us - prev.full_us
        if delta_full < 0:
            return None
        full = _ratio(delta_full, window_s)
    return Pressure(some=_ratio(some, window_s), full=full)


def _ratio(delta_us: int, window_s: float) -> float:
    # clamped: the group's clock and ours are sampled a few microseconds apart
    return min(1.0, delta_us / (window_s * 1_000_000.0))


def explain(exc: HostError) -> str:
    """Why PSI could not be read, in one line."""
    if exc.errno in (errno_codes.EOPNOTSUPP, errno_codes.ENOTSUP):
        # host-wide, so no path: one line for the host, not one per group
        return "PSI is disabled (booted with psi=0, or CONFIG_PSI_DEFAULT_DISABLED without psi=1)"
    if exc.errno == errno_codes.ENOENT:
        return (
            f"no PSI file {exc.path} (kernel without CONFIG_PSI or booted with psi=0, or "
            "the group is gone)"
        )
    return f"cannot read PSI: {exc}"
