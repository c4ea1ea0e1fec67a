"""One NRI endpoint (plugin or runtime side) as a sans-IO state machine.

Bytes from the socket go into `receive_data`, which returns typed events; calls and
replies become bytes through `send_request` / `send_response` / `send_error`, which the
caller writes (under one write lock, so frames of two messages never interleave).

Roles: the plugin serves `nri.pkg.api.v1alpha1.Plugin` on mux conn 1 and calls the
runtime on conn 2; the runtime is the mirror image. Each direction numbers its own calls
with odd, strictly increasing stream ids per conn; a server answers a violation with
INVALID_ARGUMENT, as Go's ttrpc server does, using the same words.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from nri_plugin.protocol import mux, ttrpc
from nri_plugin.protocol.errors import (
    Code,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
)


class Role(Enum):
    PLUGIN = "plugin"
    RUNTIME = "runtime"

    @property
    def serve_conn(self) -> int:
        return mux.PLUGIN_SERVICE_CONN if self is Role.PLUGIN else mux.RUNTIME_SERVICE_CONN

    @property
    def call_conn(self) -> int:
        return mux.RUNTIME_SERVICE_CONN if self is Role.PLUGIN else mux.PLUGIN_SERVICE_CONN


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The answer to one of our calls; `code` 0 means success."""

    stream_id: int
    payload: bytes
    code: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request we must refuse without dispatching; answer it with send_error."""

    stream_id: int
    code: Code
    message: str


Event = RequestReceived | ResponseReceived | BadRequest


@dataclass(slots=True)
class ConnectionStats:
    late_responses: int = 0  # replies to calls we gave up on or never made
    ignored_frames: int = 0  # frame kinds that have no meaning in NRI (data, stray types)
    dropped_bytes: int = 0  # payload for mux conn ids nobody serves


_WHOLE_MIN = mux.HEADER_SIZE + ttrpc.HEADER_SIZE  # both headers, no data yet


@dataclass(slots=True)
class _CallSide:
    next_stream_id: int = 1
    pending: set[int] = field(default_factory=set)


class NriConnection:
    def __init__(self, role: Role) -> None:
        self.role = role
        self._serve_conn = role.serve_conn
        self._mux = mux.MuxReader((role.serve_conn, role.call_conn))
        self._serve_reader = ttrpc.FrameReader()
        self._call_reader = ttrpc.FrameReader()
        self._last_served_id = 0
        self._calls = _CallSide()
        self._error: RemoteProtocolError | None = None
        self.stats = ConnectionStats()

    # --- incoming ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the socket. Raises RemoteProtocolError on corruption;
        after that the connection is dead and every later call raises the same error."""
        if self._error is not None:
            raise self._error
        try:
            whole = self._one_whole_request(data)
            if whole is not None:
                return self._on_served_frame(whole)
            events: list[Event] = []
            for conn_id, chunk in self._mux.feed(data):
                if conn_id == self._serve_conn:
                    for frame in self._serve_reader.feed(chunk):
                        events.extend(self._on_served_frame(frame))
                else:
                    for frame in self._call_reader.feed(chunk):
                        events.extend(self._on_call_frame(frame))
            self.stats.dropped_bytes = self._mux.dropped_bytes
            return events
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _one_whole_request(self, data: bytes) -> ttrpc.Frame | None:
        """The usual read: exactly one mux frame on the conn we serve, holding exactly one
        ttrpc request, with nothing left over from earlier reads. Taken apart here in two
        header reads instead of going through both readers, with what they would give
        (tests/protocol/test_codec.py compares the two on generated reads); None
        otherwise."""
        if len(data) < _WHOLE_MIN or self._mux.in_frame or self._serve_reader.in_message:
            return None
        conn_id, length = mux.HEADER.unpack_from(data)
        if conn_id != self._serve_conn or length != len(data) - mux.HEADER_SIZE:
            return None
        size, stream_id, raw_type, flags = ttrpc.HEADER.unpack_from(data, mux.HEADER_SIZE)
        if (
            raw_type != ttrpc.MessageType.REQUEST
            or size != length - ttrpc.HEADER_SIZE
            or size > ttrpc.MAX_DATA
        ):
            return None
        return ttrpc.Frame(stream_id, ttrpc.MessageType.REQUEST, flags, data[_WHOLE_MIN:])

    @property
    def has_partial_message(self) -> bool:
        """True when the stream stopped inside a frame: EOF now means a truncated peer."""
        return self._mux.in_frame or self._serve_reader.in_message or self._call_reader.in_message

    def _on_served_frame(self, frame: ttrpc.Frame | ttrpc.OversizedFrame) -> list[Event]:
        """A frame on the conn we serve, checked in the order Go's ttrpc server does:
        an oversized message is refused before its id is looked at (Go's reader fails
        first) and consumes no id; then the id must be odd (0 is even) and increase."""
        if frame.type is not ttrpc.MessageType.REQUEST:
            self.stats.ignored_frames += 1
            return []
        sid = frame.stream_id
        if isinstance(frame, ttrpc.OversizedFrame):
            too_large = MessageTooLarge(frame.length, ttrpc.MAX_DATA)
            return [BadRequest(sid, too_large.code, str(too_large))]
        if sid % 2 == 0:
            return [BadRequest(sid, Code.INVALID_ARGUMENT, _EVEN_ID)]
        if sid <= self._last_served_id:
            return [BadRequest(sid, Code.INVALID_ARGUMENT, _REUSED_ID)]
        self._last_served_id = sid
        try:
            req = ttrpc.decode_request(frame)
        except RemoteProtocolError as exc:
            return [BadRequest(sid, Code.INVALID_ARGUMENT, str(exc))]
        return [
            RequestReceived(
                stream_id=sid,
                service=req.service,
                method=req.method,
                payload=req.payload,
                timeout_nano=req.timeout_nano,
                metadata=tuple((kv.key, kv.value) for kv in req.metadata),
            )
        ]

    def _on_call_frame(self, frame: ttrpc.Frame | ttrpc.OversizedFrame) -> list[Event]:
        if frame.type is not ttrpc.MessageType.RESPONSE:
            self.stats.ignored_frames += 1
            return []
        sid = frame.stream_id
        if sid not in self._calls.pending:
            self.stats.late_responses += 1
            return []
        self._calls.pending.discard(sid)
        if isinstance(frame, ttrpc.OversizedFrame):
            return [
                ResponseReceived(
                    sid, b"", Code.RESOURCE_EXHAUSTED, f"reply of {frame.length} bytes dropped"
                )
            ]
        resp = ttrpc.decode_response(frame)
        if resp.HasField("status") and resp.status.code != Code.OK:
            return [ResponseReceived(sid, resp.payload, resp.status.code, resp.status.message)]
        return [ResponseReceived(sid, resp.payload)]

    # --- outgoing ------------------------------------------------------------------------

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Start a call; returns its stream id and the bytes to write."""
        sid = self._calls.next_stream_id
        # Like Go's client, the id is consumed even if encoding fails below.
        self._calls.next_stream_id += 2
        message = ttrpc.encode_request(sid, service, method, payload, timeout_nano, metadata)
        self._calls.pending.add(sid)
        return sid, mux.encode_message(self.role.call_conn, message)

    def abandon(self, stream_id: int) -> None:
        """Forget a call we stopped waiting for; its late reply will be ignored."""
        self._calls.pending.discard(stream_id)

    def send_response(self, stream_id: int, payload: bytes = b"") -> bytes:
        """A successful reply. Raises MessageTooLarge when the payload does not fit a ttrpc
        message; nothing is consumed, so the caller can still answer with something else."""
        _check_stream_id(stream_id, lowest=1)
        return mux.encode_message(self.role.serve_conn, ttrpc.encode_response(stream_id, payload))

    def send_error(self, stream_id: int, code: int, message: str) -> bytes:
        """An error reply. Any id the wire can carry is allowed, 0 included: like Go's
        server we answer a refused request on the id it came with, whatever that was, so
        the peer learns which request failed and the connection stays up. A message
        longer than MAX_ERROR_MESSAGE characters is clipped, so an error reply always fits
        (the text may quote the peer's own input, e.g. a method name of megabytes)."""
        _check_stream_id(stream_id, lowest=0)
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 3] + "..."
        frame = ttrpc.encode_error(stream_id, code, message)
        return mux.encode_message(self.role.serve_conn, frame)


def _check_stream_id(stream_id: int, lowest: int) -> None:
    if not lowest <= stream_id <= 0xFFFFFFFF:
        raise LocalProtocolError(f"stream id {stream_id} is out of range")


# Error texts are for logs; this keeps every error reply far below ttrpc's 4 MiB limit.
MAX_ERROR_MESSAGE = 4096

_EVEN_ID = "StreamID must be odd for client initiated streams"
_REUSED_ID = "StreamID cannot be re-used and must increment"
