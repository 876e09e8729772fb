"""A small host for the agent's tests: ``HostConnection`` over real sockets, with trio.

It accepts every offered feature (except those a test turns off), acknowledges
reports (or refuses them when told), keeps a ledger the way the real host does
(INFLATE adds, DEFLATE removes, RESYNC replaces), and records everything it got,
so tests can wait for conditions on it instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol import codec
from protocol.connection import HostConnection
from protocol.constants import Feature
from protocol.errors import NakReason, ProtocolError
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Auth,
    Bye,
    Config,
    ConnectionClosed,
    Deflate,
    Error,
    Hello,
    Inflate,
    Nak,
    Ping,
    Pong,
    Resync,
    Stats,
    Welcome,
)
from protocol.ranges import RangeSet


@dataclass
class Session:
    conn: HostConnection
    stream: trio.abc.Stream
    hello: Hello | None = None
    requests: list[object] = field(default_factory=list)
    stats: list[Stats] = field(default_factory=list)
    actuals: list[int] = field(default_factory=list)
    closed: str | None = None
    sending: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, data: bytes) -> None:
        """Send, one task at a time (the test and the session both send)."""
        async with self.sending:
            await self.stream.send_all(data)


class TestHost:
    """Serve agents on listeners; see the module docstring."""

    __test__ = False  # not a test class

    def __init__(
        self,
        *,
        target_pages: int = 0,
        window: int = 4,
        heartbeat_ms: int = 0,
        stats_interval_ms: int = 0,
        refuse: frozenset[Feature] = frozenset(),
        key: bytes | None = None,
    ) -> None:
        self.target_pages = target_pages
        self.window = window
        self.heartbeat_ms = heartbeat_ms
        self.stats_interval_ms = stats_interval_ms
        self.refuse = refuse
        self.key = key
        self.ledger = RangeSet.empty()
        self.sessions: list[Session] = []
        self.nak: Callable[[object], NakReason | None] | None = None
        self.hold: Callable[[object], bool] | None = None
        """Requests it says yes to are left unanswered."""
        self.punch: Callable[[RangeSet], None] | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self.errors: list[str] = []
        self.expect_errors = False

    # -- waiting ---------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0) -> None:
        """Until ``predicate()`` is true (re-checked whenever a session changes)."""
        with trio.fail_after(timeout):
            while not predicate():
                if self.errors and not self.expect_errors:
                    raise AssertionError(f"the test host failed: {self.errors}")
                with trio.move_on_after(0.05):
                    await self._lot.park()

    def _changed(self) -> None:
        self._lot.unpark_all()

    @property
    def session(self) -> Session:
        return self.sessions[-1]

    # -- acting ----------------------------------------------------------------------

    async def set_target(self, pages: int) -> None:
        self.target_pages = pages
        session = self.session
        if session.closed is None:
            await session.send(session.conn.send(Config(pages)))

    async def send_raw(self, data: bytes) -> None:
        await self.session.send(data)

    async def send_oversized_target(self, pages: int) -> None:
        """A CONFIG the HostConnection would refuse to send (no key in use)."""
        kind, flags, txid, body = codec.encode_event(Config(pages), ranges=False)
        await self.send_raw(codec.build_frame(kind, flags, txid, body, None, 0))

    async def close_session(self) -> None:
        await self.session.stream.aclose()

    # -- serving ---------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = HostConnection()
        session = Session(conn, stream)
        self.sessions.append(session)
        self._changed()
        try:
            async with stream:
                while session.closed is None:
                    data = await stream.receive_some(1 << 20)
                    conn.receive_data(data)
                    while True:
                        event = conn.next_event()
                        if event is NEED_DATA:
                            break
                        out = self._on_event(session, event)
                        if out:
                            await session.send(out)
                        if isinstance(event, ConnectionClosed | Bye | Error):
                            session.closed = type(event).__name__
                            break
                    self._changed()
        except ProtocolError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            session.closed = f"protocol error: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.closed = f"broken: {exc!r}"
        finally:
            if session.closed is None:
                session.closed = "cancelled"
            self._changed()

    def _on_event(self, session: Session, event: object) -> bytes:
        conn = session.conn
        if isinstance(event, Hello):
            session.hello = event
            if self.key is not None and event.features & Feature.AUTH:
                return conn.send(conn.challenge(self.key))
            return self._welcome(session)
        if isinstance(event, Auth):
            return self._welcome(session)
        if isinstance(event, Inflate | Deflate | Resync):
            session.requests.append(event)
            if self.hold is not None and self.hold(event):
                return b""
            return self.answer(session, event)
        if isinstance(event, Stats):
            session.stats.append(event)
        elif isinstance(event, Actual):
            session.actuals.append(event.actual)
        elif isinstance(event, Ping):
            return conn.send(Pong(event.txid))
        return b""

    def _welcome(self, session: Session) -> bytes:
        conn = session.conn
        assert session.hello is not None
        features = session.hello.features
        for feature in self.refuse:
            features &= ~feature
        if self.key is None:
            features &= ~Feature.AUTH
        target = min(self.target_pages, session.hello.total_pages)
        welcome = Welcome(1, features, 16 << 20, Config(target), self.stats_interval_ms,
                          self.heartbeat_ms, self.window)
        return conn.send(welcome)

    def answer(self, session: Session, event: object) -> bytes:
        """ACK (or NAK, if ``self.nak`` says so) one request, updating the ledger."""
        conn = session.conn
        reason = self.nak(event) if self.nak else None
        if reason is not None:
            return conn.send(Nak(event.txid, reason, "refused by the test host"))
        if isinstance(event, Inflate):
            if self.punch:
                self.punch(event.pages)
            self.ledger = self.ledger | event.pages
            return conn.send(Ack(event.txid, event.pages.num_pages))
        if isinstance(event, Deflate):
            self.ledger = self.ledger - event.pages
            return conn.send(Ack(event.txid))
        assert isinstance(event, Resync)
        self.ledger = event.pages
        return conn.send(Ack(event.txid, event.pages.num_pages))

    async def answer_held(self) -> None:
        """Answer every request that was held."""
        session = self.session
        pending = [r for r in session.requests if any(p.txid == r.txid for p in
                                                       session.conn.pending)]
        for request in pending:
            await session.send(self.answer(session, request))
        self._changed()


async def serve(host: TestHost, listeners: list[trio.abc.Listener],
                task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    await trio.serve_listeners(host.handle, listeners, task_status=task_status)
