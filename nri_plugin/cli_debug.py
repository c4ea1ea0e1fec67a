"""`nri-qos status|ready|pods|explain|events|signals|numa|dry-run|config check`: ask a
running daemon, over its debug API, what it is doing and why.

Each command takes `--socket PATH` (default /run/nri-qos/debug.sock) and `--json` (one
JSON document; `events --follow` prints one JSON object per line). Tables are for people;
`--json` is for scripts. `config check FILE` needs no daemon.

exit codes:
  0    answered
  1    an unexpected error: the daemon failed to answer (its log has the traceback) or did
       not answer in time
  2    nothing to answer with, reported as one line saying what to do: the daemon is not
       running or its socket is elsewhere, access refused (run as root, or join the
       daemon's group), a container that matches none or several, an invalid config
       file, or a bad command line
  130  interrupted (Ctrl-C), e.g. ending `events --follow` or `signals --watch`

`ready` (the readiness probe) exits 0 when nri-qos is registered with a runtime, that
connection's Synchronize is applied and no request failed open lately, and 1 when not,
with one line saying why; 2 as above when the daemon cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from nri_plugin.debug import DEFAULT_SOCKET

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130

COMMANDS = ("status", "ready", "pods", "explain", "events", "signals", "numa", "dry-run", "config")
SPARKS = "▁▂▃▄▅▆▇█"
HISTORY = 30  # windows a sparkline shows


def add_debug_commands(subparsers: Any) -> None:
    """Add the debug commands to `nri-qos`'s subparsers."""

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=__doc__[__doc__.index("exit codes:") :],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--socket",
            type=Path,
            default=Path(DEFAULT_SOCKET),
            help=f"the daemon's debug socket (default {DEFAULT_SOCKET})",
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    command("status", "the daemon: runtime connection, policy, controllers, signal sources")
    command("ready", "exit 0 if registered with a runtime and synchronized, else 1 (a probe)")
    command("pods", "every planned container, its class, pool and CPUs")
    explain = command("explain", "one container's plan and the reason for every field")
    explain.add_argument("container", help="id or id prefix, name, or pod/container")
    events = command("events", "the decision log")
    events.add_argument("--follow", "-f", action="store_true", help="then wait for new ones")
    signals = command("signals", "the latest signals per container, detections, mitigations")
    signals.add_argument("--watch", "-w", action="store_true", help="redraw with sparklines")
    signals.add_argument("--interval", type=float, default=1.0, help="--watch: seconds")
    signals.add_argument("--count", type=int, default=0, help="--watch: stop after N draws")
    command("numa", "CPU and memory reclaimable per NUMA node")
    dry = command("dry-run", "switch host changes to dry-run (recorded, not made) or back")
    dry.add_argument("state", choices=["on", "off"])
    config = command("config", "config files: check one without a daemon")
    config.add_argument("action", choices=["check"])
    config.add_argument("file", type=Path, help="the TOML file to validate")


def add_debug_socket_option(run: argparse.ArgumentParser) -> None:
    """`nri-qos run --debug-socket PATH`, and the deprecated `--status-socket` alias."""
    run.add_argument(
        "--debug-socket",
        type=Path,
        default=None,
        help=f'serve the debug API on this unix socket (default {DEFAULT_SOCKET}; "" disables)',
    )
    run.add_argument("--status-socket", type=Path, default=None, help=argparse.SUPPRESS)


def debug_socket_of(args: argparse.Namespace) -> Path | None:
    """The debug socket `run` should serve (None: disabled), after the alias."""
    path: Path | None = args.debug_socket
    if args.status_socket is not None:
        print(
            "nri-qos: --status-socket is deprecated: it now serves the debug API; "
            "use --debug-socket",
            file=sys.stderr,
        )
        if path is None:
            path = args.status_socket
    if path is None:
        return Path(DEFAULT_SOCKET)
    return None if str(path) in ("", ".") else path


