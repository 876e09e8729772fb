"""Sans-IO connections: bytes in, events out; events in, bytes out.

Theory of operation
-------------------
A ``GuestConnection`` or ``HostConnection`` holds one session's protocol state and
nothing else: no sockets, no clocks, no pages.  ``receive_data(bytes)`` buffers what
arrived (``b""`` means end of stream); ``next_event()`` returns the next event or
``NEED_DATA``; ``send(event)`` returns the bytes to write.  Bytes from the peer that
break the protocol raise ``RemoteProtocolError`` and move the connection to
``State.ERROR``, after which only an ``Error`` event can be sent (our last word).  An
illegal ``send`` raises ``LocalProtocolError`` and changes nothing: nothing went out.

State changes come from the one table in ``state.py``.  On top of it each connection
enforces the virtio-balloon ordering rules *per transaction*, on both ends:

* INFLATE, DEFLATE and RESYNC are guest requests with txids 1, 2, 3 ... and at most
  ``window`` of them unanswered.  The host answers each with ACK or NAK, in the order
  received.
* Pages of an INFLATE are in the balloon only once it is ACKed; an INFLATE may not
  name a page already in the balloon or in an unanswered request.
* A DEFLATE may name only pages in the balloon (so never a page whose INFLATE is
  unanswered) and not already being deflated.  It leaves the balloon when ACKed; with
  MUST_TELL_HOST that ACK is what frees the guest to reuse the pages
  (``GuestConnection.may_reuse``).
* RESYNC replaces the balloon in one step: it is sent only with nothing else in
  flight, and nothing else is sent until it is answered.
* The RANGES header flag is used only when PFN_RANGES was negotiated; STATS only with
  STATS_VQ, unsolicited STATS only with STATS_PUSH; a target never exceeds the guest.

The guest side's view of the balloon (``ballooned``) is what the host has
acknowledged; the host's ledger keeps its own, authoritative copy across sessions.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

from protocol import auth, codec
from protocol.constants import (
    DEFAULT_MAX_BODY,
    HANDSHAKE_MAX_BODY,
    MAC_TRAILER_SIZE,
    NEVER_ACCEPTED,
    NONCE_SIZE,
    Feature,
    Flag,
    MessageType,
)
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Auth,
    Bye,
    Challenge,
    Config,
    ConnectionClosed,
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
from protocol.state import TRANSITIONS, Role, State

_MAC, _RANGES = int(Flag.MAC), int(Flag.RANGES)
MAX_OUTSTANDING_PINGS = 16
MAX_OUTSTANDING_STATS_REQUESTS = 16
RANGE_BYTES = 12
PFN_BYTES = 4


@dataclass(frozen=True)
class Pending:
    """One unanswered guest request."""

    txid: int
    kind: MessageType
    pages: RangeSet


def _ranges_pay(pages: RangeSet) -> bool:
    """Ranges are the smaller encoding (or the only one: PFNs past 2^32)."""
    if pages and pages.last >= 2**32:
        return True
    return pages.num_ranges * RANGE_BYTES < pages.num_pages * PFN_BYTES


class Connection:
    """What both ends share: framing, integrity, the state table, pings."""

    role: Role

    def __init__(self) -> None:
        self.state = State.IDLE
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.features = 0  # accepted features, once WELCOME has gone by
        self.max_body = HANDSHAKE_MAX_BODY
        self._reader = codec.FrameReader(HANDSHAKE_MAX_BODY)
        self._eof = False
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._hello_body = b""
        self._pending: deque[Pending] = deque()
        self._pending_inflate = RangeSet.empty()
        self._pending_deflate = RangeSet.empty()
        self._our_pings: set[int] = set()
        self._their_pings: set[int] = set()
        self._next_ping = 1
        self._we_said_goodbye = False
        self._state_before_goodbye = State.IDLE

    # -- public API -------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """True once frames in both directions carry MACs under the session keys."""
        return self._send_key is not None and self._recv_key is not None

    @property
    def pending(self) -> tuple[Pending, ...]:
        """Unanswered INFLATE/DEFLATE/RESYNC requests, oldest first."""
        return tuple(self._pending)

    @property
    def window(self) -> int:
        return self.welcome.window if self.welcome else 1

    def negotiated(self, feature: Feature) -> bool:
        return bool(self.features & feature.value)

    def next_ping(self) -> Ping:
        """A Ping with this side's next ping id."""
        return Ping(self._next_ping)

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event``.  Raises LocalProtocolError if the protocol
        does not allow sending it now; a refused send changes nothing."""
        kind = codec.MESSAGE_TYPE.get(type(event))
        if kind is None:
            raise LocalProtocolError(f"{event!r} is not a protocol event")
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {kind.name}: the session is closed")
        new_state = TRANSITIONS.get((self.state, self.role, kind))
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {kind.name} as {self.role.value} in state {self.state.value}",
                ErrorCode.UNEXPECTED,
            )
        # A refused send leaves the connection as it was: the caller asked for
        # something illegal, and nothing went on the wire.
        self._check_send(event)
        data = self._frames(event)
        self._after_send(event)
        old_state, self.state = self.state, new_state
        if isinstance(event, Bye | Error) and not self._we_said_goodbye:
            self._we_said_goodbye = True
            self._state_before_goodbye = old_state
        return data

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed the stream."""
        if data:
            if self._eof:
                raise LocalProtocolError("received data after the end of the stream")
            self._reader.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | ConnectionClosed | object:
        """The next event, ``NEED_DATA``, or ``ConnectionClosed`` at end of stream.

        Raises RemoteProtocolError if the peer broke the protocol (the connection
        moves to ERROR and stays there).
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection already failed", ErrorCode.UNEXPECTED)
        try:
            while True:
                frame = self._reader.next_frame()
                if frame is None:
                    if not self._eof:
                        return NEED_DATA
                    if self._reader.buffered:
                        raise RemoteProtocolError(
                            f"stream ended inside a frame ({self._reader.buffered} bytes "
                            f"of it arrived)",
                            ErrorCode.MALFORMED,
                            self._reader.consumed,
                        )
                    return ConnectionClosed()
                event = self._receive_frame(frame)
                if event is not None:
                    return event
        except ProtocolError:
            self.state = State.ERROR
            raise

    # -- frames ---------------------------------------------------------------------

    def _frames(self, event: Event) -> bytes:
        ranges = self.negotiated(Feature.PFN_RANGES)
        if ranges and isinstance(event, Inflate | Deflate | Resync):
            ranges = _ranges_pay(event.pages)
        parts: list[Event] = [event]
        if isinstance(event, Resync):
            parts = self._resync_frames(event)
        elif isinstance(event, Inflate | Deflate):
            limit = self.report_limit(event.pages, ranges)
            if limit is not None:
                raise LocalProtocolError(limit, ErrorCode.TOO_LARGE)
        out = []
        for part in parts:
            kind, flags, txid, body = codec.encode_event(part, ranges=ranges)
            if len(body) > self.max_body:
                raise LocalProtocolError(
                    f"{kind.name} body of {len(body)} bytes exceeds the limit of "
                    f"{self.max_body} bytes",
                    ErrorCode.TOO_LARGE,
                )
            out.append(codec.build_frame(kind, flags, txid, body, self._send_key, self._send_seq))
            if self._send_key is not None:
                self._send_seq += 1
            if isinstance(part, Hello):
                self._hello_body = body
        return b"".join(out)

    def report_limit(self, pages: RangeSet, ranges: bool | None = None) -> str | None:
        """Why ``pages`` cannot go in one INFLATE/DEFLATE frame, or None if it can."""
        if ranges is None:
            ranges = self.negotiated(Feature.PFN_RANGES) and _ranges_pay(pages)
        size = pages.num_ranges * RANGE_BYTES if ranges else pages.num_pages * PFN_BYTES
        if size > self.max_body:
            unit = f"{self.max_body // RANGE_BYTES} ranges" if ranges else (
                f"{self.max_body // PFN_BYTES} pages"
            )
            return f"a report of {pages.num_pages} pages does not fit one frame (at most {unit})"
        return None

    def split_report(self, pages: RangeSet) -> list[RangeSet]:
        """Cut ``pages`` into pieces that each fit one INFLATE/DEFLATE frame."""
        if self.negotiated(Feature.PFN_RANGES) and _ranges_pay(pages):
            return pages.split_ranges(self.max_body // RANGE_BYTES)
        return pages.split_pages(self.max_body // PFN_BYTES)

    def _resync_frames(self, event: Resync) -> list[Event]:
        pieces = self.split_report(event.pages) or [RangeSet.empty()]
        return [
            Resync(event.txid, piece, more=i < len(pieces) - 1) for i, piece in enumerate(pieces)
        ]

    def _receive_frame(self, frame: codec.Frame) -> Event | None:
        header = frame.header
        has_mac = bool(header.flags & _MAC)
        if self._recv_key is not None:
            if not has_mac and not self._crc_allowed_now(header.type):
                raise RemoteProtocolError(
                    f"unauthenticated {header.type.name} frame in an authenticated session",
                    ErrorCode.AUTH_FAILED,
                    frame.offset,
                )
        elif has_mac:
            raise RemoteProtocolError(
                f"{header.type.name} frame carries a MAC but no session key is agreed",
                ErrorCode.AUTH_FAILED,
                frame.offset,
            )
        if has_mac:
            assert self._recv_key is not None
            want = auth.frame_mac(self._recv_key, self._recv_seq, frame.raw_header, frame.body)
            if len(frame.trailer) != MAC_TRAILER_SIZE or not auth.same(want, frame.trailer):
                raise RemoteProtocolError(
                    f"MAC mismatch on {header.type.name} frame (tampered, replayed, "
                    f"reordered or from another session)",
                    ErrorCode.AUTH_FAILED,
                    frame.offset,
                )
            self._recv_seq += 1
        else:
            codec.verify_crc(frame)
        if header.flags & _RANGES and not self.negotiated(Feature.PFN_RANGES):
            raise RemoteProtocolError(
                f"{header.type.name} uses PFN ranges, which were not negotiated",
                ErrorCode.BAD_FEATURES,
                frame.offset,
            )
        event = codec.decode_body(header, frame.body, frame.offset)
        state = self._state_before_goodbye if self._we_said_goodbye else self.state
        if self._we_said_goodbye and state is State.ERROR:
            return None  # our last word was an ERROR: whatever follows is moot
        new_state = TRANSITIONS.get((state, self.role.peer, header.type))
        if new_state is None:
            raise RemoteProtocolError(
                f"{header.type.name} from the {self.role.peer.value} is not allowed in state "
                f"{self.state.value}",
                ErrorCode.UNEXPECTED,
                frame.offset,
            )
        if self._we_said_goodbye:
            # We closed; what crossed our BYE on the wire is checked, then dropped.
            return None
        try:
            result = self._on_receive(event, frame)
        except RemoteProtocolError as exc:
            if exc.offset is None:
                exc.offset = frame.offset
            raise
        self.state = new_state
        if isinstance(event, Hello):
            self._hello_body = frame.body
        return result

    def _crc_allowed_now(self, kind: MessageType) -> bool:
        return False

    def _switch_max_body(self, max_body: int) -> None:
        self.max_body = max_body
        self._reader.max_body = max_body

    # -- shared per-message rules ------------------------------------------------------

    def _check_send(self, event: Event) -> None:
        if isinstance(event, Ping):
            if event.txid != self._next_ping:
                raise LocalProtocolError(
                    f"PING id {event.txid} out of sequence (next is {self._next_ping})",
                    ErrorCode.ORDERING,
                )
            if len(self._our_pings) >= MAX_OUTSTANDING_PINGS:
                raise LocalProtocolError(
                    f"{MAX_OUTSTANDING_PINGS} PINGs already unanswered", ErrorCode.ORDERING
                )
        elif isinstance(event, Pong) and event.txid not in self._their_pings:
            raise LocalProtocolError(f"PONG {event.txid} answers no PING", ErrorCode.ORDERING)

    def _after_send(self, event: Event) -> None:
        if isinstance(event, Ping):
            self._our_pings.add(event.txid)
            self._next_ping += 1
        elif isinstance(event, Pong):
            self._their_pings.discard(event.txid)

    def _on_receive(self, event: Event, frame: codec.Frame) -> Event | None:
        if isinstance(event, Ping):
            if event.txid in self._their_pings or len(self._their_pings) >= MAX_OUTSTANDING_PINGS:
                raise RemoteProtocolError(
                    f"PING {event.txid} repeated, or too many PINGs unanswered",
                    ErrorCode.ORDERING,
                )
            self._their_pings.add(event.txid)
        elif isinstance(event, Pong):
            if event.txid not in self._our_pings:
                raise RemoteProtocolError(f"PONG {event.txid} answers no PING", ErrorCode.ORDERING)
            self._our_pings.discard(event.txid)
        return event

    def _add_pending(self, item: Pending) -> None:
        self._pending.append(item)
        if item.kind is MessageType.INFLATE:
            self._pending_inflate = self._pending_inflate | item.pages
        elif item.kind is MessageType.DEFLATE:
            self._pending_deflate = self._pending_deflate | item.pages

    def _pop_pending(self) -> Pending:
        item = self._pending.popleft()
        if item.kind is MessageType.INFLATE:
            self._pending_inflate = self._pending_inflate - item.pages
        elif item.kind is MessageType.DEFLATE:
            self._pending_deflate = self._pending_deflate - item.pages
        return item

    def _request_problem(self, event: Inflate | Deflate | Resync, expected_txid: int) -> str | None:
        """Why this request breaks the ordering rules, or None.  Same on both ends."""
        kind = codec.MESSAGE_TYPE[type(event)].name
        if event.txid != expected_txid:
            return f"{kind} txid {event.txid} out of sequence (expected {expected_txid})"
        if len(self._pending) >= self.window:
            return f"{kind} would exceed the window of {self.window} unanswered requests"
        if any(p.kind is MessageType.RESYNC for p in self._pending):
            return f"{kind} sent while a RESYNC is unanswered"
        if isinstance(event, Resync):
            if self._pending:
                return f"RESYNC sent with {len(self._pending)} requests unanswered"
            return None
        if not event.pages.isdisjoint(self._pending_inflate):
            return (
                f"{kind} names pages whose INFLATE is still unacknowledged "
                f"(first {(event.pages & self._pending_inflate).first:#x})"
            )
        if not event.pages.isdisjoint(self._pending_deflate):
            return (
                f"{kind} names pages already being deflated "
                f"(first {(event.pages & self._pending_deflate).first:#x})"
            )
        return None


class GuestConnection(Connection):
    """The guest's end.  ``key`` is this guest's secret, if it has one."""

    role = Role.GUEST

    def __init__(self, key: bytes | None = None, *, require_auth: bool | None = None) -> None:
        super().__init__()
        self._key = auth.check_key(key) if key is not None else None
        self.require_auth = self._key is not None if require_auth is None else require_auth
        """With a key, a host that does not authenticate is refused (no downgrade)."""
        self.ballooned = RangeSet.empty()
        """Pages the host has acknowledged (this session's view)."""
        self._next_txid = 1
        self._host_nonce = b""
        self._stats_requests: set[int] = set()

    @property
    def next_txid(self) -> int:
        """The txid the next INFLATE/DEFLATE/RESYNC must carry."""
        return self._next_txid

    def make_hello(self, **fields: object) -> Hello:
        """A Hello with a fresh nonce and, if this side has a key, AUTH offered."""
        features = int(fields.pop("features", 0))  # type: ignore[call-overload]
        if self._key is not None:
            features |= Feature.AUTH
        return Hello(nonce=os.urandom(NONCE_SIZE), features=features, **fields)  # type: ignore[arg-type]

    def prove(self) -> Auth:
        """The AUTH answering the host's CHALLENGE.  Raises LocalProtocolError if this
        side has no key or was not challenged."""
        if self.state is not State.CHALLENGED or self.hello is None:
            raise LocalProtocolError("AUTH answers a CHALLENGE; none is pending")
        if self._key is None:
            raise LocalProtocolError(
                "the host requires authentication but this guest has no key",
                ErrorCode.AUTH_REQUIRED,
            )
        return Auth(
            auth.proof(
                self._key, self.hello.nonce, self._host_nonce, self.hello.name, self._hello_body
            )
        )

    def may_reuse(self, pages: RangeSet) -> bool:
        """True if the guest may give ``pages`` back to its own use now: none is in an
        unanswered INFLATE or RESYNC, none is in the acknowledged balloon, and none is
        in an unanswered DEFLATE unless MUST_TELL_HOST is off."""
        for item in self._pending:
            if item.kind is not MessageType.DEFLATE and not pages.isdisjoint(item.pages):
                return False
        if self.negotiated(Feature.MUST_TELL_HOST) and not pages.isdisjoint(
            self._pending_deflate
        ):
            return False
        return (pages - self._pending_deflate).isdisjoint(self.ballooned)

    def _check_send(self, event: Event) -> None:
        super()._check_send(event)
        if isinstance(event, Hello):
            if self._key is not None and not event.features & Feature.AUTH:
                raise LocalProtocolError("a guest with a key must offer AUTH")
            if event.features & Feature.AUTH and self._key is None:
                raise LocalProtocolError("AUTH offered but this guest has no key")
        elif isinstance(event, Inflate | Deflate | Resync):
            problem = self._request_problem(event, self._next_txid)
            if problem is None and isinstance(event, Inflate):
                overlap = event.pages & self.ballooned
                if overlap:
                    problem = f"INFLATE names page {overlap.first:#x}, already in the balloon"
            if problem is None and isinstance(event, Deflate):
                outside = event.pages - self.ballooned
                if outside:
                    problem = f"DEFLATE names page {outside.first:#x}, not in the balloon"
            if problem:
                raise LocalProtocolError(problem, ErrorCode.ORDERING)
            if event.pages and event.pages.last >= 2**32 and not self.negotiated(
                Feature.PFN_RANGES
            ):
                raise LocalProtocolError(
                    f"PFN {event.pages.last:#x} does not fit virtio's u32 array; "
                    "PFN ranges were not negotiated"
                )
        elif isinstance(event, Stats):
            if not self.negotiated(Feature.STATS_VQ):
                raise LocalProtocolError("STATS without STATS_VQ negotiated", ErrorCode.BAD_FEATURES)
            if event.txid == 0 and not self.negotiated(Feature.STATS_PUSH):
                raise LocalProtocolError(
                    "pushed STATS without STATS_PUSH negotiated", ErrorCode.BAD_FEATURES
                )
            if event.txid and event.txid not in self._stats_requests:
                raise LocalProtocolError(
                    f"STATS {event.txid} answers no STATS_REQUEST", ErrorCode.ORDERING
                )

    def _after_send(self, event: Event) -> None:
        super()._after_send(event)
        if isinstance(event, Hello):
            self.hello = event
        elif isinstance(event, Auth):
            assert self.hello is not None and self._key is not None
            g2h, h2g = auth.session_keys(
                self._key, self.hello.nonce, self._host_nonce, self._hello_body
            )
            self._send_key, self._recv_key = g2h, h2g
        elif isinstance(event, Inflate | Deflate | Resync):
            self._add_pending(Pending(event.txid, codec.MESSAGE_TYPE[type(event)], event.pages))
            self._next_txid += 1
        elif isinstance(event, Stats) and event.txid:
            self._stats_requests.discard(event.txid)

    def _crc_allowed_now(self, kind: MessageType) -> bool:
        # The host refuses a wrong proof with a plain ERROR: it holds no session key.
        return self.state is State.AUTHENTICATED and kind is MessageType.ERROR

    def _on_receive(self, event: Event, frame: codec.Frame) -> Event | None:
        event = super()._on_receive(event, frame)  # type: ignore[assignment]
        assert self.hello is not None
        if isinstance(event, Challenge):
            self._host_nonce = event.nonce
            if not self.hello.features & Feature.AUTH:
                raise RemoteProtocolError(
                    "the host requires authentication, but this guest has no key",
                    ErrorCode.AUTH_REQUIRED,
                )
        elif isinstance(event, Welcome):
            self._check_welcome(event)
        elif isinstance(event, Config):
            self._check_target(event)
        elif isinstance(event, Ack | Nak):
            if not self._pending or self._pending[0].txid != event.txid:
                oldest = self._pending[0].txid if self._pending else None
                raise RemoteProtocolError(
                    f"{type(event).__name__.upper()} for txid {event.txid}, but the oldest "
                    f"unanswered request is {oldest}",
                    ErrorCode.ORDERING,
                )
            done = self._pop_pending()
            if isinstance(event, Ack):
                if done.kind is MessageType.INFLATE:
                    self.ballooned = self.ballooned | done.pages
                elif done.kind is MessageType.DEFLATE:
                    self.ballooned = self.ballooned - done.pages
                else:
                    self.ballooned = done.pages
        elif isinstance(event, StatsRequest):
            if not self.negotiated(Feature.STATS_VQ):
                raise RemoteProtocolError(
                    "STATS_REQUEST without STATS_VQ negotiated", ErrorCode.BAD_FEATURES
                )
            if (
                event.txid in self._stats_requests
                or len(self._stats_requests) >= MAX_OUTSTANDING_STATS_REQUESTS
            ):
                raise RemoteProtocolError(
                    f"STATS_REQUEST {event.txid} repeated or too many unanswered",
                    ErrorCode.ORDERING,
                )
            self._stats_requests.add(event.txid)
        return event

    def _check_welcome(self, welcome: Welcome) -> None:
        assert self.hello is not None
        if self.require_auth and self._send_key is None:
            raise RemoteProtocolError(
                "the host welcomed this guest without authenticating it; a guest with a key "
                "only talks to a host that proves it holds the same key",
                ErrorCode.AUTH_REQUIRED,
            )
        if welcome.version not in self.hello.versions:
            raise RemoteProtocolError(
                f"WELCOME chose version {welcome.version}, which this guest did not offer",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        extra = welcome.features & ~self.hello.features
        if extra:
            raise RemoteProtocolError(
                f"WELCOME accepts features {extra:#x} that were never offered",
                ErrorCode.BAD_FEATURES,
            )
        if welcome.features & NEVER_ACCEPTED:
            raise RemoteProtocolError(
                "WELCOME accepts FREE_PAGE_HINT, PAGE_POISON or REPORTING, which uballoon "
                "never accepts",
                ErrorCode.BAD_FEATURES,
            )
        if bool(welcome.features & Feature.AUTH) != (self._send_key is not None):
            raise RemoteProtocolError(
                "WELCOME's AUTH bit disagrees with whether the session was authenticated",
                ErrorCode.BAD_FEATURES,
            )
        self._check_target(welcome.config)
        self.welcome = welcome
        self.features = welcome.features
        self._switch_max_body(welcome.max_body)

    def _check_target(self, config: Config) -> None:
        assert self.hello is not None
        if config.num_pages > self.hello.total_pages:
            raise RemoteProtocolError(
                f"target of {config.num_pages} pages is larger than this guest's "
                f"{self.hello.total_pages} pages",
                ErrorCode.MALFORMED,
            )


class HostConnection(Connection):
    """The host's end of one guest's session."""

    role = Role.HOST

    def __init__(self) -> None:
        super().__init__()
        self._key: bytes | None = None
        self._host_nonce = b""
        self._expected_txid = 1
        self._resync_txid = 0
        self._resync_parts = RangeSet.empty()
        self._next_stats_request = 1
        self._stats_requests: set[int] = set()

    @property
    def guest_name(self) -> str | None:
        return self.hello.name if self.hello else None

    def challenge(self, key: bytes) -> Challenge:
        """A CHALLENGE for this guest, whose AUTH will be checked against ``key``."""
        self._key = auth.check_key(key)
        self._host_nonce = os.urandom(NONCE_SIZE)
        return Challenge(self._host_nonce)

    def next_stats_request(self) -> StatsRequest:
        return StatsRequest(self._next_stats_request)

    def _check_send(self, event: Event) -> None:
        super()._check_send(event)
        if isinstance(event, Challenge):
            if self._key is None or event.nonce != self._host_nonce:
                raise LocalProtocolError("build the CHALLENGE with challenge(key)")
            assert self.hello is not None
            if not self.hello.features & Feature.AUTH:
                raise LocalProtocolError(
                    f"guest {self.hello.name} did not offer AUTH; it cannot be challenged",
                    ErrorCode.AUTH_REQUIRED,
                )
        elif isinstance(event, Welcome):
            assert self.hello is not None
            if event.version not in self.hello.versions:
                raise LocalProtocolError(
                    f"version {event.version} was not offered", ErrorCode.UNSUPPORTED_VERSION
                )
            extra = event.features & ~self.hello.features
            if extra:
                raise LocalProtocolError(
                    f"cannot accept features {extra:#x}: the guest did not offer them",
                    ErrorCode.BAD_FEATURES,
                )
            if event.features & NEVER_ACCEPTED:
                raise LocalProtocolError(
                    "FREE_PAGE_HINT, PAGE_POISON and REPORTING are never accepted",
                    ErrorCode.BAD_FEATURES,
                )
            if bool(event.features & Feature.AUTH) != (self.state is State.AUTHENTICATED):
                raise LocalProtocolError(
                    "accept AUTH exactly when the guest authenticated", ErrorCode.BAD_FEATURES
                )
            self._check_target(event.config)
        elif isinstance(event, Config):
            self._check_target(event)
        elif isinstance(event, Ack | Nak):
            if not self._pending or self._pending[0].txid != event.txid:
                oldest = self._pending[0].txid if self._pending else None
                raise LocalProtocolError(
                    f"answers go in order: txid {event.txid} is not the oldest unanswered "
                    f"request ({oldest})",
                    ErrorCode.ORDERING,
                )
        elif isinstance(event, StatsRequest):
            if not self.negotiated(Feature.STATS_VQ):
                raise LocalProtocolError(
                    "STATS_REQUEST without STATS_VQ negotiated", ErrorCode.BAD_FEATURES
                )
            if event.txid != self._next_stats_request:
                raise LocalProtocolError(
                    f"STATS_REQUEST id {event.txid} out of sequence", ErrorCode.ORDERING
                )
            if len(self._stats_requests) >= MAX_OUTSTANDING_STATS_REQUESTS:
                raise LocalProtocolError("too many STATS_REQUESTs unanswered", ErrorCode.ORDERING)

    def _check_target(self, config: Config) -> None:
        assert self.hello is not None
        if config.num_pages > self.hello.total_pages:
            raise LocalProtocolError(
                f"target of {config.num_pages} pages is larger than guest {self.hello.name}'s "
                f"{self.hello.total_pages} pages"
            )

    def _after_send(self, event: Event) -> None:
        super()._after_send(event)
        if isinstance(event, Welcome):
            self.welcome = event
            self.features = event.features
            self._switch_max_body(event.max_body)
        elif isinstance(event, Ack | Nak):
            self._pop_pending()
        elif isinstance(event, StatsRequest):
            self._stats_requests.add(event.txid)
            self._next_stats_request += 1

    def _on_receive(self, event: Event, frame: codec.Frame) -> Event | None:
        event = super()._on_receive(event, frame)  # type: ignore[assignment]
        if isinstance(event, Hello):
            self.hello = event
        elif isinstance(event, Auth):
            self._verify(event)
        elif isinstance(event, Inflate | Deflate | Resync):
            return self._on_request(event)
        elif isinstance(event, Stats):
            if not self.negotiated(Feature.STATS_VQ):
                raise RemoteProtocolError("STATS without STATS_VQ negotiated", ErrorCode.BAD_FEATURES)
            if event.txid == 0:
                if not self.negotiated(Feature.STATS_PUSH):
                    raise RemoteProtocolError(
                        "pushed STATS without STATS_PUSH negotiated", ErrorCode.BAD_FEATURES
                    )
            elif event.txid in self._stats_requests:
                self._stats_requests.discard(event.txid)
            else:
                raise RemoteProtocolError(
                    f"STATS {event.txid} answers no STATS_REQUEST", ErrorCode.ORDERING
                )
        return event

    def _verify(self, event: Auth) -> None:
        assert self.hello is not None
        if self._key is None:
            raise RemoteProtocolError("AUTH without a CHALLENGE", ErrorCode.UNEXPECTED)
        want = auth.proof(
            self._key, self.hello.nonce, self._host_nonce, self.hello.name, self._hello_body
        )
        if not auth.same(want, event.proof):
            raise RemoteProtocolError(
                f"guest {self.hello.name!r} failed authentication (wrong key, or a replayed "
                "or relayed answer)",
                ErrorCode.AUTH_FAILED,
            )
        # From a good proof on, everything either way carries a MAC (WELCOME first).
        self._recv_key, self._send_key = auth.session_keys(
            self._key, self.hello.nonce, self._host_nonce, self._hello_body
        )

    def _on_request(self, event: Inflate | Deflate | Resync) -> Event | None:
        assert self.welcome is not None
        if self._resync_txid and not isinstance(event, Resync):
            raise RemoteProtocolError(
                f"{type(event).__name__.upper()} inside the parts of RESYNC {self._resync_txid}",
                ErrorCode.ORDERING,
            )
        if isinstance(event, Resync) and self._resync_txid:
            # A later part of a RESYNC split over several frames.
            if event.txid != self._resync_txid:
                raise RemoteProtocolError(
                    f"RESYNC part with txid {event.txid} inside RESYNC {self._resync_txid}",
                    ErrorCode.ORDERING,
                )
            if not event.pages.isdisjoint(self._resync_parts):
                raise RemoteProtocolError("RESYNC parts overlap", ErrorCode.MALFORMED)
            self._resync_parts = self._resync_parts | event.pages
        else:
            problem = self._request_problem(event, self._expected_txid)
            if problem:
                raise RemoteProtocolError(problem, ErrorCode.ORDERING)
            if isinstance(event, Resync):
                self._resync_txid = event.txid
                self._resync_parts = event.pages
        if isinstance(event, Resync):
            assert self.hello is not None
            if self._resync_parts.num_pages > self.hello.total_pages:
                raise RemoteProtocolError(
                    f"RESYNC names more pages ({self._resync_parts.num_pages}) than the guest "
                    f"has ({self.hello.total_pages})",
                    ErrorCode.MALFORMED,
                )
            if event.more:
                return None
            whole = Resync(self._resync_txid, self._resync_parts)
            self._resync_txid = 0
            self._resync_parts = RangeSet.empty()
            self._add_pending(Pending(whole.txid, MessageType.RESYNC, whole.pages))
            self._expected_txid += 1
            return whole
        self._add_pending(Pending(event.txid, codec.MESSAGE_TYPE[type(event)], event.pages))
        self._expected_txid += 1
        return event
