"""`nri-qos run`: wire config, policy and plugin runtime into a long-running service.

Works the same under systemd (Type=notify: READY=1 once the runtime has configured us),
as a DaemonSet container, and as a pre-installed plugin that the runtime launches with
its socket on an inherited fd (NRI_PLUGIN_SOCKET) and no stdout/stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpf.signals.sampler import SignalSampler
from isolation.errors import HostError
from isolation.host import LinuxHost
from isolation.rdt import Resctrl
from isolation.sysfs import discover_topology
from isolation.writes import HostWriter
from nri_plugin import logsafe
from nri_plugin.config import Config, parse_config
from nri_plugin.control.base import Controllers, ControllerStartError
from nri_plugin.control.evict import EvictController, EvictSettings
from nri_plugin.control.executor import HostExecutor
from nri_plugin.control.io import IoController
from nri_plugin.control.net import NetController
from nri_plugin.control.oom import OomController
from nri_plugin.control.rdt import RdtController
from nri_plugin.control.support import host_support, with_support
from nri_plugin.debug.server import start_debug_server
from nri_plugin.events import EventLog
from nri_plugin.exporter import MetricsSnapshot, NodeExporter, serve_metrics, snapshot_of
from nri_plugin.gc_pacing import IdleCollection
from nri_plugin.metrics import Metrics
from nri_plugin.plugin import NotConnected, NriPlugin, PluginSetupError
from nri_plugin.podspec import PodSpecStatus, pod_roles_loop, watch_from_settings
from nri_plugin.policy.api import PolicyBase, RecordingPolicy
from nri_plugin.policy.drift import DriftBook
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import ContainerRef
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.workload import PlannerConfigError, UsageSample
from nri_plugin.priority import restore, set_nice
from nri_plugin.protect import (
    ProtectState,
    build_sampler,
    protection_loop,
    reraise_if_cancelled,
)
from nri_plugin.protocol.errors import RpcError
from nri_plugin.reconcile import HostReader, ReconcileState, new_metrics, reconcile_loop
from nri_plugin.reporter import Reporter, ReporterUnavailable, from_numa, zone_sizes
from nri_plugin.usage import UsageMeter
from nri_plugin.watchdog import executor_health, start_watchdog
from qos_model.topology import TopologyError

log = logging.getLogger("nri_qos.daemon")

LAUNCHED_LOG_FILE = Path("/var/log/nri-qos.log")
SYSLOG_SOCKET = Path("/dev/log")


@dataclass(slots=True)
class Services:
    """What `run_daemon` composes: the policy, and for "qos" the host adapter and the
    executor that runs the controllers."""

    policy: PolicyBase
    executor: HostExecutor
    host: LinuxHost | None = None
    writer: HostWriter | None = None
    sampler: SignalSampler | None = None
    protect: ProtectState = field(default_factory=ProtectState)


def build_services(config: Config) -> Services:
    """The configured policy with its controllers ("recording" has none), controllers
    started: what they could set up decides what the engine plans."""
    events = EventLog()
    if config.policy_name == "recording":
        executor = HostExecutor(Controllers([]), events)
        executor.start()
        return Services(RecordingPolicy(), executor)
    try:
        topology = discover_topology(config.host_root)
    except (OSError, TopologyError) as exc:
        raise PluginSetupError(
            f"cannot read the CPU topology under {config.host_root}/sys/devices/system: {exc}"
        ) from None
    host = LinuxHost.at(config.host_root, dry_run=config.dry_run)
    writer = HostWriter(dry_run=config.dry_run)
    iso = config.isolation
    resctrl = Resctrl(config.host_root, writer, iso.rdt.mount)
    rdt = RdtController(resctrl, host, iso.rdt)
    io = IoController(host, config.host_root, writer, iso.io)
    net = NetController(host, writer, iso.net, config.host_root)
    ev = config.protection.evict
    eviction = config.protection.engine.eviction
    evict = EvictController(
        EvictSettings(
            enabled=eviction.enabled,
            api=ev.api,
            kubeconfig=ev.kubeconfig,
            kill_fallback=ev.kill_fallback,
            dry_run=ev.dry_run,
            owner_window_s=ev.owner_window_s,
        ),
        host,
        writer,
    )
    controllers = Controllers([OomController(host), rdt, io, net, evict])
    executor = HostExecutor(controllers, events, config.host_limits)
    try:
        executor.start()
    except ControllerStartError as exc:
        raise PluginSetupError(str(exc)) from None
    support = host_support(controllers, rdt, io)

    def runtime_config(text: str) -> EngineConfig:
        """The runtime-provided config (conf.d). Text that sets nothing (comments, blank
        tables) keeps the local config: it must not reset [policy] to the defaults."""
        parsed = parse_config(text, "runtime-provided config")
        if not _sets_anything(text):
            parsed = config
        return with_support(parsed.qos.policy, support, rdt, net)

    try:
        engine = Engine(topology, with_support(config.qos.policy, support, rdt, net))
    except PlannerConfigError as exc:
        executor.close()
        raise PluginSetupError(f"[policy] does not fit this host: {exc}") from None
    protect = ProtectState()
    sampling = config.protection.sampling
    sampler = None
    if sampling.enabled:
        readable = resctrl if rdt.ready else None
        sampler = build_sampler(config.host_root, sampling.probe, readable, protect)
    return Services(QosPolicy(engine, runtime_config), executor, host, writer, sampler, protect)


async def rebalance_loop(
    plugin: NriPlugin,
    policy: QosPolicy,
    host: LinuxHost,
    executor: HostExecutor,
    interval: float,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Sample online CPU usage every `interval` and resize the reclaimed pool.

    Which containers count comes from the engine (policy thread), their counters from the
    host thread, and the re-plan again from the policy thread, serialized with the
    runtime's events; the resulting updates go out with UpdateContainers from here,
    outside any event, as the protocol requires."""
    meter = UsageMeter()
    while True:
        await plugin.configured.wait()  # nothing to sample while no runtime is connected
        await asyncio.sleep(interval)
        if not plugin.configured.is_set():
            continue
        try:
            refs = await plugin.in_policy_thread(policy.engine.online_containers)

            def read(refs: list[ContainerRef] = refs) -> dict[str, int | None]:
                return {r.id: host.cpu_usage_ns(r.cgroups_path, r.id) for r in refs}

            counters = await executor.run(read)
            usage = UsageSample(online_cores=meter.sample(time.monotonic(), counters))
            rebalance = functools.partial(policy.rebalance, usage)
            intents = await plugin.decide(rebalance, executor.submit)
            if intents.updates:
                log.info(
                    "online usage moved the pools: updating %d container(s)",
                    len(intents.all_updates()),
                )
            await plugin.send_updates(intents)
            if after is not None:
                await after()
        except (NotConnected, RpcError, TimeoutError, ConnectionError) as exc:
            reraise_if_cancelled()
            log.warning("rebalance: %s", exc or type(exc).__name__)
        except Exception:
            reraise_if_cancelled()
            log.exception("rebalance failed; will retry")


