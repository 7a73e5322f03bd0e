"""The wire format (zproc/_protocol.py): round trips and rejection of malformed input.

No processes, no sockets.
"""

from __future__ import annotations

import struct

import pytest

import zproc
from zproc import _protocol as P
from zproc import _serialization as S
from zproc import _swarmwire as W
from zproc.exceptions import ProtocolError

REQUEST = struct.Struct("<BBBIH")


def frame_of(kind: int, method: int, rid: int, namespace: bytes, body: bytes = b"") -> bytes:
    return P.request_frame(kind, method, rid, namespace, body)


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(P.Kind))
def test_request_round_trip_every_kind(kind: P.Kind) -> None:
    method = P.Method.GETITEM if kind == P.Kind.CALL else 0
    request, body = P.parse_request(frame_of(kind, method, 42, b"default", b"the body"))
    assert request == P.Request(int(kind), int(method), 42, "default")
    assert request.kind == kind
    assert body == b"the body"


@pytest.mark.parametrize("method", list(P.Method))
def test_request_round_trip_every_method(method: P.Method) -> None:
    request, _ = P.parse_request(frame_of(P.Kind.CALL, method, 7, b"ns"))
    assert (request.kind, request.method, request.request_id) == (P.Kind.CALL, method, 7)


@pytest.mark.parametrize("rid", [0, 1, 2**31, 0xFFFFFFFF])
def test_request_id_range(rid: int) -> None:
    frame = frame_of(P.Kind.PING, 0, rid, b"default")
    assert P.parse_request(frame)[0].request_id == rid
    assert P.request_id_of(frame) == rid


def test_request_namespace_unicode() -> None:
    name = "espace-été-名前"
    request, body = P.parse_request(frame_of(P.Kind.HEAD, 0, 1, name.encode(), b"x"))
    assert request.namespace == name and body == b"x"
    assert P.request_key(frame_of(P.Kind.HEAD, 0, 1, name.encode(), b"x")) == (
        int(P.Kind.HEAD) << 8, name)


def test_longest_namespace_round_trips_and_a_longer_one_is_refused() -> None:
    name = "n" * P.MAX_NAMESPACE_BYTES
    request, body = P.parse_request(frame_of(P.Kind.HEAD, 0, 1, name.encode(), b"b"))
    assert request.namespace == name and body == b"b"
    with pytest.raises(ValueError, match="at most 65535"):
        zproc.State(("ipc:///nonexistent/rr", "ipc:///nonexistent/ps"),
                    namespace="n" * (P.MAX_NAMESPACE_BYTES + 1))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x03",
        b"\x03\x05\x01",  # shorter than the fixed part
        b"\x03\x05\x01\x00\x00\x00",  # one byte short of the request id
        REQUEST.pack(P.PROTOCOL_VERSION, P.Kind.HEAD, 0, 1, 8)[:-1],  # no namespace size
        REQUEST.pack(P.PROTOCOL_VERSION, P.Kind.HEAD, 0, 1, 8) + b"short",  # namespace cut
    ],
    ids=["empty", "1-byte", "3-bytes", "6-bytes", "8-bytes", "cut-namespace"],
)
def test_short_request_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed request header"):
        P.parse_request(frame)
    if len(frame) < 7:
        assert P.request_id_of(frame) is None


def test_bad_utf8_namespace_is_a_protocol_error() -> None:
    frame = frame_of(P.Kind.HEAD, 0, 1, b"\xff\xfe")
    with pytest.raises(ProtocolError, match="utf-8"):
        P.parse_request(frame)
    # the request id is still recoverable, so the server can answer with an error
    assert P.request_id_of(frame) == 1


def test_empty_namespace_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="namespace"):
        P.parse_request(frame_of(P.Kind.HEAD, 0, 1, b""))


@pytest.mark.parametrize("version", [0, 2, P.PROTOCOL_VERSION + 1, 255])
def test_other_protocol_version_is_a_protocol_error(version: int) -> None:
    frame = REQUEST.pack(version, P.Kind.PING, 0, 9, 7) + b"default"
    with pytest.raises(ProtocolError, match="version"):
        P.parse_request(frame)
    assert P.request_id_of(frame) == 9


def test_a_request_of_the_previous_layout_gets_a_version_error() -> None:
    """Protocol 2 sent ``[header, body]``: the server names the version, not the frames."""
    old_header = struct.pack("<BBBI", 2, P.Kind.PING, 0, 9) + b"default"
    with pytest.raises(P.Rejected, match="protocol version 2") as info:
        P.parse_routed([b"id", old_header, b"body"], P.parse_request)
    assert info.value.reply is not None


