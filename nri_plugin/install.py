"""`nri-qos install` and `nri-qos uninstall`: one step from a copied binary to a running
plugin, and one step back.

install writes the systemd unit and its tmpfiles.d entry (or, with --pre-installed, the
launcher and config file the runtime itself starts at its start-up), a default
/etc/nri-qos/config.toml unless one exists, and enables NRI in the runtimes it finds:

* containerd: /etc/containerd/config.toml. Schema version 2 (containerd 1.7) has the NRI
  plugin ``io.containerd.nri.v1.nri`` disabled unless ``disable = false``; version 3
  (containerd 2.x) has it enabled unless ``disable = true``.
* CRI-O: /etc/crio/crio.conf and /etc/crio/crio.conf.d/*.conf, later files winning;
  ``[crio.nri] enable_nri``.

A runtime's config is edited as text, one line at a time, so its comments and layout
stay as they were, and every edit is checked by parsing the result: it must equal the
old config with exactly the intended key changed, or nothing is written. Each change is
shown as a unified diff first and made only with consent (--yes, or "y" at a prompt);
the original is kept as a timestamped backup under /var/lib/nri-qos/backups.

What install did is recorded in /var/lib/nri-qos/install.json; uninstall reverses exactly
that: files it created are removed, files it changed get their backup back, byte for
byte, unless they changed since (then they are left alone, and the message says where
the backup is). Everything happens under --root (default /), so it can be tried on a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_SETUP = 2

DEFAULT_EXEC = "/usr/local/bin/nri-qos"
UNIT = "/etc/systemd/system/nri-qos.service"
TMPFILES = "/etc/tmpfiles.d/nri-qos.conf"
CONFIG = "/etc/nri-qos/config.toml"
STATE_DIR = "/var/lib/nri-qos"
MANIFEST = f"{STATE_DIR}/install.json"
BACKUPS = f"{STATE_DIR}/backups"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
CRIO_CONFIG = "/etc/crio/crio.conf"
CRIO_DROPINS = "/etc/crio/crio.conf.d"
CRIO_DROPIN = f"{CRIO_DROPINS}/50-nri-qos.conf"
NRI_PLUGIN = "io.containerd.nri.v1.nri"
DEFAULT_SOCKET = "/var/run/nri/nri.sock"
DEFAULT_PLUGIN_DIR = "/opt/nri/plugins"
DEFAULT_PLUGIN_CONF_DIR = "/etc/nri/conf.d"
PLUGIN_FILE = "50-nri-qos"  # index 50, name nri-qos: what the runtime registers it as
SOURCE_TREE = Path(__file__).resolve().parent.parent / "systemd"
SHARED_DATA = Path(sys.prefix) / "share" / "nri-qos" / "systemd"

Ask = Callable[[str], str]


class InstallError(Exception):
    """A problem the user must fix first; the message is one line saying what and how."""


# --- the command line ----------------------------------------------------------------------


def add_install_commands(subparsers: Any) -> None:
    """`install` and `uninstall` on the `nri-qos` parser's subcommands."""
    install = subparsers.add_parser(
        "install",
        help="install the systemd service (or the pre-installed plugin) and enable NRI",
        description="Install nri-qos on this node: the systemd unit, a default config, and "
        "NRI enabled in containerd/CRI-O. Shows every change first; changes a runtime's "
        "config only with consent, keeping a backup. `nri-qos uninstall` reverses it.",
    )
    install.add_argument("--dry-run", action="store_true", help="show the changes, make none")
    install.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    install.add_argument(
        "--pre-installed",
        action="store_true",
        help="let the runtime start nri-qos (/opt/nri/plugins/50-nri-qos) instead of systemd",
    )
    install.add_argument(
        "--root", type=Path, default=Path("/"), help="install under this directory (default /)"
    )
    install.add_argument(
        "--exec",
        dest="exec_path",
        default=DEFAULT_EXEC,
        help=f"the nri-qos executable the service runs (default {DEFAULT_EXEC})",
    )
    uninstall = subparsers.add_parser(
        "uninstall",
        help="reverse what `nri-qos install` did",
        description="Remove what `nri-qos install` created and restore the runtime configs "
        f"it changed from their backups, as recorded in {MANIFEST}.",
    )
    uninstall.add_argument("--dry-run", action="store_true", help="show the changes, make none")
    uninstall.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    uninstall.add_argument(
        "--root", type=Path, default=Path("/"), help="uninstall under this directory (default /)"
    )


