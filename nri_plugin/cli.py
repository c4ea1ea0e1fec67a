"""The `nri-qos` command.

`run` is the daemon; `lab` runs the plugin against the embedded runtime on a machine
without containerd; `version` prints what this build speaks. A pre-installed plugin is
exec'd by the runtime with no arguments, so no subcommand means `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nri_plugin import __version__
from nri_plugin.cli_debug import COMMANDS as DEBUG_COMMANDS
from nri_plugin.cli_debug import (
    add_debug_commands,
    add_debug_socket_option,
    debug_socket_of,
    run_debug_command,
)
from nri_plugin.config import Config, ConfigError, load_config
from nri_plugin.install import add_install_commands, run_install_command
from nri_plugin.plugin import NRI_VERSION, PluginSetupError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130

RUN_EPILOG = """\
exit codes:
  0    stopped by SIGTERM/SIGINT, or (pre-installed plugin) the runtime closed its socket
  1    an unexpected internal error (a bug: the traceback is logged)
  2    a setup problem, reported (stderr, and the log) as what is wrong and how to fix
       it: bad command line, unreadable or invalid config, a [host] root without
       procfs, sysfs or cgroup mounts, an unreadable CPU topology, an unusable
       --debug-socket or log target, or (with --no-wait) no runtime socket
  130  interrupted (Ctrl-C) before the daemon was up
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nri-qos",
        description="NRI plugin that isolates containers by QoS class (containerd / CRI-O).",
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(
        "run",
        help="connect to the runtime and serve (the daemon)",
        description="Connect to the container runtime's NRI socket and serve until stopped.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--socket", type=Path, help="runtime NRI socket (default /var/run/nri/nri.sock)"
    )
    run.add_argument(
        "--config", type=Path, help="TOML config file (default /etc/nri-qos/config.toml if present)"
    )
    run.add_argument("--name", help="plugin name to register (default nri-qos)")
    run.add_argument("--index", help="two-digit plugin index (default 50)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    add_debug_socket_option(run)
    run.add_argument(
        "--metrics-address",
        help='serve Prometheus /metrics on HOST:PORT (default [metrics] address; "" off)',
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="exit with an error instead of retrying when the runtime is not there",
    )

    sub.add_parser("version", help="print version information")
    add_install_commands(sub)
    add_debug_commands(sub)

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
    lab.add_argument(
        "--scenario",
        default="pods",
        choices=["pods", "network", "interference"],
        help="pods: one pod per QoS class through the runtime; network: real traffic "
        "from containers of each class through the real HTB tree, in namespaces it creates",
    )
    lab.add_argument(
        "--duration", type=float, default=3.0, help="network: seconds of contended traffic"
    )
    lab.add_argument("--link-mbit", type=int, default=100, help="network: the shaped link")
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
    from nri_plugin import preflight
    from nri_plugin.daemon import run_daemon, setup_logging

    config = _run_config(args)
    target = setup_logging(config.log.level, config.log.target)
    if args.debug_socket is None and args.status_socket is None:
        configured = config.operations.debug.socket
        debug_socket = Path(configured) if configured else None
    else:
        debug_socket = debug_socket_of(args)
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    config_text = None
    if config_path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            config_text = config_path.read_text(encoding="utf-8")
    try:
        preflight.check_all(
            config,
            status_socket=debug_socket,
            inherited_fd=os.environ.get("NRI_PLUGIN_SOCKET"),
        )
        return asyncio.run(
            run_daemon(
                config,
                wait_for_runtime=not args.no_wait,
                debug_socket=debug_socket,
                metrics_address=args.metrics_address,
                config_text=config_text,
                config_source=str(config_path) if config_path is not None else "defaults",
            )
        )
    except (ConfigError, PluginSetupError) as exc:
        if target != "stderr":  # a runtime-launched plugin has no stderr: log it too
            logging.getLogger("nri_qos").error("cannot start: %s", exc)
        raise
    except Exception:
        logging.getLogger("nri_qos").exception("nri-qos stopped on an unexpected error")
        return EXIT_ERROR


def _cmd_version() -> int:
    print(f"nri-qos {__version__}")
    print(f"NRI protocol: speaks up to {NRI_VERSION}; runtimes with NRI v0.4.0 and newer")
    print(f"python {sys.version.split()[0]}")
    return EXIT_OK


def _cmd_lab(args: argparse.Namespace) -> int:
    if args.scenario == "interference":
        from nri_plugin.lab_interference import run_interference_lab

        return run_interference_lab(as_json=args.json)
    if args.scenario == "network":
        from nri_plugin.scenario_network import run_network_lab

        return run_network_lab(args.duration, args.link_mbit, as_json=args.json)
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
        if command in ("install", "uninstall"):
            return run_install_command(args)
        if command in DEBUG_COMMANDS:
            return run_debug_command(args)
    except (ConfigError, PluginSetupError) as exc:
        print(f"nri-qos: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
