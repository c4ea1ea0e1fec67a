"""isolation.ownership: whatever the runtime sends, the answer is a container's own group
or a refusal with its reason — never a parent, a slice or something outside the root."""

from __future__ import annotations

from pathlib import PurePosixPath

from hypothesis import given
from hypothesis import strategies as st

from isolation.ownership import ForeignCgroup, in_group, own_group

_PIECES = st.sampled_from(
    ["/", ":", "-", ".", "..", ".slice", ".scope", "kubepods", "pod1", "crio", "c1", "\x00", "x"]
)
_TEXT = st.lists(_PIECES, max_size=12).map("".join)


@given(cgroups_path=_TEXT, container_id=st.one_of(_TEXT, st.sampled_from(["c1", "crio-c1"])))
def test_the_answer_is_a_container_leaf_or_a_refusal(cgroups_path: str, container_id: str) -> None:
    try:
        group = own_group(cgroups_path, container_id)
    except ForeignCgroup as exc:
        assert str(exc)
        return
    assert group.is_absolute() and ".." not in group.parts and len(group.parts) >= 3
    assert not group.name.endswith(".slice")
    assert group.name.removesuffix(".scope").endswith(container_id)
    assert "\x00" not in str(group)


def test_membership_reads_v1_and_v2_lines_and_cgroup_namespaces() -> None:
    group = PurePosixPath("/kubepods/pod1/c1")
    v1 = "12:memory:/kubepods/pod1/c1\n11:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n"
    assert in_group(v1, group)
    assert in_group("0::/kubepods/pod1/c1\n", group)
    assert in_group("0::/../../kubepods/pod1/c1\n", group)  # seen from another cgroupns
    assert not in_group("0::/kubepods/pod1/c12\n", group)
    assert not in_group("0::/kubepods/pod1\n", group)
    assert not in_group("0::/\n1:name=systemd:/init.scope\n", group)