def run_debug_command(args: argparse.Namespace) -> int:
    """Run one debug command; returns the exit code (errors are printed as one line)."""
    if args.command == "config":
        return _config_check(args.file, args.json)
    from nri_plugin.debug.client import DebugClient, DebugError

    handler = _HANDLERS[args.command]
    try:
        with DebugClient(args.socket) as client:
            return handler(client, args)
    except DebugError as exc:
        print(f"nri-qos {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `nri-qos events | head`
        return EXIT_OK


# --- the commands -----------------------------------------------------------------------------


def _status(client: Any, args: argparse.Namespace) -> int:
    s = client.status()
    if args.json:
        return _print_json(to_plain(s))
    runtime = (
        f"{s.runtime_name} {s.runtime_version} (NRI {s.nri_version})" if s.runtime_name else "-"
    )
    lines = [
        f"nri-qos {s.version}: {s.connection}, runtime {runtime}, reconnects {s.reconnects}",
        f"policy  {s.policy or '-'}{'   DRY-RUN: host changes are not made' if s.dry_run else ''}",
        f"signals run queue from {s.runq_backend or '-'}"
        + (f" ({s.runq_reason})" if s.runq_reason else "")
        + f", {s.signal_windows} windows",
    ]
    for src in s.signal_sources:
        lines.append(f"  {src.kind:<16} {src.source:<10} {src.reason}")
    if s.pod_spec_roles:
        lines.append(f"roles   {s.pod_spec_roles}")
    lines.append("")
    rows = [
        (c.name, c.mode, "yes" if c.enabled else "no", str(c.applied), str(c.failed),
         str(c.refused), c.reason + (f"; last error: {c.last_error}" if c.last_error else ""))
        for c in s.controllers
    ]  # fmt: skip
    lines += _table(("CONTROLLER", "MODE", "ON", "APPLIED", "FAILED", "REFUSED", "REASON"), rows)
    ex = s.executor
    counts = ", ".join(f"{k} {v}" for k, v in sorted(ex.counts.items())) or "none yet"
    lines.append("")
    lines.append(
        f"host work: {ex.queued} queued, {ex.retries_pending} retries pending"
        + (", STALLED" if ex.stalled else "")
        + f"; {counts}"
    )
    lines += [f"  stuck {s.path} ({s.job}) for {s.seconds:.0f}s" for s in ex.stuck]
    lines += [f"  quarantined {k}: {v}" for k, v in sorted(ex.quarantined.items())]
    return _print_lines(lines)


def _ready(client: Any, args: argparse.Namespace) -> int:
    reply = client.ready()
    if args.json:
        _print_json(to_plain(reply))
    else:
        print(f"{'ready' if reply.ready else 'not ready'}: {reply.reason}")
    return EXIT_OK if reply.ready else EXIT_ERROR


def _pods(client: Any, args: argparse.Namespace) -> int:
    reply = client.containers()
    if args.json:
        return _print_json(to_plain(reply, drop=("plan_json",)))
    rows = [
        (c.pod, c.name, c.qos_class, c.pool, c.cpus or "-", c.mems or "all",
         str(c.oom_score_adj), c.id[:12])
        for c in sorted(reply.containers, key=lambda c: c.full_name)
    ]  # fmt: skip
    lines = _table(("POD", "CONTAINER", "CLASS", "POOL", "CPUS", "MEMS", "OOM", "ID"), rows)
    lines.append("")
    lines += _table(
        ("POOL", "CPUS", "WHY"), [(p.name, p.cpus or "-", p.reason) for p in reply.pools]
    )
    return _print_lines(lines)


def _explain(client: Any, args: argparse.Namespace) -> int:
    reply = client.explain(args.container)
    if args.json:
        return _print_json(to_plain(reply))
    c = reply.container
    lines = [
        f"{c.full_name}  ({c.id})",
        f"  class {c.qos_class}: {c.classification or '-'}",
        f"  pool  {c.pool}",
    ]
    values = {
        "cpus": c.cpus or "-",
        "mems": c.mems or "all",
        "cpu_shares": c.cpu_shares if c.HasField("cpu_shares") else "-",
        "oom_score_adj": c.oom_score_adj,
        "rdt_class": c.rdt_class if c.HasField("rdt_class") else "-",
        "io_weight": c.io_weight if c.HasField("io_weight") else "-",
        "net_class": c.net_class if c.HasField("net_class") else "-",
    }
    width = max(len(k) for k in c.reasons) if c.reasons else 10
    for field, reason in c.reasons.items():
        value = values.get(field, "")
        lines.append(f"  {field:<{width}} {value!s:<8} {reason}")
    for d in reply.detections:
        lines.append(f"  interference: {d.victim} {d.verdict}: {d.reason}")
    for r in reply.rungs:
        lines.append(f"  mitigation {r.rung} for {r.victim} on {', '.join(r.on) or '-'}")
    if reply.events:
        lines.append("  decisions:")
        lines += [f"    {_event_line(e)}" for e in reply.events]
    return _print_lines(lines)


def _events(client: Any, args: argparse.Namespace) -> int:
    for e in client.events(follow=args.follow):
        if args.json:
            print(json.dumps(to_plain(e)), flush=True)
        else:
            print(_event_line(e), flush=True)
    return EXIT_OK


def _signals(client: Any, args: argparse.Namespace) -> int:
    if not args.watch:
        reply = client.signals()
        if args.json:
            return _print_json(to_plain(reply))
        return _print_lines(signals_frame(reply, {}))
    history: dict[str, dict[str, deque[float]]] = {}
    last_window = -1
    draws = 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    while True:
        reply = client.signals()
        if reply.window != last_window:  # a new window: extend each container's series
            last_window = reply.window
            for c in reply.containers:
                series = history.setdefault(c.id, {"runq": deque(maxlen=HISTORY),
                                                   "psi": deque(maxlen=HISTORY)})  # fmt: skip
                series["runq"].append(c.runq_p90_us if c.HasField("runq_p90_us") else 0.0)
                series["psi"].append(c.cpu_pressure if c.HasField("cpu_pressure") else 0.0)
        if args.json:
            print(json.dumps(to_plain(reply)), flush=True)
        else:
            frame = signals_frame(reply, history)
            sys.stdout.write(clear + "\n".join(frame) + ("\n" if clear else "\n\n"))
            sys.stdout.flush()
        draws += 1
        if args.count and draws >= args.count:
            return EXIT_OK
        time.sleep(args.interval)


def signals_frame(reply: Any, history: dict[str, dict[str, deque[float]]]) -> list[str]:
    """The signals table; with `history`, a sparkline per container of run-queue p90
    and CPU pressure over the last windows."""
    lines = [
        f"window {reply.window} ({reply.window_s:.2f}s), run queue from {reply.runq_backend or '-'}"
    ]
    rows = []
    for c in reply.containers:
        series = history.get(c.id, {})
        rows.append(
            (
                c.name,
                _num(c, "runq_p90_us", "{:.0f}"),
                sparkline(series.get("runq", ())),
                _num(c, "cpu_pressure", "{:.0%}"),
                sparkline(series.get("psi", ()), top=1.0),
                _num(c, "cpu_cores", "{:.2f}"),
                _num(c, "throttled_ratio", "{:.0%}"),
            )
        )
    lines += _table(("CONTAINER", "RUNQ P90 us", "", "CPU PSI", "", "CORES", "THROTTLED"), rows)
    for d in reply.detections:
        culprits = ", ".join(f"{a.name} ({a.score:.2f})" for a in d.antagonists) or "none"
        lines.append(
            f"! {d.victim}: {d.verdict}, delay {d.delay_ms:.1f} ms > {d.threshold_ms:.1f} ms "
            f"for {d.windows} windows; blamed: {culprits}"
        )
    for r in reply.rungs:
        lines.append(f"  mitigation {r.rung} for {r.victim} on {', '.join(r.on) or '-'}")
    if not reply.containers:
        lines.append("(no signals yet: no sampling window has measured a container)")
    return lines


def sparkline(values: Iterable[float], top: float | None = None) -> str:
    """One block per value, scaled to the largest (or `top`): "▁▃█"."""
    values = list(values)
    if not values:
        return ""
    high = top if top is not None else max(values)
    if high <= 0:
        return SPARKS[0] * len(values)
    last = len(SPARKS) - 1
    return "".join(SPARKS[min(last, max(0, round(v / high * last)))] for v in values)


def _numa(client: Any, args: argparse.Namespace) -> int:
    reply = client.numa()
    if args.json:
        return _print_json(to_plain(reply))
    rows = [
        (str(n.node), n.cpus or "-", f"{n.millicores}m", f"{n.memory_bytes / (1 << 30):.1f} GiB",
         n.reason)
        for n in reply.nodes
    ]  # fmt: skip
    return _print_lines(_table(("NODE", "CPUS", "CPU", "MEMORY", "WHY"), rows))


def _dry_run(client: Any, args: argparse.Namespace) -> int:
    reply = client.set_dry_run(args.state == "on")
    if args.json:
        return _print_json(to_plain(reply))
    print(reply.message)
    return EXIT_OK


def _config_check(path: Path, as_json: bool) -> int:
    from nri_plugin.config import ConfigError, parse_config

    try:
        text = path.read_text()
        parse_config(text, str(path))
    except OSError as exc:
        error = f"cannot read {path}: {exc.strerror or exc}"
    except (ConfigError, ValueError) as exc:
        error = " ".join(str(exc).split())
    else:
        if as_json:
            return _print_json({"file": str(path), "valid": True})
        print(f"{path}: valid")
        return EXIT_OK
    if as_json:
        _print_json({"file": str(path), "valid": False, "error": error})
    else:
        print(f"nri-qos config check: {error}", file=sys.stderr)
    return EXIT_SETUP


_HANDLERS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "status": _status,
    "ready": _ready,
    "pods": _pods,
    "explain": _explain,
    "events": _events,
    "signals": _signals,
    "numa": _numa,
    "dry-run": _dry_run,
}


