"""Policy: pure decisions about what each container gets.

Inputs are the node topology, config, the pods and containers the runtime reports and
live signals; outputs are adjustments and updates. Nothing in here touches the host.
"""

from nri_plugin.policy.api import CreateResult, Observation, PolicyBase, RecordingPolicy

__all__ = ["CreateResult", "Observation", "PolicyBase", "RecordingPolicy"]
