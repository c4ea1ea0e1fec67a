"""The [rdt], [io] and [net] sections: which level each QoS class gets per domain, and
how each domain's controller builds those levels on the host.

```toml
[rdt]
enabled = true
runtime_classes = false     # the runtime's own RDT config defines our class names
monitor = true              # a monitoring group per container
mount = "/sys/fs/resctrl"   # where resctrl is mounted (under [host] root)
[rdt.levels]                # QoS class -> RDT class ("" = none)
reclaimed_cores = "reclaimed"
[rdt.classes.reclaimed]     # per RDT class; unset = unrestricted
l3_percent = 30             # or l3_mask = "0x3f"
mb_percent = 30             # or mb_mbps = 2000 (resctrl mounted with mba_MBps)

[io]
enabled = true
cost_qos = "enable=1 ctrl=auto"
cost_model = ""             # io.cost.model parameters; "" = the kernel's built-in model
devices = []                # virtual devices to manage too (loop, dm)
[io.weights]                # QoS class -> io.weight 1..10000 (0 = leave alone)
reclaimed_cores = 10
[io.throttle.reclaimed_cores]   # cgroup v1 only: blkio caps per device
read_bps = 52428800

[net]
interfaces = ["eth0"]       # host interfaces to shape (host-network pods)
pod_interface = ""          # the interface inside each pod's netns to shape
link_mbit = 0               # 0: the interface's speed
default_class = "online"
pin_root = "/sys/fs/bpf/nri-qos"   # on a bpffs: the classifier's maps survive restarts
[net.levels]                # QoS class -> network class ("" = unshaped)
reclaimed_cores = "batch"
# [net.classes.*]: unset = system 40 %, online 30 %, batch 30 %, each up to the link.
# Setting any replaces them all, so a table names every class the levels use:
[net.classes.system]
rate = "40%"
prio = 0
[net.classes.online]
rate = "30%"
prio = 1
[net.classes.batch]
rate = "30%"
ceil = "100%"
prio = 2
```
Every key is checked; an unknown key or a bad value names itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from isolation.blkio import Throttle
from isolation.rdt import DEFAULT_CLASSES, RdtClassConfig
from nri_plugin.control.io import IoSettings
from nri_plugin.control.net import NetClassSetting, NetSettings
from nri_plugin.control.rdt import RdtSettings
from nri_plugin.policy.class_isolation import (
    DEFAULT_IO_WEIGHTS,
    DEFAULT_NET_CLASSES,
    DEFAULT_RDT_CLASSES,
    IO_WEIGHT_MAX,
    IsolationConfig,
)
from nri_plugin.policy.qos import QosClass


class SectionError(ValueError):
    """A bad key or value in one of these sections; the message names it."""


@dataclass(frozen=True, slots=True)
class IsolationSettings:
    levels: IsolationConfig = field(default_factory=IsolationConfig)
    rdt: RdtSettings = field(default_factory=RdtSettings)
    io: IoSettings = field(default_factory=IoSettings)
    net: NetSettings = field(default_factory=NetSettings)


def parse_isolation(raw: Mapping[str, Any]) -> IsolationSettings:
    """From the whole parsed TOML document (only these three sections are read)."""
    rdt_table = _table(raw, "rdt")
    io_table = _table(raw, "io")
    net_table = _table(raw, "net")
    rdt, rdt_levels = _rdt(rdt_table)
    io, io_weights = _io(io_table)
    net, net_levels = _net(net_table)
    levels = IsolationConfig(rdt_classes=rdt_levels, io_weights=io_weights, net_classes=net_levels)
    return IsolationSettings(levels=levels, rdt=rdt, io=io, net=net)


def _table(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise SectionError(f"[{name}] must be a table")
    return dict(value)


def _known(table: Mapping[str, Any], section: str, keys: set[str]) -> None:
    unknown = set(table) - keys
    if unknown:
        raise SectionError(f"[{section}] has no key(s) {sorted(unknown)}; allowed: {sorted(keys)}")


def _get(table: Mapping[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise SectionError(f"[{section}] {key} = {value!r} must be {_KIND[kind]}")
    return value


_KIND = {bool: "true or false", int: "an integer", str: "a string", list: "a list", dict: "a table"}


def _levels(
    table: Mapping[str, Any],
    section: str,
    defaults: Mapping[QosClass, Any],
    convert: Callable[[Any], Any],
) -> dict[QosClass, Any]:
    out = dict(defaults)
    names = {str(q) for q in QosClass}
    for key, value in table.items():
        if key not in names:
            raise SectionError(f"[{section}] {key!r} is not a QoS class; use {sorted(names)}")
        try:
            out[QosClass(key)] = convert(value)
        except (TypeError, ValueError) as exc:
            raise SectionError(f"[{section}] {key} = {value!r}: {exc}") from None
    return out


def _name_or_none(value: Any) -> str | None:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    if value and not value.replace("-", "").replace("_", "").isalnum():
        raise ValueError("must be a plain name (letters, digits, - and _)")
    return value or None


def _rdt(table: dict[str, Any]) -> tuple[RdtSettings, dict[QosClass, str | None]]:
    _known(table, "rdt", {"enabled", "runtime_classes", "monitor", "mount", "levels", "classes"})
    levels = _levels(
        _get(table, "rdt", "levels", dict, {}), "rdt.levels", DEFAULT_RDT_CLASSES, _name_or_none
    )
    classes: dict[str, RdtClassConfig] = dict(DEFAULT_CLASSES)
    for name, spec in _get(table, "rdt", "classes", dict, {}).items():
        section = f"rdt.classes.{name}"
        if _name_or_none(name) is None or not isinstance(spec, dict):
            raise SectionError(f"[{section}] must be a table under a plain class name")
        _known(spec, section, {"l3_percent", "l3_mask", "mb_percent", "mb_mbps"})
        mask_text = _get(spec, section, "l3_mask", str, "")
        try:
            mask = int(mask_text, 16) if mask_text else None
        except ValueError:
            raise SectionError(
                f'[{section}] l3_mask = {mask_text!r} must be hex, e.g. "0x3f"'
            ) from None
        classes[name] = RdtClassConfig(
            l3_percent=_percent(spec, section, "l3_percent"),
            l3_mask=mask,
            mb_percent=_percent(spec, section, "mb_percent"),
            mb_mbps=_positive(spec, section, "mb_mbps"),
        )
    missing = {c for c in levels.values() if c is not None} - set(classes)
    if missing:
        raise SectionError(f"[rdt.levels] names classes with no [rdt.classes.*]: {sorted(missing)}")
    settings = RdtSettings(
        enabled=_get(table, "rdt", "enabled", bool, True),
        runtime_classes=_get(table, "rdt", "runtime_classes", bool, False),
        monitor=_get(table, "rdt", "monitor", bool, True),
        mount=_get(table, "rdt", "mount", str, "/sys/fs/resctrl").strip("/") or "sys/fs/resctrl",
        classes={c: classes[c] for c in sorted({c for c in levels.values() if c is not None})},
    )
    return settings, levels


def _percent(spec: Mapping[str, Any], section: str, key: str) -> int | None:
    if key not in spec:
        return None
    value = _get(spec, section, key, int, 0)
    if not 1 <= value <= 100:
        raise SectionError(f"[{section}] {key} = {value} must be within 1..100")
    return int(value)


def _positive(spec: Mapping[str, Any], section: str, key: str) -> int | None:
    if key not in spec:
        return None
    value = _get(spec, section, key, int, 0)
    if value < 1:
        raise SectionError(f"[{section}] {key} = {value} must be at least 1")
    return int(value)


def _weight(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("must be an integer")
    if value == 0:
        return None
    if not 1 <= value <= IO_WEIGHT_MAX:
        raise ValueError(f"must be within 1..{IO_WEIGHT_MAX}, or 0 to leave it alone")
    return value


def _io(table: dict[str, Any]) -> tuple[IoSettings, dict[QosClass, int | None]]:
    _known(table, "io", {"enabled", "cost_qos", "cost_model", "devices", "weights", "throttle"})
    weights = _levels(
        _get(table, "io", "weights", dict, {}), "io.weights", DEFAULT_IO_WEIGHTS, _weight
    )
    throttle: dict[str, Throttle] = {}
    names = {str(q) for q in QosClass}
    for cls, spec in _get(table, "io", "throttle", dict, {}).items():
        section = f"io.throttle.{cls}"
        if cls not in names or not isinstance(spec, dict):
            raise SectionError(f"[{section}]: {cls!r} is not a QoS class; use {sorted(names)}")
        keys = {"read_bps", "write_bps", "read_iops", "write_iops"}
        _known(spec, section, keys)
        throttle[cls] = Throttle(**{k: _positive(spec, section, k) for k in sorted(keys)})
    devices = _get(table, "io", "devices", list, [])
    if not all(isinstance(d, str) and d and "/" not in d for d in devices):
        raise SectionError('[io] devices must be a list of device names, e.g. ["loop0"]')
    model = _get(table, "io", "cost_model", str, "")
    settings = IoSettings(
        enabled=_get(table, "io", "enabled", bool, True),
        cost_qos=_get(table, "io", "cost_qos", str, "enable=1 ctrl=auto"),
        cost_model=model or None,
        devices=tuple(devices),
        throttle=throttle,
    )
    return settings, weights


def _net(table: dict[str, Any]) -> tuple[NetSettings, dict[QosClass, str | None]]:
    keys = {"enabled", "interfaces", "pod_interface", "link_mbit", "default_class", "pin_root"}
    _known(table, "net", keys | {"levels", "classes"})
    levels = _levels(
        _get(table, "net", "levels", dict, {}), "net.levels", DEFAULT_NET_CLASSES, _name_or_none
    )
    classes: dict[str, NetClassSetting] = {}
    for name, spec in _get(table, "net", "classes", dict, {}).items():
        section = f"net.classes.{name}"
        if _name_or_none(name) is None or not isinstance(spec, dict):
            raise SectionError(f"[{section}] must be a table under a plain class name")
        _known(spec, section, {"rate", "ceil", "prio"})
        classes[name] = NetClassSetting(
            rate=_get(spec, section, "rate", str, "10%"),
            ceil=_get(spec, section, "ceil", str, "100%"),
            prio=_get(spec, section, "prio", int, 1),
        )
    interfaces = _get(table, "net", "interfaces", list, [])
    if not all(isinstance(i, str) and i and "/" not in i for i in interfaces):
        raise SectionError('[net] interfaces must be a list of interface names, e.g. ["eth0"]')
    default = _get(table, "net", "default_class", str, "online")
    known = set(classes) or {"system", "online", "batch"}
    used = {c for c in levels.values() if c is not None} | {default}
    if used - known:
        raise SectionError(f"[net] names network classes that do not exist: {sorted(used - known)}")
    link = _get(table, "net", "link_mbit", int, 0)
    if link < 0:
        raise SectionError("[net] link_mbit must be 0 (the interface's speed) or more")
    settings = NetSettings(
        enabled=_get(table, "net", "enabled", bool, True),
        interfaces=tuple(interfaces),
        pod_interface=_get(table, "net", "pod_interface", str, ""),
        link_mbit=link,
        default_class=default,
        pin_root=_get(table, "net", "pin_root", str, "/sys/fs/bpf/nri-qos"),
        classes=classes,
    )
    return settings, levels
