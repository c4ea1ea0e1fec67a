"""Fuzz inputs derived from the recorded NRI traffic (tests/data/nri-captures).

An input is the runtime -> plugin byte stream of one captured session (containerd 1.7.13,
2.3.4, CRI-O 1.36.3) with one mutation, plus the chunks `receive_data` is fed (a socket
cuts a stream anywhere). Input `i` of seed `s` depends on `(s, i)` alone: any input can be
rebuilt from its two numbers without generating the ones before it.

Three families, each a set of kinds (`KINDS`, the name is the kind):

* `wire.*` - the bytes of a whole stream: bit flips, interesting bytes, byte insertion,
  deletion and duplication, truncation, the splice of two streams, the mux and ttrpc
  header fields (length, conn id, stream id 0 / even / reused / decreasing, message type,
  flags), and two that must not change anything: another valid mux framing and another
  chunking (`FuzzInput.reference`).
* `message.*` - a captured request decoded into its nri_pb2 message, changed the way a
  confused runtime (or a hostile CRI client behind it) could change it, and encoded again:
  huge strings (1 MiB annotations), NUL bytes, unicode, cgroups paths ("..", "/",
  "/system.slice"), extreme integers, missing pod / container / linux / resources,
  duplicate and empty ids, thousands of repeated entries, unknown enum values, Katalyst
  annotations and resources at their edges, Configure fields, Synchronize split into
  chunks or `more=true` forever, and the request sequence itself (dropped, repeated,
  swapped requests, an early Shutdown).
* `protobuf.*` - the payload (or the ttrpc envelope) as bytes: random bytes, truncation,
  unknown fields, known fields with the wrong wire type, broken varints and lengths,
  invalid UTF-8 in strings, deep group nesting, bit flips; the frame around it stays valid
  so the decoder, not the framer, sees the damage.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from nri_plugin.policy.qos import (
    ANNOTATION_CPU_ENHANCEMENT,
    ANNOTATION_MEMORY_ENHANCEMENT,
    ANNOTATION_QOS_LEVEL,
)
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol import services, ttrpc_pb2
from nri_plugin.protocol.mux import MAX_FRAME
from nri_plugin.protocol.ttrpc import MAX_DATA

MUX = struct.Struct(">II")  # conn id, length
TTRPC = struct.Struct(">IIBB")  # length, stream id, type, flags
GO_FIRST_FRAME = 4096  # Go's mux writer: the first 4096 bytes of a message, then the rest
REQUEST, RESPONSE, DATA = 1, 2, 3
SERVE_CONN, CALL_CONN = 1, 2  # the plugin serves on conn 1 and calls the runtime on conn 2
KiB, MiB = 1 << 10, 1 << 20
U32 = 0xFFFFFFFF

# --- captures ----------------------------------------------------------------------------


@dataclass
class Msg:
    """One ttrpc message of a stream; `length` overrides the header's length (a lie)."""

    conn: int
    stream_id: int
    type: int
    flags: int
    body: bytes
    length: int | None = None

    def raw(self) -> bytes:
        length = len(self.body) if self.length is None else self.length
        return TTRPC.pack(length, self.stream_id, self.type, self.flags) + self.body

    def copy(self) -> Msg:
        return replace(self)


@dataclass(frozen=True)
class Capture:
    """The runtime -> plugin side of one recorded session."""

    id: str  # "<runtime>/<session>"
    reads: tuple[bytes, ...]  # the bytes as the Go plugin read them, read by read
    messages: tuple[Msg, ...]  # the ttrpc messages in them, in order

    @property
    def stream(self) -> bytes:
        return b"".join(self.reads)

    def copy_messages(self) -> list[Msg]:
        return [m.copy() for m in self.messages]


@cache
def captures() -> tuple[Capture, ...]:
    """Every recorded session, loaded once (tests.captures checks there are six)."""
    from tests.captures import SESSIONS, TO_PLUGIN

    out = []
    for session in SESSIONS:
        messages = tuple(
            Msg(m.conn, m.stream_id, m.ttrpc_type, m.flags, m.data)
            for m in session.messages
            if m.direction == TO_PLUGIN
        )
        out.append(Capture(session.id, tuple(session.chunks(TO_PLUGIN)), messages))
    return tuple(out)


# --- framing -----------------------------------------------------------------------------


def go_frames(msgs: Sequence[Msg]) -> list[tuple[int, bytes]]:
    """Mux frames as Go's writer cuts them (what the captures show)."""
    frames = []
    for m in msgs:
        raw = m.raw()
        if len(raw) <= GO_FIRST_FRAME:
            frames.append((m.conn, raw))
        else:
            frames += [(m.conn, raw[:GO_FIRST_FRAME]), (m.conn, raw[GO_FIRST_FRAME:])]
    return frames


def join_frames(
    frames: Sequence[tuple[int, bytes]], lengths: dict[int, int] | None = None
) -> bytes:
    """Mux frames as bytes; `lengths` maps a frame's index to the length its header claims."""
    lengths = lengths or {}
    return b"".join(
        MUX.pack(conn, lengths.get(k, len(payload))) + payload
        for k, (conn, payload) in enumerate(frames)
    )


def serialize(msgs: Sequence[Msg]) -> bytes:
    return join_frames(go_frames(msgs))


def frame_offsets(stream: bytes) -> list[int]:
    """Where each mux header starts, for as long as the stream parses."""
    out, pos = [], 0
    while pos + MUX.size <= len(stream):
        out.append(pos)
        _, length = MUX.unpack_from(stream, pos)
        pos += MUX.size + length
    return out


def renumber(msgs: Sequence[Msg]) -> None:
    """Give the runtime's requests the odd, increasing stream ids a correct runtime uses."""
    sid = 1
    for m in msgs:
        if m.conn == SERVE_CONN and m.type == REQUEST:
            m.stream_id = sid
            sid += 2


def request_indexes(msgs: Sequence[Msg]) -> list[int]:
    return [k for k, m in enumerate(msgs) if m.conn == SERVE_CONN and m.type == REQUEST]


@dataclass
class Decoded:
    """A captured request, decoded: the envelope, its method and the request message."""

    index: int
    envelope: ttrpc_pb2.Request
    method: services.Method
    request: Message

    def store(self, msgs: list[Msg]) -> None:
        """Encode the (changed) request back into its message."""
        self.envelope.payload = self.request.SerializeToString(deterministic=True)
        msgs[self.index].body = self.envelope.SerializeToString(deterministic=True)


def decode(msgs: Sequence[Msg], index: int) -> Decoded | None:
    env = ttrpc_pb2.Request.FromString(msgs[index].body)
    method = services.lookup(env.service, env.method)
    if method is None:
        return None
    return Decoded(index, env, method, method.request.FromString(env.payload))


def decoded_requests(msgs: Sequence[Msg], methods: Sequence[str] = ()) -> list[Decoded]:
    out = []
    for k in request_indexes(msgs):
        d = decode(msgs, k)
        if d is not None and (not methods or d.method.name in methods):
            out.append(d)
    return out


# --- the inputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzInput:
    seed: int
    index: int
    kind: str  # "<family>.<mutation>"
    capture: str  # the session it came from
    detail: str  # what was changed, for people
    chunks: tuple[bytes, ...]  # the stream, as receive_data is fed it
    # True when the stream is the capture's own messages, only framed or cut differently:
    # it must then decode to exactly the capture's events.
    reference: bool = False

    @property
    def family(self) -> str:
        return self.kind.split(".", 1)[0]

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


