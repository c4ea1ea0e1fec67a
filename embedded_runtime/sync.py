"""Split Synchronize (NRI v0.7+) as a pure state machine (docs/nri-protocol.md §7.6).

The runtime first tries to send the whole state. When its ttrpc client refuses a message
over 4 MiB (the stream id is consumed anyway), it shrinks the number of pods and
containers per message by the ratio of the limit to the refused size (at most 0.9),
and sends the state in chunks, `more=true` on all but the last. The plugin must answer
every `more=true` chunk with `more=true` and no updates. The whole exchange shares one
deadline, which the caller enforces.

Kept faithful on purpose: when the pod count per chunk rounds down to 0 while pods
remain, the real runtime sends empty `more=true` chunks until the deadline expires. So
does this one (the caller's deadline ends it), so plugins see the real failure mode.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_OBJECTS_PER_MESSAGE = 8
MAX_SHRINK_FACTOR = 0.9


class SyncError(Exception):
    """The exchange cannot go on (message as the runtime logs it).

    `closes`: the runtime closes the connection itself (split-sync failures do on every
    version that splits); otherwise the flavor's general sync-failure rule applies.
    """

    def __init__(self, message: str, *, closes: bool = False) -> None:
        super().__init__(message)
        self.closes = closes


@dataclass(frozen=True, slots=True)
class Chunk:
    """One SynchronizeRequest: pods[pod_start:pod_end], containers[ctr_start:ctr_end]."""

    pod_start: int
    pod_end: int
    ctr_start: int
    ctr_end: int
    more: bool

    @property
    def pods(self) -> slice:
        return slice(self.pod_start, self.pod_end)

    @property
    def containers(self) -> slice:
        return slice(self.ctr_start, self.ctr_end)


class SyncSplitter:
    """Which slice of the state goes into the next SynchronizeRequest.

    Protocol: `chunk()` gives the next message; then exactly one of `oversized()` (the
    transport refused it) or `answered()` (the plugin replied). `done` becomes True after
    the final message was answered.
    """

    def __init__(self, pods: int, containers: int, *, split: bool) -> None:
        self._split = split
        self._pod_pos = 0
        self._ctr_pos = 0
        self._pods_left = pods
        self._ctrs_left = containers
        self._pods_per_msg = pods
        self._ctrs_per_msg = containers
        self.done = False
        self.messages_sent = 0
        self.refused = 0

    def chunk(self) -> Chunk:
        if self.done:
            raise SyncError("synchronization already finished")
        pods = min(self._pods_per_msg, self._pods_left)
        ctrs = min(self._ctrs_per_msg, self._ctrs_left)
        return Chunk(
            self._pod_pos,
            self._pod_pos + pods,
            self._ctr_pos,
            self._ctr_pos + ctrs,
            more=self._pods_left > pods or self._ctrs_left > ctrs,
        )

    def oversized(self, rejected_length: int, max_length: int) -> None:
        """The last chunk was too large to send: shrink the chunk size, or give up."""
        self.refused += 1
        pods, ctrs = self._pods_per_msg, self._ctrs_per_msg
        if not self._split:
            # Before v0.7 the message goes out anyway and the plugin's ttrpc refuses it.
            raise SyncError(
                f"message length {rejected_length} exceeds maximum message size of {max_length}"
            )
        if pods + ctrs <= MIN_OBJECTS_PER_MESSAGE or not 0 < max_length < rejected_length:
            raise SyncError("failed to synchronize plugin with split messages", closes=True)
        factor = min(max_length / rejected_length, MAX_SHRINK_FACTOR)
        pods, ctrs = int(pods * factor), int(ctrs * factor)
        if pods + ctrs < MIN_OBJECTS_PER_MESSAGE:
            pods = ctrs = MIN_OBJECTS_PER_MESSAGE // 2
        self._pods_per_msg, self._ctrs_per_msg = pods, ctrs

    def answered(self, more: bool, updates: int) -> bool:
        """Record the plugin's reply to the last chunk; returns True when finished."""
        sent = self.chunk()
        self.messages_sent += 1
        if not sent.more:
            self.done = True
            return True
        if updates or not more:
            raise SyncError("plugin does not handle split sync requests", closes=True)
        self._pods_left -= sent.pod_end - sent.pod_start
        self._ctrs_left -= sent.ctr_end - sent.ctr_start
        self._pod_pos, self._ctr_pos = sent.pod_end, sent.ctr_end
        self._pods_per_msg = min(self._pods_per_msg, self._pods_left)
        self._ctrs_per_msg = min(self._ctrs_per_msg, self._ctrs_left)
        return False
