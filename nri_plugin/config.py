"""nri-qos configuration: one TOML file, every key optional, every value checked.

The same text can come from three places: `--config FILE`, the runtime (a pre-installed
plugin receives `/etc/nri/conf.d/NN-name.conf` verbatim in ConfigureRequest.config), or
nowhere (defaults). Unknown keys are errors, not silently ignored, so a typo does not
quietly run a node with the default policy.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nri_plugin.config_isolation import IsolationSettings, SectionError, parse_isolation
from nri_plugin.config_operations import (
    OperationsSectionError,
    OperationsSettings,
    parse_operations,
)
from nri_plugin.config_protection import (
    ProtectionSectionError,
    ProtectionSettings,
    parse_protection,
)
from nri_plugin.config_reconcile import (
    ReconcileSectionError,
    ReconcileSettings,
    parse_reconcile,
)
from nri_plugin.config_roles import RolesSectionError, RolesSettings, parse_roles
from nri_plugin.control.executor import HostLimits
from nri_plugin.plugin import DEFAULT_SOCKET, PluginSettings, PluginSetupError
from nri_plugin.policy.engine import EngineConfig
from nri_plugin.policy.oom import OomBands
from nri_plugin.policy.qos import QosConfig
from nri_plugin.policy.workload import PlannerConfig
from nri_plugin.reporter import ReporterSettings, parse_reporter
from qos_model.cpulist import CpuListError, parse_cpu_list


class ConfigError(ValueError):
    """A bad config file; the message names the file, the key and what is allowed."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    # Where a pre-installed plugin (no stderr) logs: "syslog", "stderr" or a file path.
    target: str = "auto"


@dataclass(frozen=True, slots=True)
class QosSettings:
    """The [policy] section of the qos policy."""

    policy: EngineConfig = field(default_factory=EngineConfig)
    rebalance_interval: float = 5.0  # seconds between usage samples; 0 disables


@dataclass(frozen=True, slots=True)
class Config:
    plugin: PluginSettings = field(default_factory=PluginSettings)
    log: LogConfig = field(default_factory=LogConfig)
    policy_name: str = "qos"
    qos: QosSettings = field(default_factory=QosSettings)
    # Every host path (sysfs, cgroupfs, procfs, resctrl) hangs off this root.
    host_root: Path = Path("/")
    host_limits: HostLimits = field(default_factory=HostLimits)
    # Log every host change the controllers would make, and make none.
    dry_run: bool = False
    isolation: IsolationSettings = field(default_factory=IsolationSettings)
    protection: ProtectionSettings = field(default_factory=ProtectionSettings)
    operations: OperationsSettings = field(default_factory=OperationsSettings)
    reporter: ReporterSettings = field(default_factory=ReporterSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    roles: RolesSettings = field(default_factory=RolesSettings)


_PLUGIN_KEYS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "name": ("name", str),
    "index": ("idx", str),
    "socket": ("socket_path", Path),
    "handler_budget_ms": ("handler_budget", lambda v: float(v) / 1000),
    "deadline_fraction": ("deadline_fraction", float),
    "registration_timeout_ms": ("registration_timeout", lambda v: float(v) / 1000),
    "backoff_initial_ms": ("backoff_initial", lambda v: float(v) / 1000),
    "backoff_max_ms": ("backoff_max", lambda v: float(v) / 1000),
    "max_requests_in_flight": ("max_requests_in_flight", int),
    "write_high_water_bytes": ("write_high_water", int),
    "write_buffer_max_bytes": ("write_buffer_max", int),
    "stall_timeout_ms": ("stall_timeout", lambda v: float(v) / 1000),
    "sync_max_chunks": ("sync_max_chunks", int),
    "sync_max_objects": ("sync_max_objects", int),
    "gil_switch_interval_ms": ("gil_switch_interval", lambda v: float(v) / 1000),
    "nice": ("nice", int),
}
# [host] keys besides root: the limits of host work (`control.executor.HostLimits`).
_HOST_KEYS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "io_deadline_ms": ("deadline", lambda v: _non_negative(v) / 1000),
    "io_retries": ("retries", lambda v: int(_non_negative(v, whole=True))),
    "io_retry_delay_ms": ("retry_delay", lambda v: _non_negative(v) / 1000),
    "quarantine_ms": ("quarantine", lambda v: _non_negative(v) / 1000),
    "quarantine_max_ms": ("quarantine_max", lambda v: _non_negative(v) / 1000),
    "max_blocked_threads": ("max_stuck", lambda v: int(_non_negative(v, whole=True))),
}


