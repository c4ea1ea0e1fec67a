"""ttrpc + mux codecs: Go-verified test vectors, round trips, and hostile input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nri_plugin.protocol import mux, nri_pb2, ttrpc
from nri_plugin.protocol.connection import (
    MAX_ERROR_MESSAGE,
    BadRequest,
    NriConnection,
    RequestReceived,
    ResponseReceived,
    Role,
)
from nri_plugin.protocol.errors import (
    Code,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
)
from nri_plugin.protocol.services import PLUGIN_SERVICE, RUNTIME_SERVICE


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --- Go-verified vectors (docs/nri-protocol.md §8) ----------------------------------

TV1 = h(
    "00000002 00000046 0000003c 00000001 01 00"
    "0a1c 6e72692e706b672e6170692e7631616c706861312e52756e74696d65"
    "120e 5265676973746572506c7567696e"
    "1a0c 0a066c6f67676572 12023130"
)


def test_tv1_register_plugin_frame() -> None:
    conn = NriConnection(Role.PLUGIN)
    payload = nri_pb2.RegisterPluginRequest(plugin_name="logger", plugin_idx="10")
    sid, data = conn.send_request(RUNTIME_SERVICE, "RegisterPlugin", payload.SerializeToString())
    assert sid == 1
    assert data == TV1


def test_tv1_with_deadline_uses_next_odd_stream() -> None:
    conn = NriConnection(Role.PLUGIN)
    conn.send_request(RUNTIME_SERVICE, "RegisterPlugin", b"")
    sid, data = conn.send_request(
        RUNTIME_SERVICE,
        "RegisterPlugin",
        nri_pb2.RegisterPluginRequest(plugin_name="logger", plugin_idx="10").SerializeToString(),
        timeout_nano=4_999_954_605,
    )
    assert sid == 3
    assert data.endswith(h("20 ad8195d012"))


def test_tv2_configure_request_payloads() -> None:
    old = nri_pb2.ConfigureRequest(runtime_name="containerd", runtime_version="v1.7.13")
    assert old.SerializeToString() == h("120a636f6e7461696e657264 1a0776312e372e3133")
    new = nri_pb2.ConfigureRequest(
        runtime_name="containerd",
        runtime_version="v2.3.0",
        registration_timeout=5000,
        request_timeout=2000,
        NRI_version="v0.12.2",
    )
    assert new.SerializeToString() == h(
        "120a636f6e7461696e657264 1a0676322e332e30 208827 28d00f 320776302e31322e32"
    )


@pytest.mark.parametrize(
    ("stream", "make", "expected"),
    [
        (
            1,
            lambda c, s: c.send_response(
                s, nri_pb2.ConfigureResponse(events=0x8).SerializeToString()
            ),
            "00000001 0000000e 00000004 00000001 02 00 1202 1008",
        ),
        (3, lambda c, s: c.send_response(s), "00000001 0000000a 00000000 00000003 02 00"),
        (
            5,
            lambda c, s: c.send_error(s, Code.UNIMPLEMENTED, "method NoSuchMethod"),
            "00000001 00000023 00000019 00000005 02 00 0a17 080c 1213"
            "6d6574686f64204e6f537563684d6574686f64",
        ),
    ],
    ids=["ConfigureResponse", "empty response", "UNIMPLEMENTED status"],
)
def test_tv3_plugin_replies_are_byte_for_byte_what_go_sends(
    stream: int, make: object, expected: str
) -> None:
    conn = NriConnection(Role.PLUGIN)
    assert make(conn, stream) == h(expected)  # type: ignore[operator]


def test_tv3_server_refuses_even_and_reused_stream_ids_like_go() -> None:
    conn = NriConnection(Role.PLUGIN)
    ok = _runtime_call(1, "Configure")
    even = _runtime_call(4, "Configure")
    reused = _runtime_call(1, "Configure")
    events = conn.receive_data(ok + even + reused)
    assert isinstance(events[0], RequestReceived)
    assert events[1] == BadRequest(
        4, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )
    assert events[2] == BadRequest(
        1, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
    )
    # the replies carry Go's exact words (TV3: "... 0a35 0803 1231 ...")
    assert conn.send_error(4, Code.INVALID_ARGUMENT, events[1].message)[18:22] == h("0a35 0803")


def test_stream_id_zero_is_refused_and_answered_on_id_zero_like_go() -> None:
    """Go's server checks `StreamID%2 != 1` first, so 0 is "even" and answered on 0."""
    conn = NriConnection(Role.PLUGIN)
    (event,) = conn.receive_data(_runtime_call(0, "CreateContainer"))
    assert event == BadRequest(
        0, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )
    reply = conn.send_error(event.stream_id, event.code, event.message)
    assert reply[:24] == h("00000001 00000041 00000037 00000000 02 00 0a35 0803 1231")
    # the refusal consumed nothing: the runtime's first real call is still served
    (ok,) = conn.receive_data(_runtime_call(1, "Configure"))
    assert isinstance(ok, RequestReceived) and ok.stream_id == 1
    with pytest.raises(LocalProtocolError):
        conn.send_response(0)  # a success on an id we never served is our bug


