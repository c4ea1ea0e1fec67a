"""The io controller: disk isolation per QoS class, cgroup v2 iocost or v1 blkio.

cgroup v2 (production's common case): at start, iocost is switched on for each whole disk
at the cgroup2 root (`io.cost.qos`, safe default `enable=1 ctrl=auto`; `io.cost.model`
only when configured), so io.weight means a share of each device. New containers get
their weight from the runtime (the `unified` map of the CreateContainer adjustment); this
controller writes io.weight only for containers that were running before we planned them
or whose class moved.

cgroup v1 (hybrid hosts such as this CI machine): no iocost exists, so weights go to
`blkio.bfq.weight` (meaningful on devices whose scheduler is BFQ) and the per-class
throttle caps from `[io.throttle.<qos class>]` go to `blkio.throttle.*` — usually a
ceiling for reclaimed_cores. Optional: a node without either runs without disk
isolation, and says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from isolation.blkio import Blkio, Throttle
from isolation.blockdev import BlockDevice, discover_block_devices
from isolation.errors import HostError
from isolation.host import LinuxHost
from isolation.iocost import IoCost
from isolation.writes import HostWriter
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import HostIntent, SetIoWeight

BFQ_WEIGHT_MAX = 1000  # blkio.bfq.weight range is 1..1000 (io.weight's is 1..10000)


@dataclass(frozen=True, slots=True)
class IoSettings:
    enabled: bool = True
    cost_qos: str = "enable=1 ctrl=auto"  # io.cost.qos parameters per device (v2)
    cost_model: str | None = None  # io.cost.model parameters, when the built-in is wrong
    devices: tuple[str, ...] = ()  # also manage these virtual devices (e.g. "loop0")
    throttle: Mapping[str, Throttle] = field(default_factory=dict)  # v1 caps per QoS class


class IoController(Controller):
    name = "io"
    domain = SetIoWeight.domain
    mode = Mode.OPTIONAL

    def __init__(
        self, host: LinuxHost, root: Path, writer: HostWriter, settings: IoSettings
    ) -> None:
        self.host = host
        self.root = root
        self.writer = writer
        self.settings = settings
        self.version = ""  # "v2" or "v1" once started
        self.devices: list[BlockDevice] = []
        self.notes: list[str] = []  # what start found, for the status views
        self.iocost: IoCost | None = None
        self.blkio: Blkio | None = None

    @property
    def via_runtime(self) -> bool:
        """New containers get io.weight from the runtime (the `unified` map): cgroup v2."""
        return self.version == "v2"

    def start(self) -> None:
        if not self.settings.enabled:
            raise ControllerUnavailable("disabled by [io] enabled = false")
        mounts = self.host.cgroupfs.mounts
        try:
            self.devices = discover_block_devices(self.root, include=self.settings.devices)
        except HostError as exc:
            raise ControllerUnavailable(f"cannot list block devices: {exc}") from None
        if mounts.v1_mount("blkio") is not None:
            self.version, self.blkio = "v1", Blkio(self.writer)
            return
        unified = mounts.unified
        if unified is None:
            raise ControllerUnavailable("neither a blkio (v1) nor a cgroup2 tree is mounted")
        controllers = _words(unified / "cgroup.controllers")
        if "io" not in controllers:
            raise ControllerUnavailable(
                f"the io controller is not enabled in the cgroup2 tree at {unified} "
                "(it lists: " + (" ".join(sorted(controllers)) or "nothing") + ")"
            )
        iocost = IoCost(unified, self.writer)
        why = iocost.unavailable()
        if why:
            # Without iocost there is no io.weight file at all: a runtime asked to write
            # one would fail the container's start, so nothing is asked of anyone.
            raise ControllerUnavailable(f"no iocost: {why}")
        self.version, self.iocost = "v2", iocost
        for dev in self.devices:
            try:
                self.notes.append(
                    self.iocost.configure_device(
                        dev, self.settings.cost_qos, self.settings.cost_model
                    )
                )
            except (HostError, ValueError) as exc:
                self.notes.append(f"{dev.name}: iocost not enabled: {exc}")

    def post_start(self, intent: HostIntent) -> str:
        return self._apply(intent)

    def post_update(self, intent: HostIntent) -> str:
        return self._apply(intent)

    def _apply(self, intent: HostIntent) -> str:
        if not isinstance(intent, SetIoWeight):
            raise TypeError(f"the io controller cannot apply {type(intent).__name__}")
        ref = intent.container
        if self.iocost is not None:
            directory = self.host.group_dir(ref.cgroups_path, ref.id, "io")
            return self.iocost.set_weight(directory, intent.weight, reason=intent.reason)
        assert self.blkio is not None
        directory = self.host.group_dir(ref.cgroups_path, ref.id, "blkio")
        outcomes = []
        if (directory / "blkio.bfq.weight").exists():
            weight = min(intent.weight, BFQ_WEIGHT_MAX)
            outcomes.append(
                self.blkio.set_bfq_weight(directory, weight, self.devices, intent.reason)
            )
        throttle = self.settings.throttle.get(intent.qos_class)
        if throttle is not None:
            why = f"{intent.qos_class}: the configured [io.throttle] caps"
            for dev in self.devices:
                outcomes.append(self.blkio.set_throttle(directory, dev, throttle, why))
        return "; ".join(o for o in outcomes if o) or "blkio: no BFQ weight file and no caps"


def _words(path: Path) -> frozenset[str]:
    try:
        return frozenset(path.read_text().split())
    except OSError:
        return frozenset()
