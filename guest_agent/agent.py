"""The agent core: which chunks the balloon holds, what the host knows of each, and what
to do next.  Plain code: no event loop, no sockets, no clock, no page touching.

Theory of operation
-------------------
The core owns one ``Slot`` per chunk of the pool and one ``GuestConnection`` per
session with the host.  The service feeds it bytes (``receive_data``), time
(``now`` arguments), memory snapshots (``observe``) and the results of the
worker's pool calls (``pinned``, ``released``, ``verified``); it returns bytes to
send (``data_to_send``) and the next pool call to make (``next_command``: ``Pin``,
``Release`` or ``Verify``).  Tests drive it the same way with a pool of real pages
and a ``HostConnection`` in memory.

A chunk's life (DESIGN.md) -- the state is the core's view; ``safe`` says whether
its pages may go back to the guest without hearing from the host again (no report
of it is unanswered)::

    PINNED ──INFLATE──▶ PENDING ──ACK──▶ BALLOONED ──DEFLATE──▶ DEFLATING ──ACK──▶ released
      safe               unsafe   │        safe                   safe      (with MUST_TELL_HOST
                                  └─NAK──▶ released (the host changed nothing)   only after ACK)

    session lost:   PENDING, RESYNCING ─▶ UNCONFIRMED (unsafe)    DEFLATING ─▶ LEAVING (safe)
    agent restart:  every chunk file    ─▶ UNCONFIRMED (unsafe)
    every session:  RESYNC first: the oldest chunks up to the target ─▶ RESYNCING ─ACK─▶ BALLOONED;
                    the rest ─▶ LEAVING, released once that RESYNC is acknowledged.

Invariants:

* A page goes back to the guest only when ``GuestConnection.may_reuse`` says so in
  a session whose RESYNC was acknowledged, or -- with no session -- when its slot
  is ``safe``.  (A new session's connection knows nothing yet, so ``may_reuse``
  alone would say yes to pages a dead session may still be punching.)
* Only BALLOONED chunks are deflated; deflation is newest first (LIFO), except that
  a chunk holding more than the target gives back is deflated only after the part the
  guest keeps of it has been pinned anew and reported (so the balloon never drops
  below the target, unless the guard cannot spare those pins).  When more
  chunks are to be deflated than the window takes at once, one DEFLATE names them
  all (one round trip, and one worker call releases them all).
* Pages count as ballooned only once acknowledged; ``actual`` (ACTUAL) follows
  every change of the acknowledged balloon, except that -- as virtio's driver does --
  deflated pages leave it once they are the guest's again (released), not when the
  DEFLATE is acknowledged.  While a pin is under way the update waits for that
  chunk's INFLATE, so both go out in one send.
* Nothing but the RESYNC is sent until it is acknowledged, in every session, and
  again whenever the frames of a reported chunk are found to have moved.
* Nothing is pinned while no session is active, and at most ``window`` chunks are
  pinned-or-unanswered at a time (chunk N+1 is pinned while N's report is in flight).
* A routine check of the frames (``--verify-interval``) waits while a pin is wanted
  (with one vCPU it would only delay the inflate); one asked for because pins were
  lost comes before any further pin.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from guest_agent.guard import Guard, GuardConfig
from guest_agent.pool import HUGE_PAGE, Chunk, union_frames
from guest_agent.stats import BalloonFigures, MemorySnapshot, stats_entries
from protocol.connection import GuestConnection
from protocol.constants import BalloonState, ByeReason, Feature
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    NativeError,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Bye,
    Challenge,
    Config,
    ConnectionClosed,
    Deflate,
    Error,
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
from protocol.state import State
from protocol.units import PAGE_SIZE, format_size

__all__ = [
    "OFFERED_FEATURES",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "AgentConfig",
    "ChunkState",
    "Slot",
    "Pin",
    "Release",
    "Verify",
    "Command",
    "AgentCore",
]

log = logging.getLogger("uballoon.agent")

OFFERED_FEATURES = int(
    Feature.MUST_TELL_HOST
    | Feature.STATS_VQ
    | Feature.DEFLATE_ON_OOM
    | Feature.PFN_RANGES
    | Feature.STATS_PUSH
    | Feature.STATS_PRESSURE
    | Feature.STABLE_PFNS
)
"""Everything the agent can offer; the service removes what this guest cannot do."""

DEFAULT_CHUNK_BYTES = 128 << 20
"""The default chunk.  Every chunk costs the agent a pin, a report and an answer in
Python (tens of milliseconds of a TCG guest's only vCPU); a larger one costs the
kernel more to pin (io_uring accounts huge pages in time quadratic in a buffer's
size).  Inflating 1 GiB in a 2 GiB TCG guest, vCPU seconds (medians of 3):
32M 5.51, 64M 4.85, 128M 4.55, 256M 4.69.  It is also the pressure step."""

MAX_CHUNK_BYTES = 1 << 30
"""A chunk's report always fits one frame: 1 GiB is 262,144 pages, under both the
4 MiB minimum body's 1 Mi u32 PFNs and its 349,525 ranges; also io_uring's buffer size."""


@dataclass(frozen=True)
class AgentConfig:
    name: str
    """The guest's name in HELLO."""
    total_pages: int
    """The guest's memory in 4 KiB pages (MemTotal, or the container's limit)."""
    guard: GuardConfig
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Largest chunk (a multiple of 2 MiB, at most 1 GiB)."""
    features: int = OFFERED_FEATURES
    """Features to offer (AUTH is added when ``key`` is given)."""
    key: bytes | None = None
    ram_layout: RangeSet = field(default_factory=RangeSet.empty)
    backoff_s: tuple[float, float] = (1.0, 60.0)
    """After a refused or failed inflate: first and longest pause before trying again."""
    progress_interval_s: float = 2.0
    """Least time between two progress lines in the log."""


class ChunkState(enum.Enum):
    PINNED = "pinned"  # pinned, frames read, never reported
    PENDING = "pending"  # INFLATE sent, not answered
    BALLOONED = "ballooned"  # the host acknowledged it
    DEFLATING = "deflating"  # DEFLATE sent, not answered
    RESYNCING = "resyncing"  # listed in an unanswered RESYNC
    UNCONFIRMED = "unconfirmed"  # reported in an earlier session or by an earlier agent
    LEAVING = "leaving"  # out of the balloon once the host confirms nothing is pending
    RELEASING = "releasing"  # handed to the worker to release


_COMMITTED = (ChunkState.PINNED, ChunkState.PENDING, ChunkState.BALLOONED)


@dataclass(eq=False)
class Slot:
    """The core's record of one chunk."""

    chunk: Chunk
    state: ChunkState
    safe: bool
    """No report of it is unanswered: its pages may return to the guest without the host."""
    unsent: list[RangeSet] = field(default_factory=list)
    """Report pieces not yet sent (a report too big for one frame is split)."""
    unanswered: int = 0
    refused: bool = False
    for_pressure: bool = False
    freed_pages: int = 0
    deflated: bool = False
    """Its DEFLATE was acknowledged: the host no longer counts it, but until the worker
    has released it the guest does not have its pages back (``actual`` still counts it)."""

    @property
    def pages(self) -> int:
        return self.chunk.pages


@dataclass(frozen=True)
class Pin:
    """Worker: pin a new chunk of ``size_bytes`` (``PagePool.pin``)."""

    size_bytes: int


@dataclass(frozen=True)
class Release:
    """Worker: release ``chunk`` (``PagePool.release``)."""

    chunk: Chunk


@dataclass(frozen=True)
class Verify:
    """Worker: re-read the frames of ``chunks`` (``PagePool.check``)."""

    chunks: tuple[Chunk, ...]


Command = Pin | Release | Verify

_TOO_LARGE_RE = re.compile(r"target of (\d+) pages is larger than this guest's (\d+) pages")


def _size(pages: int) -> str:
    return format_size(pages * PAGE_SIZE)


class AgentCore:
    """The balloon's state machine; see the module docstring.

    ``snapshot`` reads memory now (for STATS answers); ``stable`` says whether chunks
    are long-term pinned (STABLE_PFNS is offered only then).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        snapshot: Callable[[], MemorySnapshot],
        chunks: Iterable[Chunk] = (),
        stable: bool = True,
        pressure_stats: bool = True,
    ) -> None:
        if config.chunk_bytes % HUGE_PAGE or not HUGE_PAGE <= config.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError("chunk_bytes must be a multiple of 2 MiB between 2M and 1G")
        self.config = config
        self.guard = Guard(config.guard)
        self._snapshot = snapshot
        self.stable = stable
        self.features = int(config.features)
        if not stable:
            self.features &= ~Feature.STABLE_PFNS
        if not pressure_stats:
            self.features &= ~Feature.STATS_PRESSURE
        if not config.guard.deflate_on_pressure:
            self.features &= ~Feature.DEFLATE_ON_OOM
        self.slots: list[Slot] = [
            Slot(c, ChunkState.UNCONFIRMED, safe=False) for c in sorted(chunks, key=lambda c: c.seq)
        ]
        self.conn: GuestConnection | None = None
        self.target_pages: int | None = None
        """The host's last target (None until a host said one)."""
        self._out: list[bytes] = []
        self._txids: dict[int, tuple[tuple[Slot, ...], str]] = {}
        """txid -> the slots its report names (several for a merged DEFLATE), and the
        kind of report."""
        self._outgoing: deque[Slot] = deque()
        self._to_release: deque[Slot] = deque()
        self._pinning: int = 0  # bytes of the pin the worker is making, 0 if none
        self._verify_requested = False
        self._verify_urgent = False
        self._swap: Slot | None = None
        """A chunk to deflate once new pins make up the part of it the target keeps
        (see ``_pump``); None if none."""
        self._swap_refused = False  # the guard could not spare the pins: deflate whole
        self._op: _Operation | None = None
        self._synced = False  # this session's RESYNC was acknowledged
        self._resync_needed = False
        self._resync_in_flight = False
        self._resync_empty = False
        self._backoff_until = 0.0
        self._failures = 0
        self._last_actual: int | None = None
        self._frames_moved = False
        self._last_pushed_state: BalloonState | None = None
        self._deflate_on_oom_allowed = bool(self.features & Feature.DEFLATE_ON_OOM)
        self._last_progress = float("-inf")
        self._announced_target: int | None = None
        self.stopping = False
        self.session_welcomed = False
        """The current (or last) session got as far as WELCOME."""
        self.session_error: str | None = None
        """Why the last session ended, in words (None while it runs)."""

    # ================================================================ session

    @property
    def session_open(self) -> bool:
        """A session exists and neither side has closed it."""
        return self.conn is not None and self.conn.state not in (State.CLOSED, State.ERROR)

    @property
    def active(self) -> bool:
        return self.conn is not None and self.conn.state is State.ACTIVE

    @property
    def window(self) -> int:
        return self.conn.window if self.conn is not None else 1

    def connect(self, now: float) -> None:
        """Start a session: queue HELLO.  (Any earlier session must have ended.)"""
        assert self.conn is None, "the previous session was not ended"
        self._out.clear()  # never a byte of an old session into a new one
        self.conn = GuestConnection(self.config.key)
        self.session_error = None
        self.session_welcomed = False
        self._synced = self._resync_in_flight = self._resync_empty = False
        self._resync_needed = True
        self._txids.clear()
        self._outgoing.clear()
        hello = self.conn.make_hello(
            name=self.config.name,
            features=self.features,
            total_pages=self.config.total_pages,
            ram_layout=self.config.ram_layout,
        )
        self._send(hello)

    def data_to_send(self) -> bytes:
        """Bytes queued for the host (and forget them)."""
        out, self._out = b"".join(self._out), []
        return out

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the host (``b""``: it closed the stream).  Handles every complete
        event; a protocol violation ends the session with an ERROR to the host and a
        clear message in ``session_error`` (never raises for what the host sent)."""
        conn = self.conn
        if conn is None or not self.session_open:
            return
        try:
            conn.receive_data(data)
            while self.conn is conn:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                self._handle(event, now)
        except RemoteProtocolError as exc:
            self._protocol_failure(exc, now)
        self._after_change(now)

    def connection_lost(self, why: str, now: float) -> None:
        """The transport broke or the service gave up on the session."""
        if self.conn is not None:
            self._end_session(why, now)
            self._after_change(now)

    def close_session(self, why: str, now: float, code: ErrorCode = ErrorCode.TIMEOUT) -> None:
        """End the session on our side (e.g. the host went silent): ERROR, then closed."""
        conn = self.conn
        if conn is None:
            return
        if self.session_open:
            try:
                self._send(Error(code, why[:1000]))
            except LocalProtocolError:
                pass
        self._end_session(why, now)
        self._after_change(now)

    # ================================================================ worker

    def next_command(self, now: float) -> Command | None:
        """The next pool call for the worker, or None if there is nothing to do now.

        Releases come first, then an urgent verification (pins were lost), then the
        next pin; a routine verification waits until no pin is wanted, because with
        one CPU it would only delay the inflate (it is a check: the long-term pins
        keep the frames where they are).
        """
        while self._to_release:
            slot = self._to_release.popleft()
            if slot in self.slots:
                return Release(slot.chunk)
        if self._verify_urgent and not self._pinning:
            command = self._verify()
            if command is not None:
                return command
        size = self._next_pin_size(now)
        self._after_change(now)  # a refusal by the floor is news for the host
        if size:
            self._pinning = size
            if self._op is not None and self._op.first_pin_at is None:
                self._op.first_pin_at = now
            return Pin(size)
        if self._verify_requested and not self._pinning:
            return self._verify()
        return None

    def more_releases(self) -> list[Chunk]:
        """Every other chunk waiting to be released now (the worker releases them in
        the same call as the one ``next_command`` returned)."""
        chunks = []
        while self._to_release:
            slot = self._to_release.popleft()
            if slot in self.slots:
                chunks.append(slot.chunk)
        return chunks

    def _verify(self) -> Verify | None:
        self._verify_requested = self._verify_urgent = False
        chunks = tuple(s.chunk for s in self.slots if s.state is not ChunkState.RELEASING)
        return Verify(chunks) if chunks else None

    def pinned(self, chunk: Chunk, now: float) -> None:
        """The worker pinned a chunk the core asked for."""
        self._pinning = 0
        self._failures = 0
        self.guard.note_pinned(chunk.size_bytes)
        if self._op is not None:
            self._op.chunk_pinned(chunk, now)
        self.slots.append(Slot(chunk, ChunkState.PINNED, safe=True))
        self._pump(now)
        self._after_change(now)

    def pin_failed(self, size_bytes: int, error: Exception, now: float) -> None:
        """The worker could not pin a chunk (NativeError, or a holder failure)."""
        self._pinning = 0
        delay = self._back_off(now)
        log.warning(
            "could not pin a chunk of %s: %s; trying again in %.0fs", format_size(size_bytes),
            error, delay,
        )
        self._after_change(now)

    def released(self, chunk: Chunk, now: float) -> None:
        """The worker released a chunk: its pages are the guest's again."""
        self.released_all([chunk], now)

    def released_all(self, chunks: Iterable[Chunk], now: float) -> None:
        """The worker released these chunks (in one call)."""
        gone = {id(c) for c in chunks}
        for slot in self.slots:
            if id(slot.chunk) in gone:
                self.guard.note_released(slot.chunk.size_bytes)
                if self._op is not None:
                    self._op.chunk_released(slot.chunk, now)
        self.slots = [s for s in self.slots if id(s.chunk) not in gone]
        self._progress(now)
        self._pump(now)
        self._after_change(now)

    def release_failed(self, chunk: Chunk, error: Exception, now: float) -> None:
        log.error("releasing chunk %d (%s) failed: %s", chunk.seq,
                  format_size(chunk.size_bytes), error)
        self.released(chunk, now)

    def request_verify(self, *, urgent: bool = False) -> None:
        """Re-read every chunk's frames soon: the ``--verify-interval`` timer, or
        ``urgent`` when pins were lost (then before any further pin)."""
        self._verify_requested = True
        self._verify_urgent = self._verify_urgent or urgent

    def verified(self, changes: Iterable[tuple[Chunk, RangeSet]], now: float) -> None:
        """The worker's ``PagePool.check`` found these chunks' frames changed."""
        moved_reported = False
        for chunk, frames in changes:
            slot = self._slot_of(chunk)
            if slot is None:
                continue
            differ = (chunk.frames - frames).num_pages
            chunk.frames = frames
            if slot.state is ChunkState.PINNED:
                log.info("chunk %d moved before it was reported; reporting its new frames",
                         chunk.seq)
                continue
            moved_reported = True
            log.warning(
                "FRAMES MOVED: chunk %d (%s): %d of %d frames are no longer the ones the host "
                "was told (state %s) -- the kernel migrated them%s; telling the host the "
                "balloon's real frames now (RESYNC)",
                chunk.seq, format_size(chunk.size_bytes), differ, chunk.pages, slot.state.value,
                "" if self.stable else " (no long-term pin here)",
            )
        if moved_reported:
            self._frames_moved = True
            self._resync_needed = True
            self._pump(now)
        self._after_change(now)

    # ================================================================ memory

    def observe(self, snapshot: MemorySnapshot, now: float) -> None:
        """A memory snapshot (polled every ``--guard-interval``)."""
        self.guard.observe(snapshot, now)
        self._apply_guard(now)
        self._after_change(now)

    def pressure_event(self, now: float) -> None:
        """The PSI trigger fired."""
        self.guard.pressure_event(now)
        self._apply_guard(now)
        self._after_change(now)

    def push_stats(self, now: float) -> None:
        """Timer: push STATS (when STATS_PUSH was negotiated)."""
        if self.active and self.conn is not None and self.conn.negotiated(Feature.STATS_PUSH):
            self._send_stats(0, now)

    # ================================================================ stopping

    def stop(self, now: float) -> None:
        """Deflate everything (SIGTERM).  With a session: DEFLATE, release after the
        ACKs, then BYE.  Without: release what is safe, keep the rest."""
        if self.stopping:
            return
        self.stopping = True
        held = sum(s.pages for s in self.slots)
        log.info("stopping: giving the balloon of %s back to the guest", _size(held))
        if not self.active:
            self._release_safe()
        self._pump(now)
        self._after_change(now)

    def give_up(self, now: float) -> None:
        """Stop now (a second signal, or the shutdown deadline): release what is safe."""
        self.stopping = True
        if self.conn is not None:
            self.close_session("the agent is stopping", now, ErrorCode.SHUTTING_DOWN)
        self._release_safe()

    @property
    def stopped(self) -> bool:
        """Stopping, and nothing more can be released without the host."""
        if not self.stopping or self._pinning or self._to_release:
            return False
        if any(s.state is ChunkState.RELEASING for s in self.slots):
            return False
        if self.session_open:
            return False
        return all(not s.safe for s in self.slots)

    def kept(self) -> list[Slot]:
        """Chunks still held (after stopping: those the host never answered for)."""
        return list(self.slots)

    # ================================================================ views

    def figures(self, now: float) -> BalloonFigures:
        acked = sum(
            s.pages for s in self.slots
            if s.state in (ChunkState.BALLOONED, ChunkState.DEFLATING)
            or (s.state is ChunkState.LEAVING and s.safe)
        )
        pending = sum(
            s.pages for s in self.slots
            if s.state in (ChunkState.PENDING, ChunkState.RESYNCING, ChunkState.UNCONFIRMED)
        )
        return BalloonFigures(acked, pending, self.state_bits(now),
                              self.config.guard.min_free_bytes)

    def state_bits(self, now: float) -> BalloonState:
        bits = self.guard.state(now)
        if not self.stable:
            bits |= BalloonState.UNSTABLE_FRAMES
        if any(not s.safe for s in self.slots):
            bits |= BalloonState.UNCONFIRMED
        if self._frames_moved:
            bits |= BalloonState.FRAMES_MOVED
        return bits

    def held_pages(self) -> int:
        """Pages in every chunk the agent holds, whatever the host knows of them."""
        return sum(s.pages for s in self.slots)

    def summary(self) -> str:
        """The balloon in a few words, for log lines."""
        held = self.held_pages()
        unsafe = sum(s.pages for s in self.slots if not s.safe)
        text = f"balloon of {_size(held)}"
        if unsafe:
            text += f" ({_size(unsafe)} of it not yet confirmed by the host)"
        return text

    # ================================================================ events

    def _handle(self, event: object, now: float) -> None:
        conn = self.conn
        assert conn is not None
        if isinstance(event, Challenge):
            self._send(conn.prove())
        elif isinstance(event, Welcome):
            self._welcome(event, now)
        elif isinstance(event, Config):
            self._set_target(event.num_pages, now)
            self._pump(now)
        elif isinstance(event, Ack | Nak):
            self._answer(event, now)
        elif isinstance(event, StatsRequest):
            self._send_stats(event.txid, now)
        elif isinstance(event, Ping):
            self._send(Pong(event.txid))
        elif isinstance(event, Pong):
            pass
        elif isinstance(event, Bye):
            reason = event.reason.name.lower() if isinstance(event.reason, ByeReason) else "?"
            self._end_session(
                f"the host said goodbye ({reason}{': ' + event.message if event.message else ''})",
                now,
            )
        elif isinstance(event, Error):
            self._end_session(
                f"the host reported an error: {event.code.name} {event.message}".rstrip(), now
            )
        elif isinstance(event, ConnectionClosed):
            self._end_session("the host closed the connection", now)

    def _welcome(self, welcome: Welcome, now: float) -> None:
        conn = self.conn
        assert conn is not None
        from protocol.constants import feature_names

        self._deflate_on_oom_allowed = conn.negotiated(Feature.DEFLATE_ON_OOM)
        self.session_welcomed = True
        log.info(
            "the host accepted this guest: target %s, window %d, features %s%s",
            _size(welcome.config.num_pages), welcome.window,
            ", ".join(feature_names(welcome.features)) or "none",
            "" if conn.negotiated(Feature.STABLE_PFNS) else " (accounting only: no STABLE_PFNS)",
        )
        self._set_target(welcome.config.num_pages, now)
        self._pump(now)

    def _set_target(self, pages: int, now: float) -> None:
        if pages != self.target_pages:
            held = self._acked_pages()
            log.info(
                "host asked for a balloon of %s (it holds %s now)", _size(pages), _size(held),
            )
            self.target_pages = pages
            self._announced_target = None
            self._swap_refused = False
            self._op = _Operation(now, held, pages) if pages != held else None

    def _answer(self, event: Ack | Nak, now: float) -> None:
        slots, kind = self._txids.pop(event.txid, ((), "?"))
        if kind == "resync":
            self._resync_answered(event, now)
            return
        if not slots:
            if isinstance(event, Nak):
                log.warning("the host refused DEFLATE %d (%s: %s) of a chunk already released: "
                            "resynchronising", event.txid, event.reason.name, event.message)
                self._resync_needed = True
            return
        for slot in slots:
            slot.unanswered -= 1
        if self._op is not None:
            self._op.answered_at.append(now)
        if kind == "inflate":
            (slot,) = slots
            if isinstance(event, Ack):
                slot.freed_pages += event.freed_pages
            else:
                delay = self._back_off(now)
                log.warning(
                    "the host refused %s of chunk %d (%s%s); giving them back to the guest, "
                    "next inflate in %.0fs",
                    _size(slot.pages), slot.chunk.seq, event.reason.name,
                    f": {event.message}" if event.message else "", delay,
                )
                slot.refused = True
                slot.unsent.clear()
            if slot.unanswered == 0 and not slot.unsent:
                self._inflate_done(slot, now)
        elif kind == "deflate":
            if isinstance(event, Nak):
                log.warning(
                    "the host refused to deflate chunk%s %s (%s%s): resynchronising",
                    "s" if len(slots) > 1 else "", ", ".join(str(s.chunk.seq) for s in slots),
                    event.reason.name, f": {event.message}" if event.message else "",
                )
                self._back_off(now)
                self._resync_needed = True
        self._pump(now)

    def _inflate_done(self, slot: Slot, now: float) -> None:
        assert self.conn is not None
        if not slot.refused:
            slot.state, slot.safe = ChunkState.BALLOONED, True
            self._failures = 0
            self._progress(now)
            return
        slot.safe = True  # the host answered every piece
        acked = slot.chunk.frames & self.conn.ballooned
        if acked:
            # Part of it was taken before a later piece was refused: give that part back.
            slot.state = ChunkState.DEFLATING
            slot.unsent = self.conn.split_report(acked)
            self._outgoing.append(slot)
        else:
            self._release(slot)

    def _resync_answered(self, event: Ack | Nak, now: float) -> None:
        self._resync_in_flight = False
        if isinstance(event, Ack):
            self._synced = True
            self._resync_empty = False
            included = [s for s in self.slots if s.state is ChunkState.RESYNCING]
            total = sum(s.pages for s in included) or 1
            for slot in included:
                slot.state, slot.safe = ChunkState.BALLOONED, True
                slot.freed_pages = event.freed_pages * slot.pages // total
            for slot in self.slots:
                if slot.state is ChunkState.LEAVING:
                    slot.safe = True
            log.info("host confirmed the %s", self.summary())
            self._progress(now, force=True)
        else:
            if self._resync_empty:
                self.close_session(
                    f"the host refused even an empty RESYNC ({event.reason.name}: "
                    f"{event.message})", now, ErrorCode.INTERNAL,
                )
                return
            log.warning(
                "the host refused the RESYNC (%s%s): asking it to drop the whole balloon "
                "instead, then inflating afresh", event.reason.name,
                f": {event.message}" if event.message else "",
            )
            for slot in self.slots:
                if slot.state is ChunkState.RESYNCING:
                    slot.state = ChunkState.LEAVING
            self._resync_empty = True
            self._resync_needed = True
        self._pump(now)

    def _protocol_failure(self, exc: RemoteProtocolError, now: float) -> None:
        match = _TOO_LARGE_RE.search(exc.message)
        if match:
            wanted, have = int(match.group(1)), int(match.group(2))
            why = (
                f"host asked for a balloon of {_size(wanted)}, larger than this guest "
                f"({_size(have)}): refusing; the {self.summary()} stays as it is"
            )
        else:
            why = f"the host broke the protocol: {exc.message}; the {self.summary()} is kept"
        log.error("%s", why)
        assert self.conn is not None
        try:
            self._send(Error(exc.code, exc.message[:1000]))
        except LocalProtocolError:
            pass
        self._end_session(why, now)

    def _end_session(self, why: str, now: float) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        self.session_error = why
        self._swap = None
        self._txids.clear()
        self._outgoing.clear()
        self._resync_in_flight = False
        self._synced = False
        for slot in self.slots:
            slot.unsent.clear()
            slot.unanswered = 0
            if slot.state in (ChunkState.PENDING, ChunkState.RESYNCING):
                slot.state, slot.safe = ChunkState.UNCONFIRMED, False
                if slot.refused:
                    slot.refused = False
            elif slot.state is ChunkState.DEFLATING:
                slot.state = ChunkState.LEAVING
        if self.stopping:
            self._release_safe()

    # ================================================================ decisions

    def _pump(self, now: float) -> None:
        """Send what may be sent, decide deflations and releases."""
        conn = self.conn
        if conn is None or conn.state is not State.ACTIVE or self._resync_in_flight:
            return
        if self._resync_needed:
            if not conn.pending:
                self._send_resync(now)
            return
        self._deflate_to_target()
        # Report pinned chunks, oldest first.
        for slot in sorted(self.slots, key=lambda s: s.chunk.seq):
            if slot.state is ChunkState.PINNED:
                self._inflate(slot)
        self._send_pieces(now)
        self._release_reusable()
        if self.stopping and not self.slots and not conn.pending and not self._pinning:
            log.info("balloon released; saying goodbye to the host")
            self._send(Bye(ByeReason.SHUTDOWN, "the guest agent is stopping"))
            self._end_session("stopped", now)

    def _deflate_to_target(self) -> None:
        """Deflate (or release, if never reported) newest first while more than the
        target is committed.

        A chunk is deflated whole.  When the next one holds more than the target gives
        back, deflating it would leave the guest more than its target -- more than the
        host granted -- until the rest was pinned again.  So the rest is pinned first
        (``_next_pin_size`` counts that chunk, ``_swap``, as gone), reported, and then
        the chunk is deflated: the balloon never dips below the target."""
        want, committed = self._want_pages(), self._committed_pages()
        swap = self._swap
        if swap is not None:
            gone = swap not in self.slots or swap.state is not ChunkState.BALLOONED
            if gone or committed <= want:
                self._swap = None  # pressure took it, or the target went back up
            elif committed - want < swap.pages or self._pinning or any(
                s.state is ChunkState.PINNED for s in self.slots
            ):
                return  # its replacement is not all pinned and reported yet
            else:
                self._swap = None
                self._deflate(swap)
                committed -= swap.pages
        for slot in sorted(self.slots, key=lambda s: s.chunk.seq, reverse=True):
            if committed <= want:
                return
            if slot.state is ChunkState.PINNED:
                self._release(slot)
            elif slot.state is ChunkState.BALLOONED:
                if slot.pages > committed - want and not self._swap_refused:
                    self._swap = slot
                    return
                self._deflate(slot)
            else:
                continue
            committed -= slot.pages

    def _want_pages(self) -> int:
        if self.stopping or self.target_pages is None:
            return 0
        return self.target_pages

    def _committed_pages(self) -> int:
        return sum(s.pages for s in self.slots if s.state in _COMMITTED)

    def _acked_pages(self) -> int:
        return sum(s.pages for s in self.slots if s.state in (
            ChunkState.BALLOONED, ChunkState.DEFLATING))

    def _next_pin_size(self, now: float) -> int:
        if not self.active or self.stopping or not self._synced or self._resync_needed:
            return 0
        if self._pinning or now < self._backoff_until or self.target_pages is None:
            return 0
        in_flight = sum(1 for s in self.slots if s.state in (ChunkState.PINNED,
                                                             ChunkState.PENDING))
        if in_flight >= self.window:
            return 0
        if any(s.state is ChunkState.DEFLATING and s.for_pressure for s in self.slots):
            return 0
        committed = self._committed_pages()
        if self._swap is not None:
            committed -= self._swap.pages  # to be deflated once the rest is pinned
        need = (self.target_pages - committed) * PAGE_SIZE
        if need <= 0:
            self.guard.at_target()
            return 0
        size = min(need, self.config.chunk_bytes)
        if size >= HUGE_PAGE:
            size -= size % HUGE_PAGE  # whole huge pages; the remainder gets its own chunk
        if not self.guard.may_pin(size, now):
            if self._swap is not None:
                # The guest cannot spare the pins now: deflate the chunk whole after all
                # (the guest keeps up to a chunk more than its target until it can).
                self._swap, self._swap_refused = None, True
                self._pump(now)
            return 0
        return size

    def _apply_guard(self, now: float) -> None:
        allowed = self._deflate_on_oom_allowed and bool(self.features & Feature.DEFLATE_ON_OOM)
        step = self.guard.shed_bytes(now, allowed=allowed)
        if not step:
            return
        session = self.active and self._synced and not self._resync_needed
        candidates = [
            s for s in sorted(self.slots, key=lambda s: s.chunk.seq, reverse=True)
            if (s.state is ChunkState.BALLOONED if session else s.safe)
            and s.state is not ChunkState.RELEASING
        ]
        chosen: list[Slot] = []
        total = 0
        for slot in candidates:
            if chosen and total + slot.chunk.size_bytes > step:
                break
            chosen.append(slot)
            total += slot.chunk.size_bytes
        if not chosen:
            return
        self.guard.note_shed(now)
        available = self.guard.available_bytes()
        log.warning(
            "memory pressure (%s available, floor %s): giving %s of the balloon back to the "
            "guest%s", format_size(available or 0), format_size(self.config.guard.min_free_bytes),
            format_size(total), "" if session else " while the host is away",
        )
        for slot in chosen:
            slot.for_pressure = True
            if session:
                self._deflate(slot)
            else:
                self._release(slot)
        if session:
            self._send_pieces(now)
            self._release_reusable()

    # ================================================================ sending

    def _send(self, event: object) -> None:
        assert self.conn is not None
        self._out.append(self.conn.send(event))  # type: ignore[arg-type]

    def _inflate(self, slot: Slot) -> None:
        assert self.conn is not None
        frames = slot.chunk.frames
        if frames and frames.last >= 2**32 and not self.conn.negotiated(Feature.PFN_RANGES):
            log.error("chunk %d has frames above 16 TiB, which virtio's u32 PFNs cannot name "
                      "(the host did not accept PFN_RANGES): giving it back", slot.chunk.seq)
            self._release(slot)
            return
        slot.state, slot.safe = ChunkState.PENDING, False
        slot.refused = False
        slot.unsent = self.conn.split_report(frames)
        self._outgoing.append(slot)

    def _deflate(self, slot: Slot) -> None:
        assert self.conn is not None
        slot.state = ChunkState.DEFLATING
        slot.unsent = self.conn.split_report(slot.chunk.frames)
        self._outgoing.append(slot)

    def _send_pieces(self, now: float) -> None:
        conn = self.conn
        assert conn is not None
        while self._outgoing and len(conn.pending) < conn.window:
            slot = self._outgoing[0]
            if not slot.unsent or slot.state not in (ChunkState.PENDING, ChunkState.DEFLATING):
                self._outgoing.popleft()
                continue
            txid = conn.next_txid
            if slot.state is ChunkState.PENDING:
                self._send(Inflate(txid, slot.unsent.pop(0)))
                self._txids[txid] = ((slot,), "inflate")
                slot.unanswered += 1
            else:
                group = self._deflate_group()
                if len(group) > conn.window - len(conn.pending):
                    # More chunks to deflate than reports the window takes now: one
                    # DEFLATE for all of them, so a deflate costs one round trip to the
                    # host, not one per ``window`` chunks.
                    pages = union_frames(s.chunk for s in group)
                    for member in group:
                        member.unsent.clear()
                        member.unanswered += 1
                    self._send(Deflate(txid, pages))
                    self._txids[txid] = (tuple(group), "deflate")
                else:
                    self._send(Deflate(txid, slot.unsent.pop(0)))
                    self._txids[txid] = ((slot,), "deflate")
                    slot.unanswered += 1
            if self._op is not None:
                self._op.sent_at.append(now)

    def _deflate_group(self) -> list[Slot]:
        """The DEFLATING chunks waiting to be sent, none of them sent in part, if one
        frame can carry all of their frames; else just the first in line."""
        assert self.conn is not None
        head = self._outgoing[0]
        group = [
            s for s in self._outgoing
            if s.state is ChunkState.DEFLATING and s.unsent and s.unanswered == 0
            and len(s.unsent) == 1 and s.unsent[0] == s.chunk.frames
        ]
        if len(group) > 1 and head in group:
            if len(self.conn.split_report(union_frames(s.chunk for s in group))) == 1:
                return group
        return [head]

    def _send_resync(self, now: float) -> None:
        conn = self.conn
        assert conn is not None
        want = 0 if self._resync_empty else self._want_pages()
        included: list[Slot] = []
        total = 0
        for slot in sorted(self.slots, key=lambda s: s.chunk.seq):
            if slot.state is ChunkState.RELEASING:
                continue
            keep = slot.state in (ChunkState.PINNED, ChunkState.PENDING, ChunkState.BALLOONED,
                                  ChunkState.UNCONFIRMED, ChunkState.RESYNCING)
            if keep and total + slot.pages <= want:
                included.append(slot)
                total += slot.pages
                continue
            slot.unsent.clear()
            if slot.state is ChunkState.PINNED:
                self._release(slot)
            else:
                slot.state = ChunkState.LEAVING
        for slot in included:
            slot.state, slot.safe = ChunkState.RESYNCING, False
            slot.unsent.clear()
        self._outgoing.clear()
        pages = union_frames(s.chunk for s in included)
        txid = conn.next_txid
        self._send(Resync(txid, pages))
        self._txids[txid] = ((), "resync")
        self._resync_needed = False
        self._resync_in_flight = True
        leaving = sum(s.pages for s in self.slots if s.state is ChunkState.LEAVING)
        log.info(
            "telling the host the whole balloon: %s in %d chunks (RESYNC)%s", _size(total),
            len(included), f"; {_size(leaving)} to give back once it confirms" if leaving else "",
        )

    def _send_stats(self, txid: int, now: float) -> None:
        conn = self.conn
        assert conn is not None
        entries = stats_entries(
            self._snapshot(), self.figures(now),
            pressure=conn.negotiated(Feature.STATS_PRESSURE),
        )
        self._send(Stats(entries, txid))
        self._last_pushed_state = self.state_bits(now)

    # ================================================================ releasing

    def _release(self, slot: Slot) -> None:
        if slot.state is ChunkState.RELEASING:
            return
        slot.state = ChunkState.RELEASING
        slot.unsent.clear()
        self._to_release.append(slot)

    def _release_reusable(self) -> None:
        conn = self.conn
        if conn is None or not self._synced:
            return
        for slot in self.slots:
            if slot.state in (ChunkState.DEFLATING, ChunkState.LEAVING) and not slot.unsent:
                if conn.may_reuse(slot.chunk.frames):
                    slot.deflated = slot.state is ChunkState.DEFLATING
                    self._release(slot)

    def _release_safe(self) -> None:
        for slot in self.slots:
            if slot.safe and slot.state is not ChunkState.RELEASING:
                self._release(slot)

    # ================================================================ bookkeeping

    def _after_change(self, now: float) -> None:
        conn = self.conn
        if conn is not None and conn.state is State.ACTIVE and self._synced:
            # Like virtio's driver: deflated pages leave ``actual`` once they are the
            # guest's again, not when the host acknowledged the DEFLATE.
            actual = conn.ballooned.num_pages + sum(
                s.pages for s in self.slots if s.deflated and s.state is ChunkState.RELEASING
            )
            # While the worker pins the next chunk, its INFLATE will carry the news:
            # one send for both (a send costs a TCG guest milliseconds of its vCPU).
            # The last answer of an inflate finds no pin under way and goes at once.
            if actual != self._last_actual and not self._pinning:
                self._send(Actual(actual))
                self._last_actual = actual
            if conn.negotiated(Feature.STATS_PUSH):
                bits = self.guard.state(now) & (
                    BalloonState.FLOOR_REACHED | BalloonState.PRESSURE_DEFLATING
                )
                last = (self._last_pushed_state or BalloonState(0)) & (
                    BalloonState.FLOOR_REACHED | BalloonState.PRESSURE_DEFLATING
                )
                if bits != last:
                    if bits & BalloonState.FLOOR_REACHED and not last & BalloonState.FLOOR_REACHED:
                        avail = self.guard.available_bytes() or 0
                        log.warning(
                            "not inflating further: %s available, the floor is %s "
                            "(balloon %s of %s asked)", format_size(avail),
                            format_size(self.config.guard.min_free_bytes),
                            _size(self._acked_pages()), _size(self.target_pages or 0),
                        )
                    self._send_stats(0, now)
        if self.conn is None:
            self._last_actual = None

    def _progress(self, now: float, *, force: bool = False) -> None:
        if self.target_pages is None:
            return
        target = self._want_pages()
        acked = self._acked_pages()
        freed = sum(s.freed_pages for s in self.slots if s.state is ChunkState.BALLOONED)
        at_target = acked == target and not self._releasing()
        if at_target and (self._announced_target == target or self.stopping) and not force:
            return
        if not (at_target or force) and now - self._last_progress < self.config.progress_interval_s:
            return
        self._last_progress = now
        if at_target:
            self._announced_target = target
            op, self._op = self._op, None
            if op is not None and op.target_pages == target:
                log.info("balloon at target: %s, host freed %s (%s)", _size(acked),
                         _size(freed), op.summary(now))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("timings %s", json.dumps(op.timings(now)))
            else:
                log.info("balloon at target: %s, host freed %s", _size(acked), _size(freed))
        elif acked < target:
            log.info("inflating: %s of %s in the balloon, host freed %s", _size(acked),
                     _size(target), _size(freed))
        else:
            log.info("deflating: %s in the balloon, going to %s%s", _size(acked), _size(target),
                     " (stopping)" if self.stopping else "")

    def _releasing(self) -> bool:
        """Deflated chunks whose pages are not back in the guest yet."""
        return any(s.deflated and s.state is ChunkState.RELEASING for s in self.slots)

    def _back_off(self, now: float) -> float:
        first, longest = self.config.backoff_s
        delay = min(longest, first * 2**self._failures)
        self._failures += 1
        self._backoff_until = now + delay
        return delay

    def _slot_of(self, chunk: Chunk) -> Slot | None:
        for slot in self.slots:
            if slot.chunk is chunk:
                return slot
        return None


class _Operation:
    """One move of the balloon towards a new target, timed for the log: when the
    target arrived, when each chunk was pinned or released (and what the pool's
    phases took), when each report went out and was answered."""

    def __init__(self, start: float, from_pages: int, target_pages: int) -> None:
        self.start = start
        self.from_pages = from_pages
        self.target_pages = target_pages
        self.first_pin_at: float | None = None
        self.pinned: list[Chunk] = []
        self.pinned_at: list[float] = []
        self.released: list[Chunk] = []
        self.released_at: list[float] = []
        self.sent_at: list[float] = []
        self.answered_at: list[float] = []

    def chunk_pinned(self, chunk: Chunk, now: float) -> None:
        self.pinned.append(chunk)
        self.pinned_at.append(now)

    def chunk_released(self, chunk: Chunk, now: float) -> None:
        self.released.append(chunk)
        self.released_at.append(now)

    def summary(self, now: float) -> str:
        took = now - self.start
        verb = "inflated" if self.target_pages > self.from_pages else "deflated"
        text = f"{verb} {_size(abs(self.target_pages - self.from_pages))} in {took:.2f}s"
        if self.pinned:
            pin_s = sum(sum(c.pin_times.values()) for c in self.pinned)
            text += f", pinning {pin_s:.2f}s in {len(self.pinned)} chunks"
        if self.released:
            text += f", {len(self.released)} chunks released"
        return text

    def timings(self, now: float) -> dict[str, object]:
        """Seconds since the target arrived (``took_s`` is now), and phase sums."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.start, 4)

        def sums(times: Iterable[dict[str, float]]) -> dict[str, float]:
            out: dict[str, float] = {}
            for item in times:
                for name, value in item.items():
                    out[name] = out.get(name, 0.0) + value
            return {name: round(value, 4) for name, value in out.items()}

        return {
            "from_pages": self.from_pages,
            "target_pages": self.target_pages,
            "took_s": rel(now),
            "first_pin_s": rel(self.first_pin_at),
            "chunks_pinned": len(self.pinned),
            "pin_phases_s": sums(c.pin_times for c in self.pinned),
            "pinned_s": [rel(t) for t in self.pinned_at],
            "sent_s": [rel(t) for t in self.sent_at],
            "answered_s": [rel(t) for t in self.answered_at],
            "chunks_released": len(self.released),
            "release_phases_s": sums(c.release_times for c in self.released),
            "released_s": [rel(t) for t in self.released_at],
        }


# Errors a worker call may raise that the core reports instead of crashing.
WORKER_ERRORS = (NativeError, OSError, ProtocolError)
