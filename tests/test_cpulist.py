"""qos_model.cpulist: the kernel's list format, strictly, with ids a kernel can have.

Lists also come from runtimes (LinuxCPU.cpus of a container) and from runtime-provided
config, so a hostile "0-4294967295" must be an error, not four billion ints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qos_model.cpulist import MAX_CPU_ID, CpuListError, format_cpu_list, parse_cpu_list


@given(st.frozensets(st.integers(0, MAX_CPU_ID), max_size=64))
def test_format_and_parse_round_trip(cpus: frozenset[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_the_kernels_forms_parse() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("") == frozenset()
    assert parse_cpu_list(f"{MAX_CPU_ID}") == {MAX_CPU_ID}


@pytest.mark.parametrize(
    "text",
    ["0-4294967295", f"0-{MAX_CPU_ID + 1}", "9" * 5000, "1_0", "\u0663", "-1", "3-1", "1 - 2", "a"],
)
def test_what_no_kernel_writes_is_refused_quickly(text: str) -> None:
    with pytest.raises(CpuListError):
        parse_cpu_list(text)
