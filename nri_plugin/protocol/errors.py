"""Protocol errors, split by whose fault they are (the h11 convention).

`RemoteProtocolError`: the peer sent something the protocol does not allow; the
connection is unusable and should be closed. `LocalProtocolError`: our own code tried to
send something invalid (a bug, or a message too large to send). Both carry a gRPC status
code hint so a server can answer the offending request with the right status.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """gRPC status codes as ttrpc carries them in `Status.code`."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ProtocolError(Exception):
    """Base class; `code` is the status a server would answer with."""

    def __init__(self, message: str, code: Code = Code.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (garbage, bad lengths, truncated stream)."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class MessageTooLarge(LocalProtocolError):
    """A message we built is over ttrpc's size limit, so no Go peer would accept it.

    The text is Go's (ttrpc's OversizedMessageErr), so it can go to the peer as is; the
    sizes are kept for the log line and for deciding on a smaller answer.
    """

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            f"message length {length} exceed maximum message size of {limit}",
            Code.RESOURCE_EXHAUSTED,
        )
        self.length = length
        self.limit = limit


class RpcError(Exception):
    """A call completed with a non-OK status from the peer."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = Code(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"{name}: {message}")
        self.code = code
        self.status_message = message
