"""Every byte layout of the uballoon protocol, declared once with construct.

This is the only module that builds construct declarations; ``codec.py`` turns the
Containers they produce into events and nothing outside ``protocol/`` ever sees one.
All integers are little-endian.

Bulk PFN bodies (INFLATE, DEFLATE, RESYNC) are declared as construct Adapters over
``GreedyBytes`` whose element layouts (``PfnU32``, ``PfnRange``) are construct Structs:
the adapters convert the whole body with one numpy call instead of parsing element by
element (construct's ``Array(n, Int32ul)`` manages ~2.3 M PFN/s, numpy ~1000x that).
tests/test_wire.py proves the adapters produce exactly the bytes construct's own
``Array`` of the element layout would, and that the ``struct`` fast path for the header
equals ``Header``.  Peer bytes are always parsed with checked (never ``.compile()``d)
declarations.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from construct import (
    Adapter,
    Bytes,
    Const,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    PrefixedArray,
    Struct,
    Terminated,
)

from protocol.constants import MAGIC, NONCE_SIZE
from protocol.ranges import RangeSet

# -- the frame header -------------------------------------------------------------

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ul,
    "type" / Int8ul,
    "flags" / Int16ul,
    "txid" / Int32ul,
    "length" / Int32ul,
)
HEADER_FAST = struct.Struct("<4sBBHII")  # identical to Header (tests/test_wire.py)
CRC_TRAILER = Struct("crc32" / Int32ul)
MAC_TRAILER = Struct("hmac_sha256" / Bytes(32))

# -- shared pieces ----------------------------------------------------------------

VirtioBalloonConfig = Struct(  # struct virtio_balloon_config, all le32
    "num_pages" / Int32ul,
    "actual" / Int32ul,
    "free_page_hint_cmd_id" / Int32ul,
    "poison_val" / Int32ul,
)
MemRange = Struct("start" / Int64ul, "count" / Int64ul)  # HELLO's RAM layout entries
StatEntry = Struct("tag" / Int16ul, "val" / Int64ul)  # struct virtio_balloon_stat, packed
PfnU32 = Int32ul  # one element of virtio's PFN array
PfnRange = Struct("start" / Int64ul, "count" / Int32ul)  # one (start, count) range

# numpy views of the element layouts above (packed, little-endian)
_U32 = np.dtype("<u4")
_RANGE = np.dtype([("start", "<u8"), ("count", "<u4")])
assert _RANGE.itemsize == PfnRange.sizeof() and _U32.itemsize == PfnU32.sizeof()
MAX_RANGE_COUNT = 0xFFFF_FFFF


class PfnArrayAdapter(Adapter):  # type: ignore[misc]
    """Body of little-endian u32 PFNs <-> RangeSet (any order on the wire; sorted out)."""

    def _decode(self, obj: bytes, context: Any, path: str) -> RangeSet:
        if len(obj) % _U32.itemsize:
            raise ValueError(f"a u32 PFN array cannot be {len(obj)} bytes long")
        return RangeSet.from_pfns(np.frombuffer(obj, dtype=_U32))

    def _encode(self, obj: RangeSet, context: Any, path: str) -> bytes:
        return obj.to_pfns(np.uint32).astype(_U32, copy=False).tobytes()


class PfnRangesAdapter(Adapter):  # type: ignore[misc]
    """Body of sorted (le64 start, le32 count) ranges <-> RangeSet."""

    def _decode(self, obj: bytes, context: Any, path: str) -> RangeSet:
        if len(obj) % _RANGE.itemsize:
            raise ValueError(f"a PFN range list cannot be {len(obj)} bytes long")
        table = np.frombuffer(obj, dtype=_RANGE)
        starts = table["start"].astype(np.uint64)
        counts = table["count"].astype(np.uint64)
        if (counts == 0).any():
            index = int(np.flatnonzero(counts == 0)[0])
            raise ValueError(f"range {index} has a count of 0")
        ends = starts + counts
        if (ends < starts).any():
            raise ValueError("a range runs past the end of the 64-bit PFN space")
        if (starts[1:] < ends[:-1]).any():
            index = int(np.flatnonzero(starts[1:] < ends[:-1])[0]) + 1
            raise ValueError(
                f"ranges must be sorted and must not overlap (range {index} at "
                f"{int(starts[index]):#x} begins before the previous one ends)"
            )
        return RangeSet._merge_sorted(starts, ends)

    def _encode(self, obj: RangeSet, context: Any, path: str) -> bytes:
        starts, counts = obj.starts, obj.counts
        if (counts > MAX_RANGE_COUNT).any():
            starts, counts = _split_long_ranges(starts, counts)
        table = np.empty(starts.size, dtype=_RANGE)
        table["start"] = starts
        table["count"] = counts
        return table.tobytes()


def _split_long_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranges longer than a u32 count can say, cut into pieces that fit."""
    out_starts, out_counts = [], []
    for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
        while count:
            piece = min(count, MAX_RANGE_COUNT)
            out_starts.append(start)
            out_counts.append(piece)
            start += piece
            count -= piece
    return np.array(out_starts, np.uint64), np.array(out_counts, np.uint64)


