"""NRI's connection multiplexer (containerd/nri pkg/net/multiplex), sans-IO.

One socket carries several logical byte streams. Each frame is `u32 BE conn id`,
`u32 BE length`, then `length` bytes of that stream. There is no open/close signalling;
frames for an unknown conn id are dropped.

The sending side has a trap (docs/nri-protocol.md §2.4): Go reads a logical
connection through a 4096-byte buffer and fails with ENOMEM on a larger queued frame,
and it kills the whole mux when more than 256 frames queue up. Go's own writer sends each
ttrpc message as the first min(4096, N) bytes, then the rest in one frame; we do exactly
that, which is also what the captures show.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from nri_plugin.protocol.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size  # 8

PLUGIN_SERVICE_CONN = 1  # runtime calls the plugin's service here
RUNTIME_SERVICE_CONN = 2  # plugin calls the runtime's service here

FIRST_FRAME_MAX = 4096
# No Go writer emits more than 1<<24 bytes in one frame (v0.4.0 refuses larger writes,
# later versions split at 4 MiB + 10); anything larger is corruption, not data.
MAX_FRAME = 1 << 24


def encode_message(conn_id: int, message: bytes) -> bytes:
    """Frame one whole ttrpc message for `conn_id` the way Go's writer does."""
    if not 0 < conn_id <= 0xFFFFFFFF:
        raise LocalProtocolError(f"mux connection id {conn_id} is out of range")
    if len(message) <= FIRST_FRAME_MAX:
        return HEADER.pack(conn_id, len(message)) + message
    head, rest = message[:FIRST_FRAME_MAX], message[FIRST_FRAME_MAX:]
    if len(rest) > MAX_FRAME:
        raise LocalProtocolError(f"message of {len(message)} bytes is too large for the NRI mux")
    return b"".join(
        (HEADER.pack(conn_id, FIRST_FRAME_MAX), head, HEADER.pack(conn_id, len(rest)), rest)
    )


class MuxReader:
    """Splits the socket's byte stream into per-connection chunks as bytes arrive.

    It never waits for a whole frame: payload bytes are handed on as soon as they are
    read, so memory stays at one 8-byte header no matter how frames are cut.
    """

    def __init__(self, conn_ids: Collection[int]) -> None:
        self._conn_ids = frozenset(conn_ids)
        self._header = bytearray()
        self._conn = 0
        self._remaining = 0
        self.dropped_bytes = 0  # payload of frames for conn ids we do not serve

    @property
    def in_frame(self) -> bool:
        """True while a frame's payload is only partly received."""
        return self._remaining > 0 or bool(self._header)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        chunks: list[tuple[int, bytes]] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining == 0:
                if not self._header and end - pos >= HEADER_SIZE:  # the usual: a whole header
                    conn, remaining = HEADER.unpack_from(data, pos)
                    pos += HEADER_SIZE
                else:  # a header cut by the read: gather it
                    need = HEADER_SIZE - len(self._header)
                    self._header += data[pos : pos + need]
                    pos += min(need, end - pos)
                    if len(self._header) < HEADER_SIZE:
                        break
                    conn, remaining = HEADER.unpack(self._header)
                    self._header.clear()
                self._conn, self._remaining = conn, remaining
                if remaining > MAX_FRAME:
                    raise RemoteProtocolError(
                        f"mux frame for conn {conn} claims {remaining} bytes "
                        f"(limit {MAX_FRAME}): the stream is corrupt"
                    )
                continue
            take = min(self._remaining, end - pos)
            conn = self._conn
            if conn in self._conn_ids:
                chunk = data[pos : pos + take]
                if chunks and chunks[-1][0] == conn:
                    chunks[-1] = (conn, chunks[-1][1] + chunk)
                else:
                    chunks.append((conn, chunk))
            else:
                self.dropped_bytes += take
            pos += take
            self._remaining -= take
        return chunks