def test_the_largest_stream_id_the_wire_carries_is_served() -> None:
    conn = NriConnection(Role.PLUGIN)
    (event,) = conn.receive_data(_runtime_call(0xFFFFFFFF, "Configure"))
    assert isinstance(event, RequestReceived)
    assert conn.send_response(0xFFFFFFFF)[8:18] == h("00000000 ffffffff 02 00")
    (again,) = conn.receive_data(_runtime_call(0xFFFFFFFF, "Configure"))
    assert isinstance(again, BadRequest) and "re-used" in again.message
    with pytest.raises(LocalProtocolError, match="out of range"):
        conn.send_error(1 << 32, Code.INVALID_ARGUMENT, "no such id on the wire")


def test_an_error_reply_always_fits_even_quoting_huge_input() -> None:
    conn = NriConnection(Role.PLUGIN)
    data = conn.send_error(1, Code.UNIMPLEMENTED, "method " + "M" * ttrpc.MAX_DATA)
    message = b"".join(chunk for _, chunk in mux.MuxReader([1]).feed(data))
    (frame,) = ttrpc.FrameReader().feed(message)
    assert isinstance(frame, ttrpc.Frame)
    response = ttrpc.decode_response(frame)
    assert len(response.status.message) == MAX_ERROR_MESSAGE
    assert response.status.message.endswith("...")


def test_tv4_create_container_response() -> None:
    resp = nri_pb2.CreateContainerResponse()
    resp.adjust.annotations["py"] = "1"
    resp.adjust.linux.resources.cpu.shares.value = 512
    data = NriConnection(Role.PLUGIN).send_response(5, resp.SerializeToString())
    assert data == h(
        "00000001 00000022 00000018 00000005 02 00"
        "1216 0a14 1207 0a027079 120131 3209 1207 1205 0a03 088004"
    )


def test_tv4_other_payloads() -> None:
    assert nri_pb2.ConfigureResponse(events=0x288).SerializeToString() == h("108805")
    assert nri_pb2.SynchronizeResponse(more=True).SerializeToString() == h("1001")
    upd = nri_pb2.ContainerUpdate(container_id="ctr1")
    upd.linux.resources.cpu.shares.value = 256
    assert upd.SerializeToString() == h("0a0463747231 1209 0a07 1205 0a03 088002")
    mem = nri_pb2.LinuxMemory()
    mem.limit.SetInParent()
    assert mem.SerializeToString() == h("0a00")


def test_tv5_mux_split_rule() -> None:
    message = bytes(20_089)
    data = mux.encode_message(1, message)
    first_len = struct.unpack_from(">I", data, 4)[0]
    second_len = struct.unpack_from(">I", data, 8 + first_len + 4)[0]
    assert (first_len, second_len) == (4096, 15_993)
    assert len(data) == 16 + 20_089


