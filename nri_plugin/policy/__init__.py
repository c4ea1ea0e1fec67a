"""The engine: pure decisions about what each container gets.

Rules of this package: no sockets, files, clocks, threads, asyncio or protobuf, and no
import of `nri_plugin.protocol`, `isolation` or `ebpf` (tests/test_layering.py checks it).
Inputs are the node topology, the config, the pods and containers the runtime reports and
signals as plain values; the output is typed `Intents` that the plumbing carries out.

Modules: `api` (the hooks a policy implements), `engine` (events in, plan + diff + intents
out), `state` (the container table), `qos` / `kube_qos` (classification), `oom` (bands),
`cpuallocator` (exclusive sets), `workload` (the planner's inputs), `dedicated` (the
dedicated pass), `cores` (core cuts), `planner` (the full plan and its building blocks),
`incremental` (the plan kept up to date per event), `plan` (the per-container plan and its
generic diff), `intents`, `numa_reclaim`, `qos_policy` (the engine behind the hooks). The
topology value lives in `qos_model`.
"""

from nri_plugin.policy.api import Observation, PolicyBase, RecordingPolicy

__all__ = ["Observation", "PolicyBase", "RecordingPolicy"]