def _non_negative(value: object, *, whole: bool = False) -> float:
    """A TOML number >= 0 (an integer when `whole`); ValueError otherwise. Strict, unlike
    float() and int(), which would take true or "3"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(value)
    if value < 0 or (whole and not isinstance(value, int)):
        raise ValueError(value)
    return float(value)


_LOG_LEVELS = {"debug", "info", "warning", "error"}
_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a table",
}
POLICIES = {"qos", "recording"}


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # arrays nested thousands deep (runtime-provided text is input)
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
    _check_finite(raw, source, "")
    sections = (
        "plugin", "log", "policy", "host", "rdt", "io", "net", "interference", "eviction",
        "debug", "metrics", "reporter", "reconcile", "roles",
    )  # fmt: skip
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; "
            f"allowed: {', '.join(f'[{name}]' for name in sections)}"
        )
    try:
        isolation = parse_isolation(raw)
        protection = parse_protection(raw)
        operations = parse_operations(raw)
        reporter = parse_reporter(_table(raw, "reporter", source))
        reconcile = parse_reconcile(raw)
        roles = parse_roles(raw)
    except (
        SectionError,
        ProtectionSectionError,
        OperationsSectionError,
        ReconcileSectionError,
        RolesSectionError,
        ValueError,
    ) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    plugin = _plugin_settings(_table(raw, "plugin", source), source)
    log = _log_config(_table(raw, "log", source), source)
    policy = dict(_table(raw, "policy", source))
    name = str(policy.pop("name", "qos"))
    if name not in POLICIES:
        raise ConfigError(
            f"{source}: [policy] name = {name!r} is unknown; choose one of {sorted(POLICIES)}"
        )
    if name != "qos" and policy:
        raise ConfigError(f"{source}: policy {name!r} takes no settings, got {sorted(policy)}")
    qos = _qos_settings(policy, source) if name == "qos" else QosSettings()
    planner = replace(qos.policy.planner, isolation=isolation.levels)
    qos = replace(qos, policy=replace(qos.policy, planner=planner, protection=protection.engine))
    host = dict(_table(raw, "host", source))
    dry_run = host.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ConfigError(f"{source}: [host] dry_run = {dry_run!r} must be true or false")
    root_text = host.pop("root", "/")
    if not isinstance(root_text, str) or not root_text.startswith("/"):
        raise ConfigError(
            f'{source}: [host] root = {root_text!r} must be an absolute path, e.g. "/" or "/host"'
        )
    root = Path(root_text)
    limits = _host_limits(host, source)
    return Config(
        plugin=plugin,
        log=log,
        policy_name=name,
        qos=qos,
        host_root=root,
        host_limits=limits,
        dry_run=dry_run,
        isolation=isolation,
        protection=protection,
        operations=operations,
        reporter=reporter,
        reconcile=reconcile,
        roles=roles,
    )


def _host_limits(table: dict[str, Any], source: str) -> HostLimits:
    limits = HostLimits(**_converted(table, _HOST_KEYS, "host", source, also=("root", "dry_run")))
    if limits.deadline <= 0 or limits.max_stuck < 1:
        raise ConfigError(
            f"{source}: [host] io_deadline_ms must be > 0 and max_blocked_threads >= 1"
        )
    return limits


def _converted(
    table: dict[str, Any],
    keys: dict[str, tuple[str, Callable[[Any], object]]],
    section: str,
    source: str,
    also: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The table's keys as keyword arguments (attribute name -> converted value), each key
    known and each value valid, or a ConfigError naming the key."""
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            allowed = sorted([*also, *keys])
            raise ConfigError(f"{source}: [{section}] has no key {key!r}; allowed: {allowed}")
        attr, conv = keys[key]
        try:
            kwargs[attr] = conv(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: [{section}] {key} = {value!r} is not valid") from None
    return kwargs


def _check_finite(value: object, source: str, key: str) -> None:
    """No setting takes nan or inf (TOML allows both); every comparison with nan is false,
    so one would pass every range check and poison every later decision."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key or 'a value'} = {value!r} must be a finite number")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, source, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, source, key)


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8"
        ) from None
    return parse_config(text, str(path))


def _table(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return value


def _plugin_settings(table: dict[str, Any], source: str) -> PluginSettings:
    settings = PluginSettings(**_converted(table, _PLUGIN_KEYS, "plugin", source))
    try:
        settings.validate()
    except PluginSetupError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return settings


def _log_config(table: dict[str, Any], source: str) -> LogConfig:
    allowed = {f.name for f in fields(LogConfig)}
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{source}: [log] has no key {key!r}; allowed: {sorted(allowed)}")
    level = str(table.get("level", "info")).lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{source}: [log] level = {level!r}; use one of {sorted(_LOG_LEVELS)}")
    target = table.get("target", "auto")
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f'{source}: [log] target = {target!r}; use "auto", "stderr", "syslog" or a file path'
        )
    return LogConfig(level=level, target=target)


def _qos_settings(table: dict[str, Any], source: str) -> QosSettings:
    """[policy] for name = "qos": every key optional, every value checked here, so a bad
    value stops start-up with its key named instead of surfacing mid-decision."""
    known = {
        "reserved_cpus", "min_shared_cpus", "reclaimed_min_cpus", "reclaimed_overlap_shared",
        "shared_headroom", "dedicated_full_pcpus", "include_isolated_cpus",
        "guaranteed_integral_to_dedicated", "system_namespaces_to_system_cores",
        "system_namespaces", "system_reserved_memory", "rebalance_interval_ms", "oom_bands",
    }  # fmt: skip
    unknown = set(table) - known
    if unknown:
        raise ConfigError(
            f"{source}: [policy] has no key(s) {sorted(unknown)}; allowed: {sorted(known)}"
        )

    def get(key: str, kind: type, default: Any) -> Any:
        value = table.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: [policy] {key} = {value!r} must be {_KIND_NAMES[kind]}")
        return value

    try:
        reserved = parse_cpu_list(get("reserved_cpus", str, ""))
    except CpuListError as exc:
        raise ConfigError(f"{source}: [policy] reserved_cpus: {exc}") from None
    try:
        bands = OomBands.from_mapping(get("oom_bands", dict, {}))
        planner = PlannerConfig(
            reserved_cpus=reserved,
            min_shared_cpus=get("min_shared_cpus", int, 1),
            reclaimed_min_cpus=get("reclaimed_min_cpus", int, 1),
            reclaimed_overlap_shared=get("reclaimed_overlap_shared", bool, False),
            shared_headroom=get("shared_headroom", float, 0.2),
            dedicated_full_pcpus=get("dedicated_full_pcpus", bool, True),
            include_isolated_cpus=get("include_isolated_cpus", bool, False),
            oom_bands=bands,
        )
        qos = QosConfig(
            guaranteed_integral_to_dedicated=get("guaranteed_integral_to_dedicated", bool, False),
            system_namespaces_to_system_cores=get("system_namespaces_to_system_cores", bool, False),
            system_namespaces=tuple(get("system_namespaces", list, ["kube-system"])),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: [policy] {exc}") from None
    interval = get("rebalance_interval_ms", int, 5000) / 1000
    if interval < 0:
        raise ConfigError(f"{source}: [policy] rebalance_interval_ms must be >= 0")
    memory = get("system_reserved_memory", int, 0)
    return QosSettings(
        EngineConfig(qos=qos, planner=planner, system_reserved_memory=memory), interval
    )


__all__ = [
    "DEFAULT_SOCKET",
    "Config",
    "ConfigError",
    "LogConfig",
    "QosSettings",
    "load_config",
    "parse_config",
]