def run_install_command(
    args: argparse.Namespace,
    *,
    ask: Ask | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run `install` or `uninstall`: 0 done (or dry run), 1 refused, 2 a setup problem.

    `ask` answers the consent question (default: the terminal, if stdin is one)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if ask is None and sys.stdin.isatty():
        ask = input
    try:
        session = _Session(Path(args.root), out, bool(args.dry_run), bool(args.yes), ask)
        if args.command == "install":
            return session.install(bool(args.pre_installed), str(args.exec_path))
        return session.uninstall()
    except InstallError as exc:
        print(f"nri-qos: {exc}", file=err)
        return EXIT_SETUP


# --- plans -----------------------------------------------------------------------------


@dataclasses.dataclass
class Change:
    """One file to write (after) or remove (after is None); before None = it is new."""

    path: str  # on the target system, e.g. "/etc/containerd/config.toml"
    before: bytes | None
    after: bytes | None
    why: str
    mode: int = 0o644
    diff: bool = False  # shown as a unified diff (runtime configs, restores)
    backup: str = ""  # uninstall: the backup this restores (removed once restored)


@dataclasses.dataclass
class Runtime:
    name: str
    restart: str
    socket: str = DEFAULT_SOCKET
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    conf_dir: str = DEFAULT_PLUGIN_CONF_DIR
    status: str = ""


class _Edits:
    """Text of the files a plan changes, so several edits of one file compose."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.texts: dict[str, tuple[bytes | None, str, str]] = {}  # path -> before, text, why

    def text(self, path: str) -> str:
        if path in self.texts:
            return self.texts[path][1]
        return _read_text(self.root, path) or ""

    def set(self, path: str, text: str, why: str) -> None:
        before = self.texts[path][0] if path in self.texts else _read(self.root, path)
        reasons = self.texts[path][2] + "; " + why if path in self.texts else why
        self.texts[path] = (before, text, reasons)

    def changes(self) -> list[Change]:
        return [
            Change(path, before, text.encode(), why, _mode_of(self.root, path), diff=True)
            for path, (before, text, why) in self.texts.items()
            if before is None or before != text.encode()
        ]


# --- TOML as text ----------------------------------------------------------------------------

_HEADER = re.compile(r"^(?P<indent>\s*)\[(?P<arr>\[)?(?P<key>[^\[\]]+)\](?(arr)\])\s*(?:#.*)?$")
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def _split_key(text: str) -> tuple[str, ...] | None:
    """A dotted TOML key ('plugins."io.containerd.nri.v1.nri"') as its parts."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _KEY_PART.match(text, pos)
        if not m:
            return None
        bare, basic, literal = m.groups()
        if basic is not None:
            try:
                parts.append(json.loads(f'"{basic}"'))
            except ValueError:
                return None
        else:
            parts.append(bare if bare is not None else literal)
        pos = m.end()
        if pos == len(text):
            return tuple(parts)
        if text[pos] != ".":
            return None
        pos += 1


def _section(lines: list[str], table: tuple[str, ...]) -> tuple[int, int] | None:
    """Line range of `[table]`: its header line to the next header (or the end)."""
    start = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        if start is not None:
            return start, i
        if not m.group("arr") and _split_key(m.group("key")) == table:
            start = i
    return None if start is None else (start, len(lines))


def _assignment(key: str) -> re.Pattern[str]:
    quoted = re.escape(key)
    return re.compile(
        rf"""^(?P<lead>\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*=\s*)(?P<value>true|false)"""
        r"(?P<tail>\s*(?:#.*)?)$"
    )


def _commented(key: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<indent>\s*)#\s*{re.escape(key)}\s*=")


def _nested(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{where} is not valid TOML ({exc}): fix it first") from None


def set_bool(
    text: str, where: str, table: tuple[str, ...], key: str, value: bool, header: str
) -> str:
    """`text` with `[table] key = value`: the value replaced on its own line, else the line
    added to the table (under its commented-out default when there is one), else the table
    appended with `header`. Raises InstallError when the result would differ from the old
    config in anything but that key (a layout this line editor does not understand)."""
    old = _parse(text, where)
    lines = text.splitlines(keepends=True)
    literal = "true" if value else "false"
    found = _section(lines, table)
    if found is not None:
        start, end = found
        pattern = _assignment(key)
        for i in range(start + 1, end):
            m = pattern.match(lines[i].rstrip("\n"))
            if m:
                newline = "\n" if lines[i].endswith("\n") else ""
                lines[i] = f"{m['lead']}{literal}{m['tail']}{newline}"
                break
        else:
            at, indent = start + 1, ""
            header_indent = _HEADER.match(lines[start])
            body = [ln for ln in lines[start + 1 : end] if ln.strip() and ln.lstrip()[0] != "#"]
            if body:
                indent = body[0][: len(body[0]) - len(body[0].lstrip())]
            elif header_indent and header_indent["indent"]:
                indent = header_indent["indent"] + "  "
            for i in range(start + 1, end):
                c = _commented(key).match(lines[i])
                if c:
                    at, indent = i + 1, c["indent"]
                    break
            if not lines[at - 1].endswith("\n"):
                lines[at - 1] += "\n"
            lines.insert(at, f"{indent}{key} = {literal}\n")
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"\n{header}\n  {key} = {literal}\n")
    new = "".join(lines)
    expected = copy.deepcopy(old)
    node = expected
    for part in table:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            break
    else:
        node[key] = value
    try:
        ok = tomllib.loads(new) == expected
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise InstallError(
            f"{where}: cannot change it safely (unusual layout); set {key} = {literal} "
            f"under {header} by hand, then run install again"
        )
    return new


# --- runtimes --------------------------------------------------------------------------------


def _containerd(root: Path, edits: _Edits, external: bool) -> Runtime | None:
    """containerd's NRI settings, with the edits that enable NRI (and, for the systemd
    service, which connects from outside, external connections) queued in `edits`."""
    path = CONTAINERD_CONFIG
    rt = Runtime("containerd", "systemctl restart containerd")
    text = _read_text(root, path)
    if text is None:
        installed = [
            p for p in ("/usr/bin/containerd", "/usr/local/bin/containerd") if _at(root, p)
        ]
        if not installed and not _at(root, "/etc/containerd").is_dir():
            return None
        # Version 2 is read by 1.7 and (migrated on load) by 2.x; everything unset keeps
        # its built-in default.
        new = (
            "# Written by `nri-qos install`: enables NRI; everything else keeps containerd's\n"
            "# defaults.\nversion = 2\n\n"
            f'[plugins."{NRI_PLUGIN}"]\n  disable = false\n'
        )
        edits.set(path, new, "containerd has no config file: create one that enables NRI")
        rt.status = f"{path} does not exist"
        return rt
    data = _parse(text, path)
    disabled_plugins = data.get("disabled_plugins", [])
    if isinstance(disabled_plugins, list) and NRI_PLUGIN in disabled_plugins:
        raise InstallError(
            f'{path}: disabled_plugins lists "{NRI_PLUGIN}": remove it there, then run '
            "install again"
        )
    version = data.get("version", 1)
    if version not in (2, 3):
        raise InstallError(
            f"{path}: config version {version} is not supported: migrate it "
            "(`containerd config migrate`, or write version = 2) and run install again"
        )
    nri = _nested(data, ("plugins", NRI_PLUGIN))
    nri = nri if isinstance(nri, dict) else {}
    quote = "'" if version == 3 and "'io.containerd" in text else '"'
    header = f"[plugins.{quote}{NRI_PLUGIN}{quote}]"
    table = ("plugins", NRI_PLUGIN)
    disabled = bool(nri.get("disable", version == 2))  # 1.7 default off, 2.x on
    rt.socket = str(nri.get("socket_path", DEFAULT_SOCKET))
    rt.plugin_dir = str(nri.get("plugin_path", DEFAULT_PLUGIN_DIR))
    rt.conf_dir = str(nri.get("plugin_config_path", DEFAULT_PLUGIN_CONF_DIR))
    if disabled:
        why = (
            "enable NRI"
            if "disable" in nri
            else f"enable NRI (off by default in version {version})"
        )
        edits.set(path, set_bool(edits.text(path), path, table, "disable", False, header), why)
    if external and nri.get("disable_connections") is True:
        new = set_bool(edits.text(path), path, table, "disable_connections", False, header)
        edits.set(path, new, "allow external plugins to connect (nri-qos runs as a service)")
    rt.status = f"{path} (version {version}): NRI " + ("disabled" if disabled else "enabled")
    return rt


def _crio(root: Path, edits: _Edits, external: bool) -> Runtime | None:
    """CRI-O's NRI settings across crio.conf and its drop-ins (later ones win), with the
    edits queued where the deciding value is (or in crio.conf when nothing sets it)."""
    files = [CRIO_CONFIG] if _at(root, CRIO_CONFIG).is_file() else []
    dropins = _at(root, CRIO_DROPINS)
    if dropins.is_dir():
        files += [f"{CRIO_DROPINS}/{p.name}" for p in sorted(dropins.glob("*.conf"))]
    if not files and not any(
        _at(root, p).exists() for p in ("/usr/bin/crio", "/usr/local/bin/crio")
    ):
        return None
    rt = Runtime("CRI-O", "systemctl restart crio")
    settings: dict[str, tuple[str, Any]] = {}  # key -> the file that decides, its value
    for path in files:
        nri = _nested(_parse(edits.text(path), path), ("crio", "nri"))
        for key, value in (nri or {}).items():
            settings[key] = (path, value)
    rt.socket = str(settings.get("nri_listen", ("", DEFAULT_SOCKET))[1])
    rt.plugin_dir = str(settings.get("nri_plugin_dir", ("", DEFAULT_PLUGIN_DIR))[1])
    rt.conf_dir = str(settings.get("nri_plugin_config_dir", ("", DEFAULT_PLUGIN_CONF_DIR))[1])
    table, header = ("crio", "nri"), "[crio.nri]"
    where, enabled = settings.get("enable_nri", ("", None))
    main = _read_text(root, CRIO_CONFIG) or ""
    if enabled is None and re.search(r"(?m)^\s*#\s*enable_nri\s*=\s*true\b", main):
        enabled = True  # `crio config` writes each default commented out: this build's is on
    if enabled is not True:
        if not where:
            where = CRIO_CONFIG if CRIO_CONFIG in files else CRIO_DROPIN
        new = set_bool(edits.text(where), where, table, "enable_nri", True, header)
        edits.set(where, new, "enable NRI")
    where, closed = settings.get("nri_disable_connections", ("", None))
    if external and closed is True:
        new = set_bool(edits.text(where), where, table, "nri_disable_connections", False, header)
        edits.set(where, new, "allow external plugins to connect (nri-qos runs as a service)")
    state = "enabled" if enabled is True else "disabled"
    rt.status = f"{', '.join(files) or 'no config files'}: NRI {state}"
    return rt


# --- files we own ------------------------------------------------------------------------------


def _unit_source(name: str) -> str:
    for directory in (SOURCE_TREE, SHARED_DATA):
        if (directory / name).is_file():
            return (directory / name).read_text()
    raise InstallError(
        f"{name} is not part of this installation (looked in {SOURCE_TREE} and "
        f"{SHARED_DATA}): run install from a source checkout"
    )


def default_config(socket: str) -> str:
    """The config.toml install writes when there is none: the defaults, spelled out where
    an operator is likely to change them first."""
    return f"""\
# nri-qos configuration, written by `nri-qos install` (never overwritten by it).
# Every key is optional; shown are the defaults. All keys: README.md, "Configuration".

[plugin]
socket = "{socket}"        # the runtime's NRI socket

[log]
level = "info"            # debug, info, warning, error

[policy]
name = "qos"              # or "recording": observe only, change nothing
# reserved_cpus = "0-1"   # CPUs for system_cores

[host]
dry_run = false           # true: log every host change, make none (a safe first run)
"""


def launcher(exec_path: str) -> str:
    return f"""\
#!/bin/sh
# nri-qos as a pre-installed NRI plugin, written by `nri-qos install --pre-installed`.
# The runtime runs this at its start-up with the connection on an inherited fd
# (NRI_PLUGIN_SOCKET); nri-qos reads {CONFIG} when it exists and logs to syslog.
exec {exec_path} run "$@"
"""


# --- the session ---------------------------------------------------------------------------


class _Session:
    def __init__(self, root: Path, out: TextIO, dry_run: bool, yes: bool, ask: Ask | None):
        if not root.is_dir():
            raise InstallError(f"--root {root} is not a directory")
        self.root = root.resolve()
        self.out = out
        self.dry_run = dry_run
        self.yes = yes
        self.ask = ask
        self.live = self.root == Path("/")
        if self.live and not dry_run and os.geteuid() != 0:
            raise InstallError("writing under / needs root: run it with sudo (or use --dry-run)")

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    # install

    def install(self, pre_installed: bool, exec_path: str) -> int:
        if _at(self.root, MANIFEST).exists():
            raise InstallError(
                f"already installed ({MANIFEST} exists): run `nri-qos uninstall` first"
            )
        edits = _Edits(self.root)
        runtimes = [
            rt
            for rt in (
                _containerd(self.root, edits, not pre_installed),
                _crio(self.root, edits, not pre_installed),
            )
            if rt is not None
        ]
        changes: list[Change] = []
        notes: list[str] = []
        if pre_installed:
            places = {(rt.plugin_dir, rt.conf_dir) for rt in runtimes} or {
                (DEFAULT_PLUGIN_DIR, DEFAULT_PLUGIN_CONF_DIR)
            }
            for plugin_dir, conf_dir in sorted(places):
                changes += self._own(
                    f"{plugin_dir}/{PLUGIN_FILE}", launcher(exec_path), "the plugin launcher", 0o755
                )
                # Empty on purpose: the runtime hands this file's text to the plugin, and
                # any non-blank text (a comment too) replaces the [policy] of config.toml.
                changes += self._own(f"{conf_dir}/{PLUGIN_FILE}.conf", "", "its NRI config", 0o644)
        else:
            unit = _unit_source("nri-qos.service")
            if exec_path != DEFAULT_EXEC:
                unit = unit.replace(f"ExecStart={DEFAULT_EXEC} ", f"ExecStart={exec_path} ")
            changes += self._own(UNIT, unit, "the systemd unit", 0o644)
        changes += self._own(TMPFILES, _unit_source("nri-qos.conf"), "tmpfiles.d entry", 0o644)
        if _at(self.root, CONFIG).exists():
            notes.append(f"{CONFIG} exists: kept as it is")
        else:
            socket = runtimes[0].socket if runtimes else DEFAULT_SOCKET
            changes.append(Change(CONFIG, None, default_config(socket).encode(), "default config"))
        runtime_changes = edits.changes()
        changes += runtime_changes
        if not _at(self.root, exec_path).exists():
            notes.append(
                f"{exec_path} does not exist: copy nri-qos there, or pass "
                "--exec $(command -v nri-qos)"
            )
        if not runtimes:
            notes.append("found neither containerd nor CRI-O: enable NRI in the runtime by hand")
        mode = "pre-installed NRI plugin" if pre_installed else "systemd service"
        self.say(f"nri-qos install under {self.root} as a {mode}:")
        for rt in runtimes:
            self.say(f"  {rt.name}: {rt.status}")
        self._show(changes, notes)
        if not self._consent(changes):
            return EXIT_OK if self.dry_run else EXIT_REFUSED
        manifest: dict[str, Any] = {
            "version": 1,
            "mode": "pre-installed" if pre_installed else "systemd",
            "installed_at": _now().isoformat(),
            "created": [],
            "modified": [],
            "directories": [],
        }
        try:
            self._apply_install(changes, manifest)
        finally:
            if manifest["created"] or manifest["modified"]:
                self._write_manifest(manifest)
        self.say("installed. Next:")
        steps = ["systemd-tmpfiles --create " + TMPFILES]
        if not pre_installed:
            steps += ["systemctl daemon-reload", "systemctl enable --now nri-qos.service"]
        self._systemd(steps)
        if runtime_changes or pre_installed:  # the runtime reads NRI settings at start only
            for rt in runtimes:
                self.say(f"  {rt.restart}")
        return EXIT_OK

    def _own(self, path: str, text: str, why: str, mode: int) -> list[Change]:
        """A file of ours: new, or replacing a different one (which uninstall restores)."""
        before = _read(self.root, path)
        if before == text.encode():
            return []
        return [Change(path, before, text.encode(), why, mode, diff=before is not None)]

    def _apply_install(self, changes: list[Change], manifest: dict[str, Any]) -> None:
        stamp = _now().strftime("%Y%m%dT%H%M%SZ")
        for change in changes:
            assert change.after is not None
            target = _at(self.root, change.path)
            manifest["directories"] += self._makedirs(target.parent)
            if change.before is not None:
                backup = f"{BACKUPS}{change.path}.{stamp}"
                manifest["directories"] += self._makedirs(_at(self.root, backup).parent)
                shutil.copy2(target, _at(self.root, backup))
                _write(target, change.after, None)
                manifest["modified"].append(
                    {"path": change.path, "backup": backup, "sha256": _sha(change.after)}
                )
            else:
                _write(target, change.after, change.mode)
                manifest["created"].append({"path": change.path, "sha256": _sha(change.after)})
            self.say(f"  wrote {change.path}")

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        path = _at(self.root, MANIFEST)
        manifest["directories"] += self._makedirs(path.parent)
        _write(path, (json.dumps(manifest, indent=2) + "\n").encode(), 0o600)

    def _makedirs(self, directory: Path) -> list[str]:
        """Create `directory` and missing parents; the ones created, as target paths."""
        missing: list[Path] = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        made = []
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            made.append("/" + str(d.relative_to(self.root)))
        return made

    # uninstall

    def uninstall(self) -> int:
        raw = _read(self.root, MANIFEST)
        if raw is None:
            raise InstallError(f"nothing to uninstall: {MANIFEST} does not exist")
        try:
            manifest = json.loads(raw)
            created = [(e["path"], e["sha256"]) for e in manifest["created"]]
            modified = [(e["path"], e["backup"], e["sha256"]) for e in manifest["modified"]]
            directories = [str(d) for d in manifest["directories"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise InstallError(f"{MANIFEST} is damaged ({exc}): revert by hand") from None
        changes: list[Change] = []
        notes: list[str] = []
        for path, sha in created:
            current = _read(self.root, path)
            if current is None:
                notes.append(f"{path} is already gone")
            elif _sha(current) != sha:
                notes.append(f"{path} changed since install: left in place")
            else:
                changes.append(Change(path, current, None, "installed by nri-qos"))
        for path, backup, sha in modified:
            current = _read(self.root, path)
            original = _read(self.root, backup)
            if original is None:
                notes.append(f"{path}: its backup {backup} is gone: left as it is")
            elif current is not None and _sha(current) != sha:
                notes.append(
                    f"{path} changed since install: left as it is; the original is {backup}"
                )
            else:
                why = "restore the original"
                mode = _mode_of(self.root, backup)
                changes.append(Change(path, current, original, why, mode, True, backup))
        self.say(f"nri-qos uninstall under {self.root} ({manifest.get('mode', '?')}):")
        self._show(changes, notes)
        if not self._consent(changes):
            return EXIT_OK if self.dry_run else EXIT_REFUSED
        if any(c.path == UNIT for c in changes):
            self._systemd(["systemctl disable --now nri-qos.service"])
        for change in changes:
            target = _at(self.root, change.path)
            if change.after is None:
                target.unlink()
                self.say(f"  removed {change.path}")
            else:
                backup = _at(self.root, change.backup)
                _write(target, change.after, None)
                shutil.copystat(backup, target)
                backup.unlink()
                self.say(f"  restored {change.path}")
        # Gone even when something was left in place: the notes above named the backups,
        # and a manifest left behind would block the next install.
        _at(self.root, MANIFEST).unlink()
        for directory in reversed(directories):
            with contextlib.suppress(OSError):  # not empty (something else is there), gone
                _at(self.root, directory).rmdir()
        if any(c.path == UNIT for c in changes):
            self._systemd(["systemctl daemon-reload"])
        self.say("uninstalled; restart the runtime if its NRI settings were restored")
        return EXIT_OK

    # both

    def _show(self, changes: list[Change], notes: list[str]) -> None:
        for change in changes:
            verb = (
                "create"
                if change.before is None
                else "remove"
                if change.after is None
                else "change"
            )
            self.say(f"  {verb} {change.path}: {change.why}")
        for change in changes:
            if change.diff:
                self.say()
                self.out.writelines(_diff(change))
        for note in notes:
            self.say(f"  note: {note}")

    def _consent(self, changes: list[Change]) -> bool:
        if not changes:
            self.say("nothing to change")
            return False
        if self.dry_run:
            self.say("dry run: nothing changed")
            return False
        if self.yes:
            return True
        if self.ask is None:
            self.say("nothing changed: not a terminal to ask; run again with --yes to apply")
            return False
        answer = self.ask("apply these changes? [y/N] ").strip().lower()
        if answer in ("y", "yes"):
            return True
        self.say("nothing changed")
        return False

    def _systemd(self, commands: list[str]) -> None:
        """Run systemd commands when installing onto this very host under a running
        systemd; otherwise (a --root, a container) list them for the operator."""
        running = self.live and Path("/run/systemd/system").is_dir()
        for command in commands:
            if not running:
                self.say(f"  {command}")
                continue
            done = subprocess.run(command.split(), capture_output=True, text=True, check=False)
            state = "ok" if done.returncode == 0 else f"failed: {done.stderr.strip()}"
            self.say(f"  {command}: {state}")


# --- small helpers -------------------------------------------------------------------------------


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _read(root: Path, path: str) -> bytes | None:
    try:
        return _at(root, path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from None


def _read_text(root: Path, path: str) -> str | None:
    raw = _read(root, path)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InstallError(f"{path} is not UTF-8 text: cannot edit it") from None


def _mode_of(root: Path, path: str) -> int:
    try:
        return _at(root, path).stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


def _write(target: Path, data: bytes, mode: int | None) -> None:
    """Replace `target` atomically; an existing file keeps its mode and owner."""
    tmp = target.with_name(f".{target.name}.nri-qos-tmp")
    try:
        old = target.stat()
    except FileNotFoundError:
        old = None
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            os.chmod(tmp, old.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, old.st_uid, old.st_gid)
        else:
            os.chmod(tmp, mode if mode is not None else 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot write {target}: {exc.strerror}") from None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _diff(change: Change) -> list[str]:
    before = (change.before or b"").decode(errors="replace").splitlines(keepends=True)
    after = (change.after or b"").decode(errors="replace").splitlines(keepends=True)
    old = "/dev/null" if change.before is None else f"a{change.path}"
    new = "/dev/null" if change.after is None else f"b{change.path}"
    lines = list(difflib.unified_diff(before, after, old, new))
    return [
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    ]
