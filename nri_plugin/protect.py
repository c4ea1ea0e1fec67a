"""The daemon's interference loop: every signal window, measure the containers on the
host thread, let the engine decide on the policy thread, and carry the decisions out.

The window (`[interference] window_ms`, 500 ms by default) is the one periodic timer of
the loop, and it only runs while a runtime is connected; nothing is sampled when no
container is planned. Which run-queue backend measures (CO-RE probe, bcc, schedstat) is
chosen once at start, and the choice with its reasons is what status shows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ebpf.runq import select_runq_source
from ebpf.signals.sampler import SignalSampler
from ebpf.watched import RunqSource, WatchedContainer
from isolation.cgroups import CgroupError
from isolation.errors import HostError, RefusedAction
from isolation.host import LinuxHost
from isolation.rdt import Resctrl
from nri_plugin.control.executor import HostExecutor
from nri_plugin.plugin import NotConnected, NriPlugin
from nri_plugin.policy.class_intents import rdt_clos_id
from nri_plugin.policy.intents import ContainerRef
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.protocol.errors import RpcError
from qos_model.signals import Availability, SignalSnapshot

log = logging.getLogger("nri_qos.protect")


@dataclass(slots=True)
class ProtectState:
    """What the views show about the loop."""

    runq_source: str = "none"
    runq_reason: str = "not started"
    windows: int = 0
    last: SignalSnapshot | None = None
    sources: dict[str, Availability] = field(default_factory=dict)


def build_sampler(
    root: Path, probe: str, resctrl: Resctrl | None, state: ProtectState
) -> SignalSampler:
    """The sampler with the best run-queue backend `probe` allows ("auto": best first)."""
    prefer = ("core", "bcc", "schedstat") if probe == "auto" else (probe, "schedstat")
    runq: RunqSource | None
    try:
        runq = select_runq_source(prefer, procfs=root / "proc")
    except Exception as exc:  # no backend at all: PSI and cpu.stat still work
        log.warning("no run-queue latency backend: %s", exc)
        runq = None
        state.runq_source, state.runq_reason = "none", str(exc)
    else:
        state.runq_source = runq.name
        state.runq_reason = runq.availability.reason
        log.info("run-queue latency from %s%s", runq.name,
                 f" ({state.runq_reason})" if state.runq_reason else "")  # fmt: skip
    return SignalSampler(root, runq=runq, resctrl=resctrl)


_Key = tuple[str, str, str | None, bool]


def watched(
    host: LinuxHost,
    refs: Sequence[tuple[ContainerRef, str | None]],
    rdt_monitor: bool = True,
    cache: dict[_Key, WatchedContainer | None] | None = None,
) -> list[WatchedContainer]:
    """The containers as collectors see them: only groups provably theirs. With
    `rdt_monitor` off ([rdt] monitor = false) there are no per-container monitoring
    groups: the class group's counters are not the container's, so none are read.
    `cache` keeps each container's resolution across windows (its cgroups_path does not
    change while it lives); entries of containers no longer listed are dropped."""
    out = []
    keys = set()
    for ref, rdt_class in refs:
        key = (ref.id, ref.cgroups_path, rdt_class, rdt_monitor)
        keys.add(key)
        if cache is not None and key in cache:
            known = cache[key]
            if known is not None:
                out.append(known)
            continue
        container = _resolve(host, ref, rdt_class, rdt_monitor)
        if cache is not None:
            cache[key] = container
        if container is not None:
            out.append(container)
    if cache is not None:
        for stale in set(cache) - keys:
            del cache[stale]
    return out


def _resolve(
    host: LinuxHost, ref: ContainerRef, rdt_class: str | None, rdt_monitor: bool
) -> WatchedContainer | None:
    dirs: dict[str, Path | None] = {}
    for key, controller in (("cgroup2_dir", ""), ("cpu_dir", "cpu"), ("memory_dir", "memory")):
        try:
            dirs[key] = host.group_dir(ref.cgroups_path, ref.id, controller)
        except (RefusedAction, CgroupError, HostError):
            dirs[key] = None
    if not any(dirs.values()):
        return None
    monitored = rdt_class is not None and rdt_monitor
    return WatchedContainer(
        id=ref.id,
        name=ref.name,
        cgroup2_dir=dirs["cgroup2_dir"],
        cpu_dir=dirs["cpu_dir"],
        memory_dir=dirs["memory_dir"],
        rdt_group=rdt_clos_id(rdt_class) if monitored and rdt_class else None,
        rdt_mon=ref.id if monitored else None,
    )


async def protection_loop(
    plugin: NriPlugin,
    policy: QosPolicy,
    host: LinuxHost,
    executor: HostExecutor,
    sampler: SignalSampler,
    window_s: float,
    state: ProtectState,
    rdt_monitor: bool = True,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    resolved: dict[_Key, WatchedContainer | None] = {}  # owned by the host thread
    while True:
        await plugin.configured.wait()
        await asyncio.sleep(window_s)
        if not plugin.configured.is_set():
            continue
        try:
            refs = await plugin.in_policy_thread(policy.engine.watch_list)
            if not refs:
                continue

            def measure(refs: list[tuple[ContainerRef, str | None]] = refs) -> SignalSnapshot:
                containers = watched(host, refs, rdt_monitor, resolved)
                return sampler.sample(containers, time.monotonic())

            snapshot = await executor.run(measure, key="signals")
            state.windows += 1
            state.last = snapshot
            state.sources = dict(snapshot.sources)
            protect = functools.partial(policy.protect, snapshot)
            intents = await plugin.decide(protect, executor.submit)
            await plugin.send_updates(intents)
            if after is not None and (intents.updates or intents.host):
                await after()
        except (NotConnected, RpcError, TimeoutError, ConnectionError) as exc:
            reraise_if_cancelled()
            log.warning("interference window: %s", exc or type(exc).__name__)
        except Exception:
            reraise_if_cancelled()
            log.exception("interference window failed; will retry")


def reraise_if_cancelled() -> None:
    """A cancel that lands while a call fails (the connection closing under a stopping
    daemon) can surface as that call's error; swallowing it would keep a loop alive
    through shutdown."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