class MemLayoutAdapter(Adapter):  # type: ignore[misc]
    """HELLO's RAM layout: a list of MemRange <-> RangeSet."""

    def _decode(self, obj: Any, context: Any, path: str) -> RangeSet:
        starts = np.array([item.start for item in obj], dtype=np.uint64)
        counts = np.array([item.count for item in obj], dtype=np.uint64)
        return RangeSet.from_ranges(starts, counts)

    def _encode(self, obj: RangeSet, context: Any, path: str) -> list[dict[str, int]]:
        return [{"start": s, "count": c} for s, c in obj.ranges()]


# -- message bodies -----------------------------------------------------------------

HelloBody = Struct(
    "versions" / Int32ul,  # bit v set: protocol version v spoken
    "features" / Int64ul,
    "page_size" / Int32ul,
    "total_pages" / Int64ul,
    "nonce" / Bytes(NONCE_SIZE),
    "name" / PascalString(Int8ul, "ascii"),
    "ram_layout" / MemLayoutAdapter(PrefixedArray(Int16ul, MemRange)),
    Terminated,
)
ChallengeBody = Struct("nonce" / Bytes(NONCE_SIZE), Terminated)
AuthBody = Struct("proof" / Bytes(32), Terminated)
WelcomeBody = Struct(
    "version" / Int8ul,
    "reserved" / Const(0, Int8ul),
    "window" / Int16ul,
    "features" / Int64ul,
    "max_body" / Int32ul,
    "config" / VirtioBalloonConfig,
    "stats_interval_ms" / Int32ul,
    "heartbeat_ms" / Int32ul,
    Terminated,
)
ConfigBody = Struct("config" / VirtioBalloonConfig, Terminated)
PfnArrayBody = PfnArrayAdapter(GreedyBytes)
PfnRangesBody = PfnRangesAdapter(GreedyBytes)
AckBody = Struct("freed_pages" / Int64ul, Terminated)
NO_PFN = 0xFFFF_FFFF_FFFF_FFFF
NakBody = Struct(
    "reason" / Int16ul,
    "pfn" / Int64ul,  # NO_PFN when the reason names no page
    "message" / PascalString(Int16ul, "utf8"),
    Terminated,
)
ActualBody = Struct("actual" / Int32ul, Terminated)
StatsBody = Struct("entries" / GreedyRange(StatEntry), Terminated)
EmptyBody = Struct(Terminated)
ByeBody = Struct("reason" / Int16ul, "message" / PascalString(Int16ul, "utf8"), Terminated)

# The small fixed-size bodies a busy host sends and receives for every guest (a target
# pushed to 10,000 guests, their ACTUALs back) also have a ``struct`` fast path, like
# the header: construct spends ~30 us on each.  tests/test_wire.py proves each one
# builds and parses exactly what its declaration above does, for any input.
FAST_BODIES = {
    "config": (ConfigBody, struct.Struct("<4I")),
    "actual": (ActualBody, struct.Struct("<I")),
    "ack": (AckBody, struct.Struct("<Q")),
    "empty": (EmptyBody, struct.Struct("")),
}
CONFIG_FAST = FAST_BODIES["config"][1]
ACTUAL_FAST = FAST_BODIES["actual"][1]
ACK_FAST = FAST_BODIES["ack"][1]
ErrorBody = Struct("code" / Int16ul, "message" / PascalString(Int16ul, "utf8"), Terminated)