@pytest.mark.parametrize("kind", [0, max(P.Kind) + 1, 200, 255])
def test_unknown_kind_is_a_protocol_error(kind: int) -> None:
    frame = REQUEST.pack(P.PROTOCOL_VERSION, kind, 0, 5, 7) + b"default"
    with pytest.raises(ProtocolError, match="unknown request kind"):
        P.parse_request(frame)


@pytest.mark.parametrize("method", [0, max(P.Method) + 1, 99, 255])
def test_unknown_method_is_a_protocol_error(method: int) -> None:
    frame = REQUEST.pack(P.PROTOCOL_VERSION, P.Kind.CALL, method, 5, 7) + b"default"
    with pytest.raises(ProtocolError, match="method"):
        P.parse_request(frame)


def test_method_allow_list_has_no_dangerous_names() -> None:
    names = {m.name.lower() for m in P.Method}
    for forbidden in ("__class__", "__reduce__", "__init__", "__getattribute__", "__setattr__"):
        assert forbidden.strip("_") not in names
    # codes are unique and fit the one-byte header field
    codes = [int(m) for m in P.Method]
    assert len(codes) == len(set(codes))
    assert all(0 < c < 256 for c in codes)
    assert all(0 < int(k) < 256 for k in P.Kind)


# -- replies ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(P.Status))
@pytest.mark.parametrize("rid", [0, 17, 0xFFFFFFFF])
def test_reply_round_trip(status: P.Status, rid: int) -> None:
    identity, frame = P.reply(b"id", status, rid, b"the body", 12)
    assert identity == b"id"
    assert P.parse_reply([frame]) == (status, rid, 12, b"the body")


def test_reply_with_buffers_round_trips() -> None:
    body = P.encode_buffered(b"x" * S.OUT_OF_BAND)
    identity, *frames = P.reply(b"id", P.OK, 3, body)
    assert len(frames) == 2
    status, rid, head, got = P.parse_reply(frames)
    assert (status, rid, head) == (P.OK, 3, 0)
    assert P.decode_buffered(got) == b"x" * S.OUT_OF_BAND


def test_big_reply_body_is_read_in_place() -> None:
    body = S.dumps(b"y" * (2 * S.OUT_OF_BAND))  # in-band: no buffers asked for
    _, frame = P.reply(b"id", P.OK, 3, body)
    got = P.parse_reply([frame])[3]
    assert isinstance(got, memoryview) and P.decode_buffered(got) == b"y" * (2 * S.OUT_OF_BAND)


@pytest.mark.parametrize("frame", [b"", b"\x03", b"\x03\x00\x00", b"\x03" * 13])
def test_short_reply_header_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed reply header"):
        P.parse_reply([frame])


@pytest.mark.parametrize("version", [2, P.PROTOCOL_VERSION + 1])
def test_reply_other_version_is_a_protocol_error(version: int) -> None:
    frame = struct.pack("<BBIQ", version, P.Status.OK, 1, 0)
    with pytest.raises(ProtocolError, match=f"protocol version {version}"):
        P.parse_reply([frame, b"old body frame"])


# -- events -----------------------------------------------------------------------------


@pytest.mark.parametrize("first,last", [(1, 1), (5, 9), (0, 2**63)])
def test_events_header_round_trip(first: int, last: int) -> None:
    run = b"\x07" * P.RUN_SIZE
    assert P.parse_events_header(P.events_header(first, last, run)) == (first, last, run)


def test_bad_events_header_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        P.parse_events_header(b"\x01\x02")
    with pytest.raises(ProtocolError, match="version"):
        P.parse_events_header(struct.pack("<BQQ8s", 99, 1, 1, b"r" * 8))


@pytest.mark.parametrize("body", [S.dumps((1, True)), S.dumps((-1, True, b"")),
                                  S.dumps(("1", True, b"")), S.dumps((1, True, "run")),
                                  b"junk"])
def test_bad_fetch_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="FETCH|decode"):
        P.parse_fetch_request(body)


def test_fetch_and_head_shapes() -> None:
    run = b"r" * P.RUN_SIZE
    assert P.parse_fetch_request(P.fetch_request(5, False, run)) == (5, False, run)
    reply = P.fetch_reply((7, None, [], run, True))
    assert (reply.head, reply.events, reply.run, reply.continued) == (7, [], run, True)
    assert P.head_reply((7, run)) == (7, run)
    for bad in (7, (7,), None):
        with pytest.raises(ProtocolError, match="HEAD"):
            P.head_reply(bad)


def test_event_round_trip_drops_old_values() -> None:
    event = P.Event(3, b"\x01abcdefg", 1234.5, {"a": [1, 2], ("t", 1): None}, ("gone",), {"a": 0})
    decoded = P.decode_event(P.encode_event(event))
    assert decoded == event._replace(old=None)
    assert isinstance(decoded, P.Event)


