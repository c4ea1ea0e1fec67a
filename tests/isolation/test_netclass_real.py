"""isolation.netclass against the real kernel: HTB + cls_bpf in network namespaces made
here, with real TCP traffic from processes in different cgroup2 groups.

Every test gets its own `NetworkLab` (two netns joined by a veth, 10.200.0.x only inside
them, a private bpffs, a cgroup2 parent); the fixture removes all of it even when the test
fails. Rates are chosen so the assertions hold on a noisy 2-vCPU VM: a 100 mbit link,
online guaranteed 30 (may borrow to 100), batch guaranteed 10 with a 50 mbit ceiling.
Throughputs are TCP payload as the receiver counted it, so they read ~5 % below the
wire rates the classes are configured in; the bounds are loose in the safe direction.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf.libbpf import BpfUnavailable, libbpf
from isolation.errors import HostError
from isolation.netclass import NetClassSpec, NetClassTree, cgroup2_id, link_speed_bps
from nri_plugin.scenario_network import Flow, FlowResult, NetworkLab, ScenarioUnavailable

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns, tc and BPF"),
]

MBIT = 1_000_000
LINK = 100 * MBIT
CLASSES = [
    NetClassSpec("system", 0x10, 10 * MBIT, LINK, 0),
    NetClassSpec("online", 0x20, 30 * MBIT, LINK, 1),
    NetClassSpec("batch", 0x30, 10 * MBIT, 50 * MBIT, 2),
]


@pytest.fixture
def lab() -> Iterator[NetworkLab]:
    try:
        libbpf()
        network_lab = NetworkLab(f"t{os.getpid()}").open()
    except (ScenarioUnavailable, BpfUnavailable) as exc:
        pytest.skip(str(exc))
    try:
        yield network_lab
    finally:
        network_lab.close()


def installed(lab: NetworkLab, classes: list[NetClassSpec] = CLASSES) -> NetClassTree:
    tree = lab.tree(classes, default="system")
    try:
        line = tree.ensure()
    except BpfUnavailable as exc:
        pytest.skip(str(exc))
    assert line.startswith("installed htb 7a51:"), line
    return tree


def test_traffic_lands_in_its_class_and_is_shaped(lab: NetworkLab) -> None:
    tree = installed(lab)
    online, batch = lab.cgroup("online-web"), lab.cgroup("batch-copy")
    tree.classify(cgroup2_id(online), "online")
    tree.classify(cgroup2_id(batch), "batch")
    assert tree.classified() == {cgroup2_id(online): "online", cgroup2_id(batch): "batch"}

    before = tree.stats()
    got = lab.run_flows([Flow("online", online), Flow("batch", batch)], window_s=2.0)
    after = tree.stats()
    delta = {name: after[name].bytes - before[name].bytes for name in after}

    # Each flow's bytes went through its class (headers make the class count a bit more),
    # and nothing went to the default class: the classifier saw both cgroups.
    for flow, cls in (("online", "online"), ("batch", "batch")):
        assert got[flow].total_bytes <= delta[cls] <= got[flow].total_bytes * 1.15 + 100_000, (
            f"{cls}: class counted {delta[cls]} B, the receiver got {got[flow].total_bytes} B"
        )
    assert delta["system"] < 0.01 * (delta["online"] + delta["batch"])
    assert tree.decisions()["cgroup2"] > 0

    # Shaping under contention: online keeps >= 90 % of its guarantee (it also gets the
    # spare first, prio 1 < 2); batch stays under 110 % of its ceiling.
    assert got["online"].mbit >= 0.9 * 30, describe(got)
    assert got["batch"].mbit <= 1.1 * 50, describe(got)
    assert got["online"].mbit > got["batch"].mbit, describe(got)

    # Alone, batch borrows past its 10 mbit guarantee but not past its 50 mbit ceiling.
    alone = lab.run_flows([Flow("batch", batch)], window_s=1.5)
    assert 0.6 * 50 <= alone["batch"].mbit <= 1.1 * 50, describe(alone)


def test_adopt_keeps_the_qdisc_and_the_classification(lab: NetworkLab) -> None:
    first = installed(lab)
    online, batch = lab.cgroup("online-web"), lab.cgroup("batch-copy")
    first.classify(cgroup2_id(online), "online")
    first.classify(cgroup2_id(batch), "batch")
    loaded = first.program_id
    assert loaded is not None
    first.close()  # the agent goes away; the tree and the pinned map stay

    # A new agent adopts while traffic flows, with online's ceiling lowered to 80 mbit.
    changed = [
        spec if spec.name != "online" else NetClassSpec("online", 0x20, 30 * MBIT, 80 * MBIT, 1)
        for spec in CLASSES
    ]
    second = lab.tree(changed, default="system")
    results: dict[str, FlowResult] = {}
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            results.update(lab.run_flows([Flow("online", online)], window_s=1.5, warmup_s=0.3))
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=traffic)
    sender.start()
    time.sleep(1.0)  # mid-window
    during = second.stats()["online"].bytes
    line = second.ensure()
    sender.join(timeout=30)
    assert not errors, errors

    assert line.startswith("adopted htb 7a51:"), line
    assert "changed online" in line and "kept filter and pinned map (2 cgroups" in line, line
    assert second.program_id is None  # no reload: the live program kept classifying
    assert second.classified() == {cgroup2_id(online): "online", cgroup2_id(batch): "batch"}
    after = second.stats()
    # Counters never went back to zero (a new qdisc would start from 0), and every byte
    # of the flow, before and after the adoption, was counted in online's class.
    assert during > 0
    assert after["online"].bytes >= results["online"].total_bytes > 0
    assert after["online"].ceil_bps == 80 * MBIT
    assert after["system"].bytes < 0.01 * after["online"].bytes


def test_remove_cleans_up(lab: NetworkLab) -> None:
    tree = installed(lab)
    tree.classify(cgroup2_id(lab.cgroup("batch-copy")), "batch")
    assert tree.pin_dir.is_dir()
    assert tree.remove() == (
        f"removed htb 7a51: from {tree.where}; unpinned 3 maps from {tree.pin_dir}"
    )
    assert not tree.pin_dir.exists()
    assert tree.stats() == {}
    from pyroute2 import IPRoute

    with IPRoute(netns=lab.sender_ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=lab.sender_if)[0]
        kinds = {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index)}
    assert "htb" not in kinds
    assert tree.remove() == f"no nri-qos tree on {tree.where}"


def test_a_foreign_root_qdisc_is_left_alone(lab: NetworkLab) -> None:
    from pyroute2 import IPRoute

    with IPRoute(netns=lab.sender_ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=lab.sender_if)[0]
        ipr.tc("add", "htb", index, 0x10000, default=0x30)
        tree = lab.tree(CLASSES, default="system")
        with pytest.raises(HostError) as raised:
            tree.ensure()
        assert raised.value.errno == errno.EEXIST
        roots = [q for q in ipr.get_qdiscs(index) if q["parent"] == 0xFFFFFFFF]
        assert [(q.get_attr("TCA_KIND"), q["handle"]) for q in roots] == [("htb", 0x10000)]
        assert tree.remove() == f"no nri-qos tree on {tree.where}"  # not ours: untouched


def test_link_speed_inside_a_namespace(lab: NetworkLab) -> None:
    assert link_speed_bps(lab.sender_if, lab.sender_ns) == 10_000 * MBIT  # veth says 10G
    assert link_speed_bps("no-such0", lab.sender_ns) is None


def describe(results: dict[str, FlowResult]) -> str:
    return ", ".join(f"{r.name} {r.mbit:.1f} mbit/s" for r in results.values())


def test_a_failed_install_is_undone(lab: NetworkLab, tmp_path: Path) -> None:
    assert lab.bpffs is not None
    tree = NetClassTree(
        lab.sender_if,
        CLASSES,
        default="system",
        netns=lab.sender_ns,
        pin_dir=lab.bpffs / "failed",
        object_path=tmp_path / "missing.bpf.o",
    )
    with tree, pytest.raises(BpfUnavailable, match="no BPF object at"):
        tree.ensure()
    with tree:
        assert tree.stats() == {}  # the half-made tree was taken away again


def test_remove_after_the_pod_namespace_is_gone(lab: NetworkLab) -> None:
    """The pod ended (its netns and qdisc with it): remove() still frees the pins."""
    pinned = installed(lab)
    pinned.close()
    orphan = NetClassTree(
        lab.sender_if,
        CLASSES,
        default="system",
        netns=f"{lab.sender_ns}-gone",
        pin_dir=pinned.pin_dir,
    )
    with orphan:
        line = orphan.remove()
    assert line == f"{orphan.where} is gone; unpinned 3 maps from {pinned.pin_dir}"
    assert not pinned.pin_dir.exists()
    assert not Path(f"/var/run/netns/{lab.sender_ns}-gone").exists()  # not created by us


def test_adopt_without_pins_swaps_in_a_fresh_classifier(lab: NetworkLab) -> None:
    """bpffs was remounted under a live tree: the filter is replaced in place (the qdisc
    stays) and the caller is told to classify again."""
    first = installed(lab)
    first.classify(cgroup2_id(lab.cgroup("online-web")), "online")
    old_program = first.program_id
    first.close()
    for pin in first.pin_dir.iterdir():
        pin.unlink()

    second = lab.tree(CLASSES, default="system")
    line = second.ensure()
    assert line.startswith("adopted htb 7a51:"), line
    assert "cls_bpf filter replaced" in line and "reclassify" in line, line
    assert second.program_id not in (None, old_program)
    assert second.classified() == {}
