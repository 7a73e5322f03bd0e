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

REQUEST = struct.Struct("<BBBI")


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(P.Kind))
def test_request_header_round_trip_every_kind(kind: P.Kind) -> None:
    method = P.Method.GETITEM if kind == P.Kind.CALL else 0
    header = P.request_header(kind, method, 42, b"default")
    request = P.parse_request(header)
    assert request == P.Request(int(kind), int(method), 42, "default")
    assert request.kind == kind


@pytest.mark.parametrize("method", list(P.Method))
def test_request_header_round_trip_every_method(method: P.Method) -> None:
    request = P.parse_request(P.request_header(P.Kind.CALL, method, 7, b"ns"))
    assert (request.kind, request.method, request.request_id) == (P.Kind.CALL, method, 7)


@pytest.mark.parametrize("rid", [0, 1, 2**31, 0xFFFFFFFF])
def test_request_id_range(rid: int) -> None:
    header = P.request_header(P.Kind.PING, 0, rid, b"default")
    assert P.parse_request(header).request_id == rid
    assert P.request_id_of(header) == rid


def test_request_namespace_unicode() -> None:
    name = "espace-été-名前"
    request = P.parse_request(P.request_header(P.Kind.HEAD, 0, 1, name.encode()))
    assert request.namespace == name


def test_parse_request_accepts_memoryview() -> None:
    header = P.request_header(P.Kind.SNAPSHOT, 0, 3, b"default")
    assert P.parse_request(memoryview(header)).request_id == 3


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        b"\x01\x05\x01",  # shorter than the fixed part
        b"\x01\x05\x01\x00\x00\x00",  # one byte short of the request id
    ],
    ids=["empty", "1-byte", "3-bytes", "6-bytes"],
)
def test_short_request_header_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed request header"):
        P.parse_request(frame)
    assert P.request_id_of(frame) is None


def test_bad_utf8_namespace_is_a_protocol_error() -> None:
    header = P.request_header(P.Kind.HEAD, 0, 1, b"\xff\xfe")
    with pytest.raises(ProtocolError):
        P.parse_request(header)
    # the request id is still recoverable, so the server can answer with an error
    assert P.request_id_of(header) == 1


def test_empty_namespace_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="namespace"):
        P.parse_request(P.request_header(P.Kind.HEAD, 0, 1, b""))


@pytest.mark.parametrize("version", [0, P.PROTOCOL_VERSION + 1, 255])
def test_other_protocol_version_is_a_protocol_error(version: int) -> None:
    header = REQUEST.pack(version, P.Kind.PING, 0, 9) + b"default"
    with pytest.raises(ProtocolError, match="version"):
        P.parse_request(header)
    assert P.request_id_of(header) == 9


@pytest.mark.parametrize("kind", [0, max(P.Kind) + 1, 200, 255])
def test_unknown_kind_is_a_protocol_error(kind: int) -> None:
    header = REQUEST.pack(P.PROTOCOL_VERSION, kind, 0, 5) + b"default"
    with pytest.raises(ProtocolError, match="unknown request kind"):
        P.parse_request(header)


@pytest.mark.parametrize("method", [0, max(P.Method) + 1, 99, 255])
def test_unknown_method_is_a_protocol_error(method: int) -> None:
    header = REQUEST.pack(P.PROTOCOL_VERSION, P.Kind.CALL, method, 5) + b"default"
    with pytest.raises(ProtocolError, match="method"):
        P.parse_request(header)


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
def test_reply_header_round_trip(status: P.Status, rid: int) -> None:
    assert P.parse_reply(P.reply_header(status, rid)) == (status, rid)


@pytest.mark.parametrize("frame", [b"", b"\x01", b"\x01\x00\x00"])
def test_short_reply_header_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed reply header"):
        P.parse_reply(frame)


def test_reply_other_version_is_a_protocol_error() -> None:
    frame = struct.pack("<BBI", P.PROTOCOL_VERSION + 1, P.Status.OK, 1)
    with pytest.raises(ProtocolError, match="version"):
        P.parse_reply(frame)


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
    header = P.request_header(P.Kind.PING, 0, 9, b"default")
    assert P.parse_routed([b"id", header, b""], P.parse_request).request_id == 9
    # a wrong frame count, or a bad header, with a request id: an error reply to the sender
    for frames in ([b"id", header], [b"id", header[:1] + b"\x7f" + header[2:], b""]):
        with pytest.raises(P.Rejected) as info:
            P.parse_routed(frames, P.parse_request)
        assert info.value.reply is not None
        identity, reply_header, body = info.value.reply
        assert identity == b"id" and P.parse_reply(reply_header) == (P.Status.ERROR, 9)
        assert isinstance(S.loads_exception(body), ProtocolError)
    # no request id to answer: dropped
    with pytest.raises(P.Rejected, match="4 frames") as info:
        P.parse_routed([b"id", b"x", b"y", b"z"], P.parse_request)
    assert info.value.reply is None
    # the broker's kinds are not the server's
    with pytest.raises(P.Rejected):
        P.parse_routed([b"id", header, b""], P.parse_swarm_request)


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
