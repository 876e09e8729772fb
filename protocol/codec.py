"""Events <-> frames, statelessly.

``encode_frame`` turns one event into the bytes of one or more frames; ``FrameReader``
cuts a received byte stream into checked frames and ``decode_body`` turns a frame back
into an event.  Whether a message is allowed *now* is the Connection's business
(``connection.py`` and the table in ``state.py``); this module only knows what a
well-formed frame is.  Every parse failure leaves here as a ``RemoteProtocolError``
naming what was wrong; every bad event handed to us to send is a ``LocalProtocolError``.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from construct import ConstructError

from protocol import auth, wire
from protocol.constants import (
    CRC_TRAILER_SIZE,
    HEADER_SIZE,
    HEADER_VERSION,
    MAC_TRAILER_SIZE,
    MAGIC,
    MAX_NEGOTIATED_MAX_BODY,
    MAX_WINDOW,
    MIN_NEGOTIATED_MAX_BODY,
    NONCE_SIZE,
    PFN_MESSAGES,
    ByeReason,
    Flag,
    MessageType,
)
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    NakReason,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.events import (
    Ack,
    Actual,
    Auth,
    Bye,
    Challenge,
    Config,
    Deflate,
    Error,
    Event,
    Hello,
    Inflate,
    Nak,
    Ping,
    Pong,
    Resync,
    Stats,
    StatsRequest,
    Welcome,
)
from protocol.ranges import RangeSet

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# Plain ints for the hot path: IntFlag/IntEnum arithmetic goes through enum machinery
# (a push to 10,000 guests decodes and encodes every frame header).
_RANGES, _MORE, _MAC = int(Flag.RANGES), int(Flag.MORE), int(Flag.MAC)
_KNOWN_FLAGS = _RANGES | _MORE | _MAC
_TYPES = {int(t): t for t in MessageType}
MAX_MESSAGE_BYTES = 1024
U16, U32, U64 = 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

MESSAGE_TYPE: dict[type, MessageType] = {
    Hello: MessageType.HELLO,
    Challenge: MessageType.CHALLENGE,
    Auth: MessageType.AUTH,
    Welcome: MessageType.WELCOME,
    Config: MessageType.CONFIG,
    Inflate: MessageType.INFLATE,
    Deflate: MessageType.DEFLATE,
    Resync: MessageType.RESYNC,
    Ack: MessageType.ACK,
    Nak: MessageType.NAK,
    Actual: MessageType.ACTUAL,
    Stats: MessageType.STATS,
    StatsRequest: MessageType.STATS_REQUEST,
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    Bye: MessageType.BYE,
    Error: MessageType.ERROR,
}
# Messages whose header carries a transaction id; every other header's txid is 0.
TXID_MESSAGES = frozenset(
    {
        MessageType.INFLATE,
        MessageType.DEFLATE,
        MessageType.RESYNC,
        MessageType.ACK,
        MessageType.NAK,
        MessageType.STATS,
        MessageType.STATS_REQUEST,
        MessageType.PING,
        MessageType.PONG,
    }
)


# -- header and trailer -----------------------------------------------------------------


@dataclass(frozen=True)
class FrameHeader:
    type: MessageType
    flags: int  # Flag bits, kept as a plain int
    txid: int
    length: int

    @property
    def trailer_size(self) -> int:
        return MAC_TRAILER_SIZE if self.flags & _MAC else CRC_TRAILER_SIZE


def pack_header(mtype: int, flags: int, txid: int, length: int) -> bytes:
    return wire.HEADER_FAST.pack(MAGIC, HEADER_VERSION, mtype, flags, txid, length)


def parse_header(data: bytes | memoryview, offset: int = 0) -> FrameHeader:
    """Check a 16-byte header on its own: magic, version, type, flags, txid.

    The length is returned, not judged: the caller knows the current limit.
    Raises RemoteProtocolError (with ``offset``) naming the bad field.
    """
    magic, version, mtype, flags, txid, length = wire.HEADER_FAST.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError(
            f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a uballoon stream",
            ErrorCode.MALFORMED,
            offset,
        )
    if version != HEADER_VERSION:
        raise RemoteProtocolError(
            f"frame version {version} not supported (this side speaks {HEADER_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
            offset,
        )
    kind = _TYPES.get(mtype)
    if kind is None:
        raise RemoteProtocolError(
            f"unknown message type {mtype:#04x}", ErrorCode.MALFORMED, offset
        )
    if flags and flags != _MAC:
        problem = flag_problem(kind, flags)
        if problem:
            raise RemoteProtocolError(problem, ErrorCode.MALFORMED, offset)
    if txid and kind not in TXID_MESSAGES:
        raise RemoteProtocolError(
            f"{kind.name} carries no transaction id, but the header has txid {txid}",
            ErrorCode.MALFORMED,
            offset,
        )
    return FrameHeader(kind, flags, txid, length)


def flag_problem(kind: MessageType, flags: int) -> str | None:
    """Why ``flags`` make no sense on a ``kind`` frame, or None."""
    unknown = flags & ~_KNOWN_FLAGS
    if unknown:
        return f"unknown header flag bits {unknown:#06x} on {kind.name}"
    if flags & _RANGES and kind not in PFN_MESSAGES:
        return f"flag RANGES makes no sense on {kind.name} (only INFLATE, DEFLATE, RESYNC)"
    if flags & _MORE and kind is not MessageType.RESYNC:
        return f"flag MORE makes no sense on {kind.name} (only RESYNC)"
    return None


def crc_trailer(header: bytes, body: bytes | memoryview) -> bytes:
    return (zlib.crc32(body, zlib.crc32(header))).to_bytes(4, "little")


# -- events <-> bodies ------------------------------------------------------------------


def encode_event(event: Event, *, ranges: bool) -> tuple[MessageType, int, int, bytes]:
    """(type, flags, txid, body) for ``event``; PFN bodies as ranges if ``ranges``.

    Raises LocalProtocolError naming the field that cannot go on the wire.
    """
    check_event(event, LocalProtocolError)
    kind = MESSAGE_TYPE[type(event)]
    flags = 0
    txid = getattr(event, "txid", 0)
    try:
        if isinstance(event, Inflate | Deflate | Resync):
            if ranges:
                flags |= _RANGES
                body = wire.PfnRangesBody.build(event.pages)
            else:
                body = wire.PfnArrayBody.build(event.pages)
            if isinstance(event, Resync) and event.more:
                flags |= _MORE
        else:
            body = _BUILDERS[kind](event)
    except (ConstructError, ValueError, OverflowError, UnicodeError) as exc:
        raise LocalProtocolError(f"cannot encode {kind.name}: {exc}") from exc
    return kind, flags, txid, body


def decode_body(header: FrameHeader, body: bytes, offset: int | None = None) -> Event:
    """The event a checked frame carries.  Raises RemoteProtocolError if the body is
    malformed or a value makes no sense."""
    kind = header.type
    try:
        if kind in PFN_MESSAGES:
            layout = wire.PfnRangesBody if header.flags & _RANGES else wire.PfnArrayBody
            pages = layout.parse(body)
            if kind is MessageType.INFLATE:
                event: Event = Inflate(header.txid, pages)
            elif kind is MessageType.DEFLATE:
                event = Deflate(header.txid, pages)
            else:
                event = Resync(header.txid, pages, bool(header.flags & _MORE))
        else:
            event = _PARSERS[kind](header.txid, body)
    except ProtocolError:
        raise
    except (ConstructError, ValueError, OverflowError, UnicodeError) as exc:
        raise RemoteProtocolError(
            f"malformed {kind.name} body ({len(body)} bytes): {_describe(exc)}",
            ErrorCode.MALFORMED,
            offset,
        ) from None
    try:
        check_event(event, RemoteProtocolError)
    except RemoteProtocolError as exc:
        exc.offset = offset
        raise
    return event


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _welcome(e: Welcome) -> bytes:
    return wire.WelcomeBody.build(
        dict(
            version=e.version,
            window=e.window,
            features=e.features,
            max_body=e.max_body,
            config=_config_dict(e.config),
            stats_interval_ms=e.stats_interval_ms,
            heartbeat_ms=e.heartbeat_ms,
        )
    )


def _config_dict(c: Config) -> dict[str, int]:
    return dict(
        num_pages=c.num_pages,
        actual=c.actual,
        free_page_hint_cmd_id=c.free_page_hint_cmd_id,
        poison_val=c.poison_val,
    )


def _config(c: object) -> Config:
    return Config(c.num_pages, c.actual, c.free_page_hint_cmd_id, c.poison_val)  # type: ignore[attr-defined]


def _versions_mask(versions: frozenset[int]) -> int:
    mask = 0
    for v in versions:
        mask |= 1 << v
    return mask


_BUILDERS: dict[MessageType, Callable[[object], bytes]] = {
    MessageType.HELLO: lambda e: wire.HelloBody.build(
        dict(
            versions=_versions_mask(e.versions),  # type: ignore[attr-defined]
            features=e.features,  # type: ignore[attr-defined]
            page_size=e.page_size,  # type: ignore[attr-defined]
            total_pages=e.total_pages,  # type: ignore[attr-defined]
            nonce=e.nonce,  # type: ignore[attr-defined]
            name=e.name,  # type: ignore[attr-defined]
            ram_layout=e.ram_layout,  # type: ignore[attr-defined]
        )
    ),
    MessageType.CHALLENGE: lambda e: wire.ChallengeBody.build(dict(nonce=e.nonce)),  # type: ignore[attr-defined]
    MessageType.AUTH: lambda e: wire.AuthBody.build(dict(proof=e.proof)),  # type: ignore[attr-defined]
    MessageType.WELCOME: _welcome,  # type: ignore[dict-item]
    MessageType.CONFIG: lambda e: wire.CONFIG_FAST.pack(
        e.num_pages, e.actual, e.free_page_hint_cmd_id, e.poison_val  # type: ignore[attr-defined]
    ),
    MessageType.ACK: lambda e: wire.ACK_FAST.pack(e.freed_pages),  # type: ignore[attr-defined]
    MessageType.NAK: lambda e: wire.NakBody.build(
        dict(
            reason=e.reason,  # type: ignore[attr-defined]
            pfn=wire.NO_PFN if e.pfn is None else e.pfn,  # type: ignore[attr-defined]
            message=e.message,  # type: ignore[attr-defined]
        )
    ),
    MessageType.ACTUAL: lambda e: wire.ACTUAL_FAST.pack(e.actual),  # type: ignore[attr-defined]
    MessageType.STATS: lambda e: wire.StatsBody.build(
        dict(entries=[dict(tag=t, val=v) for t, v in e.entries])  # type: ignore[attr-defined]
    ),
    MessageType.STATS_REQUEST: lambda e: b"",
    MessageType.PING: lambda e: b"",
    MessageType.PONG: lambda e: b"",
    MessageType.BYE: lambda e: wire.ByeBody.build(dict(reason=e.reason, message=e.message)),  # type: ignore[attr-defined]
    MessageType.ERROR: lambda e: wire.ErrorBody.build(dict(code=e.code, message=e.message)),  # type: ignore[attr-defined]
}


def _versions(mask: int) -> frozenset[int]:
    return frozenset(v for v in range(32) if mask >> v & 1)


def _fixed(layout: struct.Struct, what: str, body: bytes) -> tuple[int, ...]:
    """Unpack a fixed-size body through its fast path (see wire.FAST_BODIES)."""
    if len(body) != layout.size:
        raise ValueError(f"a {what} body is {layout.size} bytes, not {len(body)}")
    return layout.unpack(body)


def _empty(body: bytes) -> None:
    if body:
        raise ValueError(f"expected an empty body, got {len(body)} bytes")


def _nak(txid: int, body: bytes) -> Nak:
    c = wire.NakBody.parse(body)
    return Nak(txid, _enum(NakReason, c.reason, "NAK reason"), c.message,
               None if c.pfn == wire.NO_PFN else c.pfn)


def _enum(enum_type: type, value: int, what: str):  # type: ignore[no-untyped-def]
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value}") from None


def _hello(txid: int, body: bytes) -> Hello:
    c = wire.HelloBody.parse(body)
    return Hello(
        name=c.name,
        nonce=c.nonce,
        features=c.features,
        total_pages=c.total_pages,
        ram_layout=c.ram_layout,
        page_size=c.page_size,
        versions=_versions(c.versions),
    )


def _welcome_parse(txid: int, body: bytes) -> Welcome:
    c = wire.WelcomeBody.parse(body)
    return Welcome(
        version=c.version,
        features=c.features,
        max_body=c.max_body,
        config=_config(c.config),
        stats_interval_ms=c.stats_interval_ms,
        heartbeat_ms=c.heartbeat_ms,
        window=c.window,
    )


def _stats(txid: int, body: bytes) -> Stats:
    c = wire.StatsBody.parse(body)
    return Stats(tuple((e.tag, e.val) for e in c.entries), txid)


def _ping(txid: int, body: bytes) -> Ping:
    _empty(body)
    return Ping(txid)


def _pong(txid: int, body: bytes) -> Pong:
    _empty(body)
    return Pong(txid)


def _stats_request(txid: int, body: bytes) -> StatsRequest:
    _empty(body)
    return StatsRequest(txid)


_PARSERS: dict[MessageType, Callable[[int, bytes], Event]] = {
    MessageType.HELLO: _hello,
    MessageType.CHALLENGE: lambda t, b: Challenge(wire.ChallengeBody.parse(b).nonce),
    MessageType.AUTH: lambda t, b: Auth(wire.AuthBody.parse(b).proof),
    MessageType.WELCOME: _welcome_parse,
    MessageType.CONFIG: lambda t, b: Config(*_fixed(wire.CONFIG_FAST, "CONFIG", b)),
    MessageType.ACK: lambda t, b: Ack(t, *_fixed(wire.ACK_FAST, "ACK", b)),
    MessageType.NAK: _nak,
    MessageType.ACTUAL: lambda t, b: Actual(*_fixed(wire.ACTUAL_FAST, "ACTUAL", b)),
    MessageType.STATS: _stats,
    MessageType.STATS_REQUEST: _stats_request,
    MessageType.PING: _ping,
    MessageType.PONG: _pong,
    MessageType.BYE: lambda t, b: Bye(
        _enum(ByeReason, (c := wire.ByeBody.parse(b)).reason, "BYE reason"), c.message
    ),
    MessageType.ERROR: lambda t, b: Error(
        _enum(ErrorCode, (c := wire.ErrorBody.parse(b)).code, "error code"), c.message
    ),
}


# -- value checks, the same for what we send and what we receive ---------------------


def check_event(event: Event, error: type[ProtocolError]) -> None:
    """Raise ``error`` naming the first field of ``event`` that cannot be on the wire."""
    problem = _problem(event)
    if problem:
        raise error(f"{MESSAGE_TYPE[type(event)].name}: {problem}", ErrorCode.MALFORMED)


def _problem(e: Event) -> str | None:  # noqa: C901 - one flat list of rules reads best
    if isinstance(e, Hello):
        if not isinstance(e.name, str) or not NAME_RE.match(e.name):
            return f"guest name {e.name!r} must match [A-Za-z0-9_.-]{{1,64}}"
        if len(e.nonce) != NONCE_SIZE:
            return f"nonce must be {NONCE_SIZE} bytes, not {len(e.nonce)}"
        if not e.versions or any(not 1 <= v <= 31 for v in e.versions):
            return f"versions {sorted(e.versions)} must be a non-empty set within 1-31"
        if e.page_size < 4096 or e.page_size & (e.page_size - 1) or e.page_size > U32:
            return f"page size {e.page_size} must be a power of two of at least 4096"
        if not 1 <= e.total_pages <= U64:
            return f"total_pages {e.total_pages} must be at least 1"
        if not 0 <= e.features <= U64:
            return "features must fit 64 bits"
        if e.ram_layout.num_ranges > U16:
            return "RAM layout has more ranges than fit the message"
    elif isinstance(e, Challenge):
        if len(e.nonce) != NONCE_SIZE:
            return f"nonce must be {NONCE_SIZE} bytes, not {len(e.nonce)}"
    elif isinstance(e, Auth):
        if len(e.proof) != auth.PROOF_SIZE:
            return f"proof must be {auth.PROOF_SIZE} bytes, not {len(e.proof)}"
    elif isinstance(e, Welcome):
        if not 1 <= e.version <= 31:
            return f"version {e.version} must be within 1-31"
        if not MIN_NEGOTIATED_MAX_BODY <= e.max_body <= MAX_NEGOTIATED_MAX_BODY:
            return (
                f"max_body {e.max_body} must be within {MIN_NEGOTIATED_MAX_BODY}-"
                f"{MAX_NEGOTIATED_MAX_BODY}"
            )
        if not 1 <= e.window <= MAX_WINDOW:
            return f"window {e.window} must be within 1-{MAX_WINDOW}"
        if not 0 <= e.features <= U64:
            return "features must fit 64 bits"
        for name in ("stats_interval_ms", "heartbeat_ms"):
            if not 0 <= getattr(e, name) <= U32:
                return f"{name} must fit 32 bits"
        return _problem(e.config)
    elif isinstance(e, Config):
        for name in ("num_pages", "actual"):
            if not 0 <= getattr(e, name) <= U32:
                return f"{name} {getattr(e, name)} must fit 32 bits"
        if e.free_page_hint_cmd_id or e.poison_val:
            return "free_page_hint_cmd_id and poison_val must be 0 (features never accepted)"
    elif isinstance(e, Inflate | Deflate | Resync):
        if not 1 <= e.txid <= U32:
            return f"transaction id {e.txid} must be within 1-{U32}"
        if not isinstance(e.pages, RangeSet):
            return "pages must be a RangeSet"
        if not e.pages and not isinstance(e, Resync):
            return "a report must name at least one page"
    elif isinstance(e, Ack):
        if not 1 <= e.txid <= U32:
            return f"transaction id {e.txid} must be within 1-{U32}"
        if not 0 <= e.freed_pages <= U64:
            return "freed_pages must fit 64 bits"
    elif isinstance(e, Nak):
        if not 1 <= e.txid <= U32:
            return f"transaction id {e.txid} must be within 1-{U32}"
        if len(e.message.encode()) > MAX_MESSAGE_BYTES:
            return f"message longer than {MAX_MESSAGE_BYTES} bytes"
        if e.pfn is not None and not 0 <= e.pfn < U64:
            return "pfn must fit 64 bits"
        if not isinstance(e.reason, NakReason):
            return f"unknown NAK reason {e.reason}"
    elif isinstance(e, Actual):
        if not 0 <= e.actual <= U32:
            return f"actual {e.actual} must fit 32 bits"
    elif isinstance(e, Stats):
        tags = [t for t, _ in e.entries]
        if len(set(tags)) != len(tags):
            dup = next(t for t in tags if tags.count(t) > 1)
            return f"stat tag {dup:#06x} appears more than once"
        for tag, value in e.entries:
            if not 0 <= tag <= U16 or not 0 <= value <= U64:
                return f"stat {tag}={value} does not fit (u16 tag, u64 value)"
        if not 0 <= e.txid <= U32:
            return "txid must fit 32 bits"
    elif isinstance(e, StatsRequest | Ping | Pong):
        if not 1 <= e.txid <= U32:
            return f"transaction id {e.txid} must be within 1-{U32}"
    elif isinstance(e, Bye | Error):
        if len(e.message.encode()) > MAX_MESSAGE_BYTES:
            return f"message longer than {MAX_MESSAGE_BYTES} bytes"
        if isinstance(e, Bye) and not isinstance(e.reason, ByeReason):
            return f"unknown BYE reason {e.reason}"
        if isinstance(e, Error) and not isinstance(e.code, ErrorCode):
            return f"unknown error code {e.code}"
    return None


# -- frames -------------------------------------------------------------------------------


def build_frame(
    kind: int, flags: int, txid: int, body: bytes, mac_key: bytes | None, seq: int
) -> bytes:
    """One frame: header, body, and a CRC-32 trailer, or an HMAC under ``mac_key``."""
    if mac_key is not None:
        flags |= _MAC
        header = pack_header(kind, flags, txid, len(body))
        return b"".join((header, body, auth.frame_mac(mac_key, seq, header, body)))
    header = pack_header(kind, flags, txid, len(body))
    return b"".join((header, body, crc_trailer(header, body)))


@dataclass(frozen=True)
class Frame:
    """A received frame whose header and trailer were checked."""

    offset: int
    """Byte offset of the frame in the stream."""
    header: FrameHeader
    body: bytes
    raw_header: bytes
    trailer: bytes


class FrameReader:
    """Cuts a byte stream into frames, judging each header before buffering its body.

    The buffer is a bytearray consumed from a moving offset and compacted only when
    the consumed part dominates, so reassembling a 4 MiB body from 64 KiB reads costs
    one copy, not one per read.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._pos = 0
        self.consumed = 0  # stream offset of self._pos
        self._header: FrameHeader | None = None

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed.

        Raises RemoteProtocolError on a bad header (before its body is buffered) or a
        body longer than ``max_body``.  The trailer is *not* verified here (a MAC needs
        the session key); ``verify_crc`` does the CRC.
        """
        if self._header is None:
            if self.buffered < HEADER_SIZE:
                return None
            header = parse_header(
                bytes(self._buf[self._pos : self._pos + HEADER_SIZE]), self.consumed
            )
            if header.length > self.max_body:
                raise RemoteProtocolError(
                    f"{header.type.name} body of {header.length} bytes exceeds the limit "
                    f"of {self.max_body} bytes",
                    ErrorCode.TOO_LARGE,
                    self.consumed,
                )
            self._header = header
        header = self._header
        total = HEADER_SIZE + header.length + header.trailer_size
        if self.buffered < total:
            return None
        start = self._pos
        view = memoryview(self._buf)
        try:
            raw_header = bytes(view[start : start + HEADER_SIZE])
            body = bytes(view[start + HEADER_SIZE : start + HEADER_SIZE + header.length])
            trailer = bytes(view[start + HEADER_SIZE + header.length : start + total])
        finally:
            view.release()
        frame = Frame(self.consumed, header, body, raw_header, trailer)
        self._pos += total
        self.consumed += total
        self._header = None
        return frame


def verify_crc(frame: Frame) -> None:
    if crc_trailer(frame.raw_header, frame.body) != frame.trailer:
        raise RemoteProtocolError(
            f"CRC-32 mismatch on {frame.header.type.name} frame",
            ErrorCode.INTEGRITY,
            frame.offset,
        )
