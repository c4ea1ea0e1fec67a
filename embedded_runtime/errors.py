"""Why an embedded-runtime operation failed, as exceptions a caller can tell apart.

Real runtimes turn these conditions into a failed CRI call (RunPodSandbox,
CreateContainer, ...); the embedded runtime raises instead, with the message the caller
(a test, the lab) needs to see which plugin blocked what.
"""

from __future__ import annotations

from nri_plugin.protocol.errors import Code


class EmbeddedRuntimeError(Exception):
    """Base class for every failure the embedded runtime reports."""


class UnknownObjectError(EmbeddedRuntimeError, KeyError):
    """A pod or container id the runtime does not know."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InvalidOperationError(EmbeddedRuntimeError):
    """The call makes no sense for the current state or for the emulated runtime."""


class PluginFailedOperationError(EmbeddedRuntimeError):
    """A plugin answered an event with an error status, which blocks the operation
    (docs/nri-protocol.md §3.5: CreateContainer, RunPodSandbox, StartContainer,
    UpdateContainer, UpdatePodSandbox)."""

    def __init__(self, plugin: str, method: str, code: int, message: str) -> None:
        try:
            code_name = Code(code).name
        except ValueError:
            code_name = f"code {code}"
        super().__init__(f"plugin {plugin!r} failed {method}: {code_name}: {message}")
        self.plugin = plugin
        self.method = method
        self.code = code
        self.status_message = message


class AdjustmentError(EmbeddedRuntimeError):
    """Merging the plugins' adjustments or updates failed (NRI §7.2/§7.3)."""


class OwnershipConflictError(AdjustmentError):
    """Two plugins (or one plugin twice) set the same field within one event."""

    def __init__(self, message: str, plugin: str, other: str, field: str) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.other = other
        self.field = field


class ValidationRejectedError(EmbeddedRuntimeError):
    """A validator plugin rejected (or failed to validate) a container's adjustment."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class BackendError(EmbeddedRuntimeError):
    """The container backend failed to execute an operation."""
