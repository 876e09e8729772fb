"""Events: what a Connection returns from ``next_event()`` and takes in ``send()``.

One frozen dataclass per message, carrying exactly what goes on the wire (the header's
transaction id included where it means something).  Page sets are ``RangeSet``s, never
lists of PFNs.  docs/protocol.md gives the byte layout of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.constants import PROTOCOL_VERSIONS, ByeReason
from protocol.errors import ErrorCode, NakReason
from protocol.ranges import RangeSet


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""Returned by ``next_event()`` when no complete frame is buffered yet."""


@dataclass(frozen=True)
class Hello:
    """guest → host: who the guest is and what it offers."""

    name: str
    """The guest's name, ``[A-Za-z0-9_.-]{1,64}``; the host's configuration is keyed by it."""
    nonce: bytes
    """32 random bytes, fresh for every connection (authentication uses them)."""
    features: int
    """Offered feature bits (``Feature``), a 64-bit mask."""
    total_pages: int
    """The guest's RAM in 4 KiB pages (MemTotal, or the container's limit)."""
    ram_layout: RangeSet = field(default_factory=RangeSet.empty)
    """Guest-physical RAM as 4 KiB PFN ranges (empty in a container); informational only."""
    page_size: int = 4096
    """The guest kernel's base page size in bytes."""
    versions: frozenset[int] = PROTOCOL_VERSIONS
    """Protocol versions the guest speaks (sent as a bitmask, bits 1-31)."""


@dataclass(frozen=True)
class Challenge:
    """host → guest: authentication is required; prove you hold this guest's key."""

    nonce: bytes
    """32 random bytes chosen by the host for this connection."""


@dataclass(frozen=True)
class Auth:
    """guest → host: the proof, HMAC-SHA256 over both nonces, the name and the HELLO body."""

    proof: bytes
    """32 bytes; see docs/protocol.md, "Authentication"."""


@dataclass(frozen=True)
class Config:
    """host → guest: ``struct virtio_balloon_config``, sent whenever the target changes."""

    num_pages: int
    """Target balloon size in 4 KiB pages (u32)."""
    actual: int = 0
    """The guest's last reported ``actual``, echoed (u32)."""
    free_page_hint_cmd_id: int = 0
    """Unused by uballoon (FREE_PAGE_HINT is never accepted); always 0."""
    poison_val: int = 0
    """Unused by uballoon (PAGE_POISON is never accepted); always 0."""


@dataclass(frozen=True)
class Welcome:
    """host → guest: the session's terms."""

    version: int
    """The protocol version chosen (one the guest offered)."""
    features: int
    """Accepted features: a subset of the offered ones."""
    max_body: int
    """Largest body either side may send from now on (4 MiB to 64 MiB)."""
    config: Config
    """The initial target."""
    stats_interval_ms: int = 0
    """Push STATS this often (0: only on STATS_REQUEST)."""
    heartbeat_ms: int = 0
    """The host PINGs this often and drops a guest silent for 3 intervals (0: never)."""
    window: int = 1
    """How many INFLATE/DEFLATE/RESYNC transactions may be unanswered at once (1-64)."""


@dataclass(frozen=True)
class Inflate:
    """guest → host: these pages are in the balloon once the host acknowledges."""

    txid: int
    """Guest transaction id: 1 for the first request of a connection, then +1 each."""
    pages: RangeSet
    """The 4 KiB frames given to the host."""


@dataclass(frozen=True)
class Deflate:
    """guest → host: take these pages back out of the balloon."""

    txid: int
    """Guest transaction id (same sequence as INFLATE's)."""
    pages: RangeSet
    """Frames leaving the balloon; with MUST_TELL_HOST reused only after the ACK."""


@dataclass(frozen=True)
class Resync:
    """guest → host: the whole balloon, replacing what the host holds for this guest."""

    txid: int
    """Guest transaction id (same sequence as INFLATE's)."""
    pages: RangeSet
    """Every frame in the balloon (a part of them when ``more``)."""
    more: bool = False
    """Wire-level only: further parts with the same txid follow.  A Connection joins
    the parts and returns one Resync; apps never set this."""


@dataclass(frozen=True)
class Ack:
    """host → guest: the request ``txid`` is done."""

    txid: int
    """The request being answered (requests are answered in order)."""
    freed_pages: int = 0
    """Of the request's pages, how many the host really released (0: accounting only)."""


@dataclass(frozen=True)
class Nak:
    """host → guest: the request ``txid`` was refused; nothing changed on the host."""

    txid: int
    """The request being answered."""
    reason: NakReason
    """Why, as a code."""
    message: str = ""
    """Why, for people (UTF-8, at most 1024 bytes)."""
    pfn: int | None = None
    """The first offending PFN, when the reason names one."""


@dataclass(frozen=True)
class Actual:
    """guest → host: ``actual``, the balloon's size in 4 KiB pages as virtio defines it."""

    actual: int
    """Pages in the balloon (u32)."""


@dataclass(frozen=True)
class Stats:
    """guest → host: statistics as virtio's packed ``{le16 tag; le64 val}`` entries."""

    entries: tuple[tuple[int, int], ...]
    """(tag, value) pairs; each tag at most once.  See ``StatTag``."""
    txid: int = 0
    """0 for a pushed update; else the STATS_REQUEST being answered."""

    def as_dict(self) -> dict[int, int]:
        return dict(self.entries)


@dataclass(frozen=True)
class StatsRequest:
    """host → guest: send STATS now."""

    txid: int
    """Host transaction id, echoed by the STATS that answers (host ids start at 1)."""


@dataclass(frozen=True)
class Ping:
    """either way: are you there?"""

    txid: int
    """Sender's ping id, echoed by the PONG."""


@dataclass(frozen=True)
class Pong:
    """either way: the answer to PING ``txid``."""

    txid: int
    """The PING being answered."""


@dataclass(frozen=True)
class Bye:
    """either way: the sender closes the session on purpose."""

    reason: ByeReason = ByeReason.NORMAL
    """Why, as a code."""
    message: str = ""
    """Why, for people."""


@dataclass(frozen=True)
class Error:
    """either way: the sender hit a protocol error and closes the session."""

    code: ErrorCode
    """The error, as a code (``ErrorCode``)."""
    message: str = ""
    """What was wrong, for people (UTF-8, at most 1024 bytes)."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the byte stream at a frame boundary (not a wire message)."""


Event = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | Config
    | Inflate
    | Deflate
    | Resync
    | Ack
    | Nak
    | Actual
    | Stats
    | StatsRequest
    | Ping
    | Pong
    | Bye
    | Error
)
