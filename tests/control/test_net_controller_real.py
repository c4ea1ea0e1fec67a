"""The net controller for real: a pod network namespace, a container cgroup in the
cgroup2 tree, classification by its id, and clean-up when the pod's last container goes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolation.host import LinuxHost
from isolation.netclass import cgroup2_id
from isolation.writes import HostWriter
from nri_plugin.control.base import ControllerUnavailable
from nri_plugin.control.net import NetController, NetSettings
from nri_plugin.lab_host import POD_INTERFACE, LabNetwork
from nri_plugin.policy.intents import ContainerRef, Phase, ReleaseNetClass, SetNetClass

UNIFIED = Path("/sys/fs/cgroup/unified")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not UNIFIED.is_dir(), reason="needs root and a cgroup2 tree"
    ),
]


@pytest.fixture
def pod_netns(tmp_path: Path) -> Iterator[LabNetwork]:
    network = LabNetwork(f"nriqos-test-{uuid.uuid4().hex[:6]}", tmp_path)
    if not network.available:
        pytest.skip(f"no network namespace here: {network.why}")
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def container_group() -> Iterator[tuple[ContainerRef, Path]]:
    top = UNIFIED / f"nriqos-test-{uuid.uuid4().hex[:6]}"
    leaf = top / "pod1" / "ctr-web"
    leaf.mkdir(parents=True)
    ref = ContainerRef("ctr-web", "default/web/app", "pod1", f"/{top.name}/pod1/ctr-web", None)
    try:
        yield ref, leaf
    finally:
        for d in (leaf, leaf.parent, top):
            d.rmdir()


def test_a_pod_is_shaped_in_its_own_namespace_and_cleaned_up_with_its_last_container(
    pod_netns: LabNetwork, container_group: tuple[ContainerRef, Path]
) -> None:
    ref, leaf = container_group
    settings = NetSettings(
        pod_interface=POD_INTERFACE, link_mbit=100, pin_root=str(pod_netns.pin_root / "nri-qos")
    )
    net = NetController(LinuxHost.at(Path("/")), HostWriter(), settings)
    net.start()  # no host interfaces: nothing installed yet
    assert not net.trees

    outcome = net.post_start(
        SetNetClass(
            phase=Phase.POST_START,
            container=ref,
            reason="t",
            net_class="batch",
            netns=pod_netns.path,
        )
    )
    assert outcome == f"net class batch on {POD_INTERFACE} (cgroup id {cgroup2_id(leaf)})"
    assert pod_netns.net_class_of(ref.cgroups_path, real=True)["value"] == "batch"
    pins = list((pod_netns.pin_root / "nri-qos").iterdir())
    assert pins, "the classifier's maps are pinned"

    released = net.post_stop(
        ReleaseNetClass(phase=Phase.POST_STOP, container=ref, reason="t", netns=pod_netns.path)
    )
    assert released == "net: unclassified from 1 tree(s)"
    assert not net.trees  # the pod's last container: its tree and pins are gone
    assert not any(p.exists() for p in pins)


def test_without_an_interface_to_shape_the_controller_says_what_to_set() -> None:
    net = NetController(LinuxHost.at(Path("/")), HostWriter(), NetSettings())
    with pytest.raises(ControllerUnavailable, match="pod_interface"):
        net.start()
