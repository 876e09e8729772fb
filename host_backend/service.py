"""The host service: where trio lives on the host side.

Theory of operation
-------------------
One ``HostService`` serves every guest: each connection gets a ``Session`` running in
its own task (plus a small writer task for targets, heartbeats and statistics polls),
all inside one nursery, so one slow, silent or hostile guest never blocks another.
The logic the sessions drive is plain code: the protocol's ``HostConnection``, the
``Ledger``, the ``RamFiles`` that punch holes, and the pure ``policy``.

Safety, in the order it happens for one report (docs/safety.md has the argument):

1. the handshake has a deadline; a guest with a configured key must authenticate;
2. a newer authenticated session of the same guest first cancels the older one and
   waits until its work — a punch already running in a worker thread included — has
   finished, before the new one is welcomed;
3. a report is validated against the ledger and the *configured* RAM map, then
   (only for an authenticated session that negotiated STABLE_PFNS) punched, then
   recorded, then acknowledged.  A refused report gets a NAK and changes nothing.

Sends on one connection are serialised by a lock: the bytes must reach the wire in
the order ``HostConnection.send`` produced them (the MACs count frames).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from host_backend import policy
from host_backend.config import GuestConfig, HostConfig, load_config
from host_backend.ledger import GuestRecord, Ledger, Refusal
from host_backend.ramfile import RamFiles
from host_backend.view import GuestStats, GuestStatus, PoolStatus
from protocol import auth
from protocol.addresses import Address
from protocol.connection import HostConnection
from protocol.constants import DEFAULT_MAX_BODY, ByeReason, Feature, StatTag
from protocol.errors import (
    ErrorCode,
    NakReason,
    NativeError,
    PolicyError,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Auth,
    Bye,
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
from protocol.state import State
from protocol.units import PAGE_SIZE, format_size

log = logging.getLogger("uballoon.host")

RECEIVE_SIZE = 256 * 1024
WINDOW = 4
SEND_TIMEOUT_S = 30.0
POLICY_PAUSE_RUNS = 3  # after an event-driven policy run, pause 3x its length
ACCEPTED = (
    Feature.MUST_TELL_HOST
    | Feature.STATS_VQ
    | Feature.DEFLATE_ON_OOM
    | Feature.PFN_RANGES
    | Feature.STATS_PUSH
    | Feature.STATS_PRESSURE
    | Feature.STABLE_PFNS
)


class SessionEnded(Exception):
    """The session is over; ``reason`` says why, for the log."""


class Session:
    """One guest connection."""

    def __init__(self, service: HostService, stream: trio.abc.Stream, peer: str) -> None:
        self.service = service
        self.stream = stream
        self.peer = peer
        self.conn = HostConnection()
        self.send_lock = trio.Lock()
        self.record: GuestRecord | None = None
        self.ram: RamFiles | None = None
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()
        self.predecessor: Session | None = None
        self.wake = trio.Event()
        self.config_dirty = False
        self.superseded = False
        self._send_deadline: trio.CancelScope | None = None
        # The socket's descriptor, for sends that need not wait and receives that wait
        # once (see send_nowait and _receive); None for a stream that is not a socket.
        self._fd: int | None = _socket_fd(stream)
        self._backlog = b""  # bytes send_nowait could not write yet
        self.heard = trio.current_time()  # when the guest's last bytes arrived
        self.idle_scope = trio.CancelScope()  # the ticker cancels it: nothing heard
        self._pongs = 0
        self.ping_due = False
        self.poll_due = False
        self.next_poll = 0.0

    @property
    def name(self) -> str:
        return self.conn.guest_name or self.peer

    # -- I/O -----------------------------------------------------------------------------

    async def send(self, event: Any = None, *, own_deadline: bool = False) -> None:
        """Send ``event`` after whatever ``send_nowait`` left unwritten (with no event:
        just that).  Raises trio.TooSlowError if the guest has not taken the bytes
        within SEND_TIMEOUT_S (it stopped reading).  ``own_deadline``: for a task that
        is not one of the session's own (a last word)."""
        # A push sends once per guest: with 10,000 guests every scheduler trip and
        # object made here counts (and the objects cost again in the garbage
        # collector).  An uncontended lock is taken without a checkpoint (send_all
        # has its own); while the session is served, the deadline is set on one
        # scope made for it in _serve rather than on a new cancel scope per send.
        lock = self.send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            data = self.conn.send(event) if event is not None else b""
            if self._backlog:
                data, self._backlog = self._backlog + data, b""
            if not data:
                return
            if self._fd is not None:
                # Most sends fit the socket's buffer: written at once, with no trip
                # through the scheduler.  What does not is sent below, with the deadline.
                written = self._write_nowait(data)
                if written == len(data):
                    return
                data = data[written:]
            scope = None if own_deadline else self._send_deadline
            if scope is None:  # the handshake, a last word
                with trio.CancelScope(deadline=trio.current_time() + SEND_TIMEOUT_S) as scope:
                    await self.stream.send_all(data)
                if scope.cancelled_caught:
                    raise trio.TooSlowError
            else:
                scope.deadline = trio.current_time() + SEND_TIMEOUT_S
                try:
                    await self.stream.send_all(data)
                finally:
                    scope.deadline = math.inf
        finally:
            lock.release()

    def send_nowait(self, event: Any) -> bool:
        """Send ``event`` now if that needs no waiting: no other send under way and a
        socket.  Returns False (nothing sent) otherwise.  Bytes the socket does not
        take at once -- and an error -- are left to the writer task, which sends them
        under the send deadline (or meets the error) in the session's own context."""
        if self._fd is None or self.send_lock.locked() or self._backlog:
            return False
        data = self.conn.send(event)
        try:
            written = self._write_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            written = 0
        if written < len(data):
            self._backlog = data[written:]
            self.wake.set()
        return True

    def _write_nowait(self, data: bytes) -> int:
        """Write what the socket takes without blocking; the bytes written."""
        assert self._fd is not None
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending to the guest: {exc}") from exc

    async def _receive(self) -> bytes:
        """The next bytes from the guest (b"" at its end of the stream).

        On a socket: wait until it is readable, then read -- one trip through the
        scheduler per read, where ``receive_some`` first tries a read that finds
        nothing and then waits (two)."""
        fd = self._fd
        if fd is None:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        else:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, RECEIVE_SIZE)
                    break
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receiving from the guest: {exc}") from exc
        self.heard = trio.current_time()
        return data

    async def next_event(self, idle_timeout: float | None = None) -> Any:
        """The guest's next event.  ``idle_timeout``: fail if nothing arrives within it
        (the handshake); while the session is served the ticker watches for silence
        instead (``idle_scope``), so no deadline is set per receive."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            if idle_timeout is None:
                data = await self._receive()
            else:
                with trio.move_on_after(idle_timeout) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise RemoteProtocolError(
                        f"nothing heard for {idle_timeout:g}s", ErrorCode.TIMEOUT
                    )
            self.conn.receive_data(data)

    def push_config(self) -> None:
        """The guest's target changed: send it a CONFIG -- now if the socket takes it,
        else from the writer task."""
        record = self.record
        if (
            not self.config_dirty and record is not None and self.conn.state is State.ACTIVE
            and record.target_keep_pages is not None
        ):
            if self.send_nowait(record.config_for(record.target_keep_pages)):
                return
        self.config_dirty = True
        self.wake.set()

    # -- lifetime ------------------------------------------------------------------------

    async def run(self) -> None:
        service = self.service
        try:
            with self.cancel_scope:
                try:
                    await self._handshake()
                    await self._serve()
                except RemoteProtocolError as exc:
                    log.warning("guest %s (%s): %s", self.name, self.peer, exc.message)
                    await self._last_word(Error(exc.code, exc.message[:1000]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.info("guest %s (%s): connection lost", self.name, self.peer)
                except trio.TooSlowError:
                    log.warning("guest %s (%s): too slow; dropped", self.name, self.peer)
                    await self._last_word(Error(ErrorCode.TIMEOUT, "too slow"))
                except SessionEnded as exc:
                    log.info("guest %s (%s): %s", self.name, self.peer, exc)
                except (ProtocolError, NativeError, PolicyError) as exc:
                    log.error("guest %s (%s): %s", self.name, self.peer, exc)
                    await self._last_word(Error(ErrorCode.INTERNAL, str(exc)[:1000]))
                except Exception:
                    # A bug met while serving one guest ends that session, loudly, and
                    # never the service: the other guests must keep working.
                    log.exception("guest %s (%s): internal error; session closed",
                                  self.name, self.peer)
                    await self._last_word(Error(ErrorCode.INTERNAL, "internal error"))
            if self.superseded:
                await self._last_word(Bye(ByeReason.SUPERSEDED, "a newer session replaced this"))
        finally:
            with trio.CancelScope(shield=True):
                if self.record is not None and service.sessions.get(self.record.name) is self:
                    del service.sessions[self.record.name]
                    service.ledger.disconnect(self.record, time.time())
                    service.changed(policy=True)
                if self.ram is not None:
                    self.ram.close()
                self._fd = None  # its number may soon be another guest's socket
                await trio.aclose_forcefully(self.stream)
                if self.predecessor is not None:
                    await self.predecessor.done.wait()
                self.done.set()

    async def _last_word(self, event: Error | Bye) -> None:
        # Shielded from the session's cancellation, bounded by its own deadline.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.send(event, own_deadline=True)
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.BusyResourceError, trio.TooSlowError):
                pass

    async def _refuse(self, code: ErrorCode, message: str) -> None:
        log.warning("guest %s (%s) refused: %s", self.name, self.peer, message)
        await self._last_word(Error(code, message))
        raise SessionEnded("refused")

    async def _handshake(self) -> None:
        service = self.service
        config = service.config
        with trio.fail_after(config.handshake_timeout_s):
            hello = await self.next_event(config.handshake_timeout_s)
            assert isinstance(hello, Hello)  # the state table allows nothing else first
            if 1 not in hello.versions:
                await self._refuse(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"no protocol version in common (guest speaks {sorted(hello.versions)}, "
                    "host speaks [1])",
                )
            guest_config = config.guests.get(hello.name)
            if guest_config is None and config.unknown_guests == "refuse":
                await self._refuse(
                    ErrorCode.UNKNOWN_GUEST,
                    f"guest {hello.name!r} is not in this host's configuration",
                )
            if guest_config is not None and hello.total_pages * PAGE_SIZE > guest_config.max_bytes:
                await self._refuse(
                    ErrorCode.GUEST_TOO_LARGE,
                    f"guest {hello.name} says it has "
                    f"{format_size(hello.total_pages * PAGE_SIZE)} of RAM, more than its "
                    f"configured max of {format_size(guest_config.max_bytes)}",
                )
            key = self._key(guest_config)
            if key is not None:
                if not hello.features & Feature.AUTH:
                    await self._refuse(
                        ErrorCode.AUTH_REQUIRED,
                        f"guest {hello.name} must authenticate (start it with --key-file)",
                    )
                await self.send(self.conn.challenge(key))
                answer = await self.next_event(config.handshake_timeout_s)
                if not isinstance(answer, Auth):
                    raise SessionEnded(f"left during authentication ({type(answer).__name__})")
        # Authenticated (or not required): this session now replaces any older one of
        # the same guest, whose work is cancelled and finished before we go on.
        await service.take_over(hello.name, self)
        authenticated = key is not None
        features = hello.features & ACCEPTED
        if authenticated:
            features |= Feature.AUTH
        record = service.ledger.admit(
            hello.name,
            guest_config,
            total_pages=hello.total_pages,
            ram_layout=hello.ram_layout,
            features=features,
            authenticated=authenticated,
            now=time.time(),
        )
        self.record = record
        service.restore_manual(record)
        if not record.map_trusted:
            outside = hello.ram_layout - record.ram_map.pages  # type: ignore[union-attr]
            log.error(
                "guest %s: its RAM at PFN %#x (%d pages) is outside the configured RAM map: "
                "the map is wrong (QEMU moves RAM above 3 GiB to 4 GiB on a pc machine "
                "with 3.5 GiB or more); accounting only until it is fixed",
                record.name, outside.first, outside.num_pages,
            )
        if record.ram_map is not None and record.reclaims:
            try:
                self.ram = RamFiles(record.ram_map)
            except NativeError as exc:
                log.error("guest %s: %s; accounting only this session", record.name, exc)
                record.ram_map = None
        if record.ram_map is not None and not record.reclaims:
            why = "not authenticated" if not authenticated else "frames not stable (no pin)"
            log.warning("guest %s: RAM file known but %s: accounting only", record.name, why)
        keep = record.target_keep_pages
        if keep is None:
            keep = record.manual_keep_pages if record.manual_keep_pages is not None else (
                record.keep_pages
            )
            record.target_keep_pages = keep
        welcome = Welcome(
            version=1,
            features=int(features),
            max_body=DEFAULT_MAX_BODY,
            config=record.config_for(keep),
            stats_interval_ms=int(config.stats_interval_s * 1000)
            if features & Feature.STATS_PUSH
            else 0,
            heartbeat_ms=int(config.heartbeat_s * 1000),
            window=WINDOW,
        )
        await self.send(welcome)
        log.info(
            "guest %s connected from %s: %s, %s, reclaim %s",
            record.name,
            self.peer,
            format_size(record.ram_pages * PAGE_SIZE),
            "authenticated" if authenticated else "unauthenticated",
            record.reclaim_mode,
        )
        service.changed(policy=True)

    def _key(self, guest_config: GuestConfig | None) -> bytes | None:
        if guest_config is None or guest_config.key_file is None:
            return None
        try:
            return auth.key_from_file_bytes(Path(guest_config.key_file).read_bytes())
        except (OSError, ValueError) as exc:
            # A configured key that cannot be read must not open the door.
            raise RemoteProtocolError(
                f"the host cannot use guest {guest_config.name}'s key", ErrorCode.INTERNAL
            ) from exc

    async def _serve(self) -> None:
        # Its deadline is set only while a send is under way (see send), so when it
        # expires a guest stopped taking what we send: the session ends as too slow.
        self._send_deadline = deadline = trio.CancelScope()
        try:
            with deadline:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    self.heard = trio.current_time()
                    with self.idle_scope:
                        while True:
                            event = await self.next_event()
                            if isinstance(event, ConnectionClosed):
                                raise SessionEnded("disconnected")
                            await self._handle(event)
                            if isinstance(event, Bye | Error):
                                nursery.cancel_scope.cancel()
                                return
                    if self.idle_scope.cancelled_caught:
                        raise RemoteProtocolError(
                            f"nothing heard for {self.service.idle_timeout_s:g}s",
                            ErrorCode.TIMEOUT
                        )
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            self._send_deadline = None
        if deadline.cancelled_caught:
            raise trio.TooSlowError

    async def _writer(self) -> None:
        """Targets, heartbeats and statistics polls, as they fall due.  The service's
        one ``ticker`` marks heartbeats and polls due for every session, so a wake
        costs an Event, not a timer per session."""
        record = self.record
        assert record is not None
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if self._backlog:  # what send_nowait could not write
                await self.send()
            if self.config_dirty:
                self.config_dirty = False
                keep = record.target_keep_pages
                if keep is not None:
                    await self.send(record.config_for(keep))
            if self.ping_due:
                self.ping_due = False
                unanswered = self.conn.next_ping().txid - 1 - self._pongs
                if unanswered >= 3:
                    raise RemoteProtocolError("3 PINGs unanswered", ErrorCode.TIMEOUT)
                await self.send(self.conn.next_ping())
            if self.poll_due:
                self.poll_due = False
                if self.conn.negotiated(Feature.STATS_VQ):
                    await self.send(self.conn.next_stats_request())

    def tick(self, now: float, ping: bool) -> None:
        """Called by the service's ticker: mark a heartbeat and a statistics poll due."""
        record = self.record
        if record is None:
            return
        if now - self.heard > self.service.idle_timeout_s:
            self.idle_scope.cancel()  # _serve ends the session: nothing heard
        interval = record.stats_interval_s
        if interval and now >= self.next_poll:
            self.poll_due = True
            self.next_poll = now + interval
        elif not interval:
            self.next_poll = now
        if ping:
            self.ping_due = True
        if self.poll_due or self.ping_due:
            self.wake.set()

    # -- events ----------------------------------------------------------------------------

    async def _handle(self, event: Any) -> None:
        service, record = self.service, self.record
        assert record is not None
        now = time.time()
        if isinstance(event, Inflate):
            refusal = service.ledger.check_inflate(record, event.pages)
            if refusal is None:
                freed = await self._punch(event.pages)
                if isinstance(freed, Refusal):
                    refusal = freed
                else:
                    service.ledger.inflate(record, event.pages, freed, now)
                    await self.send(Ack(event.txid, freed.num_pages))
                    log.debug("guest %s: +%d pages (%d freed)", record.name,
                              event.pages.num_pages, freed.num_pages)
            if refusal is not None:
                await self._nak(event.txid, refusal)
            service.changed()
        elif isinstance(event, Deflate):
            refusal = service.ledger.check_deflate(record, event.pages)
            if refusal is None:
                service.ledger.deflate(record, event.pages, now)
                await self.send(Ack(event.txid, 0))
            else:
                await self._nak(event.txid, refusal)
            service.changed()
        elif isinstance(event, Resync):
            refusal = service.ledger.check_resync(record, event.pages)
            if refusal is None:
                new = event.pages - record.ballooned
                freed = await self._punch(new)
                if isinstance(freed, Refusal):
                    refusal = freed
                else:
                    service.ledger.resync(record, event.pages, freed, now)
                    await self.send(Ack(event.txid, (record.freed & event.pages).num_pages))
                    log.info(
                        "guest %s: balloon resynchronised: %s (%s freed on the host)",
                        record.name,
                        format_size(event.pages.num_pages * PAGE_SIZE),
                        format_size(record.freed.num_pages * PAGE_SIZE),
                    )
            if refusal is not None:
                await self._nak(event.txid, refusal)
            service.changed(policy=True)
        elif isinstance(event, Actual):
            record.actual = event.actual
            service.changed()
        elif isinstance(event, Stats):
            before = record.floor_reached
            record.previous_stats = record.stats
            record.stats = event.as_dict()
            record.stats_time = now
            service.changed(policy=record.floor_reached != before)
        elif isinstance(event, Ping):
            await self.send(Pong(event.txid))
        elif isinstance(event, Pong):
            self._pongs += 1
        elif isinstance(event, Bye):
            log.info("guest %s says goodbye (%s) %s", record.name, event.reason.name,
                     event.message)
        elif isinstance(event, Error):
            log.warning("guest %s reports error %s: %s", record.name, event.code.name,
                        event.message)

    async def _punch(self, pages: RangeSet) -> RangeSet | Refusal:
        if self.ram is None or not pages:
            return RangeSet.empty()
        try:
            # Punching GiBs takes hundreds of ms: a worker thread, bounded by the
            # service's limiter.  Not abandoned on cancel: a newer session of this
            # guest waits for it (safety rule 3).
            return await trio.to_thread.run_sync(
                self.ram.punch, pages, limiter=self.service.punch_limiter
            )
        except NativeError as exc:
            log.error("guest %s: reclaim failed: %s", self.name, exc)
            return Refusal(NakReason.RECLAIM_FAILED, f"the host could not free the pages: {exc}")

    async def _nak(self, txid: int, refusal: Refusal) -> None:
        record = self.record
        assert record is not None
        count = self.service.ledger.refused(record)
        log.warning("guest %s: report %d refused: %s", record.name, txid, refusal.message)
        await self.send(Nak(txid, refusal.reason, refusal.message[:1000], refusal.pfn))
        if count > self.service.config.max_naks:
            raise RemoteProtocolError(
                f"{count} reports in a row refused; giving up on this session",
                ErrorCode.MISBEHAVING,
            )