def chunk(rng: random.Random, data: bytes, reads: Sequence[bytes]) -> tuple[tuple[bytes, ...], str]:
    """Cut a stream the way reads could: whole, as recorded, at random, byte by byte (in a
    window of at most 2 KiB; byte-sized reads of a whole session would only cost time)."""
    mode = rng.choices(["whole", "recorded", "random", "bytes"], weights=[3, 3, 4, 2])[0]
    sizes: list[int] = []
    if mode == "whole":
        return (data,), mode
    if mode == "recorded":
        pattern = [len(r) for r in reads] or [len(data)]
        while sum(sizes) < len(data):
            sizes.append(pattern[len(sizes) % len(pattern)])
    elif mode == "random":
        small = [1, 2, 3, 7, 8, 9, 10, 11, 17, 18, 64, 4095, 4096, 4097, 4104, 65536]
        total = 0
        while total < len(data):
            size = rng.choice(small) if rng.random() < 0.3 else rng.randint(1, 16384)
            sizes.append(size)
            total += size
    else:
        start = rng.randrange(max(1, len(data)))
        window = min(2048, len(data) - start)
        sizes = [start, *(rng.choice((1, 1, 2, 3)) for _ in range(window)), len(data)]
        mode = f"bytes at {start}"
    return split_at(data, sizes), mode


def split_at(data: bytes, sizes: Sequence[int]) -> tuple[bytes, ...]:
    out, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        if size:
            out.append(data[pos : pos + size])
            pos += size
    if pos < len(data):
        out.append(data[pos:])
    return tuple(out) or (b"",)


# --- interesting values --------------------------------------------------------------------

PATHS = [
    "",
    "..",
    "/",
    "/system.slice",
    "system.slice:cri-containerd:x",
    "/system.slice/../..",
    "../../../../etc",
    "/kubepods/../../sys/fs/cgroup",
    "/proc/self/root",
    "/sys/fs/cgroup",
    "kubepods-besteffort.slice:cri-containerd:" + "a" * 64,
    "/\x00",
    "\x00",
    "//kubepods//pod1//",
    "/" + "a" * 4096,
    "/" + "/".join(["x"] * 2000),
]
UNICODE = [
    "héllo ✓",
    "🙂" * 50,
    "\u202eevil",
    "\ufeff",
    "\u0000\u0001\u001f",
    "Ω" * 1000,
    "\U0010ffff",
    "e\u0301" * 20,
    "日本語の名前",
    "\u2028\u2029",
]
STRINGS = [
    *PATHS,
    *UNICODE,
    "a\x00b",
    " ",
    "\n\t\r",
    "%s%n%x",
    "${jndi:ldap://x}",
    "-1",
    "0",
    "0-1023",
    "99999999999999999999",
    "true",
    "null",
    "[]",
    "{}",
    "NaN",
    "x" * 65536,
]
CPULISTS = [
    "",
    "0",
    "0-1",
    "0-3,8-11",
    "15",
    "16",
    "1-0",
    "-1",
    "a",
    "0-",
    ",,,",
    " 0 - 1 ",
    "0-3\n",
    "0-1023",
    "0-65535",
    "0-1000000",
    "0-99999999",  # a hundred million CPUs: a memory bomb for anyone who expands it
    "4294967295",
    "0-4294967295",
    ",".join(str(k) for k in range(0, 4000, 2)),
    "0-1," * 5000,
]
INTS = {
    FieldDescriptor.CPPTYPE_INT32: [0, 1, -1, 2, 1023, 1024, 65535, 2**31 - 1, -(2**31)],
    FieldDescriptor.CPPTYPE_UINT32: [0, 1, 2, 1024, 2**31, U32],
    FieldDescriptor.CPPTYPE_INT64: [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), -1000],
    FieldDescriptor.CPPTYPE_UINT64: [0, 1, 2, 1024, 2**63, 2**64 - 1],
}
ENUMS = [-1, 15, 16, 99, 2**31 - 1, -(2**31)]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308]
# Katalyst annotation values (nri_plugin.policy.qos): the classes, their near misses, and
# enhancement maps at the edges of what classify() accepts.
QOS_LEVELS = [
    "dedicated_cores",
    "shared_cores",
    "reclaimed_cores",
    "system_cores",
    "",
    "DEDICATED_CORES",
    "dedicated_cores\x00",
    " shared_cores",
    "bogus",
]
CPU_ENHANCEMENTS = [
    '{"numa_share":"false"}',
    '{"cpuset_pool":"batch"}',
    '{"cpuset_pool":""}',
    '{"cpuset_pool":"reclaim"}',
    '{"cpuset_pool":"../x"}',
    '{"cpuset_pool":"' + "p" * 10000 + '"}',
    '{"full_pcpus_pairing":"true"}',
    '{"numa_share":{"x":"y"}}',
    '{"numa_share":1}',
    "[" * 100000,
    '{"a":' * 50000,
    "null",
    "NaN",
    "1e400",
    '"str"',
    "{",
    "",
    json.dumps({f"k{k}": "v" for k in range(5000)}),
]
MEMORY_ENHANCEMENTS = [
    '{"numa_binding":"true"}',
    '{"numa_binding":"true","numa_exclusive":"true"}',
    '{"numa_binding":"True"}',
    '{"oom_priority":"-1000000"}',
    '{"oom_priority":"99999999999999999999"}',
    '{"oom_priority":"+-1"}',
    '{"oom_priority":"nan"}',
    '{"oom_priority":"' + "9" * 5000 + '"}',
    "[" * 100000,
    "{}",
]
CONFIG_TEXTS = [
    "",
    "garbage = [",
    "[policy]\nreserved_cpus = '0-1'\n",
    "[policy]\nreserved_cpus = '0-15'\n",
    "[policy]\nreserved_cpus = '999'\n",
    "[policy]\nreserved_cpus = '0-99999999'\n",
    "[policy]\nmin_shared_cpus = -1\n",
    "[policy]\nmin_shared_cpus = 1000\n",
    "[policy]\nshared_headroom = nan\n",
    "[policy]\nshared_headroom = inf\n",
    "[policy]\nrebalance_interval_ms = -1\n",
    "[policy]\noom_bands = { reclaimed_cores = [1000, 500] }\n",
    "[policy]\noom_bands = { bogus = [1, 2] }\n",
    "[policy]\nsystem_namespaces = [1, 2]\n",
    "[policy]\nname = 'recording'\n",
    "[plugin]\nname = 'x y'\n",
    "[host]\nroot = '/nonexistent'\n",
    "a = " + "[" * 5000 + "]" * 5000 + "\n",
    "a = {" + "b = {" * 2000 + "}" * 2001 + "\n",
    "\x00",
    "[policy]\n" + "".join(f"k{k} = {k}\n" for k in range(2000)),
]
VERSIONS = [
    "v2.3.4",
    "1.7.13",
    "v1.7.13",
    "1.36.3",
    "v0.12.2",
    "v999.999.999",
    "v1",
    "",
    "vX",
    "v-1.0.0",
    "v1.7.13-rc.1+dirty",
    "9" * 100 + ".0.0",
    "v2.3.4\x00",
    "v" + ".".join(["1"] * 5000),
]
RUNTIME_NAMES = ["containerd", "cri-o", "CRI-O", "", "x" * 1000, "containerd\x00", "podman"]