def _sets_anything(text: str) -> bool:
    """Whether TOML text sets any key (parse errors are the caller's to report)."""

    def keys(table: dict[str, Any]) -> bool:
        return any(not isinstance(v, dict) or keys(v) for v in table.values())

    try:
        return keys(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, RecursionError):
        return True


def _group_id(name: str) -> int | None:
    """The gid of `[debug] group` (None when unset); a missing group is a setup error."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise PluginSetupError(
            f"[debug] group = {name!r} does not exist on this host; create it or unset it"
        ) from None


def launched_by_runtime() -> bool:
    return "NRI_PLUGIN_SOCKET" in os.environ


def setup_logging(level: str, target: str) -> str:
    """Log to stderr, unless the runtime launched us (it connects stderr to nothing):
    then syslog if /dev/log exists, else a file. Returns the target used.

    Every record goes through `nri_plugin.logsafe`'s filters: repeated warnings are rate
    limited and long values cut. A target that cannot be opened is a PluginSetupError."""
    if target == "auto":
        target = "stderr"
        if launched_by_runtime():
            target = "syslog" if SYSLOG_SOCKET.exists() else str(LAUNCHED_LOG_FILE)
    handler: logging.Handler
    try:
        if target == "stderr":
            handler = logging.StreamHandler(sys.stderr)
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        elif target == "syslog":
            if not SYSLOG_SOCKET.exists():  # the handler would connect lazily, and fail then
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            handler = logging.handlers.SysLogHandler(address=str(SYSLOG_SOCKET))
            fmt = "nri-qos[%(process)d]: %(levelname)s %(message)s"
        else:
            handler = logging.FileHandler(target)
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    except OSError as exc:
        where = f"{SYSLOG_SOCKET} (is syslog running?)" if target == "syslog" else target
        raise PluginSetupError(
            f"[log] target = {target!r}: cannot open {where}: {exc.strerror or exc}; "
            'choose "stderr", "syslog" or a file in an existing, writable directory'
        ) from None
    handler.setFormatter(logging.Formatter(fmt))
    logsafe.install(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return target


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (no-op when not started by a Type=notify unit)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False
    return True


async def report_status(
    plugin: NriPlugin, after_configure: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Tell systemd (STATUS=, shown by `systemctl status`) whether we serve a runtime.

    READY at once: a runtime that is down must not fail the unit's start-up. Then one
    STATUS= per change, waiting on the plugin's events in between (no polling)."""
    sd_notify("READY=1\nSTATUS=waiting for the container runtime")
    while True:
        await plugin.configured.wait()
        rt = plugin.runtime
        sd_notify(f"STATUS=serving {rt.name} {rt.version}" if rt else "STATUS=serving")
        if after_configure is not None:
            try:
                await after_configure()
            except Exception as exc:  # reporting is a courtesy to the cluster
                reraise_if_cancelled()
                log.warning("after configure: %s", exc)
        await plugin.disconnected.wait()
        sd_notify("STATUS=runtime connection lost; reconnecting")


