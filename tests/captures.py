"""Loader for the real NRI wire captures in tests/data/nri-captures.

Each session is the raw byte traffic between a Go plugin and a real runtime, recorded
read by read. This module splits it into mux frames and ttrpc messages with an
independent, deliberately naive parser (plain struct unpacking, no nri_plugin code), so
tests can check our codecs against it instead of against themselves.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from tests.conftest import CAPTURES

TO_PLUGIN = "runtime->plugin"
TO_RUNTIME = "plugin->runtime"


@dataclass
class CapturedMessage:
    direction: str
    conn: int  # mux conn id
    stream_id: int
    ttrpc_type: int
    flags: int
    data: bytes  # the ttrpc message body (envelope protobuf)
    frame_sizes: list[int] = field(default_factory=list)  # mux frame payload sizes it used

    @property
    def raw(self) -> bytes:
        """The whole ttrpc message: header + body."""
        return struct.pack(">IIBB", len(self.data), self.stream_id, self.ttrpc_type, self.flags) + (
            self.data
        )


@dataclass
class Session:
    runtime: str  # folder name, e.g. "containerd-1.7.13"
    name: str
    records: list[dict[str, object]]
    messages: list[CapturedMessage]  # in wire order per direction, interleaved by record
    decoded: list[dict[str, object]]
    steps: dict[str, object]

    def stream(self, direction: str) -> bytes:
        return b"".join(bytes.fromhex(str(r["hex"])) for r in self.records if r["dir"] == direction)

    def chunks(self, direction: str) -> list[bytes]:
        return [bytes.fromhex(str(r["hex"])) for r in self.records if r["dir"] == direction]

    @property
    def id(self) -> str:
        return f"{self.runtime}/{self.name}"


def _split(stream: bytes, direction: str) -> list[CapturedMessage]:
    """Naively parse mux frames, then ttrpc messages per conn."""
    per_conn: dict[int, bytearray] = {}
    frames_used: dict[int, list[int]] = {}
    out: list[CapturedMessage] = []
    pos = 0
    while pos < len(stream):
        conn, length = struct.unpack_from(">II", stream, pos)
        payload = stream[pos + 8 : pos + 8 + length]
        assert len(payload) == length, "capture ends inside a mux frame"
        pos += 8 + length
        buf = per_conn.setdefault(conn, bytearray())
        buf += payload
        frames_used.setdefault(conn, []).append(length)
        while len(buf) >= 10:
            dlen, sid, mtype, flags = struct.unpack_from(">IIBB", buf)
            if len(buf) < 10 + dlen:
                break
            out.append(
                CapturedMessage(
                    direction,
                    conn,
                    sid,
                    mtype,
                    flags,
                    bytes(buf[10 : 10 + dlen]),
                    frames_used.pop(conn),
                )
            )
            del buf[: 10 + dlen]
            if buf:
                frames_used[conn] = [len(buf)]
    assert all(not b for b in per_conn.values()), "capture ends inside a ttrpc message"
    return out


def load_session(folder: Path, name: str) -> Session:
    records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    decoded = [
        json.loads(line) for line in (folder / f"{name}.decoded.jsonl").read_text().splitlines()
    ]
    steps = json.loads((folder / f"{name}.steps.json").read_text())
    raw_to_plugin = b"".join(bytes.fromhex(r["hex"]) for r in records if r["dir"] == TO_PLUGIN)
    raw_to_runtime = b"".join(bytes.fromhex(r["hex"]) for r in records if r["dir"] == TO_RUNTIME)
    to_plugin = _split(raw_to_plugin, TO_PLUGIN)
    to_runtime = _split(raw_to_runtime, TO_RUNTIME)
    # Interleave in the order the decoded file lists them (it follows wire time).
    queues = {TO_PLUGIN: list(to_plugin), TO_RUNTIME: list(to_runtime)}
    ordered = [queues[str(d["dir"])].pop(0) for d in decoded]
    assert not queues[TO_PLUGIN] and not queues[TO_RUNTIME]
    return Session(folder.name, name, records, ordered, decoded, steps)


def all_sessions() -> list[Session]:
    sessions = []
    for folder in sorted(p for p in CAPTURES.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.steps.json")):
            sessions.append(load_session(folder, path.name.removesuffix(".steps.json")))
    return sessions


SESSIONS = all_sessions()
# Six recorded sessions: 2 x containerd 1.7.13, 3 x containerd 2.3.4, 1 x CRI-O 1.36.3.
assert len(SESSIONS) == 6, f"expected 6 capture sessions under {CAPTURES}, found {len(SESSIONS)}"


def session_id(session: Session) -> str:
    """A session's parametrize id, "<runtime>/<name>": `ids=session_id`."""
    return session.id


def has_map(message: Message) -> bool:
    """True when a message holds a map entry anywhere: Go writes map entries in random
    order, so such messages can only be compared decoded, not byte for byte."""
    for fd, value in message.ListFields():  # lists only non-empty fields
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            return True
        if any(has_map(v) for v in (value if fd.is_repeated else [value])):
            return True
    return False