@pytest.mark.parametrize(
    "frame",
    [S.dumps((1, 2)), S.dumps("not an event"), b"garbage", b""],
    ids=["short-tuple", "str", "garbage", "empty"],
)
def test_malformed_event_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        P.decode_event(frame)


def test_topics_are_prefix_free() -> None:
    # the NUL terminator keeps namespace "a" from matching the topic of namespace "ab"
    a, ab = P.event_topic(b"a"), P.event_topic(b"ab")
    assert not ab.startswith(a)
    assert a.startswith(P.EVENT_PREFIX)
    assert P.sync_topic(b"\x01id").startswith(P.SYNC_PREFIX)
    assert not P.sync_topic(b"\x01id").startswith(P.EVENT_PREFIX)


def test_protocol_error_is_a_zproc_error() -> None:
    assert issubclass(ProtocolError, zproc.ZProcError)
    assert zproc.ProtocolError is ProtocolError


# -- routed requests and bodies ---------------------------------------------------------


def test_parse_routed() -> None:
    frame = frame_of(P.Kind.PING, 0, 9, b"default", b"ping")
    request, body = P.parse_routed([b"id", frame], P.parse_request)
    assert request.request_id == 9 and body == b"ping"
    # buffers after a CALL's frame belong to its body
    call = frame_of(P.Kind.CALL, P.Method.SETITEM, 4, b"default", b"args")
    request, body = P.parse_routed([b"id", call, b"buf1", b"buf2"], P.parse_request)
    assert body == b"args" and body.buffers == [b"buf1", b"buf2"]  # type: ignore[attr-defined]
    # a wrong frame count, or a bad header, with a request id: an error reply to the sender
    for frames in ([b"id", frame, b"extra"], [b"id", frame[:1] + b"\x7f" + frame[2:]]):
        with pytest.raises(P.Rejected) as info:
            P.parse_routed(frames, P.parse_request)
        assert info.value.reply is not None
        identity, reply = info.value.reply
        status, rid, _, body = P.parse_reply([reply])
        assert identity == b"id" and (status, rid) == (P.Status.ERROR, 9)
        assert isinstance(S.loads_exception(body), ProtocolError)
    # no request id to answer: dropped
    for frames, message in (([b"id", b"x", b"y", b"z"], "malformed request header"),
                            ([b"id"], "1 frames")):
        with pytest.raises(P.Rejected, match=message) as info:
            P.parse_routed(frames, P.parse_request)
        assert info.value.reply is None
    # the broker's kinds are not the server's
    with pytest.raises(P.Rejected):
        P.parse_routed([b"id", frame], P.parse_swarm_request)


def test_records_are_plain_tuples_on_the_wire() -> None:
    assert P.encode(P.HeadReply(3, b"r" * 8)) == S.dumps((3, b"r" * 8))
    assert P.encode(W.SubmitReply(2, None)) == S.dumps((2, None))
    assert P.decode(P.PingReply, S.loads(P.encode(P.PingReply(b"x", 7)))) == (b"x", 7)
    with pytest.raises(ProtocolError, match="malformed SnapshotReply"):
        P.decode(P.SnapshotReply, (1, 2, 3))
    reply = S.loads(W.encode_results_reply(1, 4, [(0, 0, 4, 0, b"body")], workers=2))
    submitted = P.decode(W.SubmitReply, reply)
    assert submitted.workers == 2
    assert P.decode(W.ResultsReply, submitted.results).chunks == [(0, 0, 4, 0, b"body")]


def test_pipeline_and_call_bodies() -> None:
    op = P.pipeline_op(P.Method.SETITEM, ("k", 1))
    assert P.parse_pipeline_op(op) == (P.Method.SETITEM, ("k", 1))
    assert P.parse_pipeline_request(S.dumps([op])) == [op]
    for bad in (S.dumps((999, ())), S.dumps((int(P.Method.GET), ["k"]))):
        with pytest.raises(ProtocolError):
            P.parse_pipeline_op(bad)
    with pytest.raises(ProtocolError):
        P.parse_pipeline_request(S.dumps("not a list"))
    with pytest.raises(ProtocolError):
        P.pipeline_reply([(0, b"")], 2)
    assert P.parse_call_request(b"") == ()
    with pytest.raises(ProtocolError):
        P.parse_call_request(S.dumps(["k"]))


def test_submit_body_is_checked() -> None:
    good = (5, 3, b"code", 3, 0, 1, [(0, 3, b"items")])
    submit = W.parse_submit_request(S.dumps(good))
    assert submit == W.SubmitRequest(5, 3, b"code", 3, False, 1.0, [(0, 3, b"items")])
    for bad in ((0, *good[1:]), good[:6], (*good[:6], [(0, 3, "items")])):
        with pytest.raises(ProtocolError, match="malformed swarm SUBMIT"):
            W.parse_submit_request(S.dumps(bad))
