"""Frames: round trips, stream splitting, and hostile bytes."""

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec
from protocol.constants import HEADER_SIZE, MessageType
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.events import Hello, Inflate, Resync, Stats
from protocol.ranges import RangeSet
from tests.strategies import any_event, pfn_events, plain_events

LIMIT = 64 << 20


def frame_of(event, ranges=False):
    kind, flags, txid, body = codec.encode_event(event, ranges=ranges)
    return codec.build_frame(kind, flags, txid, body, None, 0)


def decode_stream(chunks, limit=LIMIT):
    reader = codec.FrameReader(limit)
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        while (frame := reader.next_frame()) is not None:
            codec.verify_crc(frame)
            out.append(codec.decode_body(frame.header, frame.body, frame.offset))
    if reader.buffered:
        raise RemoteProtocolError("stream ends inside a frame", offset=reader.consumed)
    return out


@given(plain_events)
def test_decode_of_encode_is_identity(event):
    assert decode_stream([frame_of(event)]) == [event]


@given(pfn_events, st.booleans())
def test_pfn_events_round_trip_in_both_encodings(event, ranges):
    assert decode_stream([frame_of(event, ranges)]) == [event]


@given(st.lists(any_event, min_size=1, max_size=6), st.data())
def test_any_split_of_the_stream_gives_the_same_events(events, data):
    stream = b"".join(frame_of(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert decode_stream(chunks) == events


@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_remote_protocol_error(data):
    reader = codec.FrameReader(64 * 1024)
    try:
        decode_stream([data], limit=64 * 1024)
    except RemoteProtocolError:
        pass
    # never buffers more than one header before judging it
    reader.feed(data[:HEADER_SIZE])
    try:
        reader.next_frame()
    except RemoteProtocolError:
        pass


@given(any_event, st.data())
def test_mutated_frames_are_refused_cleanly(event, data):
    frame = bytearray(frame_of(event))
    position = data.draw(st.integers(0, len(frame) - 1))
    frame[position] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_stream([bytes(frame)])
    except RemoteProtocolError as exc:
        assert exc.message
        return
    # A flip that survives the CRC check would have to collide: never for one byte.
    pytest.fail(f"mutated frame decoded as {decoded}")


def test_oversized_length_is_refused_from_the_header_alone():
    header = codec.pack_header(MessageType.INFLATE, 0, 1, 1 << 30)
    reader = codec.FrameReader(64 * 1024)
    reader.feed(header)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit") as info:
        reader.next_frame()
    assert info.value.offset == 0


def test_errors_name_the_offset_of_the_bad_frame():
    good = frame_of(Stats(((4, 1),), 0))
    bad = bytearray(frame_of(Stats(((5, 2),), 0)))
    bad[-1] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="CRC-32 mismatch") as info:
        decode_stream([good + bytes(bad)])
    assert info.value.offset == len(good)


@pytest.mark.parametrize(
    "flags, message",
    [(0x0004, "unknown header flag"), (0x0001, "RANGES makes no sense"), (0x0002, "MORE")],
)
def test_flags_that_make_no_sense_are_named(flags, message):
    header = codec.pack_header(MessageType.PING, flags, 1, 0)
    frame = header + zlib.crc32(header).to_bytes(4, "little")
    with pytest.raises(RemoteProtocolError, match=message):
        decode_stream([frame])


def test_txid_on_a_message_without_one_is_refused():
    header = codec.pack_header(MessageType.ACTUAL, 0, 7, 4)
    body = (1).to_bytes(4, "little")
    frame = header + body + codec.crc_trailer(header, body)
    with pytest.raises(RemoteProtocolError, match="carries no transaction id"):
        decode_stream([frame])


@pytest.mark.parametrize(
    "event, message",
    [
        (Hello("bad name!", b"x" * 32, 0, 10), "must match"),
        (Hello("vm", b"x" * 31, 0, 10), "nonce must be 32"),
        (Inflate(1, RangeSet.empty()), "at least one page"),
        (Stats(((4, 1), (4, 2))), "appears more than once"),
    ],
)
def test_bad_events_are_refused_before_sending(event, message):
    with pytest.raises(LocalProtocolError, match=message):
        codec.encode_event(event, ranges=False)


def test_u32_array_cannot_carry_large_pfns():
    with pytest.raises(LocalProtocolError, match="does not fit"):
        codec.encode_event(Resync(1, RangeSet.span(2**32, 1)), ranges=False)
