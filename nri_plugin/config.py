"""nri-qos configuration: one TOML file, every key optional, every value checked.

The same text can come from three places: `--config FILE`, the runtime (a pre-installed
plugin receives `/etc/nri/conf.d/NN-name.conf` verbatim in ConfigureRequest.config), or
nowhere (defaults). Unknown keys are errors, not silently ignored, so a typo does not
quietly run a node with the default policy.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nri_plugin.plugin import DEFAULT_SOCKET, PluginSettings, PluginSetupError


class ConfigError(ValueError):
    """A bad config file; the message names the file, the key and what is allowed."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    # Where a pre-installed plugin (no stderr) logs: "syslog", "stderr" or a file path.
    target: str = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    plugin: PluginSettings = field(default_factory=PluginSettings)
    log: LogConfig = field(default_factory=LogConfig)
    # Per-policy sections stay raw here; the policy validates its own section.
    policy_name: str = "recording"
    policy: dict[str, Any] = field(default_factory=dict)


_PLUGIN_KEYS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "name": ("name", str),
    "index": ("idx", str),
    "socket": ("socket_path", Path),
    "handler_budget_ms": ("handler_budget", lambda v: float(v) / 1000),
    "deadline_fraction": ("deadline_fraction", float),
    "registration_timeout_ms": ("registration_timeout", lambda v: float(v) / 1000),
    "backoff_initial_ms": ("backoff_initial", lambda v: float(v) / 1000),
    "backoff_max_ms": ("backoff_max", lambda v: float(v) / 1000),
}
_LOG_LEVELS = {"debug", "info", "warning", "error"}
POLICIES = {"recording"}


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"plugin", "log", "policy"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; allowed: [plugin], [log], [policy]"
        )
    plugin = _plugin_settings(_table(raw, "plugin", source), source)
    log = _log_config(_table(raw, "log", source), source)
    policy = dict(_table(raw, "policy", source))
    name = str(policy.pop("name", "recording"))
    if name not in POLICIES:
        raise ConfigError(
            f"{source}: [policy] name = {name!r} is unknown; choose one of {sorted(POLICIES)}"
        )
    return Config(plugin=plugin, log=log, policy_name=name, policy=policy)


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(text, str(path))


def _table(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return value


def _plugin_settings(table: dict[str, Any], source: str) -> PluginSettings:
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _PLUGIN_KEYS:
            raise ConfigError(
                f"{source}: [plugin] has no key {key!r}; allowed: {sorted(_PLUGIN_KEYS)}"
            )
        attr, conv = _PLUGIN_KEYS[key]
        try:
            kwargs[attr] = conv(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: [plugin] {key} = {value!r} is not valid") from None
    settings = PluginSettings(**kwargs)
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
    return LogConfig(level=level, target=str(table.get("target", "auto")))


__all__ = ["DEFAULT_SOCKET", "Config", "ConfigError", "LogConfig", "load_config", "parse_config"]
