"""The oom controller: oom_score_adj of a container's running processes.

The runtime applies oom_score_adj from the CreateContainer adjustment on NRI >= v0.7; this
controller covers the rest: runtimes older than v0.7 (PostStart, once the processes
exist), and containers that were already running when their plan was made or moved
(Synchronize after a restart, a class change on update: PostUpdate). Required: without
procfs nri-qos cannot enforce OOM bands at all.
"""

from __future__ import annotations

from isolation.host import LinuxHost
from nri_plugin.control.base import Controller, ControllerUnavailable, Mode
from nri_plugin.policy.intents import HostIntent, SetOomScoreAdj


class OomController(Controller):
    name = "oom"
    domain = SetOomScoreAdj.domain
    mode = Mode.REQUIRED

    def __init__(self, host: LinuxHost) -> None:
        self.host = host

    def start(self) -> None:
        missing = self.host.missing()
        if missing:
            raise ControllerUnavailable(missing)

    def post_start(self, intent: HostIntent) -> str:
        return self._write(intent)

    def post_update(self, intent: HostIntent) -> str:
        return self._write(intent)

    def _write(self, intent: HostIntent) -> str:
        if not isinstance(intent, SetOomScoreAdj):
            raise TypeError(f"the oom controller cannot apply {type(intent).__name__}")
        ref = intent.container
        return self.host.set_oom_score_adj(
            ref.cgroups_path, ref.id, ref.pid, intent.value, ref.name or ref.id
        )
