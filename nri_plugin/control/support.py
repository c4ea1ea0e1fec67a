"""What the started controllers can do, told to the engine.

The engine never promises isolation the host cannot give: after the controllers started,
their status becomes the engine's `HostSupport` (a domain whose controller is disabled
plans None, with the controller's reason), and the levels each controller really built
(the RDT classes that got a group, the network classes) become the words in the plan's
reasons.
"""

from __future__ import annotations

from dataclasses import replace

from nri_plugin.control.base import Controllers
from nri_plugin.control.evict import EvictController
from nri_plugin.control.io import IoController
from nri_plugin.control.net import NetController
from nri_plugin.control.rdt import RdtController
from nri_plugin.policy.class_isolation import Backend, HostSupport
from nri_plugin.policy.engine import EngineConfig


def host_support(controllers: Controllers, rdt: RdtController, io: IoController) -> HostSupport:
    status = {s.domain: s for s in controllers.status()}

    def backend(domain: str) -> Backend:
        s = status.get(domain)
        if s is None:
            return Backend(False, f"no {domain} controller")
        return Backend(s.enabled, "started" if s.enabled else s.reason)

    return HostSupport(
        rdt=backend(rdt.domain),
        io=backend(io.domain),
        net=backend(NetController.domain),
        evict=backend(EvictController.domain),
        io_via_runtime=io.via_runtime,
        rdt_runtime_classes=rdt.settings.runtime_classes,
    )


def with_support(
    config: EngineConfig,
    support: HostSupport,
    rdt: RdtController,
    net: NetController | None = None,
) -> EngineConfig:
    """`config` planning only what the host supports, with the built levels described."""
    levels = config.planner.isolation
    isolation = replace(
        levels,
        rdt_limits={**levels.rdt_limits, **rdt.ready},
        rdt_degraded=dict(rdt.degraded),
        net_limits={**levels.net_limits, **(net.describe() if net is not None else {})},
        host=support,
    )
    return replace(config, planner=replace(config.planner, isolation=isolation))