class HostService:
    """Every guest's sessions, the ledger, the policy loop, and ``HostControl``."""

    def __init__(self, config: HostConfig, capacity_bytes: int, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.ledger = Ledger(capacity_bytes // PAGE_SIZE)
        self.sessions: dict[str, Session] = {}
        self.punch_limiter = trio.CapacityLimiter(2)
        self.params = policy.DEFAULT_PARAMS
        self._changes = 0
        self._changed = trio.Event()
        self._policy_wake = trio.Event()
        self._manual: dict[str, int] = {}
        self._policy_states: dict[str, tuple[tuple[Any, ...], policy.GuestState]] = {}
        self._state_wake = trio.Event()
        self._state_dirty = False
        self._state_saver_running = False
        self._load_state()
        for guest_config in config.guests.values():
            self.ledger.configure(guest_config)
            self.restore_manual(self.ledger.records[guest_config.name])

    # -- sessions ------------------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        await Session(self, stream, _peer(stream)).run()

    async def take_over(self, name: str, session: Session) -> None:
        old = self.sessions.get(name)
        self.sessions[name] = session
        if old is not None:
            log.info("guest %s: a newer session from %s replaces the one from %s",
                     name, session.peer, old.peer)
            old.superseded = True
            old.cancel_scope.cancel()
            session.predecessor = old
            await old.done.wait()
            session.predecessor = None

    @property
    def idle_timeout_s(self) -> float:
        """A guest heard from for no longer than this (3 heartbeats) is dropped."""
        return 3 * self.config.heartbeat_s

    def changed(self, *, policy: bool = False) -> None:
        self._changes += 1
        # Wakes whoever waits in wait_change; a fresh Event is made there, when one
        # is needed, not here for every message of every guest.
        self._changed.set()
        if policy:
            self._policy_wake.set()

    # -- the policy ----------------------------------------------------------------------

    async def ticker(self) -> None:
        """Heartbeats and statistics polls for every session, from one task: a PING
        every ``heartbeat_s``, a STATS_REQUEST every guest's polling interval."""
        step = min(1.0, self.config.heartbeat_s)
        next_ping = trio.current_time() + self.config.heartbeat_s
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            ping = now >= next_ping
            if ping:
                next_ping = now + self.config.heartbeat_s
            for session in list(self.sessions.values()):
                session.tick(now, ping)

    async def policy_loop(self) -> None:
        while True:
            with trio.move_on_after(self.config.policy_interval_s):
                await self._policy_wake.wait()
            self._policy_wake = trio.Event()
            started = trio.current_time()
            self.run_policy()
            # A run costs O(guests), ~20 ms per 1,000.  Events that come back to back
            # (thousands of guests connecting, a target for every guest) would run it
            # once per event and starve the sessions: 10,000 guests had not finished
            # connecting after 17 minutes.  Events within 3x the last run's length are
            # served by the next run, so event-driven runs take at most a quarter of
            # the time.
            await trio.sleep(POLICY_PAUSE_RUNS * (trio.current_time() - started))

    def run_policy(self) -> None:
        now = time.time()
        for record in list(self.ledger.records.values()):
            self._expire(record, now)
        cache, self._policy_states = self._policy_states, {}
        states = [
            self._policy_state(r, cache) for r in self.ledger.records.values() if r.present
        ]
        if not states:
            return
        targets = policy.compute_targets(states, self.ledger.capacity_pages, self.params)
        for name, target in targets.items():
            record = self.ledger.records[name]
            keep = target.keep_pages
            if record.manual_keep_pages is not None:
                keep = self._clamp(record, record.manual_keep_pages)
                record.reason = "manual"
            else:
                record.reason = target.reason
            if record.connected and keep != record.target_keep_pages:
                record.target_keep_pages = keep
                session = self.sessions.get(name)
                if session is not None:
                    session.push_config()
                self.changed()

    def _expire(self, record: GuestRecord, now: float) -> None:
        """Past its grace period, a disconnected guest whose RAM files are gone (its
        VM was torn down) is released; one whose VM may still run keeps its place."""
        if record.connected or not record.present or record.disconnected_at is None:
            return
        if now - record.disconnected_at < self.config.grace_s or record.ram_map is None:
            return
        if not all(os.path.exists(r.file) for r in record.ram_map.regions):
            log.info("guest %s: gone for %.0fs and its RAM files are gone: released",
                     record.name, now - record.disconnected_at)
            self.ledger.release(record.name)
            self.changed()

    def _policy_state(
        self, record: GuestRecord, cache: dict[str, tuple[tuple[Any, ...], policy.GuestState]]
    ) -> policy.GuestState:
        """The record as the policy sees it.  A ``GuestState`` is rebuilt (and checked)
        only when what it is made of changed since the last run: with thousands of
        guests, building them all every round was two thirds of a run's cost."""
        stats = record.stats
        key = (
            record.ram_pages, record.min_pages, record.shares, record.ballooned.num_pages,
            record.freed.num_pages, record.target_keep_pages, stats, record.previous_stats,
            record.manual_keep_pages, record.connected, record.ram_map,
            record.authenticated, record.features,
        )
        cached = cache.get(record.name)
        if cached is not None and cached[0] == key:
            state = cached[1]
        else:
            state = self._build_policy_state(record)
        self._policy_states[record.name] = (key, state)
        return state

    def _build_policy_state(self, record: GuestRecord) -> policy.GuestState:
        stats = record.stats
        used = available = total = psi = None
        if StatTag.MEMTOT in stats and StatTag.AVAIL in stats:
            total = stats[StatTag.MEMTOT] // PAGE_SIZE
            available = stats[StatTag.AVAIL] // PAGE_SIZE
            balloon = stats.get(StatTag.BALLOON_PAGES, record.ballooned.num_pages)
            used = max(0, total - available - balloon)
        if StatTag.PSI_SOME_AVG10 in stats:
            psi = stats[StatTag.PSI_SOME_AVG10] / 100.0
        previous = record.previous_stats
        swapping = any(
            tag in stats and tag in previous and stats[tag] > previous[tag]
            for tag in (StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MAJFLT)
        )
        return policy.GuestState(
            name=record.name,
            ram_pages=record.ram_pages,
            min_pages=min(record.min_pages, record.ram_pages),
            shares=record.shares,
            keep_pages=record.keep_pages,
            target_keep_pages=record.target_keep_pages,
            used_pages=used,
            available_pages=available,
            total_pages=total,
            psi_some_avg10=psi,
            swapping=swapping,
            cannot_inflate=record.floor_reached,
            manual_keep_pages=record.manual_keep_pages,
            connected=record.connected,
            reclaims=record.reclaims,
            unfreed_pages=record.unfreed_pages,
        )

    # -- manual targets, kept across restarts -----------------------------------------------

    def restore_manual(self, record: GuestRecord) -> None:
        if record.name in self._manual:
            record.manual_keep_pages = self._manual[record.name] // PAGE_SIZE

    def _load_state(self) -> None:
        path = self.config.state_file
        if not path or not os.path.exists(path):
            return
        try:
            state = json.loads(Path(path).read_text())
            self._manual = {str(k): int(v) for k, v in state.get("manual", {}).items()}
        except (OSError, ValueError, AttributeError) as exc:
            log.error("cannot read state file %s (%s); starting without manual targets",
                      path, exc)

    def _manual_changed(self) -> None:
        """Keep the manual targets on disk.  Under ``serve`` a burst of changes (a
        target for every guest) is written once, by ``state_saver``; each write is
        O(guests), and writing once per change took 0.9 s for 1,000 targets and 4.7 s
        for 3,000.  Without ``serve``, at once."""
        if not self.config.state_file:
            return
        if self._state_saver_running:
            self._state_dirty = True
            self._state_wake.set()
        else:
            self._save_state()

    async def state_saver(self) -> None:
        """Write the state file after each burst of manual-target changes."""
        self._state_saver_running = True
        try:
            while True:
                await self._state_wake.wait()
                self._state_wake = trio.Event()
                self._state_dirty = False
                self._save_state()
        finally:
            self._state_saver_running = False
            if self._state_dirty:
                self._save_state()

    def _save_state(self) -> None:
        path = self.config.state_file
        if not path:
            return
        tmp = f"{path}.tmp"
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_text(json.dumps({"version": 1, "manual": self._manual}, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot write state file %s: %s", path, exc)

    # -- configuration reload ------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file (SIGHUP).  A bad file is logged and ignored."""
        if not self.config_path:
            return
        try:
            fresh = load_config(self.config_path)
        except PolicyError as exc:
            log.error("config reload failed, keeping the old one: %s", exc)
            return
        self.config = replace(
            fresh,
            capacity_bytes=self.config.capacity_bytes,
            state_file=self.config.state_file or fresh.state_file,
        )
        for guest_config in fresh.guests.values():
            self.ledger.configure(guest_config)
        log.info("configuration reloaded from %s (%d guests)", self.config_path,
                 len(fresh.guests))
        self.changed(policy=True)

    # -- HostControl -------------------------------------------------------------------------

    def guests(self) -> list[GuestStatus]:
        return [self._status(r) for _, r in sorted(self.ledger.records.items())]

    def guest(self, name: str) -> GuestStatus:
        return self._status(self.ledger.get(name))

    def _status(self, r: GuestRecord) -> GuestStatus:
        stats = r.stats
        avail = stats.get(StatTag.AVAIL)
        psi = stats.get(StatTag.PSI_SOME_AVG10)
        target = r.target_keep_pages if r.target_keep_pages is not None else r.ram_pages
        return GuestStatus(
            name=r.name,
            ram_bytes=r.ram_pages * PAGE_SIZE,
            min_bytes=r.min_pages * PAGE_SIZE,
            shares=r.shares,
            target_bytes=target * PAGE_SIZE,
            actual_bytes=max(0, r.ram_pages - r.actual) * PAGE_SIZE,
            ballooned_bytes=r.ballooned.num_pages * PAGE_SIZE,
            freed_bytes=r.freed.num_pages * PAGE_SIZE,
            available_bytes=avail,
            pressure=None if psi is None else psi / 100.0,
            connected=r.connected,
            reclaim=r.reclaim_mode,
            manual=r.manual_keep_pages is not None,
            reason=r.reason,
            authenticated=r.authenticated,
            stable=r.stable,
            floor_reached=r.floor_reached,
        )

    def _clamp(self, record: GuestRecord, keep_pages: int) -> int:
        return max(min(record.min_pages, record.ram_pages), min(record.ram_pages, keep_pages))

    def set_target(self, name: str, keep_bytes: int | None, *, clamp: bool) -> int:
        record = self.ledger.get(name)
        if keep_bytes is None:
            record.manual_keep_pages = None
            self._manual.pop(name, None)
        else:
            keep = keep_bytes // PAGE_SIZE
            if not clamp:
                if keep > record.ram_pages:
                    raise PolicyError(
                        f"{format_size(keep_bytes)} is more than guest {name}'s RAM "
                        f"({format_size(record.ram_pages * PAGE_SIZE)})"
                    )
                if keep < record.min_pages:
                    raise PolicyError(
                        f"{format_size(keep_bytes)} is below guest {name}'s floor "
                        f"({format_size(record.min_pages * PAGE_SIZE)})"
                    )
            keep = self._clamp(record, keep)
            record.manual_keep_pages = keep
            self._manual[name] = keep * PAGE_SIZE
            if record.connected and keep != record.target_keep_pages:
                record.target_keep_pages = keep
                session = self.sessions.get(name)
                if session is not None:
                    session.push_config()
            record.reason = "manual"
            log.info("guest %s: operator target: keep %s", name, format_size(keep * PAGE_SIZE))
        self._manual_changed()
        self.changed(policy=True)
        kept = record.manual_keep_pages if record.manual_keep_pages is not None else (
            record.target_keep_pages if record.target_keep_pages is not None else record.ram_pages
        )
        return kept * PAGE_SIZE

    def stats(self, name: str) -> GuestStats | None:
        record = self.ledger.get(name)
        if record.stats_time is None:
            return None
        return GuestStats(dict(record.stats), record.stats_time, record.stats_interval_s)

    def set_stats_interval(self, name: str, seconds: int) -> None:
        record = self.ledger.get(name)
        if seconds < 0:
            raise PolicyError("a polling interval cannot be negative")
        record.stats_interval_s = int(seconds)
        session = self.sessions.get(name)
        if session is not None:
            session.wake.set()
        self.changed()

    def release(self, name: str) -> None:
        self.ledger.release(name)
        log.info("guest %s released by the operator", name)
        self.changed(policy=True)

    def pool(self) -> PoolStatus:
        records = [r for r in self.ledger.records.values() if r.present]
        return PoolStatus(
            capacity_bytes=self.ledger.capacity_pages * PAGE_SIZE,
            free_bytes=self.ledger.free_pages() * PAGE_SIZE,
            committed_bytes={r.name: r.committed_pages * PAGE_SIZE for r in records},
            freed_bytes=sum(r.freed.num_pages for r in records) * PAGE_SIZE,
            ballooned_bytes=sum(r.ballooned.num_pages for r in records) * PAGE_SIZE,
        )

    def changes(self) -> int:
        return self._changes

    async def wait_change(self, seen: int) -> int:
        while self._changes == seen:
            if self._changed.is_set():
                self._changed = trio.Event()
            await self._changed.wait()
        return self._changes

    # -- shutdown ------------------------------------------------------------------------

    async def say_goodbye(self) -> None:
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions.values()):
                nursery.start_soon(session._last_word, Bye(ByeReason.SHUTDOWN, "host stopping"))


GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Each guest keeps ~100 objects the cyclic collector tracks and every message makes
    a few dozen short-lived ones: with 10,000 guests CPython's default thresholds ran
    2-3 full collections (1-2 s each) per target pushed to all of them
    (bench/bench_host_scale.py).  Collect the young generation less often."""
    gc.set_threshold(*GC_THRESHOLDS)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception that ended a reader/writer pair (the other one was cancelled)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _socket_fd(stream: trio.abc.Stream) -> int | None:
    sock = getattr(stream, "socket", None)
    if isinstance(stream, trio.SocketStream) and sock is not None:
        return sock.fileno()
    return None


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "memory"
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname() or '?'}"
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name)


async def open_listeners(address: Address) -> list[trio.SocketListener]:
    """Listeners for one ``--listen`` address.  Raises OSError as the OS reports it."""
    if address.kind == "tcp":
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    if address.kind == "unix":
        path = address.path
        if os.path.exists(path):
            import stat as stat_module

            if stat_module.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(1024)
        return [trio.SocketListener(sock)]
    if address.kind == "vsock":
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        await sock.bind((address.cid, address.port))
        sock.listen(1024)
        return [trio.SocketListener(sock)]
    raise PolicyError(f"cannot listen on {address}")


async def serve(
    service: HostService,
    listeners: list[trio.SocketListener],
    *,
    extra: list[Callable[..., Awaitable[Any]]] = (),  # type: ignore[assignment]
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve guests on ``listeners`` until cancelled (SIGTERM/SIGINT end it cleanly,
    SIGHUP reloads the configuration).  ``extra`` are control-plane servers, each an
    async function taking ``task_status``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.policy_loop)
        nursery.start_soon(service.ticker)
        nursery.start_soon(service.state_saver)
        for server in extra:
            await nursery.start(server)
        await nursery.start(trio.serve_listeners, service.handle_stream, listeners)
        nursery.start_soon(_signals, service, nursery.cancel_scope)
        task_status.started()


async def _signals(service: HostService, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                service.reload()
                continue
            log.info("stopping: saying goodbye to %d guest(s)", len(service.sessions))
            with trio.move_on_after(5):
                await service.say_goodbye()
            scope.cancel()
            return