@pytest.mark.parametrize(
    "size", [0, 1, 4095, 4096, 4097, 8192, 8193], ids=lambda size: f"{size} bytes"
)
def test_mux_sends_at_most_4096_bytes_in_the_first_frame_and_reads_back_the_rest(size: int) -> None:
    data = mux.encode_message(2, bytes(range(256)) * (size // 256) + bytes(size % 256))
    reader = mux.MuxReader([2])
    chunks = reader.feed(data)
    assert b"".join(c for _, c in chunks) == data[8 : 8 + min(size, 4096)] + (
        data[16 + 4096 :] if size > 4096 else b""
    )
    n_frames = 1 if size <= 4096 else 2
    assert len(data) == size + 8 * n_frames


# --- helpers ---------------------------------------------------------------------------------


def _runtime_call(sid: int, method: str, payload: bytes = b"", timeout: int = 0) -> bytes:
    return mux.encode_message(
        mux.PLUGIN_SERVICE_CONN, ttrpc.encode_request(sid, PLUGIN_SERVICE, method, payload, timeout)
    )


# --- ttrpc frame reader ----------------------------------------------------------------------


def test_frame_reader_byte_at_a_time_and_with_trailing_garbage() -> None:
    frames = ttrpc.encode_request(1, "s", "m", b"x" * 100) + ttrpc.encode_response(3, b"yz")
    whole = ttrpc.FrameReader().feed(frames)
    reader = ttrpc.FrameReader()
    dribbled = [f for b in frames for f in reader.feed(bytes([b]))]
    assert whole == dribbled and len(whole) == 2
    # a partial header after the frames stays buffered, nothing invented
    reader = ttrpc.FrameReader()
    assert len(reader.feed(frames + b"\x00\x00\x00")) == 2
    assert reader.buffered == 3


def test_oversized_frame_is_skipped_without_buffering() -> None:
    reader = ttrpc.FrameReader()
    size = ttrpc.MAX_DATA + 1
    header = ttrpc.HEADER.pack(size, 7, ttrpc.MessageType.REQUEST, 0)
    assert reader.feed(header + bytes(1000)) == [
        ttrpc.OversizedFrame(7, ttrpc.MessageType.REQUEST, size)
    ]
    left = size - 1000
    while left:
        step = min(65536, left)
        assert reader.feed(bytes(step)) == []
        assert reader.buffered == 0
        left -= step
    # after the oversized data, the stream continues normally
    tail = ttrpc.encode_response(9, b"ok")
    assert reader.feed(tail) == [
        ttrpc.Frame(9, ttrpc.MessageType.RESPONSE, 0, tail[ttrpc.HEADER_SIZE :])
    ]


def test_oversized_request_is_answered_resource_exhausted() -> None:
    conn = NriConnection(Role.PLUGIN)
    header = ttrpc.HEADER.pack(ttrpc.MAX_DATA + 5, 1, ttrpc.MessageType.REQUEST, 0)
    data = mux.HEADER.pack(1, len(header) + ttrpc.MAX_DATA + 5) + header + bytes(ttrpc.MAX_DATA + 5)
    events = conn.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], BadRequest)
    assert events[0].code == Code.RESOURCE_EXHAUSTED
    assert events[0].message == "message length 4194309 exceed maximum message size of 4194304"


def test_oversized_request_is_refused_before_its_id_is_checked_and_uses_no_id() -> None:
    """Go's reader fails on the length before the server looks at the id."""
    conn = NriConnection(Role.PLUGIN)
    for sid in (0, 4, 7):
        header = ttrpc.HEADER.pack(ttrpc.MAX_DATA + 1, sid, ttrpc.MessageType.REQUEST, 0)
        frame = header + bytes(ttrpc.MAX_DATA + 1)
        (event,) = conn.receive_data(mux.HEADER.pack(1, len(frame)) + frame)
        assert isinstance(event, BadRequest)
        assert (event.stream_id, event.code) == (sid, Code.RESOURCE_EXHAUSTED)
    (ok,) = conn.receive_data(_runtime_call(7, "Configure"))
    assert isinstance(ok, RequestReceived)


