"""The net controller: egress shaping per network class, classified per container.

An HTB tree (one class per network class, fq_codel leaves) on each interface we shape,
with a cls_bpf classifier that maps the sending socket's cgroup to its class. The cgroup
of a packet is only known where the sending socket lives, so:

* host-network pods: their sockets are in the host's network namespace, so the trees on
  the configured host interfaces (`[net] interfaces`) classify them;
* pod-network pods: the tree is installed in the pod's own network namespace, on
  `[net] pod_interface` (usually eth0), entered through netlink; past the pod's veth the
  cgroup is lost, so shaping there is per pod, by class.

A container is classified after start by its cgroup2 id (the unified tree exists on v2
and hybrid hosts) and forgotten when it goes. Host trees are adopted, not rebuilt, after
a restart, and removed when the agent stops. Optional.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from isolation.host import LinuxHost
from isolation.netclass import (
    NetClassSpec,
    NetClassTree,
    cgroup2_id,
    default_classes,
    link_speed_bps,
    parse_rate,
    pin_dir_for,
)
from isolation.writes import HostWriter
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import HostIntent, ReleaseNetClass, SetNetClass

log = logging.getLogger("nri_qos.control.net")


@dataclass(frozen=True, slots=True)
class NetClassSetting:
    rate: str  # "30%" of the link, or an absolute rate ("100mbit")
    ceil: str = "100%"
    prio: int = 1


@dataclass(frozen=True, slots=True)
class NetSettings:
    enabled: bool = True
    interfaces: tuple[str, ...] = ()  # host interfaces to shape (host-network pods)
    pod_interface: str = ""  # the interface inside each pod's netns to shape ("": none)
    link_mbit: int = 0  # 0: the interface's own speed
    default_class: str = "online"  # unclassified traffic
    pin_root: str = "/sys/fs/bpf/nri-qos"  # bpffs directory for the classifier's maps
    classes: Mapping[str, NetClassSetting] = field(default_factory=dict)  # {}: defaults


class NetController(Controller):
    name = "net"
    domain = SetNetClass.domain
    mode = Mode.OPTIONAL

    def __init__(
        self, host: LinuxHost, writer: HostWriter, settings: NetSettings, root: Path = Path("/")
    ) -> None:
        self.host = host
        self.pin_root = root / settings.pin_root.strip("/")
        self.writer = writer
        self.settings = settings
        self.trees: dict[str, NetClassTree] = {}  # "host:<ifname>" or a pod's netns path
        self.known: dict[str, int] = {}  # container id -> the cgroup id we classified
        self.outcomes: list[str] = []

    def start(self) -> None:
        s = self.settings
        if not s.enabled:
            raise ControllerUnavailable("disabled by [net] enabled = false")
        if not s.interfaces and not s.pod_interface:
            raise ControllerUnavailable(
                "no interface to shape: set [net] interfaces (host network) and/or "
                "pod_interface (inside each pod's network namespace)"
            )
        for ifname in s.interfaces:
            try:
                tree = self._tree(ifname, None)
                self.outcomes.append(tree.ensure())
            except Exception as exc:
                self.stop()
                raise ControllerUnavailable(f"cannot shape {ifname}: {exc}") from None
            self.trees[f"host:{ifname}"] = tree

    def stop(self) -> None:
        """Remove every tree we installed; one that cannot be removed does not keep the
        others in place."""
        trees, self.trees = dict(self.trees), {}
        for key, tree in trees.items():
            try:
                tree.remove()
            except Exception as exc:
                log.warning("net: could not remove the tree on %s: %s", key, exc)
            finally:
                tree.close()

    def describe(self) -> dict[str, str]:
        """Each network class's share, for the plan's reasons."""
        configured = self.settings.classes
        if not configured:
            return {
                s.name: f"rate {s.rate_bps // 10**6} % of the link, ceil the link"
                for s in default_classes(100 * 10**6)
            }
        return {n: f"rate {c.rate}, ceil {c.ceil}" for n, c in configured.items()}

    def specs(self, link_bps: int) -> list[NetClassSpec]:
        configured = self.settings.classes
        if not configured:
            return default_classes(link_bps)
        return [
            NetClassSpec(
                name=name,
                minor=0x10 * (i + 1),
                rate_bps=parse_rate(c.rate, link_bps),
                ceil_bps=parse_rate(c.ceil, link_bps),
                prio=c.prio,
            )
            for i, (name, c) in enumerate(sorted(configured.items()))
        ]

    def _tree(self, ifname: str, netns: str | None) -> NetClassTree:
        link = self.settings.link_mbit * 1_000_000 or link_speed_bps(ifname, netns)
        if not link:
            raise ValueError(f"the speed of {ifname} is unknown: set [net] link_mbit")
        return NetClassTree(
            ifname,
            self.specs(link),
            default=self.settings.default_class,
            netns=netns,
            writer=self.writer,
            pin_dir=pin_dir_for(self.pin_root, ifname, netns),
        )

    def _trees_for(self, netns: str, create: bool) -> Sequence[NetClassTree]:
        if not netns:
            return [t for k, t in self.trees.items() if k.startswith("host:")]
        if not self.settings.pod_interface:
            return []
        tree = self.trees.get(netns)
        if tree is None and create:
            tree = self._tree(self.settings.pod_interface, netns)
            tree.ensure()
            self.trees[netns] = tree
        return [tree] if tree is not None else []

    def post_start(self, intent: HostIntent) -> str:
        return self._classify(intent)

    def post_update(self, intent: HostIntent) -> str:
        return self._classify(intent)

    def post_stop(self, intent: HostIntent) -> str:
        if not isinstance(intent, ReleaseNetClass):
            raise TypeError(f"the net controller cannot apply {type(intent).__name__}")
        # the cgroup is usually gone by now: use the id it had when we classified it
        cgid = self.known.pop(intent.container.id, None)
        if cgid is None:
            return ""
        dropped = 0
        for tree in self._trees_for(intent.netns, create=False):
            dropped += tree.unclassify(cgid)
        if intent.netns and intent.netns in self.trees:
            tree = self.trees[intent.netns]
            if not tree.classified():  # the pod's last container: its pins go too
                try:
                    tree.remove()
                finally:
                    tree.close()
                    del self.trees[intent.netns]
        return f"net: unclassified from {dropped} tree(s)" if dropped else ""

    def _classify(self, intent: HostIntent) -> str:
        if not isinstance(intent, SetNetClass):
            raise TypeError(f"the net controller cannot apply {type(intent).__name__}")
        ref = intent.container
        directory = self.host.group_dir(ref.cgroups_path, ref.id, "")
        cgid = cgroup2_id(directory)
        trees = self._trees_for(intent.netns, create=intent.net_class is not None)
        if not trees:
            where = "the pod's network namespace" if intent.netns else "the host network"
            return f"net: no shaped interface in {where}"
        for tree in trees:
            if intent.net_class is None:
                tree.unclassify(cgid)
            else:
                tree.classify(cgid, intent.net_class)
        if intent.net_class is None:
            self.known.pop(ref.id, None)
        else:
            self.known[ref.id] = cgid
        names = ", ".join(t.ifname for t in trees)
        return f"net class {intent.net_class} on {names} (cgroup id {cgid})"