# --- output -----------------------------------------------------------------------------------


def to_plain(message: Any, drop: Sequence[str] = ()) -> Any:
    """A message as JSON-ready values: 64-bit integers stay numbers (protobuf's JSON
    mapping would make them strings), unset optional fields are null, enums are names."""
    from google.protobuf.descriptor import FieldDescriptor as F

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name in drop:
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vtype = field.message_type.fields_by_name["value"]
            out[field.name] = {
                k: to_plain(v) if vtype.message_type is not None else v for k, v in value.items()
            }
        elif field.is_repeated:
            out[field.name] = [to_plain(v) if field.message_type is not None else v for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        elif field.message_type is not None:
            out[field.name] = to_plain(value)
        elif field.type == F.TYPE_ENUM:
            out[field.name] = field.enum_type.values_by_number[value].name
        else:
            out[field.name] = value
    return out


def _num(message: Any, field: str, fmt: str) -> str:
    return fmt.format(getattr(message, field)) if message.HasField(field) else "-"


def _event_line(e: Any) -> str:
    when = datetime.fromtimestamp(e.time).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when} [{e.kind}] {e.subject}: {e.message}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["(none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _print_lines(lines: Iterable[str]) -> int:
    print("\n".join(lines))
    return EXIT_OK


def _print_json(value: object) -> int:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The debug commands alone (`python -m nri_plugin.cli_debug status`), until and
    besides `nri-qos` itself."""
    parser = argparse.ArgumentParser(prog="nri-qos")
    add_debug_commands(parser.add_subparsers(dest="command", required=True))
    return run_debug_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "COMMANDS",
    "add_debug_commands",
    "add_debug_socket_option",
    "debug_socket_of",
    "run_debug_command",
    "sparkline",
    "to_plain",
]