def test_unknown_message_type_is_a_remote_error_and_sticks() -> None:
    conn = NriConnection(Role.PLUGIN)
    bad = mux.encode_message(1, ttrpc.HEADER.pack(0, 1, 9, 0))
    with pytest.raises(RemoteProtocolError, match="unknown ttrpc message type 0x09"):
        conn.receive_data(bad)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(_runtime_call(1, "Configure"))


def test_too_large_to_send_is_a_local_error() -> None:
    with pytest.raises(MessageTooLarge) as info:
        ttrpc.encode_response(1, bytes(ttrpc.MAX_DATA))
    assert isinstance(info.value, LocalProtocolError)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert (info.value.length, info.value.limit) == (ttrpc.MAX_DATA + 5, ttrpc.MAX_DATA)
    assert str(info.value) == (  # Go's OversizedMessageErr text, fit to send to the peer
        "message length 4194309 exceed maximum message size of 4194304"
    )
    with pytest.raises(MessageTooLarge):
        NriConnection(Role.PLUGIN).send_response(1, bytes(ttrpc.MAX_DATA))


def test_garbage_envelope_gets_invalid_argument_and_connection_survives() -> None:
    conn = NriConnection(Role.PLUGIN)
    garbage = mux.encode_message(
        1, ttrpc.encode_frame(1, ttrpc.MessageType.REQUEST, b"\xff\xff\xff")
    )
    events = conn.receive_data(garbage)
    assert isinstance(events[0], BadRequest) and events[0].code == Code.INVALID_ARGUMENT
    assert isinstance(conn.receive_data(_runtime_call(3, "Configure"))[0], RequestReceived)


def test_unknown_mux_conn_is_dropped_and_counted() -> None:
    conn = NriConnection(Role.PLUGIN)
    data = mux.encode_message(7, b"hello") + _runtime_call(1, "Configure")
    events = conn.receive_data(data)
    assert len(events) == 1 and conn.stats.dropped_bytes == 5


def test_corrupt_mux_length_is_an_error() -> None:
    conn = NriConnection(Role.PLUGIN)
    with pytest.raises(RemoteProtocolError, match="mux frame"):
        conn.receive_data(mux.HEADER.pack(1, mux.MAX_FRAME + 1))


def test_responses_match_pending_calls_and_late_ones_are_ignored() -> None:
    plugin = NriConnection(Role.PLUGIN)
    runtime = NriConnection(Role.RUNTIME)
    sid1, req1 = plugin.send_request(RUNTIME_SERVICE, "RegisterPlugin", b"a")
    sid2, req2 = plugin.send_request(RUNTIME_SERVICE, "UpdateContainers", b"b")
    got = runtime.receive_data(req1 + req2)
    assert [e.stream_id for e in got] == [1, 3]
    plugin.abandon(sid1)
    # out-of-order replies are matched by id; the abandoned one is dropped
    events = plugin.receive_data(runtime.send_response(sid2, b"r2") + runtime.send_response(sid1))
    assert events == [ResponseReceived(3, b"r2")]
    assert plugin.stats.late_responses == 1
    err = plugin.send_request(RUNTIME_SERVICE, "X", b"")
    events = plugin.receive_data(runtime.send_error(err[0], Code.UNIMPLEMENTED, "method X"))
    assert events == [ResponseReceived(5, b"", 12, "method X")]


def test_partial_message_is_visible_for_truncation_detection() -> None:
    conn = NriConnection(Role.PLUGIN)
    data = _runtime_call(1, "Configure", b"x" * 50)
    conn.receive_data(data[:-3])
    assert conn.has_partial_message
    assert len(conn.receive_data(data[-3:])) == 1
    assert not conn.has_partial_message


# --- properties ------------------------------------------------------------------------------

