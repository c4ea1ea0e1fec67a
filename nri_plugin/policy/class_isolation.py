"""Isolation beyond CPU, per QoS class: the RDT class, the I/O weight and the network class
of a container, each a plan field with its reason.

Why per class and not per pod: resctrl has 8-16 CLOSIDs on real parts, iocost weights and
HTB classes only mean something relative to each other, and the classes are what the user
reasons about ("batch may have 30 % of the cache"). So the engine decides a level from the
container's QoS class; the domain's controller turns levels into host objects (one resctrl
group per RDT class, one HTB class per net class).

What the host offers is an input (`HostSupport`), decided once at start from the
controllers that could start: a plan never promises isolation the node cannot give, and
its reason says why a field is empty ("no resctrl: ..."). Pure: no files, no clocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nri_plugin.policy.plan import Decision
from nri_plugin.policy.qos import QosClass

# cgroup v2 io.weight range (Documentation/admin-guide/cgroup-v2.rst, "io.weight").
IO_WEIGHT_MIN = 1
IO_WEIGHT_MAX = 10000
IO_WEIGHT_DEFAULT = 100


@dataclass(frozen=True, slots=True)
class Backend:
    """Whether one isolation domain works on this host, and why (not)."""

    available: bool
    reason: str


NOT_PROBED = Backend(False, "no controller for it is running")


@dataclass(frozen=True, slots=True)
class HostSupport:
    """What the host lets us isolate, as the controllers found at start.

    `io_via_runtime`: the container's io.weight travels in the adjustment's cgroup v2
    `unified` map (the runtime writes it when it creates the cgroup) - only on a cgroup v2
    host whose tree has the io controller, as runc refuses `unified` on v1.
    `rdt_runtime_classes`: the runtime's own RDT config defines classes named like ours,
    so runtimes before NRI v0.11 can be asked by `rdt_class`."""

    rdt: Backend = NOT_PROBED
    io: Backend = NOT_PROBED
    net: Backend = NOT_PROBED
    evict: Backend = NOT_PROBED  # an executor for Evict intents (the API, or the kill)
    io_via_runtime: bool = False
    rdt_runtime_classes: bool = False


NO_SUPPORT = HostSupport()


DEFAULT_RDT_CLASSES: Mapping[QosClass, str | None] = MappingProxyType(
    {
        QosClass.SYSTEM_CORES: "system",
        QosClass.DEDICATED_CORES: "dedicated",
        QosClass.SHARED_CORES: "shared",
        QosClass.RECLAIMED_CORES: "reclaimed",
    }
)
DEFAULT_IO_WEIGHTS: Mapping[QosClass, int | None] = MappingProxyType(
    {
        QosClass.SYSTEM_CORES: 1000,
        QosClass.DEDICATED_CORES: 500,
        QosClass.SHARED_CORES: 100,
        QosClass.RECLAIMED_CORES: 10,
    }
)
DEFAULT_NET_CLASSES: Mapping[QosClass, str | None] = MappingProxyType(
    {
        QosClass.SYSTEM_CORES: "system",
        QosClass.DEDICATED_CORES: "online",
        QosClass.SHARED_CORES: "online",
        QosClass.RECLAIMED_CORES: "batch",
    }
)


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """Which level each QoS class gets per domain (None: leave the container alone), and
    a one-line description of each level for the reasons ("L3 30 % of the ways")."""

    rdt_classes: Mapping[QosClass, str | None] = field(default_factory=lambda: DEFAULT_RDT_CLASSES)
    io_weights: Mapping[QosClass, int | None] = field(default_factory=lambda: DEFAULT_IO_WEIGHTS)
    net_classes: Mapping[QosClass, str | None] = field(default_factory=lambda: DEFAULT_NET_CLASSES)
    rdt_limits: Mapping[str, str] = field(default_factory=dict)  # rdt class -> description
    net_limits: Mapping[str, str] = field(default_factory=dict)  # net class -> description
    rdt_degraded: Mapping[str, str] = field(default_factory=dict)  # class -> why no group
    host: HostSupport = NO_SUPPORT

    def check(self) -> None:
        """Raises ValueError for a level that cannot be applied."""
        for cls, weight in self.io_weights.items():
            if weight is not None and not IO_WEIGHT_MIN <= weight <= IO_WEIGHT_MAX:
                raise ValueError(
                    f"io weight {weight} for {cls} is outside {IO_WEIGHT_MIN}..{IO_WEIGHT_MAX}"
                )


@dataclass(frozen=True, slots=True)
class ClassLevels:
    """The three decisions of one QoS class."""

    rdt_class: Decision[str | None]
    io_weight: Decision[int | None]
    net_class: Decision[str | None]


def class_levels(qos_class: QosClass, config: IsolationConfig) -> ClassLevels:
    """The RDT class, I/O weight and net class of a container of `qos_class`, remembered
    per (class, config): a node has thousands of containers and four classes."""
    key = (qos_class, id(config))
    known = _LEVELS.get(key)
    if known is not None and known[0] is config:
        return known[1]
    levels = ClassLevels(_rdt(qos_class, config), _io(qos_class, config), _net(qos_class, config))
    if len(_LEVELS) > 256:
        _LEVELS.clear()
    _LEVELS[key] = (config, levels)
    return levels


_LEVELS: dict[tuple[QosClass, int], tuple[IsolationConfig, ClassLevels]] = {}


def _unavailable(what: str, backend: Backend) -> str:
    return f"{what} not applied: {backend.reason}"


def _rdt(qos_class: QosClass, config: IsolationConfig) -> Decision[str | None]:
    name = config.rdt_classes.get(qos_class)
    if name is None:
        return Decision(None, f"{qos_class}: no RDT class configured; the root group's cache")
    backend = config.host.rdt
    if not backend.available:
        return Decision(None, _unavailable(f"RDT class {name}", backend))
    degraded = config.rdt_degraded.get(name)
    if degraded is not None:
        return Decision(None, f"RDT class {name} not applied: {degraded}; the root group's cache")
    limits = config.rdt_limits.get(name)
    detail = f" ({limits})" if limits else ""
    return Decision(name, f"{qos_class}: RDT class {name}{detail}, one resctrl group per class")


def _io(qos_class: QosClass, config: IsolationConfig) -> Decision[int | None]:
    weight = config.io_weights.get(qos_class)
    if weight is None:
        return Decision(None, f"{qos_class}: no I/O weight configured; the runtime's default")
    backend = config.host.io
    if not backend.available:
        return Decision(None, _unavailable(f"I/O weight {weight}", backend))
    if weight > IO_WEIGHT_DEFAULT:
        why = "disk time goes to it before default-weight work"
    elif weight < IO_WEIGHT_DEFAULT:
        why = "it yields disk time to online work"
    else:
        why = "the default share"
    return Decision(
        weight, f"{qos_class}: I/O weight {weight} (default {IO_WEIGHT_DEFAULT}): {why}"
    )


def _net(qos_class: QosClass, config: IsolationConfig) -> Decision[str | None]:
    name = config.net_classes.get(qos_class)
    if name is None:
        return Decision(None, f"{qos_class}: no network class configured; unshaped")
    backend = config.host.net
    if not backend.available:
        return Decision(None, _unavailable(f"network class {name}", backend))
    limits = config.net_limits.get(name)
    detail = f" ({limits})" if limits else ""
    return Decision(name, f"{qos_class}: network class {name}{detail}")


DEFAULT_ISOLATION = IsolationConfig()
