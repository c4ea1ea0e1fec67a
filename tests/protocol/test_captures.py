"""Our codecs against real traffic from containerd 1.7.13, containerd 2.3.4 and CRI-O 1.36.3."""

from __future__ import annotations

import pytest
from google.protobuf.json_format import MessageToDict

from nri_plugin.protocol import mux, services, ttrpc, ttrpc_pb2
from nri_plugin.protocol.connection import NriConnection, RequestReceived, ResponseReceived, Role
from tests.captures import (
    SESSIONS,
    TO_PLUGIN,
    TO_RUNTIME,
    CapturedMessage,
    Session,
    has_map,
    session_id,
)


def test_all_runtimes_are_covered() -> None:
    runtimes = {s.runtime for s in SESSIONS}
    assert runtimes == {"containerd-1.7.13", "containerd-2.3.4", "cri-o-1.36.3"}
    assert len(SESSIONS) == 6


def _method_for(session: Session, index: int) -> tuple[str, str]:
    d = session.decoded[index]
    return str(d["service"]), str(d["method"])


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_every_message_decodes_like_the_reference(session: Session) -> None:
    """Envelope and payload of every recorded message decode with our schema to exactly
    what the reference decoder (upstream's api.proto) produced."""
    for i, msg in enumerate(session.messages):
        ref = session.decoded[i]
        assert msg.stream_id == ref["stream_id"]
        assert msg.conn == ref["mux_conn"]
        service, method = _method_for(session, i)
        spec = services.lookup(service, method)
        assert spec is not None, f"{service}/{method} missing from our service tables"
        if msg.ttrpc_type == ttrpc.MessageType.REQUEST:
            env = ttrpc.decode_request(
                ttrpc.Frame(msg.stream_id, ttrpc.MessageType.REQUEST, 0, msg.data)
            )
            assert (env.service, env.method) == (service, method)
            assert env.timeout_nano == ref.get("timeout_nano", 0)
            meta = {kv.key: kv.value for kv in env.metadata}
            assert meta == (ref.get("metadata") or {})
            payload_type = spec.request
            payload = env.payload
        else:
            env_r = ttrpc.decode_response(
                ttrpc.Frame(msg.stream_id, ttrpc.MessageType.RESPONSE, 0, msg.data)
            )
            if "status" in ref:
                assert MessageToDict(env_r.status) == ref["status"]
                continue
            assert not env_r.HasField("status")
            payload_type = spec.response
            payload = env_r.payload
        assert payload_type.DESCRIPTOR.full_name == ref["message_type"]
        decoded = services.decode(payload_type, payload, method)
        ours = MessageToDict(decoded, preserving_proto_field_name=True)
        expected = ref["message"]
        if session.runtime.startswith("cri-o") and method == "RegisterPlugin":
            # The reference decoder used v0.11's schema, which lacks NRI_version (field 3).
            ours.pop("NRI_version", None)
        assert ours == expected, f"message {i} ({method}) differs"


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
@pytest.mark.parametrize("direction", [TO_PLUGIN, TO_RUNTIME])
def test_connection_reassembles_records_as_read(session: Session, direction: str) -> None:
    """Feed each recorded read() as it happened (frames split across reads, several
    frames per read, messages split across mux frames) into a real NriConnection."""
    role = Role.PLUGIN if direction == TO_PLUGIN else Role.RUNTIME
    conn = NriConnection(role)
    expected = [m for m in session.messages if m.direction == direction]
    # Responses are only reported for calls we made: register the peer's calls as ours.
    calls = [m for m in session.messages if m.direction != direction and m.ttrpc_type == 1]
    for call in calls:
        if call.conn == role.call_conn:
            conn._calls.pending.add(call.stream_id)
    events = []
    for chunk in session.chunks(direction):
        events.extend(conn.receive_data(chunk))
    assert not conn.has_partial_message
    assert len(events) == len(expected)
    for event, msg in zip(events, expected, strict=True):
        assert event.stream_id == msg.stream_id
        if msg.ttrpc_type == ttrpc.MessageType.REQUEST:
            assert isinstance(event, RequestReceived)
            env = ttrpc_pb2.Request.FromString(msg.data)
            assert (event.service, event.method, event.payload) == (
                env.service,
                env.method,
                env.payload,
            )
        else:
            assert isinstance(event, ResponseReceived)


def _reencode(msg: CapturedMessage) -> bytes:
    """Encode the message again with our encoder from its decoded content."""
    if msg.ttrpc_type == ttrpc.MessageType.REQUEST:
        env = ttrpc_pb2.Request.FromString(msg.data)
        return ttrpc.encode_request(
            msg.stream_id,
            env.service,
            env.method,
            env.payload,
            env.timeout_nano,
            [(kv.key, kv.value) for kv in env.metadata],
        )
    env_r = ttrpc_pb2.Response.FromString(msg.data)
    if env_r.HasField("status"):
        return ttrpc.encode_error(msg.stream_id, env_r.status.code, env_r.status.message)
    return ttrpc.encode_response(msg.stream_id, env_r.payload)


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_envelopes_reencode_byte_for_byte(session: Session) -> None:
    for msg in session.messages:
        assert _reencode(msg) == msg.raw


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_payloads_without_maps_reencode_byte_for_byte(session: Session) -> None:
    """Protobuf content re-serialized by us equals Go's bytes wherever no map is involved
    (Go writes map entries in random order, so those are compared decoded, above)."""
    checked = 0
    for i, msg in enumerate(session.messages):
        service, method = _method_for(session, i)
        spec = services.lookup(service, method)
        assert spec is not None
        if msg.ttrpc_type == ttrpc.MessageType.REQUEST:
            payload = ttrpc_pb2.Request.FromString(msg.data).payload
            cls = spec.request
        else:
            env = ttrpc_pb2.Response.FromString(msg.data)
            if env.HasField("status"):
                continue
            payload, cls = env.payload, spec.response
        decoded = cls.FromString(payload)
        if has_map(decoded):
            continue
        assert decoded.SerializeToString() == payload, f"message {i} ({method})"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("session", SESSIONS, ids=session_id)
def test_mux_framing_matches_go_writer(session: Session) -> None:
    """Our mux encoder cuts every message into the same frames Go did (4096 + rest)."""
    for msg in session.messages:
        encoded = mux.encode_message(msg.conn, msg.raw)
        sizes = []
        pos = 0
        while pos < len(encoded):
            conn, length = mux.HEADER.unpack_from(encoded, pos)
            assert conn == msg.conn
            sizes.append(length)
            pos += mux.HEADER_SIZE + length
        assert sizes == msg.frame_sizes


def test_crio_splits_large_messages_across_frames() -> None:
    crio = [s for s in SESSIONS if s.runtime.startswith("cri-o")]
    split = [m for s in crio for m in s.messages if len(m.frame_sizes) > 1]
    assert len(split) == 12
    assert all(m.frame_sizes[0] == 4096 for m in split)
