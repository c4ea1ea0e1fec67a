"""The `nri-qos` command.

`run` is the daemon; `lab` runs the plugin against the embedded runtime on a machine
without containerd; `version` prints what this build speaks. A pre-installed plugin is
exec'd by the runtime with no arguments, so no subcommand means `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nri_plugin import __version__
from nri_plugin.config import Config, ConfigError, load_config
from nri_plugin.plugin import NRI_VERSION, PluginSetupError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nri-qos",
        description="NRI plugin that isolates containers by QoS class (containerd / CRI-O).",
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="connect to the runtime and serve (the daemon)")
    run.add_argument(
        "--socket", type=Path, help="runtime NRI socket (default /var/run/nri/nri.sock)"
    )
    run.add_argument(
        "--config", type=Path, help="TOML config file (default /etc/nri-qos/config.toml if present)"
    )
    run.add_argument("--name", help="plugin name to register (default nri-qos)")
    run.add_argument("--index", help="two-digit plugin index (default 50)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--status-socket",
        type=Path,
        help="serve the plan and decisions as JSON on this unix socket (root only)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="exit with an error instead of retrying when the runtime is not there",
    )

    sub.add_parser("version", help="print version information")

    lab = sub.add_parser(
        "lab", help="run the plugin against the embedded runtime and show what happened"
    )
    lab.add_argument("--json", action="store_true", help="print one JSON object")
    lab.add_argument(
        "--flavor",
        default="containerd-2.3",
        choices=["containerd-1.7", "containerd-2.3", "cri-o-1.36"],
        help="which real runtime the embedded runtime behaves like",
    )
    return parser


DEFAULT_CONFIG = Path("/etc/nri-qos/config.toml")


def _run_config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = load_config(path)
    plugin = config.plugin
    overrides: dict[str, object] = {}
    if args.socket is not None:
        overrides["socket_path"] = args.socket
    if args.name:
        overrides["name"] = args.name
    if args.index:
        overrides["idx"] = args.index
    # A runtime-launched plugin's identity comes from the runtime.
    if "NRI_PLUGIN_NAME" in os.environ:
        overrides["name"] = os.environ["NRI_PLUGIN_NAME"]
    if "NRI_PLUGIN_IDX" in os.environ:
        overrides["idx"] = os.environ["NRI_PLUGIN_IDX"]
    plugin = dataclasses.replace(plugin, **overrides)  # type: ignore[arg-type]
    plugin.validate()
    log = config.log
    if args.log_level:
        log = dataclasses.replace(log, level=args.log_level)
    return dataclasses.replace(config, plugin=plugin, log=log)


def _cmd_run(args: argparse.Namespace) -> int:
    from nri_plugin.daemon import run_daemon, setup_logging

    config = _run_config(args)
    setup_logging(config.log.level, config.log.target)
    return asyncio.run(
        run_daemon(config, wait_for_runtime=not args.no_wait, status_socket=args.status_socket)
    )


def _cmd_version() -> int:
    print(f"nri-qos {__version__}")
    print(f"NRI protocol: speaks up to {NRI_VERSION}; runtimes with NRI v0.4.0 and newer")
    print(f"python {sys.version.split()[0]}")
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from nri_plugin.lab import run_lab

    return run_lab(flavor=args.flavor, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if args.command is None:  # exec'd by the runtime with no arguments
        args = _parser().parse_args(["run"])
    try:
        if command == "run":
            return _cmd_run(args)
        if command == "version":
            return _cmd_version()
        if command == "lab":
            return _cmd_lab(args)
    except (ConfigError, PluginSetupError) as exc:
        print(f"nri-qos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
