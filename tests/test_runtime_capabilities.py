"""qos_model.runtime: what each NRI version lets a plugin do, worked out once per value."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from qos_model.runtime import V0_7, V0_10, V0_11, V0_12, NriCapabilities, NriVersion, RuntimeInfo

versions = st.builds(NriVersion, st.integers(0, 2), st.integers(0, 14), st.integers(0, 3))

# Each flag and the release that introduced it (docs/nri-protocol.md §3-§7).
SINCE = {
    "applies_oom_score_adj": V0_7,
    "applies_pids": V0_7,
    "applies_device_rules": V0_10,
    "applies_rdt": V0_11,
    "has_timeouts": V0_7,
    "has_pod_update_events": V0_10,
    "has_container_timestamps": V0_10,
    "has_dedicated_notifications": V0_12,
}


@given(versions)
def test_each_flag_is_on_from_the_release_that_introduced_it(version: NriVersion) -> None:
    caps = NriCapabilities(version)
    for flag, since in SINCE.items():
        assert getattr(caps, flag) is (version >= since), (flag, version)


@given(versions, versions)
def test_a_runtime_carries_the_capabilities_of_its_nri_version(
    first: NriVersion, second: NriVersion
) -> None:
    info = RuntimeInfo("containerd", "v2.3.4", first, "from its version")
    assert info.capabilities == NriCapabilities(first)
    moved = replace(info, nri_version=second)  # a copy with another version gets its own
    assert moved.capabilities == NriCapabilities(second)
    assert (info == moved) is (first == second)  # the flags are derived, not compared
