"""ttrpc message framing and envelopes, sans-IO.

A ttrpc message is a 10-byte header (u32 BE data length, u32 BE stream id, u8 type,
u8 flags) followed by `length` bytes of data: a protobuf `ttrpc.Request` or
`ttrpc.Response` for the unary calls NRI makes. `FrameReader` turns a byte stream that
arrives in arbitrary pieces into whole frames with memory bounded by one frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from nri_plugin.protocol import ttrpc_pb2
from nri_plugin.protocol.errors import MessageTooLarge, RemoteProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA = 4 << 20  # ttrpc's messageLengthMax: larger frames are refused by every Go peer


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # streaming only; NRI never uses it


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: MessageType
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose length exceeded MAX_DATA; its data was skipped, not buffered.

    Go's ttrpc does the same and answers such a request with RESOURCE_EXHAUSTED, so the
    connection survives an oversized message instead of dying on it.
    """

    stream_id: int
    type: MessageType
    length: int


def encode_frame(stream_id: int, msg_type: MessageType, data: bytes, flags: int = 0) -> bytes:
    """One whole frame. Raises MessageTooLarge (a LocalProtocolError) over MAX_DATA, which
    every NRI runtime enforces, rather than send what the peer would refuse."""
    if len(data) > MAX_DATA:
        raise MessageTooLarge(len(data), MAX_DATA)
    return HEADER.pack(len(data), stream_id, msg_type, flags) + data


class FrameReader:
    """Reassembles ttrpc frames from one logical byte stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discard = 0  # bytes of an oversized frame still to skip

    @property
    def buffered(self) -> int:
        """Bytes held in memory (of a frame not yet complete)."""
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """True when the stream stopped inside a frame: one partly buffered, or an
        oversized one whose bytes are still being skipped."""
        return bool(self._buf) or self._discard > 0

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        """Add bytes; return every frame they complete (possibly none)."""
        if not self._buf and not self._discard and len(data) >= HEADER_SIZE:
            # The usual: one whole frame, read at once. Taken as it is, not buffered.
            length, stream_id, raw_type, flags = HEADER.unpack_from(data)
            msg_type = _TYPES.get(raw_type)  # an unknown one fails below, as it always has
            if msg_type is not None and length + HEADER_SIZE == len(data) and length <= MAX_DATA:
                return [Frame(stream_id, msg_type, flags, data[HEADER_SIZE:])]
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        self._buf += data
        frames: list[Frame | OversizedFrame] = []
        while not self._discard and len(self._buf) >= HEADER_SIZE:
            length, stream_id, raw_type, flags = HEADER.unpack_from(self._buf)
            msg_type = _message_type(raw_type, stream_id)
            if length > MAX_DATA:
                frames.append(OversizedFrame(stream_id, msg_type, length))
                available = len(self._buf) - HEADER_SIZE
                skipped = min(length, available)
                del self._buf[: HEADER_SIZE + skipped]
                self._discard = length - skipped
                continue
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append(Frame(stream_id, msg_type, flags, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return frames


def _message_type(raw: int, stream_id: int) -> MessageType:
    found = _TYPES.get(raw)
    if found is None:
        raise RemoteProtocolError(
            f"unknown ttrpc message type {raw:#04x} on stream {stream_id}: "
            "the peer does not speak ttrpc or the stream is corrupt"
        )
    return found


_TYPES = {int(t): t for t in MessageType}


# --- envelopes ---------------------------------------------------------------------------


def encode_request(
    stream_id: int,
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    if timeout_nano > 0:
        req.timeout_nano = timeout_nano
    for key, value in metadata:
        req.metadata.add(key=key, value=value)
    return encode_frame(stream_id, MessageType.REQUEST, req.SerializeToString())


def encode_response(stream_id: int, payload: bytes = b"") -> bytes:
    """A successful reply. Go omits `status` on success, so an empty result has no data."""
    resp = ttrpc_pb2.Response(payload=payload)
    return encode_frame(stream_id, MessageType.RESPONSE, resp.SerializeToString())


def encode_error(stream_id: int, code: int, message: str) -> bytes:
    resp = ttrpc_pb2.Response()
    resp.status.code = code
    resp.status.message = message
    return encode_frame(stream_id, MessageType.RESPONSE, resp.SerializeToString())


def decode_request(frame: Frame) -> ttrpc_pb2.Request:
    req = ttrpc_pb2.Request()
    try:
        req.ParseFromString(frame.data)
    except DecodeError as exc:
        raise RemoteProtocolError(
            f"stream {frame.stream_id}: request envelope is not valid protobuf ({exc})"
        ) from exc
    return req


def decode_response(frame: Frame) -> ttrpc_pb2.Response:
    resp = ttrpc_pb2.Response()
    try:
        resp.ParseFromString(frame.data)
    except DecodeError as exc:
        raise RemoteProtocolError(
            f"stream {frame.stream_id}: response envelope is not valid protobuf ({exc})"
        ) from exc
    return resp