def _child_forgets_our_signals() -> None:
    """In a forked child (pyroute2 forks one to open a netlink socket in another network
    namespace): drop the event loop's signal wakeup fd and its handlers. The child shares
    the parent's wakeup pipe, so a SIGTERM sent to the child (pyroute2 stops its helpers
    that way) would otherwise reach the parent's loop and stop the daemon."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_DFL)


_FORK_HOOK_INSTALLED = False


def install_fork_hook() -> None:
    global _FORK_HOOK_INSTALLED
    if not _FORK_HOOK_INSTALLED:
        os.register_at_fork(after_in_child=_child_forgets_our_signals)
        _FORK_HOOK_INSTALLED = True


async def _start_reporter(config: Config, policy: PolicyBase) -> Reporter | None:
    """The node reporter when [reporter] enables it; a cluster it cannot reach is one
    warning, never a reason not to serve the runtime."""
    if not config.reporter.enabled or not isinstance(policy, QosPolicy):
        return None
    zones = zone_sizes(policy.engine.topology)
    try:  # building it imports the Kubernetes client (~1 s): off the loop
        return await asyncio.to_thread(Reporter.from_settings, config.reporter, zones)
    except ReporterUnavailable as exc:
        log.warning("node reporting off: %s", exc)
        return None


def _reporting(
    plugin: NriPlugin, policy: PolicyBase, reporter: Reporter | None
) -> Callable[[], Awaitable[None]] | None:
    """After a rebalance or a signal window: hand the reporter the reclaimable resources
    (it publishes only changes, rate-limited)."""
    if reporter is None or not isinstance(policy, QosPolicy):
        return None
    engine = policy.engine

    async def report() -> None:
        values = await plugin.in_policy_thread(lambda: from_numa(engine.reclaimable()))
        reporter.update(values)

    return report


def _set_dry_run(services: Services, on: bool) -> None:
    """The debug API's dry-run switch: host changes are recorded and logged, not made."""
    if services.writer is not None:
        services.writer.dry_run = on
    if services.host is not None:
        services.host.cgroupfs.dry_run = on
        services.host.procs.dry_run = on
    log.warning("host changes are now %s", "DRY-RUN (logged, not made)" if on else "made")


def _reconcile(
    config: Config, plugin: NriPlugin, policy: QosPolicy, services: Services, metrics: Metrics
) -> Coroutine[Any, Any, None]:
    """The drift reconciliation loop ([reconcile]); its state is observed before the
    first request, so no CPU manager evidence from the request path is missed."""
    settings = config.reconcile
    assert services.host is not None
    policy.drift = DriftBook(settings.drift)
    state = ReconcileState(metrics=new_metrics(metrics.registry))
    services.executor.observe(state.observe_intents)
    reader = HostReader(
        config.host_root,
        unknown_containers=settings.unknown_containers,
        max_pids=settings.max_pids,
        cpu_manager_state=settings.cpu_manager_state,
        resctrl_mount=config.isolation.rdt.mount,
    )
    return reconcile_loop(
        plugin, policy, services.host, services.executor, reader, settings.period_s, state
    )


def _metrics_server(address: str, registry: Any) -> Any:
    """The /metrics endpoint; an address that cannot be served is one error line, never a
    reason not to serve the runtime (isolation matters more than its dashboard)."""
    try:
        return serve_metrics(address, registry)
    except PluginSetupError as exc:
        log.error("metrics not served: %s", exc)
        return None


async def run_daemon(
    config: Config,
    wait_for_runtime: bool = True,
    status_socket: Path | None = None,
    *,
    debug_socket: Path | None = None,
    metrics_address: str | None = None,
    config_text: str | None = None,
    config_source: str = "defaults",
) -> int:
    """Serve until SIGTERM/SIGINT (external) or until the inherited socket closes.

    `debug_socket`: the gRPC debug API's socket (None: none; `status_socket` is its
    deprecated name). `metrics_address`: "HOST:PORT" for /metrics ("" none; None: the
    config's). Returns 0; a problem the user must fix raises PluginSetupError."""
    install_fork_hook()
    sys.setswitchinterval(config.plugin.gil_switch_interval)  # see PluginSettings
    priority = set_nice(config.plugin.nice)  # before any thread starts: they inherit it
    if priority.warning:
        log.warning("%s", priority.warning)
    collection = IdleCollection()  # start-up frozen; the policy thread collects
    try:
        return await _serve(
            config,
            wait_for_runtime,
            debug_socket if debug_socket is not None else status_socket,
            metrics_address,
            config_text,
            config_source,
            collection,
        )
    finally:
        collection.uninstall()
        restore(priority)


