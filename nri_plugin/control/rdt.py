"""The rdt controller: one resctrl control group per RDT class, and the per-container
work the runtime could not do.

At start it makes (or adopts) one group per configured class, with the class's L3 mask
and memory bandwidth, and removes groups of ours that no class uses any more. CLOSIDs are
scarce (8-16 on real parts), so classes are created in order of how much they protect
online work (the restricted reclaimed class first); a class that cannot get a group (out
of CLOSIDs, a mask the hardware refuses) is "degraded" with the kernel's reason, and its
containers stay in the root group — the node keeps working, the plan says why.

Per container, only on the fallback path (runtimes before NRI v0.11 place tasks
themselves from the LinuxRdt adjustment): move the container's processes into the class
group and its own monitoring group, after checking each is in the container's cgroup;
the executor runs the intent again after its rechecks so late forks are not lost. When
the container goes, its monitoring group is removed (RMIDs are scarce too). Optional: a
node without resctrl runs without RDT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from isolation.errors import HostError
from isolation.host import LinuxHost
from isolation.rdt import (
    DEFAULT_CLASSES,
    RdtClassConfig,
    RdtInfo,
    RdtUnavailable,
    Resctrl,
    schemata_for,
)
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import HostIntent, PlaceInRdtClass, ReleaseRdt

log = logging.getLogger("nri_qos.control.rdt")

# Which class gets a CLOSID first when there are not enough: restricting batch protects
# the most; the online classes' full masks equal the root group's anyway.
_PRIORITY = ("reclaimed", "shared", "dedicated", "system")


@dataclass(frozen=True, slots=True)
class RdtSettings:
    enabled: bool = True
    # The runtime's own RDT config (containerd's / CRI-O's rdt config file) defines
    # classes with our names: runtimes before NRI v0.11 are asked by rdt_class then.
    runtime_classes: bool = False
    monitor: bool = True  # a monitoring group per container (bandwidth, cache occupancy)
    mount: str = "sys/fs/resctrl"  # where resctrl is mounted, under [host] root
    classes: Mapping[str, RdtClassConfig] = field(default_factory=lambda: dict(DEFAULT_CLASSES))


class RdtController(Controller):
    name = "rdt"
    domain = PlaceInRdtClass.domain
    mode = Mode.OPTIONAL

    def __init__(self, resctrl: Resctrl, host: LinuxHost, settings: RdtSettings) -> None:
        self.resctrl = resctrl
        self.host = host
        self.settings = settings
        self.info: RdtInfo | None = None
        self.ready: dict[str, str] = {}  # class -> what its group enforces
        self.degraded: dict[str, str] = {}  # class -> why it has no group

    def start(self) -> None:
        if not self.settings.enabled:
            raise ControllerUnavailable("disabled by [rdt] enabled = false")
        try:
            info = self.resctrl.probe()
        except RdtUnavailable as exc:
            raise ControllerUnavailable(str(exc)) from None
        except HostError as exc:
            raise ControllerUnavailable(f"cannot read resctrl: {exc}") from None
        self.info = info
        classes = self.settings.classes
        try:
            removed = self.resctrl.remove_unused(keep=classes)
        except HostError as exc:  # a leftover group costs a CLOSID, nothing else
            log.warning("rdt: could not remove groups no class uses: %s", exc)
        else:
            if removed:
                log.info("rdt: removed groups no class uses: %s", ", ".join(removed))
        # the root group holds one CLOSID: the rest is ours, most protective first
        free = max(0, info.num_closids - 1)
        order = sorted(classes, key=lambda c: (_rank(c), c))
        for cls in order:
            if free <= 0:
                self.degraded[cls] = (
                    f"out of CLOSIDs: the hardware has {info.num_closids} "
                    "(the root group holds one); lower the number of [rdt] classes"
                )
                continue
            try:
                self.resctrl.ensure_class(cls, classes[cls], info)
            except (HostError, ValueError) as exc:
                self.degraded[cls] = str(exc)
                continue
            free -= 1
            self.ready[cls] = describe(info, classes[cls])
        if not self.ready:
            why = "; ".join(f"{c}: {w}" for c, w in self.degraded.items()) or "no classes"
            raise ControllerUnavailable(f"no RDT class could be set up ({why})")

    def post_start(self, intent: HostIntent) -> str:
        return self._place(intent)

    def post_update(self, intent: HostIntent) -> str:
        return self._place(intent)

    def post_stop(self, intent: HostIntent) -> str:
        if not isinstance(intent, ReleaseRdt):
            raise TypeError(f"the rdt controller cannot apply {type(intent).__name__}")
        if intent.rdt_class not in self.ready:
            return ""
        ref = intent.container
        if self.resctrl.remove_mon_group(intent.rdt_class, ref.id, intent.reason):
            return f"RDT: monitoring group of {ref.id[:12]} removed"
        return ""

    def _place(self, intent: HostIntent) -> str:
        if not isinstance(intent, PlaceInRdtClass):
            raise TypeError(f"the rdt controller cannot apply {type(intent).__name__}")
        cls = intent.rdt_class
        if cls is None:
            return "RDT: no class; left where it is"
        if cls not in self.ready:
            why = self.degraded.get(cls, "not configured in [rdt] classes")
            return f"RDT class {cls} is unavailable ({why}): left in the root group"
        ref = intent.container
        group, pids = self.host.member_pids(ref.cgroups_path, ref.id, ref.pid)
        if not pids:
            return f"RDT class {cls}: no process in {group} yet"
        mon = None
        if self.settings.monitor:
            self.resctrl.ensure_mon_group(cls, ref.id, "bandwidth and cache use per container")
            mon = ref.id
        where = self.resctrl.group_name(cls)
        # a recheck mostly finds everyone in place: one read instead of a write per pid
        missing = [p for p in pids if p not in self.resctrl.tasks_of(cls, mon=mon)]
        if not missing:
            return ""  # nothing to say: in place already
        placed = self.resctrl.assign_tasks(cls, missing, intent.reason, mon=mon)
        return f"RDT class {cls}: {placed} of {len(missing)} process(es) moved into {where}"


def _rank(cls: str) -> int:
    return _PRIORITY.index(cls) if cls in _PRIORITY else len(_PRIORITY)


def describe(info: RdtInfo, config: RdtClassConfig) -> str:
    """What a class's group enforces, for people: "L3 0x3f of 0xfffff, MB 30 %"."""
    parts = []
    lines = schemata_for(info, config)
    for resource, domains in sorted(lines.items()):
        values = sorted(set(domains.values()))
        shown = ",".join(values)
        if resource.startswith("L"):
            full = info.l3.cbm_mask if info.l3 is not None else 0
            parts.append(f"{resource} ways 0x{shown} of 0x{full:x}")
        elif resource == "MB":
            unit = " MBps" if info.mb is not None and info.mb.mbps else " %"
            parts.append(f"MB {shown}{unit}")
        else:
            parts.append(f"{resource} {shown}")
    return ", ".join(parts)
