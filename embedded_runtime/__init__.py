"""An NRI runtime in Python (the containerd / CRI-O side of the protocol).

Used by the tests, the benchmarks and `nri-qos lab` to run NRI plugins on a machine
without containerd. `RuntimeFlavor` picks which real runtime to emulate; the three
captured ones are provided as constants.
"""

from embedded_runtime.backend import BackendCall, ContainerBackend, InMemoryBackend
from embedded_runtime.errors import (
    AdjustmentError,
    BackendError,
    EmbeddedRuntimeError,
    InvalidOperationError,
    OwnershipConflictError,
    PluginFailedOperationError,
    UnknownObjectError,
    ValidationRejectedError,
)
from embedded_runtime.flavor import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    CRIO_1_36,
    FLAVORS,
    RuntimeFlavor,
    UpdateScope,
)
from embedded_runtime.records import (
    ExchangeRecord,
    Outcome,
    PluginCounters,
    PluginInfo,
    PluginState,
)
from embedded_runtime.runtime import EmbeddedRuntime
from embedded_runtime.validator import REQUIRED_PLUGINS_ANNOTATION, DefaultValidatorConfig

__all__ = [
    "CONTAINERD_1_7",
    "CONTAINERD_2_3",
    "CRIO_1_36",
    "FLAVORS",
    "REQUIRED_PLUGINS_ANNOTATION",
    "AdjustmentError",
    "BackendCall",
    "BackendError",
    "ContainerBackend",
    "DefaultValidatorConfig",
    "EmbeddedRuntime",
    "EmbeddedRuntimeError",
    "ExchangeRecord",
    "InMemoryBackend",
    "InvalidOperationError",
    "Outcome",
    "OwnershipConflictError",
    "PluginCounters",
    "PluginFailedOperationError",
    "PluginInfo",
    "PluginState",
    "RuntimeFlavor",
    "UnknownObjectError",
    "UpdateScope",
    "ValidationRejectedError",
]