async def _serve(
    config: Config,
    wait_for_runtime: bool,
    debug_socket: Path | None,
    metrics_address: str | None,
    config_text: str | None,
    config_source: str,
    collection: IdleCollection,
) -> int:
    try:
        services = build_services(config)
    except HostError as exc:
        raise PluginSetupError(
            f"the host under [host] root = {str(config.host_root)!r} cannot be used: {exc}"
        ) from None
    policy, executor = services.policy, services.executor
    metrics = Metrics()
    plugin = NriPlugin(policy, config.plugin, metrics=metrics, on_intents=executor.submit)
    loop = asyncio.get_running_loop()
    collection.install()  # everything start-up made is frozen; the policy thread collects
    plugin.policy_thread.on_idle = collection.collect_if_due

    def fresh_snapshot() -> MetricsSnapshot | None:
        """From the HTTP thread: build the snapshot in the policy thread, 2 s at most."""
        if not isinstance(policy, QosPolicy):
            return None
        build = functools.partial(snapshot_of, policy.engine, executor, services.protect, plugin)
        future = asyncio.run_coroutine_threadsafe(plugin.in_policy_thread(build), loop)
        return future.result(timeout=2.0)

    exporter = NodeExporter(metrics.registry, refresh=fresh_snapshot)
    executor.observe(exporter.observe_intents)
    address = config.operations.metrics.address if metrics_address is None else metrics_address
    metrics_server = _metrics_server(address, metrics.registry) if address else None
    # Container roles from the pod spec ([roles] pod_spec): built now for the status.
    pod_watch, pod_spec = None, PodSpecStatus(reason=f"policy {policy.name}")
    if isinstance(policy, QosPolicy):
        pod_watch, pod_spec = watch_from_settings(config.roles, os.environ)
    debug = None
    if debug_socket is not None:
        try:
            debug = await start_debug_server(
                debug_socket,
                plugin,
                policy,
                executor,
                protect=services.protect,
                config=config,
                config_text=config_text,
                config_source=config_source,
                set_dry_run=functools.partial(_set_dry_run, services),
                allowed_gid=_group_id(config.operations.debug.group),
                pod_spec=pod_spec,
            )
        except PluginSetupError:
            plugin.close()
            executor.close()
            if metrics_server is not None:
                metrics_server.close()
            raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plugin.stop)

    reporter = await _start_reporter(config, policy)
    after = _reporting(plugin, policy, reporter)
    ready = asyncio.create_task(report_status(plugin, after))
    background = [ready]
    pings = start_watchdog(sd_notify, executor_health(executor))
    if pings is not None:
        background.append(pings)
    interval = config.qos.rebalance_interval
    if isinstance(policy, QosPolicy) and services.host is not None and interval > 0:
        sampler = rebalance_loop(plugin, policy, services.host, executor, interval, after)
        background.append(asyncio.create_task(sampler))
    if isinstance(policy, QosPolicy) and services.host is not None and services.sampler:
        window = config.protection.sampling.window_s
        loop_ = protection_loop(
            plugin,
            policy,
            services.host,
            executor,
            services.sampler,
            window,
            services.protect,
            config.isolation.rdt.monitor,
            after,
        )
        background.append(asyncio.create_task(loop_))
    if isinstance(policy, QosPolicy) and services.host is not None and config.reconcile.enabled:
        reconciling = _reconcile(config, plugin, policy, services, metrics)
        background.append(asyncio.create_task(reconciling))
    if isinstance(policy, QosPolicy) and pod_watch is not None:
        watching = pod_roles_loop(plugin, policy, executor, pod_watch)
        background.append(asyncio.create_task(watching))
    try:
        if launched_by_runtime():
            fd = int(os.environ["NRI_PLUGIN_SOCKET"])
            end = await plugin.run_inherited(fd)
            log.info(
                "runtime connection closed (%s); a pre-installed plugin cannot reconnect, exiting",
                end.reason,
            )
            return 0
        await plugin.run(wait_for_runtime=wait_for_runtime)
        return 0
    finally:
        sd_notify("STOPPING=1")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if debug is not None:
            await debug.stop()
        if metrics_server is not None:
            metrics_server.close()
        if reporter is not None:
            await reporter.close()
        plugin.close()
        plugin.policy_thread.on_idle = None
        # Controllers stop off the loop: netlink libraries run their own event loop, and
        # a stop that blocks must not freeze the shutdown of everything else.
        await asyncio.to_thread(executor.close)
        if services.sampler is not None:
            services.sampler.close()
            if services.sampler.runq is not None:
                services.sampler.runq.close()