def show(value: object) -> str:
    """A value for a detail line: long strings as `'a'*N`."""
    if isinstance(value, str | bytes) and len(value) > 48:
        head = value[:12]
        return f"{head!r}..({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    return repr(value)


def huge_string(rng: random.Random, size: int) -> str:
    unit = rng.choice(["a", "\x00", "é", "/", "🙂", "0-1,"])
    return unit * max(1, size // len(unit.encode()))


# --- descriptor-driven edits ------------------------------------------------------------


@dataclass
class Site:
    """One field of one message inside a request: where a value can be put."""

    owner: Message
    field: FieldDescriptor
    path: str

    @property
    def is_map(self) -> bool:
        return _is_map(self.field)

    @property
    def cpp_type(self) -> int:
        return self.field.cpp_type


def _fields(descriptor: object) -> list[FieldDescriptor]:
    return list(descriptor.fields)  # type: ignore[attr-defined]


def _entry(fd: FieldDescriptor) -> dict[str, FieldDescriptor]:
    """The fields of a map field's entry message (key, value)."""
    assert fd.message_type is not None
    return dict(fd.message_type.fields_by_name)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def sites(msg: Message, path: str = "") -> list[Site]:
    """Every field of `msg` and of the sub-messages it holds (the first few of a list)."""
    out = []
    for fd in _fields(msg.DESCRIPTOR):
        where = f"{path}.{fd.name}" if path else fd.name
        out.append(Site(msg, fd, where))
        if fd.message_type is None or _is_map(fd):
            continue
        if fd.is_repeated:
            for k, item in enumerate(list(getattr(msg, fd.name))[:3]):
                out += sites(item, f"{where}[{k}]")
        elif msg.HasField(fd.name):
            out += sites(getattr(msg, fd.name), where)
    return out


def scalar_value(rng: random.Random, fd: FieldDescriptor) -> object:
    """An interesting value of the field's type (one that protobuf will encode)."""
    t = fd.cpp_type
    if t == FieldDescriptor.CPPTYPE_STRING:
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return rng.randbytes(rng.choice([0, 1, 16, 4096]))
        return rng.choice(STRINGS)
    if t in INTS:
        return rng.choice(INTS[t])
    if t == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.CPPTYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        return rng.choice(ENUMS + known)
    if t in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return rng.choice(FLOATS)
    raise AssertionError(f"no scalar values for {fd.full_name}")


def put(site: Site, value: object, rng: random.Random) -> str:
    """Store a scalar value at a site (into a list or map element when it is one)."""
    owner, fd = site.owner, site.field
    if site.is_map:
        entries = getattr(owner, fd.name)
        value_fd = _entry(fd)["value"]
        if value_fd.message_type is not None:
            entries[str(value)]
            return f"{site.path}[{show(value)}] = {{}}"
        key = rng.choice(sorted(entries)) if entries and rng.random() < 0.5 else rng.choice(STRINGS)
        if value_fd.cpp_type != FieldDescriptor.CPPTYPE_STRING:
            value = scalar_value(rng, value_fd)
        try:
            entries[key] = value
        except (TypeError, ValueError):
            return f"{site.path}: cannot hold {show(value)}"
        return f"{site.path}[{show(key)}] = {show(value)}"
    if fd.is_repeated:
        items = getattr(owner, fd.name)
        if len(items) and rng.random() < 0.7:
            k = rng.randrange(len(items))
            items[k] = value
            return f"{site.path}[{k}] = {show(value)}"
        items.append(value)
        return f"{site.path} += {show(value)}"
    try:
        setattr(owner, fd.name, value)
    except (TypeError, ValueError):
        return f"{site.path}: cannot hold {show(value)}"
    return f"{site.path} = {show(value)}"


def edit_site(rng: random.Random, site: Site) -> str:
    """One random edit of a site, whatever its type."""
    fd, owner = site.field, site.owner
    if site.is_map:
        entries = getattr(owner, fd.name)
        action = rng.choice(["clear", "many", "value", "value"])
        if action == "clear":
            owner.ClearField(fd.name)
            return f"{site.path} cleared"
        if action == "many":
            return fill(rng, site, rng.choice([100, 1000, 3000]))
        if _entry(fd)["value"].message_type is not None:
            entries[rng.choice(STRINGS)]
            return f"{site.path}: entry added"
        return put(site, rng.choice(STRINGS), rng)
    if fd.message_type is not None:
        if fd.is_repeated:
            items = getattr(owner, fd.name)
            action = rng.choice(["clear", "dup", "empty", "many"])
            if action == "clear" or (action == "dup" and not len(items)):
                owner.ClearField(fd.name)
                return f"{site.path} cleared"
            if action == "dup":
                items.add().CopyFrom(items[rng.randrange(len(items))])
                return f"{site.path}: an element repeated"
            if action == "empty":
                items.add()
                return f"{site.path} += {{}}"
            return fill(rng, site, rng.choice([100, 1000, 3000]))
        if owner.HasField(fd.name) and rng.random() < 0.5:
            owner.ClearField(fd.name)
            return f"{site.path} removed"
        child = getattr(owner, fd.name)
        child.SetInParent()
        inner = [s for s in sites(child, site.path) if s.field.message_type is None]
        if not inner or rng.random() < 0.3:
            child.Clear()
            return f"{site.path} = {{}}"
        return edit_site(rng, rng.choice(inner))
    if fd.is_repeated and rng.random() < 0.3:
        return fill(rng, site, rng.choice([100, 1000, 3000]))
    return put(site, scalar_value(rng, fd), rng)


def fill(rng: random.Random, site: Site, count: int) -> str:
    """Give a repeated or map field `count` entries (distinct where it has ids)."""
    owner, fd = site.owner, site.field
    items = getattr(owner, fd.name)
    if site.is_map:
        value_fd = _entry(fd)["value"]
        for k in range(count):
            key = f"fuzz.example/k{k}"
            if value_fd.message_type is not None:
                items[key]
            elif value_fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
                items[key] = f"v{k}"
            else:
                items[key] = k % 100
    elif fd.message_type is not None:
        template = items[0] if len(items) else None
        for k in range(count):
            item = items.add()
            if template is not None:
                item.CopyFrom(template)
            if "id" in item.DESCRIPTOR.fields_by_name:
                item.id = f"{getattr(item, 'id')}-fuzz{k}"  # noqa: B009
    elif fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        items.extend(f"fuzz{k}" for k in range(count))
    else:
        items.extend([1] * count)
    return f"{site.path}: {count} entries"


# --- wire mutations ------------------------------------------------------------------------

Mutated = tuple[bytes, str]


def _hot(rng: random.Random, stream: bytes) -> int:
    """A position, half the time in or just after a mux header (where the lengths are)."""
    offsets = frame_offsets(stream)
    if offsets and rng.random() < 0.5:
        return min(len(stream) - 1, rng.choice(offsets) + rng.randrange(18))
    return rng.randrange(max(1, len(stream)))


def wire_bitflip(rng: random.Random, cap: Capture) -> Mutated:
    data = bytearray(cap.stream)
    flips = rng.choice([1, 1, 2, 4, 8, 32])
    where = []
    for _ in range(flips):
        pos = _hot(rng, cap.stream)
        data[pos] ^= 1 << rng.randrange(8)
        where.append(pos)
    return bytes(data), f"{flips} bit(s) flipped at {where[:4]}"


def wire_byte_set(rng: random.Random, cap: Capture) -> Mutated:
    data = bytearray(cap.stream)
    done = []
    for _ in range(rng.randint(1, 4)):
        pos = _hot(rng, cap.stream)
        data[pos] = rng.choice([0x00, 0x01, 0x02, 0x03, 0x7F, 0x80, 0xFE, 0xFF])
        done.append((pos, data[pos]))
    return bytes(data), f"bytes set {done}"


def wire_insert(rng: random.Random, cap: Capture) -> Mutated:
    stream = cap.stream
    pos = _hot(rng, stream)
    if rng.random() < 0.5:
        piece = rng.randbytes(rng.choice([1, 2, 4, 8, 10, 64]))
    else:
        other = rng.choice(captures()).stream
        start = rng.randrange(len(other))
        piece = other[start : start + rng.choice([8, 18, 100, 512])]
    return stream[:pos] + piece + stream[pos:], f"{len(piece)} bytes inserted at {pos}"


def wire_delete(rng: random.Random, cap: Capture) -> Mutated:
    stream = cap.stream
    pos = _hot(rng, stream)
    n = rng.choice([1, 2, 4, 8, 10, 18, 64, 256, 4096])
    return stream[:pos] + stream[pos + n :], f"{n} bytes deleted at {pos}"


def wire_duplicate(rng: random.Random, cap: Capture) -> Mutated:
    stream = cap.stream
    offsets = frame_offsets(stream)
    if rng.random() < 0.5 and len(offsets) > 1:
        k = rng.randrange(len(offsets) - 1)
        start, end = offsets[k], offsets[k + 1]
        what = f"mux frame {k} sent twice"
    else:
        start = rng.randrange(len(stream))
        end = min(len(stream), start + rng.choice([1, 8, 64, 1024]))
        what = f"bytes {start}..{end} sent twice"
    return stream[:end] + stream[start:end] + stream[end:], what


def wire_truncate(rng: random.Random, cap: Capture) -> Mutated:
    stream = cap.stream
    pos = _hot(rng, stream) if rng.random() < 0.5 else rng.randrange(len(stream))
    return stream[:pos], f"truncated to {pos} of {len(stream)} bytes"


def wire_splice(rng: random.Random, cap: Capture) -> Mutated:
    other = rng.choice(captures())
    a, b = cap.stream, other.stream
    if rng.random() < 0.5:  # at mux frame boundaries: a valid mux stream of mixed sessions
        i, j = rng.choice(frame_offsets(a)), rng.choice(frame_offsets(b))
    else:
        i, j = rng.randrange(len(a)), rng.randrange(len(b))
    return a[:i] + b[j:], f"{cap.id}[:{i}] + {other.id}[{j}:]"


def wire_mux_length(rng: random.Random, cap: Capture) -> Mutated:
    frames = go_frames(cap.copy_messages())
    k = rng.randrange(len(frames))
    real = len(frames[k][1])
    claim = rng.choice(
        [0, 1, real - 1, real + 1, 2 * real, 4095, 4096, 4097, MAX_FRAME, MAX_FRAME + 1, U32]
    )
    claim = max(0, claim) if rng.random() < 0.9 else rng.randrange(U32 + 1)
    return join_frames(frames, {k: claim}), f"mux frame {k} claims {claim} bytes (has {real})"


def wire_mux_conn(rng: random.Random, cap: Capture) -> Mutated:
    frames = go_frames(cap.copy_messages())
    k = rng.randrange(len(frames))
    conn = rng.choice([0, 1, 2, 3, 4, 0x80000001, U32])
    frames[k] = (conn, frames[k][1])
    return join_frames(frames), f"mux frame {k} sent on conn {conn}"


def wire_ttrpc_length(rng: random.Random, cap: Capture) -> Mutated:
    msgs = cap.copy_messages()
    k = rng.randrange(len(msgs))
    real = len(msgs[k].body)
    claim = rng.choice(
        [0, 1, real - 1, real + 1, real + 10, MAX_DATA, MAX_DATA + 1, U32, rng.randrange(U32)]
    )
    msgs[k].length = max(0, claim)
    return serialize(msgs), f"ttrpc message {k} claims {claim} bytes (has {real})"


def wire_stream_id(rng: random.Random, cap: Capture) -> Mutated:
    msgs = cap.copy_messages()
    reqs = request_indexes(msgs)
    k = rng.choice(reqs)
    sid = msgs[k].stream_id
    earlier = [msgs[r].stream_id for r in reqs if r < k]
    how = rng.choice(["zero", "even", "reused", "decreasing", "max", "max-1", "2^31+1"])
    if how == "zero":
        new = 0
    elif how == "even":
        new = sid + 1
    elif how == "reused":
        new = rng.choice(earlier) if earlier else sid
        if not earlier:  # the first request: send it twice
            msgs.insert(k, msgs[k].copy())
    elif how == "decreasing":
        new = max(1, sid - 4) | 1
    elif how == "max":
        new = U32
    elif how == "max-1":
        new = U32 - 1
    else:
        new = 2**31 + 1
    msgs[k].stream_id = new
    return serialize(msgs), f"request {k} (stream {sid}) sent on stream {new} ({how})"


def wire_ttrpc_type(rng: random.Random, cap: Capture) -> Mutated:
    msgs = cap.copy_messages()
    k = rng.randrange(len(msgs))
    if rng.random() < 0.6:
        msgs[k].type = rng.choice([0, 1, 2, 3, 4, 0x7F, 0xFF])
        what = f"type {msgs[k].type}"
    else:
        msgs[k].flags = rng.choice([1, 2, 4, 0x80, 0xFF])
        what = f"flags {msgs[k].flags:#x}"
    return serialize(msgs), f"ttrpc message {k} sent with {what}"


def wire_reframe(rng: random.Random, cap: Capture) -> Mutated:
    """The same messages in other valid mux frames: tiny frames, empty frames, frames for
    conns nobody serves in between (dropped). Must decode to the capture's events."""
    frames: list[tuple[int, bytes]] = []
    for m in cap.messages:
        raw = m.raw()
        pos = 0
        while pos < len(raw):
            size = rng.choice([1, 2, 9, 10, 11, 100, 4096, 65536, rng.randint(1, 5000)])
            frames.append((m.conn, raw[pos : pos + size]))
            pos += size
            if rng.random() < 0.05:
                frames.append((m.conn, b""))
            if rng.random() < 0.05:
                frames.append((rng.choice([0, 3, 7, U32]), rng.randbytes(rng.randint(0, 64))))
    return join_frames(frames), f"{len(frames)} mux frames"


def wire_chunking(rng: random.Random, cap: Capture) -> Mutated:
    return cap.stream, "the recorded bytes"


# --- message mutations ---------------------------------------------------------------------

MessageMutation = Callable[[random.Random, list[Msg]], str]


def _pick(
    rng: random.Random, msgs: list[Msg], methods: Sequence[str] = (), field: str = ""
) -> Decoded:
    found = decoded_requests(msgs, methods)
    if field:
        found = [d for d in found if field in d.request.DESCRIPTOR.fields_by_name]
    return rng.choice(found or decoded_requests(msgs))


def _holders(d: Decoded, name: str) -> list[Message]:
    """The pods (name "pod") or containers of a request, wherever it keeps them."""
    req = d.request
    plural = {"pod": "pods", "container": "containers"}[name]
    if plural in req.DESCRIPTOR.fields_by_name:
        return list(getattr(req, plural))
    if name in req.DESCRIPTOR.fields_by_name:
        return [getattr(req, name)]
    return []


_WITH_OBJECTS = (
    "CreateContainer",
    "UpdateContainer",
    "StopContainer",
    "StateChange",
    "Synchronize",
    "RunPodSandbox",
    "StartContainer",
    "PostStartContainer",
    "RemoveContainer",
    "UpdatePodSandbox",
)


def _edit(d: Decoded, msgs: list[Msg], text: str) -> str:
    d.store(msgs)
    return f"{d.method.name}#{d.index}: {text}"


def msg_huge_string(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    strings = [
        s
        for s in sites(d.request)
        if s.cpp_type == FieldDescriptor.CPPTYPE_STRING and s.field.type != s.field.TYPE_BYTES
    ]
    site = rng.choice(strings)
    size = rng.choice([64 * KiB, MiB, MiB, 3 * MiB])
    return _edit(d, msgs, put(site, huge_string(rng, size), rng))


def msg_huge_annotation(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    holders = _holders(d, "pod") + _holders(d, "container")
    target = rng.choice(holders) if holders else d.request
    if "annotations" not in target.DESCRIPTOR.fields_by_name:
        return _edit(d, msgs, "nothing annotated")
    big = huge_string(rng, rng.choice([MiB, MiB, 2 * MiB]))
    key = rng.choice(
        [ANNOTATION_QOS_LEVEL, ANNOTATION_CPU_ENHANCEMENT, "harness.test/big", big[: 64 * KiB]]
    )
    value = big if rng.random() < 0.8 else "x"
    target.annotations[key] = value  # type: ignore[attr-defined]
    return _edit(d, msgs, f"annotation {show(key)} = {show(value)}")


def msg_nul_bytes(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    strings = [
        s
        for s in sites(d.request)
        if s.cpp_type == FieldDescriptor.CPPTYPE_STRING and not s.field.is_repeated
    ]
    done = []
    for site in rng.sample(strings, min(len(strings), rng.randint(1, 3))):
        old = getattr(site.owner, site.field.name)
        pos = rng.randint(0, len(old))
        done.append(put(site, old[:pos] + "\x00" + old[pos:], rng))
    return _edit(d, msgs, "; ".join(done))


def msg_cgroups_path(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    done = []
    for pod in _holders(d, "pod"):
        if rng.random() < 0.5:
            pod.linux.cgroup_parent = rng.choice(PATHS)  # type: ignore[attr-defined]
            done.append(f"pod.linux.cgroup_parent = {show(pod.linux.cgroup_parent)}")  # type: ignore[attr-defined]
        if rng.random() < 0.5:
            pod.linux.cgroups_path = rng.choice(PATHS)  # type: ignore[attr-defined]
            done.append(f"pod.linux.cgroups_path = {show(pod.linux.cgroups_path)}")  # type: ignore[attr-defined]
    for ctr in _holders(d, "container"):
        ctr.linux.cgroups_path = rng.choice(PATHS)  # type: ignore[attr-defined]
        done.append(f"container.linux.cgroups_path = {show(ctr.linux.cgroups_path)}")  # type: ignore[attr-defined]
    return _edit(d, msgs, "; ".join(done) or "no cgroups path")


_INT_TYPES = tuple(INTS)


def msg_int_extreme(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    done = []
    if rng.random() < 0.4:  # the resources the policy reads, present or not
        for ctr in _holders(d, "container"):
            res = ctr.linux.resources  # type: ignore[attr-defined]
            wrapper = rng.choice(
                [
                    res.cpu.shares,
                    res.cpu.quota,
                    res.cpu.period,
                    res.memory.limit,
                    ctr.linux.oom_score_adj,  # type: ignore[attr-defined]
                ]
            )
            wrapper.SetInParent()
            site = Site(wrapper, wrapper.DESCRIPTOR.fields_by_name["value"], "resource")
            done.append(put(site, scalar_value(rng, site.field), rng))
    ints = [s for s in sites(d.request) if s.cpp_type in _INT_TYPES and not s.is_map]
    for site in rng.sample(ints, min(len(ints), rng.randint(1, 3))):
        done.append(put(site, scalar_value(rng, site.field), rng))
    return _edit(d, msgs, "; ".join(done))


def msg_missing(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    present = [
        s
        for s in sites(d.request)
        if s.field.message_type is not None
        and not s.field.is_repeated
        and s.owner.HasField(s.field.name)
    ]
    if not present:
        return _edit(d, msgs, "nothing to remove")
    preferred = [s for s in present if s.field.name in ("pod", "container", "linux", "resources")]
    site = rng.choice(preferred if preferred and rng.random() < 0.7 else present)
    site.owner.ClearField(site.field.name)
    return _edit(d, msgs, f"{site.path} removed")


def msg_duplicate_ids(rng: random.Random, msgs: list[Msg]) -> str:
    synced = decoded_requests(msgs, ["Synchronize"])
    how = rng.choice(["sync-twice", "request-twice", "taken-id", "pod-id"])
    if how == "sync-twice" and synced:
        d = synced[0]
        req = d.request
        for name in ("pods", "containers"):
            items = getattr(req, name)
            for item in list(items)[: rng.choice([1, 2])]:
                for _ in range(rng.choice([1, 2, 50])):
                    items.add().CopyFrom(item)
        return _edit(d, msgs, "the same pods and containers listed several times")
    if how == "request-twice":
        d = _pick(rng, msgs, ["CreateContainer", "RunPodSandbox", "UpdateContainer"])
        msgs.insert(d.index + 1, msgs[d.index].copy())
        renumber(msgs)
        return f"{d.method.name}#{d.index} sent twice"
    d = _pick(rng, msgs, ["CreateContainer", "UpdateContainer", "StateChange", "StartContainer"])
    ids = [
        obj.id  # type: ignore[attr-defined]
        for s in synced
        for obj in (*_holders(s, "pod"), *_holders(s, "container"))
    ] or ["x"]
    taken = rng.choice(ids)
    done = []
    for ctr in _holders(d, "container"):
        if how == "taken-id":
            ctr.id = taken  # type: ignore[attr-defined]
            done.append(f"container.id = {taken!r}")
        else:
            ctr.pod_sandbox_id = taken  # type: ignore[attr-defined]
            done.append(f"container.pod_sandbox_id = {taken!r}")
    for pod in _holders(d, "pod"):
        if rng.random() < 0.5:
            pod.id = taken  # type: ignore[attr-defined]
            done.append(f"pod.id = {taken!r}")
    return _edit(d, msgs, "; ".join(done) or "no ids")


def msg_empty_ids(rng: random.Random, msgs: list[Msg]) -> str:
    everywhere = rng.random() < 0.3
    targets = decoded_requests(msgs, _WITH_OBJECTS) if everywhere else [_pick(rng, msgs)]
    fields = rng.sample(["id", "pod_sandbox_id", "name", "uid", "namespace"], rng.randint(1, 3))
    for d in targets:
        for obj in (*_holders(d, "pod"), *_holders(d, "container")):
            for name in fields:
                if name in obj.DESCRIPTOR.fields_by_name:
                    setattr(obj, name, "")
        d.store(msgs)
    where = "every request" if everywhere else f"{targets[0].method.name}#{targets[0].index}"
    return f"{where}: {', '.join(fields)} = ''"


def msg_unicode(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    strings = [
        s
        for s in sites(d.request)
        if s.cpp_type == FieldDescriptor.CPPTYPE_STRING and s.field.type != s.field.TYPE_BYTES
    ]
    done = [
        put(site, rng.choice(UNICODE), rng)
        for site in rng.sample(strings, min(len(strings), rng.randint(1, 5)))
    ]
    return _edit(d, msgs, "; ".join(done))


def msg_repeated_many(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    repeated = [s for s in sites(d.request) if s.field.is_repeated]
    favourites = {"containers", "pods", "annotations", "labels", "args", "env", "ips"}
    liked = [s for s in repeated if s.field.name in favourites]
    site = rng.choice(liked if liked and rng.random() < 0.6 else repeated)
    return _edit(d, msgs, fill(rng, site, rng.choice([100, 1000, 2000, 3000])))


def msg_unknown_enum(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, _WITH_OBJECTS)
    if isinstance(d.request, pb.StateChangeEvent) and rng.random() < 0.6:
        d.request.event = rng.choice([*range(16), 99, -1, 2**31 - 1])
        return _edit(d, msgs, f"event = {int(d.request.event)}")
    enums = [s for s in sites(d.request) if s.cpp_type == FieldDescriptor.CPPTYPE_ENUM]
    if not enums:
        return _edit(d, msgs, "no enum")
    site = rng.choice(enums)
    return _edit(d, msgs, put(site, rng.choice(ENUMS), rng))


def msg_sync_more_forever(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, ["Synchronize"])
    if not isinstance(d.request, pb.SynchronizeRequest):
        return _edit(d, msgs, "no Synchronize")
    chunks = rng.choice([2, 20, 300])
    keep = rng.random() < 0.5
    if not keep:
        d.request.Clear()
    d.request.more = True
    d.store(msgs)
    for _ in range(chunks - 1):
        msgs.insert(d.index, msgs[d.index].copy())
    renumber(msgs)
    content = "the captured state" if keep else "nothing"
    return f"Synchronize#{d.index}: {chunks} chunks of {content}, all more=true"


def msg_sync_split(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, ["Synchronize"])
    req = d.request
    if not isinstance(req, pb.SynchronizeRequest):
        return _edit(d, msgs, "no Synchronize")
    pods, ctrs = list(req.pods), list(req.containers)
    if not ctrs:
        return _edit(d, msgs, "no containers")
    id_size = rng.choice([0, 0, 0, 4 * KiB, MiB, 2 * MiB + 64 * KiB])
    # Big ids go one container per chunk, so that every chunk still fits in a message.
    extra = rng.choice([0, 0, 10, 500]) if id_size <= 4 * KiB else 0
    parts = rng.choice([2, 3, 4])
    pieces: list[pb.SynchronizeRequest] = []
    for k in range(parts):
        chunk_req = pb.SynchronizeRequest(more=k < parts - 1)
        if k == 0:
            chunk_req.pods.extend(pods)
        for n in range(1 + extra // parts):
            ctr = chunk_req.containers.add()
            ctr.CopyFrom(rng.choice(ctrs))
            ctr.id = f"{ctr.id}-{k}-{n}" + "i" * id_size
        pieces.append(chunk_req)
    template = msgs[d.index]
    msgs[d.index : d.index + 1] = [template.copy() for _ in pieces]
    for k, piece in enumerate(pieces):
        d.envelope.payload = piece.SerializeToString(deterministic=True)
        msgs[d.index + k].body = d.envelope.SerializeToString(deterministic=True)
    renumber(msgs)
    return (
        f"Synchronize#{d.index}: {parts} chunks, {extra} extra containers, "
        f"container ids of {id_size} bytes"
    )


def msg_katalyst(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, ["CreateContainer", "Synchronize", "UpdateContainer", "StateChange"])
    pods, ctrs = _holders(d, "pod"), _holders(d, "container")
    if not pods and not ctrs:
        return _edit(d, msgs, "no pod")
    annotations: dict[str, str] = {}
    if rng.random() < 0.8:
        annotations[ANNOTATION_QOS_LEVEL] = rng.choice(QOS_LEVELS)
    if rng.random() < 0.5:
        annotations[ANNOTATION_CPU_ENHANCEMENT] = rng.choice(CPU_ENHANCEMENTS)
    if rng.random() < 0.5:
        annotations[ANNOTATION_MEMORY_ENHANCEMENT] = rng.choice(MEMORY_ENHANCEMENTS)
    name = str(ctrs[0].name) if ctrs else "workload"  # type: ignore[attr-defined]
    scope = rng.choice(["", "", "/pod", f"/container.{name}", "/container.", "/container.x"])
    scoped = {key + scope: value for key, value in annotations.items()}
    if rng.random() < 0.2:  # the form that passes the API server
        scoped = {
            f"{key.split('/')[1]}.{key.split('/')[0]}{scope or '/pod'}": value
            for key, value in annotations.items()
        }
    for obj in pods + (ctrs if rng.random() < 0.5 else []):
        for key, value in scoped.items():
            obj.annotations[key] = value  # type: ignore[attr-defined]
    cpus = rng.choice([0, 1, 2, 3, 4, 8, 15, 16, 17, 1000, 1.5, 0.001])
    for ctr in ctrs:
        cpu = ctr.linux.resources.cpu  # type: ignore[attr-defined]
        cpu.period.value = 100_000
        cpu.quota.value = int(cpus * 100_000)
        cpu.shares.value = max(2, int(cpus * 1024))
        if rng.random() < 0.3:
            cpu.cpus = rng.choice(CPULISTS[:8])
        if rng.random() < 0.3:
            ctr.linux.oom_score_adj.value = rng.choice([-1000, -998, 0, 999, 1000, 1001])  # type: ignore[attr-defined]
    shown = ", ".join(f"{k}={show(v)}" for k, v in scoped.items())
    return _edit(d, msgs, f"{shown}; {cpus} CPUs")


def msg_resources(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, ["CreateContainer", "Synchronize", "UpdateContainer", "UpdatePodSandbox"])
    targets: list[pb.LinuxResources] = []
    for ctr in _holders(d, "container"):
        targets.append(ctr.linux.resources)  # type: ignore[attr-defined]
    for pod in _holders(d, "pod"):
        targets.append(rng.choice([pod.linux.pod_overhead, pod.linux.pod_resources]))  # type: ignore[attr-defined]
    if isinstance(d.request, pb.UpdateContainerRequest | pb.UpdatePodSandboxRequest):
        targets.append(d.request.linux_resources)
    if not targets:
        return _edit(d, msgs, "no resources")
    res = rng.choice(targets)
    res.SetInParent()
    done = []
    for _ in range(rng.randint(1, 4)):
        what = rng.choice(["cpus", "mems", "cpu", "memory", "hugepages", "unified", "pids"])
        if what in ("cpus", "mems"):
            value = rng.choice(CPULISTS)
            setattr(res.cpu, what, value)
            done.append(f"cpu.{what} = {show(value)}")
        elif what in ("cpu", "memory"):
            group = getattr(res, what)
            name = rng.choice([f.name for f in group.DESCRIPTOR.fields if f.message_type])
            wrapper = getattr(group, name)
            wrapper.SetInParent()
            site = Site(wrapper, wrapper.DESCRIPTOR.fields_by_name["value"], f"{what}.{name}")
            done.append(put(site, scalar_value(rng, site.field), rng))
        elif what == "hugepages":
            for _ in range(rng.choice([1, 100])):
                res.hugepage_limits.add(page_size=rng.choice(STRINGS), limit=rng.choice([0, U32]))
            done.append("hugepage limits")
        elif what == "unified":
            res.unified[rng.choice(["cpu.max", "memory.max", "", "../x"])] = rng.choice(STRINGS)
            done.append("unified")
        else:
            res.pids.limit = rng.choice(INTS[FieldDescriptor.CPPTYPE_INT64])
            done.append(f"pids.limit = {res.pids.limit}")
    return _edit(d, msgs, "; ".join(done))


def msg_configure(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs, ["Configure"])
    req = d.request
    if not isinstance(req, pb.ConfigureRequest):
        return _edit(d, msgs, "no Configure")
    done = []
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["name", "version", "nri", "timeouts", "config", "config"])
        if what == "name":
            req.runtime_name = rng.choice(RUNTIME_NAMES)
            done.append(f"runtime_name = {show(req.runtime_name)}")
        elif what == "version":
            req.runtime_version = rng.choice(VERSIONS)
            done.append(f"runtime_version = {show(req.runtime_version)}")
        elif what == "nri":
            req.NRI_version = rng.choice(VERSIONS)
            done.append(f"NRI_version = {show(req.NRI_version)}")
        elif what == "timeouts":
            values = INTS[FieldDescriptor.CPPTYPE_INT64]
            req.registration_timeout = rng.choice(values)
            req.request_timeout = rng.choice(values)
            done.append(f"timeouts = {req.registration_timeout}, {req.request_timeout}")
        else:
            req.config = rng.choice(CONFIG_TEXTS)
            done.append(f"config = {show(req.config)}")
    return _edit(d, msgs, "; ".join(done))


def msg_sequence(rng: random.Random, msgs: list[Msg]) -> str:
    reqs = request_indexes(msgs)
    how = rng.choice(["drop", "repeat", "swap", "configure-last", "shutdown", "twice", "reverse"])
    k = rng.choice(reqs)
    if how == "drop":
        del msgs[k]
    elif how == "repeat":
        for _ in range(rng.choice([1, 2, 10])):
            msgs.insert(k, msgs[k].copy())
    elif how == "swap" and len(reqs) > 1:
        j = rng.choice([r for r in reqs if r != k])
        msgs[k], msgs[j] = msgs[j], msgs[k]
    elif how == "configure-last":
        first = reqs[0]
        msgs.append(msgs.pop(first))
    elif how == "shutdown":
        env = ttrpc_pb2.Request(
            service=services.PLUGIN_SERVICE, method="Shutdown", payload=b"", timeout_nano=10**9
        )
        msgs.insert(k, Msg(SERVE_CONN, 0, REQUEST, 0, env.SerializeToString(deterministic=True)))
    elif how == "twice":
        msgs += [m.copy() for m in msgs if m.conn == SERVE_CONN]
    else:
        tail = [msgs[r] for r in reqs][::-1]
        msgs[:] = [m for m in msgs if m.conn != SERVE_CONN] + tail
    renumber(msgs)
    return f"requests: {how} at {k}"


def msg_generic(rng: random.Random, msgs: list[Msg]) -> str:
    d = _pick(rng, msgs)
    done = []
    for _ in range(rng.randint(1, 4)):
        all_sites = sites(d.request)
        if not all_sites:
            break
        done.append(edit_site(rng, rng.choice(all_sites)))
    return _edit(d, msgs, "; ".join(done) or "empty message")


# --- protobuf-level mutations ------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_bytes(number: int, wire_type: int, rng: random.Random) -> bytes:
    """One field of any wire type with a plausible value."""
    if wire_type == 0:
        return tag(number, 0) + varint(rng.choice([0, 1, 2**31, 2**63, 2**64 - 1]))
    if wire_type == 1:
        return tag(number, 1) + rng.randbytes(8)
    if wire_type == 2:
        value = rng.randbytes(rng.choice([0, 1, 10, 1000]))
        return tag(number, 2) + varint(len(value)) + value
    if wire_type == 5:
        return tag(number, 5) + rng.randbytes(4)
    return tag(number, 3) + tag(number, 4)  # an empty group


def nested(path: Sequence[int], leaf: bytes) -> bytes:
    """`leaf` wrapped in the length-delimited sub-messages of `path` (outermost first)."""
    for number in reversed(path):
        leaf = tag(number, 2) + varint(len(leaf)) + leaf
    return leaf


def field_paths(
    descriptor: object, want: Callable[[FieldDescriptor], bool], depth: int = 0
) -> list[list[FieldDescriptor]]:
    """Field paths from a message type down to fields `want` accepts (no maps, depth 4)."""
    out: list[list[FieldDescriptor]] = []
    for fd in descriptor.fields:  # type: ignore[attr-defined]
        if want(fd):
            out.append([fd])
        if fd.message_type is not None and not _is_map(fd) and depth < 4:
            out += [[fd, *rest] for rest in field_paths(fd.message_type, want, depth + 1)]
    return out


def _wire_type(fd: FieldDescriptor) -> int:
    if fd.message_type is not None or fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return 2
    if fd.type in (fd.TYPE_FIXED64, fd.TYPE_SFIXED64, fd.TYPE_DOUBLE):
        return 1
    if fd.type in (fd.TYPE_FIXED32, fd.TYPE_SFIXED32, fd.TYPE_FLOAT):
        return 5
    return 0


PayloadMutation = Callable[[random.Random, Decoded, bytes], tuple[bytes, str]]


def pb_random(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    n = rng.choice([1, 2, 5, 16, 100, 1000])
    return rng.randbytes(n), f"{n} random bytes"


def pb_truncated(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    if len(payload) < 2:
        return payload + b"\x0a", "a dangling tag"
    cut = rng.randrange(1, len(payload))
    return payload[:cut], f"cut at {cut} of {len(payload)} bytes"


def pb_unknown_fields(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    known = {f.number for f in d.request.DESCRIPTOR.fields}
    extra = b""
    numbers = []
    for _ in range(rng.randint(1, 5)):
        number = rng.choice([15, 99, 1000, 19999, 2**29 - 1, rng.randint(1, 2**29 - 1)])
        if number in known:
            number += 1000
        numbers.append(number)
        extra += field_bytes(number, rng.choice([0, 1, 2, 3, 5]), rng)
    at_front = rng.random() < 0.3
    return (extra + payload if at_front else payload + extra), f"unknown fields {numbers}"


def pb_wrong_wire_type(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    paths = field_paths(d.request.DESCRIPTOR, lambda fd: True)
    path = rng.choice(paths)
    leaf = path[-1]
    wrong = rng.choice([w for w in (0, 1, 2, 3, 5) if w != _wire_type(leaf)])
    data = nested([f.number for f in path[:-1]], field_bytes(leaf.number, wrong, rng))
    name = ".".join(f.name for f in path)
    return payload + data, f"{name} with wire type {wrong}"


def pb_bad_varint(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    how = rng.choice(["overlong", "unterminated", "length-past-end", "huge-length", "tag-zero"])
    number = rng.choice([f.number for f in d.request.DESCRIPTOR.fields] or [1])
    if how == "overlong":
        bad = tag(number, 0) + b"\xff" * 10 + b"\x01"
    elif how == "unterminated":
        bad = tag(number, 0) + b"\x80" * rng.choice([1, 5, 9])
    elif how == "length-past-end":
        bad = tag(number, 2) + varint(1000) + b"abc"
    elif how == "huge-length":
        bad = tag(number, 2) + varint(2**63)
    else:
        bad = b"\x00\x00"
    return payload + bad, how


def pb_bad_utf8(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    paths = field_paths(
        d.request.DESCRIPTOR,
        lambda fd: fd.type == fd.TYPE_STRING and fd.containing_type is not None,
    )
    if not paths:
        return payload + b"\xff", "no string field: a stray byte"
    path = rng.choice(paths)
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\x80", b"ok\xf8\x88\x80\x80"])
    leaf = path[-1]
    data = nested([f.number for f in path[:-1]], tag(leaf.number, 2) + varint(len(bad)) + bad)
    return payload + data, f"{'.'.join(f.name for f in path)} = {bad!r}"


def pb_deep_nesting(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    depth = rng.choice([10, 63, 64, 65, 99, 100, 101, 1000, 100_000])
    number = 2**20 + 7
    if rng.random() < 0.5:
        deep = tag(number, 3) * depth + tag(number, 4) * depth
        what = "groups"
    else:
        deep = b""
        for _ in range(min(depth, 5000)):
            deep = tag(number, 2) + varint(len(deep)) + deep
        what = "length-delimited fields"
    return payload + deep, f"unknown {what} nested {depth} deep"


def pb_flip(rng: random.Random, d: Decoded, payload: bytes) -> tuple[bytes, str]:
    if not payload:
        return b"\xff", "an empty payload became 0xff"
    data = bytearray(payload)
    for _ in range(rng.choice([1, 2, 4, 8])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data), "bits flipped in the payload"


def _with_payload(mutation: PayloadMutation) -> MessageMutation:
    def run(rng: random.Random, msgs: list[Msg]) -> str:
        d = _pick(rng, msgs)
        payload, what = mutation(rng, d, d.envelope.payload)
        d.envelope.payload = payload
        msgs[d.index].body = d.envelope.SerializeToString(deterministic=True)
        return f"{d.method.name}#{d.index} payload: {what}"

    return run


def pb_envelope(rng: random.Random, msgs: list[Msg]) -> str:
    k = rng.choice(request_indexes(msgs))
    env = ttrpc_pb2.Request.FromString(msgs[k].body)
    how = rng.choice(
        ["random", "truncated", "service", "method", "huge-method", "metadata", "timeout", "utf8"]
    )
    body: bytes | None = None
    if how == "random":
        body = rng.randbytes(rng.choice([0, 1, 10, 100]))
    elif how == "truncated":
        raw = env.SerializeToString(deterministic=True)
        body = raw[: rng.randrange(max(1, len(raw)))]
    elif how == "service":
        env.service = rng.choice(
            [services.RUNTIME_SERVICE, "", "nri.pkg.api.v1alpha1.Plugin\x00", "x" * 10000]
        )
    elif how == "method":
        env.method = rng.choice(["", "RegisterPlugin", "configure", "Configure\x00", "Nope"])
    elif how == "huge-method":
        env.service = rng.choice(["", services.PLUGIN_SERVICE, "x"])
        env.method = "M" * (MAX_DATA - len(env.payload) - rng.randrange(0, 64))
    elif how == "metadata":
        for n in range(rng.choice([1, 1000, 10000])):
            env.metadata.add(key=f"k{n}", value=rng.choice(STRINGS))
    elif how == "timeout":
        env.timeout_nano = rng.choice([1, -1, 2**63 - 1, -(2**63)])
    else:
        raw = env.SerializeToString(deterministic=True)
        body = raw + tag(2, 2) + varint(2) + b"\xff\xfe"  # method = invalid UTF-8
    msgs[k].body = env.SerializeToString(deterministic=True) if body is None else body
    return f"request {k} envelope: {how}"


# --- the registry ------------------------------------------------------------------------

WireMutation = Callable[[random.Random, Capture], Mutated]

WIRE: dict[str, WireMutation] = {
    "wire.bitflip": wire_bitflip,
    "wire.byte_set": wire_byte_set,
    "wire.insert": wire_insert,
    "wire.delete": wire_delete,
    "wire.duplicate": wire_duplicate,
    "wire.truncate": wire_truncate,
    "wire.splice": wire_splice,
    "wire.mux_length": wire_mux_length,
    "wire.mux_conn": wire_mux_conn,
    "wire.ttrpc_length": wire_ttrpc_length,
    "wire.stream_id": wire_stream_id,
    "wire.ttrpc_type": wire_ttrpc_type,
    "wire.reframe": wire_reframe,
    "wire.chunking": wire_chunking,
}
REFERENCE_KINDS = frozenset({"wire.reframe", "wire.chunking"})

MESSAGE: dict[str, MessageMutation] = {
    "message.huge_string": msg_huge_string,
    "message.huge_annotation": msg_huge_annotation,
    "message.nul_bytes": msg_nul_bytes,
    "message.cgroups_path": msg_cgroups_path,
    "message.int_extreme": msg_int_extreme,
    "message.missing": msg_missing,
    "message.duplicate_ids": msg_duplicate_ids,
    "message.empty_ids": msg_empty_ids,
    "message.unicode": msg_unicode,
    "message.repeated_many": msg_repeated_many,
    "message.unknown_enum": msg_unknown_enum,
    "message.sync_more_forever": msg_sync_more_forever,
    "message.sync_split": msg_sync_split,
    "message.katalyst": msg_katalyst,
    "message.resources": msg_resources,
    "message.configure": msg_configure,
    "message.sequence": msg_sequence,
    "message.generic": msg_generic,
    "protobuf.random_payload": _with_payload(pb_random),
    "protobuf.truncated_payload": _with_payload(pb_truncated),
    "protobuf.unknown_fields": _with_payload(pb_unknown_fields),
    "protobuf.wrong_wire_type": _with_payload(pb_wrong_wire_type),
    "protobuf.bad_varint": _with_payload(pb_bad_varint),
    "protobuf.bad_utf8": _with_payload(pb_bad_utf8),
    "protobuf.deep_nesting": _with_payload(pb_deep_nesting),
    "protobuf.payload_flip": _with_payload(pb_flip),
    "protobuf.envelope": pb_envelope,
}

KINDS: tuple[str, ...] = (*WIRE, *MESSAGE)
# Each family gets about a third of the inputs, shared evenly by its kinds.
FAMILY_SHARE = {"wire": 0.35, "message": 0.4, "protobuf": 0.25}
_FAMILY_SIZE = {f: sum(1 for k in KINDS if k.startswith(f + ".")) for f in FAMILY_SHARE}
WEIGHTS: tuple[float, ...] = tuple(
    FAMILY_SHARE[k.split(".")[0]] / _FAMILY_SIZE[k.split(".")[0]] for k in KINDS
)


def generate(seed: int, index: int, kind: str | None = None) -> FuzzInput:
    """Input `index` of `seed` (deterministic; `kind` forces the mutation)."""
    rng = random.Random(f"nri-qos-fuzz/{seed}/{index}")
    chosen = kind or rng.choices(KINDS, WEIGHTS)[0]
    cap = rng.choice(captures())
    if chosen in WIRE:
        data, detail = WIRE[chosen](rng, cap)
    else:
        msgs = cap.copy_messages()
        detail = MESSAGE[chosen](rng, msgs)
        data = serialize(msgs)
    chunks, how = chunk(rng, data, cap.reads)
    return FuzzInput(
        seed, index, chosen, cap.id, f"{detail} [{how}]", chunks, chosen in REFERENCE_KINDS
    )
