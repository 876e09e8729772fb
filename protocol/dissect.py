"""The dissector: a captured uballoon byte stream -> one JSON object per frame.

``python -m protocol dump [FILE|-]`` reads one direction of a session (what a guest
sent, or what a host sent), checks every header and CRC, and prints each frame with
its body decoded (PFNs as ``[start, count]`` ranges).  MACs cannot be checked without
the session key and are shown as hex.  On a corrupt stream it prints one line naming
the byte offset and what was wrong, and exits 1.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from protocol import codec
from protocol.constants import MAX_NEGOTIATED_MAX_BODY, BalloonState, Flag, feature_names
from protocol.errors import RemoteProtocolError
from protocol.events import Hello, Stats, Welcome
from protocol.ranges import RangeSet

READ_SIZE = 1 << 20


def frames(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Decode a stream given as chunks of bytes; yields one dict per frame.

    Raises RemoteProtocolError (with ``offset``) at the first corrupt frame, including
    a stream that ends inside a frame.
    """
    reader = codec.FrameReader(MAX_NEGOTIATED_MAX_BODY)
    for chunk in chunks:
        reader.feed(chunk)
        while (frame := reader.next_frame()) is not None:
            yield describe(frame)
    if reader.buffered:
        raise RemoteProtocolError(
            f"stream ends inside a frame ({reader.buffered} bytes of it present)",
            offset=reader.consumed,
        )


def describe(frame: codec.Frame) -> dict[str, Any]:
    header = frame.header
    if header.flags & Flag.MAC:
        integrity = {"mac": frame.trailer.hex(), "mac_checked": False}
    else:
        codec.verify_crc(frame)
        integrity = {"crc32": f"{int.from_bytes(frame.trailer, 'little'):#010x}"}
    event = codec.decode_body(header, frame.body, frame.offset)
    out: dict[str, Any] = {
        "offset": frame.offset,
        "type": header.type.name,
        "txid": header.txid,
        "flags": [f.name for f in Flag if header.flags & f],
        "length": header.length,
        **integrity,
    }
    out.update(_jsonable(event))
    if isinstance(event, Hello | Welcome):
        out["feature_names"] = feature_names(event.features)
    if isinstance(event, Stats):
        state = event.as_dict().get(0x8012)
        if state is not None:
            out["balloon_state"] = [s.name for s in BalloonState if state & s]
    return out


def _jsonable(event: object) -> dict[str, Any]:
    assert is_dataclass(event)
    out: dict[str, Any] = {}
    for f in fields(event):
        out[f.name] = _value(getattr(event, f.name))
    return out


def _value(value: Any) -> Any:
    if isinstance(value, RangeSet):
        return {"pages": value.num_pages, "ranges": value.to_list()}
    if isinstance(value, bytes):
        return base64.b16encode(value).decode().lower()
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    if is_dataclass(value):
        return _jsonable(value)
    if hasattr(value, "name") and isinstance(value, int):
        return value.name
    return value


def dump(stream: Any, out: Any) -> int:
    """Print one JSON line per frame of ``stream`` (a binary file); returns an exit code."""

    def chunks() -> Iterator[bytes]:
        while data := stream.read(READ_SIZE):
            yield data

    try:
        for item in frames(chunks()):
            out.write(json.dumps(item) + "\n")
    except RemoteProtocolError as exc:
        offset = "?" if exc.offset is None else exc.offset
        out.write(f"error at byte offset {offset}: {exc.message}\n")
        return 1
    return 0