_text = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(
        st.tuples(_text, _text, st.binary(max_size=9000), st.integers(0, 2**62)),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(1, 5000), max_size=30),
)
def test_round_trip_over_arbitrary_read_boundaries(
    calls: list[tuple[str, str, bytes, int]], cuts: list[int]
) -> None:
    runtime = NriConnection(Role.RUNTIME)
    plugin = NriConnection(Role.PLUGIN)
    wire = b"".join(runtime.send_request(s, m, p, t)[1] for s, m, p, t in calls)
    events = []
    pos = 0
    for cut in cuts:
        events.extend(plugin.receive_data(wire[pos : pos + cut]))
        pos += cut
    events.extend(plugin.receive_data(wire[pos:]))
    assert [(e.service, e.method, e.payload, e.timeout_nano) for e in events] == [  # type: ignore[union-attr]
        (s, m, p, t) for s, m, p, t in calls
    ]
    assert [e.stream_id for e in events] == list(range(1, 2 * len(calls), 2))


@given(
    frame=st.tuples(
        st.integers(0, 3),  # mux conn id: 1 is the one the plugin serves
        st.integers(0, 2**32 - 1),  # ttrpc stream id
        st.integers(0, 3),  # ttrpc message type
        st.integers(0, 255),  # flags
        st.binary(max_size=5000),  # ttrpc data (an envelope, or not)
        st.integers(-2, 2),  # how far the two lengths are off
    ),
    earlier=st.binary(max_size=12),  # what a previous read left behind
)
def test_a_read_of_one_whole_request_gives_what_byte_by_byte_reading_gives(
    frame: tuple[int, int, int, int, bytes, int], earlier: bytes
) -> None:
    """receive_data takes a read of exactly one whole request apart in one go; every
    other read goes through the mux and ttrpc readers. Both must give the same events,
    errors and state (here: the same input fed whole and one byte at a time)."""
    conn_id, stream_id, raw_type, flags, data, off = frame
    message = struct.pack(">IIBB", max(0, len(data) + off), stream_id, raw_type, flags) + data
    wire = struct.pack(">II", conn_id, len(message) + (off if off < 0 else 0)) + message

    def feed(pieces: list[bytes]) -> tuple[list[object], str | None, bool]:
        plugin = NriConnection(Role.PLUGIN)
        events: list[object] = []
        try:
            for piece in pieces:
                events.extend(plugin.receive_data(piece))
        except RemoteProtocolError as exc:
            return events, str(exc), plugin.has_partial_message
        return events, None, plugin.has_partial_message

    whole = feed([earlier, wire] if earlier else [wire])
    bytewise = feed([bytes([b]) for b in earlier + wire])
    assert whole == bytewise


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.lists(st.integers(1, 200), max_size=20))
def test_garbage_never_hangs_or_raises_anything_but_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    conn = NriConnection(Role.PLUGIN)
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            events = conn.receive_data(data[pos : pos + cut])
            for event in events:
                assert isinstance(event, (RequestReceived, ResponseReceived, BadRequest))
                if isinstance(event, BadRequest):  # every refusal can be answered
                    conn.send_error(event.stream_id, event.code, event.message)
            pos += cut
    except ProtocolError:
        pass
    # bounded memory: never more buffered than the input
    assert conn._serve_reader.buffered + conn._call_reader.buffered <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_payload_decodes_or_raises_protocol_error(payload: bytes) -> None:
    from nri_plugin.protocol import services

    for method in services.PLUGIN_METHODS.values():
        with contextlib.suppress(ProtocolError):
            services.decode(method.request, payload, method.name)


def test_a_stream_that_ends_inside_an_oversized_message_is_truncated_not_clean() -> None:
    conn = NriConnection(Role.PLUGIN)
    size = ttrpc.MAX_DATA + 1
    header = ttrpc.HEADER.pack(size, 7, ttrpc.MessageType.REQUEST, 0)
    conn.receive_data(mux.encode_message(mux.PLUGIN_SERVICE_CONN, header + bytes(100)))
    assert conn.has_partial_message  # still skipping: EOF now is a truncated peer
