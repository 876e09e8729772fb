"""The agent core against a HostConnection in memory, with a pool of real pages.

No event loop: a small rig moves bytes between the core and the host connection,
answers requests the way a host does (or not, or with NAK, when a test says so) and
runs the core's pool commands on a real ``PagePool`` (pins kept in this process).
So every frame a test sees reported is a frame some real locked page sits in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest

import native
from guest_agent.agent import AgentConfig, AgentCore, ChunkState, Pin, Release, Verify
from guest_agent.guard import GuardConfig
from guest_agent.pool import PagePool, union_frames
from guest_agent.stats import MemorySnapshot
from protocol.connection import HostConnection
from protocol.constants import BalloonState, ByeReason, Feature, StatTag
from protocol.errors import NakReason
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Bye,
    Config,
    ConnectionClosed,
    Deflate,
    Error,
    Hello,
    Inflate,
    Nak,
    Ping,
    Resync,
    Stats,
    StatsRequest,
    Welcome,
)
from protocol.ranges import RangeSet
from tests.agent.conftest import needs_root

pytestmark = needs_root

MiB = 1 << 20
NOTHING = Feature(0)
PAGES_PER_MIB = 256
TOTAL = 1 << 30
PLENTY = MemorySnapshot(total_bytes=TOTAL, available_bytes=TOTAL - 64 * MiB,
                        free_bytes=TOTAL - 64 * MiB, caches_bytes=0)


def pages(mib: float) -> int:
    return int(mib * PAGES_PER_MIB)


class Rig:
    """A core, a pool, and a host that answers in memory."""

    def __init__(self, pool: PagePool, *, target_mib: float = 0, window: int = 4,
                 refuse: Feature = NOTHING, min_free: int = 0, chunks=(),
                 deflate_on_oom: bool = True, holdoff_s: float = 30.0) -> None:
        self.pool = pool
        self.now = 100.0
        self.snapshot = PLENTY
        self.target = pages(target_mib)
        self.window = window
        self.refuse = refuse
        config = AgentConfig(
            name="vm1", total_pages=TOTAL // 4096, chunk_bytes=4 * MiB,
            guard=GuardConfig(min_free_bytes=min_free, step_bytes=4 * MiB,
                              deflate_on_pressure=deflate_on_oom, holdoff_s=holdoff_s,
                              step_interval_s=1.0),
        )
        self.core = AgentCore(config, snapshot=lambda: self.snapshot, chunks=chunks)
        self.core.observe(self.snapshot, self.now)
        self.host: HostConnection | None = None
        self.answering = True
        self.nak: dict[int, NakReason] = {}  # txid -> reason, for the current session
        self.requests: list[object] = []  # every request, all sessions
        self.held: list[object] = []
        self.ledger = RangeSet.empty()
        self.actuals: list[int] = []
        self.stats: list[Stats] = []
        self.closed: object | None = None

    # -- moving bytes ------------------------------------------------------------------

    def connect(self) -> None:
        self.host = HostConnection()
        self.held.clear()
        self.closed = None
        self.core.connect(self.now)
        self.settle()

    def exchange(self) -> bool:
        data = self.core.data_to_send()
        if not data or self.host is None:
            return False
        self.host.receive_data(data)
        reply = []
        while (event := self.host.next_event()) is not NEED_DATA:
            reply.append(self._host_event(event))
            if isinstance(event, Bye | Error | ConnectionClosed):
                self.closed = event
                break
        out = b"".join(reply)
        if out:
            self.core.receive_data(out, self.now)
        return True

    def _host_event(self, event: object) -> bytes:
        host = self.host
        assert host is not None
        if isinstance(event, Hello):
            features = event.features & ~self.refuse
            return host.send(Welcome(1, features, 16 << 20, Config(self.target), 0, 0,
                                     self.window))
        if isinstance(event, Inflate | Deflate | Resync):
            self.requests.append(event)
            if not self.answering:
                self.held.append(event)
                return b""
            return self.answer(event)
        if isinstance(event, Actual):
            self.actuals.append(event.actual)
        elif isinstance(event, Stats):
            self.stats.append(event)
        return b""

    def answer(self, event) -> bytes:
        assert self.host is not None
        reason = self.nak.pop(event.txid, None)
        if reason is not None:
            return self.host.send(Nak(event.txid, reason, "test says no"))
        if isinstance(event, Inflate):
            self.ledger |= event.pages
        elif isinstance(event, Deflate):
            self.ledger -= event.pages
        else:
            self.ledger = event.pages
        return self.host.send(Ack(event.txid, event.pages.num_pages))

    def answer_held(self) -> None:
        out = b"".join(self.answer(e) for e in self.held)
        self.held.clear()
        self.core.receive_data(out, self.now)
        self.settle()

    def host_sends(self, event) -> None:
        assert self.host is not None
        if isinstance(event, Config):
            self.target = event.num_pages
        self.core.receive_data(self.host.send(event), self.now)
        self.settle()

    def work(self) -> object | None:
        command = self.core.next_command(self.now)
        if isinstance(command, Pin):
            self.core.pinned(self.pool.pin(command.size_bytes), self.now)
        elif isinstance(command, Release):
            self.pool.release(command.chunk)
            self.core.released(command.chunk, self.now)
        elif isinstance(command, Verify):
            self.core.verified(self.pool.check(command.chunks), self.now)
        return command

    def settle(self, limit: int = 1000) -> None:
        for _ in range(limit):
            moved = self.exchange()
            worked = self.work() is not None
            if not (moved or worked):
                return
        raise AssertionError("the core never settled")

    def lose_host(self) -> None:
        self.core.connection_lost("test cut the connection", self.now)
        self.host = None
        self.nak.clear()
        self.settle()

    # -- views -------------------------------------------------------------------------

    def held_frames(self) -> RangeSet:
        return union_frames(s.chunk for s in self.core.slots)

    def kinds(self) -> list[str]:
        return [type(r).__name__ for r in self.requests]


@pytest.fixture
def rig(local_pool: PagePool) -> Rig:
    return Rig(local_pool, target_mib=10)


def real_frames(pool: PagePool) -> RangeSet:
    return RangeSet.from_pfns(np.concatenate([
        native.read_pfns(c.address, c.size_bytes) for c in pool.chunks.values()
    ])) if pool.chunks else RangeSet.empty()


# -- inflating ---------------------------------------------------------------------------


def test_inflates_to_the_target_in_chunks_and_reports_the_real_frames(rig: Rig) -> None:
    rig.connect()
    assert rig.kinds()[0] == "Resync" and rig.requests[0].pages == RangeSet.empty()
    assert rig.kinds()[1:] == ["Inflate"] * 3  # 4M + 4M + 2M
    assert [s.chunk.size_bytes for s in rig.core.slots] == [4 * MiB, 4 * MiB, 2 * MiB]
    assert rig.ledger == real_frames(rig.pool)  # what the host holds is what pagemap says
    assert rig.ledger.num_pages == pages(10)
    assert all(s.state is ChunkState.BALLOONED for s in rig.core.slots)
    assert rig.actuals[-1] == pages(10)
    assert rig.host.pending == ()


def test_the_last_chunk_hits_the_target_exactly(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=4 + 3 / 256)  # 4 MiB and three 4 KiB pages
    rig.connect()
    sizes = [s.chunk.size_bytes for s in rig.core.slots]
    assert sizes == [4 * MiB, 3 * 4096]  # whole huge pages, then the 4 KiB remainder
    assert rig.ledger.num_pages == rig.target


def test_pins_the_next_chunk_while_the_last_report_is_in_flight(rig: Rig) -> None:
    rig.answering = False
    rig.connect()  # RESYNC unanswered: nothing is pinned before it is
    assert rig.kinds() == ["Resync"] and rig.pool.chunks == {}
    rig.answer_held()
    # Window 4: chunks are pinned and reported without waiting for any answer.
    assert rig.kinds()[1:] == ["Inflate"] * 3
    assert all(s.state is ChunkState.PENDING for s in rig.core.slots)
    assert rig.core.figures(rig.now).ballooned_pages == 0  # nothing counts before the ACK
    assert rig.actuals == [0]
    rig.answer_held()
    assert rig.core.figures(rig.now).ballooned_pages == pages(10)
    assert rig.actuals[-1] == pages(10)


def test_window_of_one_reports_one_chunk_at_a_time(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=10, window=1)
    rig.answering = False
    rig.connect()
    rig.answer_held()
    assert rig.kinds() == ["Resync", "Inflate"] and len(rig.pool.chunks) == 1
    rig.answer_held()
    assert rig.kinds() == ["Resync", "Inflate", "Inflate"]


# -- deflating ---------------------------------------------------------------------------


def test_deflates_newest_first_and_releases_only_after_the_ack(rig: Rig) -> None:
    rig.connect()
    first, second, third = (s.chunk for s in rig.core.slots)
    rig.answering = False
    rig.host_sends(Config(pages(4)))
    deflates = [r for r in rig.requests if isinstance(r, Deflate)]
    assert [d.pages for d in deflates] == [third.frames, second.frames]  # LIFO
    # MUST_TELL_HOST: still pinned and mapped until the host answers.
    assert third.path.exists() and second.path.exists()
    assert set(rig.pool.chunks) == {first.seq, second.seq, third.seq}
    rig.answer_held()
    assert list(rig.pool.chunks) == [first.seq]
    assert not third.path.exists()
    assert rig.ledger == first.frames == real_frames(rig.pool)
    assert rig.actuals[-1] == pages(4)


def test_more_chunks_than_the_window_deflate_in_one_report(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=10, window=2)
    rig.connect()
    chunks = [s.chunk for s in rig.core.slots]
    rig.answering = False
    rig.host_sends(Config(0))
    deflates = [r for r in rig.requests if isinstance(r, Deflate)]
    # Three chunks, two free places in the window: one DEFLATE names all of them, so
    # the whole deflate costs one round trip to the host.
    assert len(deflates) == 1 and deflates[0].pages == union_frames(chunks)
    assert all(c.path.exists() for c in chunks)  # nothing goes back before the answer
    rig.answer_held()
    assert rig.pool.chunks == {} and not any(c.path.exists() for c in chunks)
    assert rig.ledger == RangeSet.empty() and rig.actuals[-1] == 0


def test_actual_counts_deflated_pages_until_they_are_released(rig: Rig) -> None:
    rig.connect()
    rig.answering = False
    rig.host_sends(Config(pages(4)))
    assert rig.actuals[-1] == pages(10)
    # The host answers, but the worker has not released the chunks yet: the guest
    # does not have those pages back, so ``actual`` (virtio's meaning) stays.
    out = b"".join(rig.answer(e) for e in rig.held)
    rig.held.clear()
    rig.core.receive_data(out, rig.now)
    rig.exchange()
    assert rig.actuals[-1] == pages(10)
    assert rig.core.figures(rig.now).ballooned_pages == pages(4)  # the host's view
    rig.settle()  # the worker releases them
    assert rig.actuals[-1] == pages(4) and len(rig.pool.chunks) == 1


def test_a_routine_check_waits_until_no_pin_is_wanted(rig: Rig) -> None:
    rig.connect()
    rig.core.request_verify()
    rig.core.receive_data(rig.host.send(Config(pages(18))), rig.now)
    kinds = []
    while (command := rig.work()) is not None:
        kinds.append(type(command).__name__)
        rig.exchange()
    assert kinds == ["Pin", "Pin", "Verify"]  # 4M + 4M first, the check after


def test_an_urgent_check_comes_before_the_next_pin(rig: Rig) -> None:
    rig.connect()
    rig.core.request_verify(urgent=True)
    rig.core.receive_data(rig.host.send(Config(pages(14))), rig.now)
    assert isinstance(rig.core.next_command(rig.now), Verify)


def test_reaching_the_target_logs_how_long_it_took(
    local_pool: PagePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="uballoon.agent")
    rig = Rig(local_pool, target_mib=10)
    rig.connect()
    line = next(r.getMessage() for r in caplog.records
                if r.getMessage().startswith("balloon at target: 10M"))
    assert "inflated 10M in" in line and "in 3 chunks" in line
    timings = next(r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("timings "))
    data = json.loads(timings.removeprefix("timings "))
    assert data["chunks_pinned"] == 3 and len(data["sent_s"]) == 3
    assert set(data["pin_phases_s"]) >= {"create", "map", "lock", "pin", "frames"}


def test_without_must_tell_host_pages_go_back_once_the_deflate_is_sent(
    local_pool: PagePool,
) -> None:
    rig = Rig(local_pool, target_mib=8, refuse=Feature.MUST_TELL_HOST)
    rig.connect()
    rig.answering = False
    rig.host_sends(Config(pages(4)))
    assert rig.kinds()[-1] == "Deflate" and rig.held
    assert len(rig.pool.chunks) == 1  # released before the answer
    rig.answer_held()
    assert rig.ledger.num_pages == pages(4)


def test_a_target_between_chunks_is_met_by_deflating_then_inflating_the_rest(
    rig: Rig,
) -> None:
    rig.connect()
    rig.host_sends(Config(pages(7)))
    sizes = [s.chunk.size_bytes for s in rig.core.slots]
    assert sizes == [4 * MiB, 2 * MiB, 1 * MiB]
    assert rig.ledger.num_pages == pages(7) and rig.ledger == real_frames(rig.pool)


def test_a_deflate_between_chunks_pins_the_rest_first(rig: Rig) -> None:
    rig.connect()  # 10 MiB: chunks of 4, 4 and 2
    seen: list[int] = []
    answer = rig.answer

    def watched(event):
        out = answer(event)
        seen.append(rig.ledger.num_pages)
        return out

    rig.answer = watched  # type: ignore[method-assign]
    start = len(rig.requests)
    rig.host_sends(Config(pages(7)))
    # Deflating the second 4 MiB chunk whole would leave the guest 4 MiB where the
    # host gave it 3: the 3 MiB it keeps of it are pinned and reported first.
    assert rig.kinds()[start:] == ["Deflate", "Inflate", "Inflate", "Deflate"]
    assert min(seen) >= pages(7)  # the host never saw the guest keep more than its target
    assert sorted(s.chunk.size_bytes for s in rig.core.slots) == [1 * MiB, 2 * MiB, 4 * MiB]
    assert rig.ledger.num_pages == pages(7) and rig.ledger == real_frames(rig.pool)


def test_a_guest_that_cannot_spare_the_rest_deflates_the_chunk_whole(
    local_pool: PagePool,
) -> None:
    rig = Rig(local_pool, target_mib=10, min_free=16 * MiB, deflate_on_oom=False)
    rig.connect()
    # Under the floor: nothing more may be pinned until memory comes back.
    rig.snapshot = replace(PLENTY, available_bytes=15 * MiB)
    rig.core.observe(rig.snapshot, rig.now)
    seen: list[int] = []
    answer = rig.answer

    def watched(event):
        out = answer(event)
        seen.append(rig.ledger.num_pages)
        return out

    rig.answer = watched  # type: ignore[method-assign]
    rig.host_sends(Config(pages(7)))
    # So the second 4 MiB chunk goes whole, and the rest waits for memory.
    assert rig.ledger.num_pages == min(seen) == pages(4)
    rig.snapshot = PLENTY
    rig.now += 31  # past the hold-off of the pressure episode
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(7) and rig.ledger == real_frames(rig.pool)


def test_lowering_the_target_while_a_pin_is_in_progress(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=4)
    rig.connect()
    # Raise the target without letting the rig run the worker.
    rig.core.receive_data(rig.host.send(Config(pages(8))), rig.now)
    command = rig.core.next_command(rig.now)
    assert command == Pin(4 * MiB)
    rig.core.receive_data(rig.host.send(Config(pages(4))), rig.now)  # changed its mind
    chunk = rig.pool.pin(command.size_bytes)
    rig.core.pinned(chunk, rig.now)
    rig.settle()
    assert not chunk.path.exists()  # released without ever being reported
    assert all(chunk.frames.isdisjoint(r.pages) for r in rig.requests)
    assert rig.ledger.num_pages == pages(4)


# -- refusals ----------------------------------------------------------------------------


def test_a_refused_inflate_gives_the_pages_back_and_backs_off(
    local_pool: PagePool, caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(local_pool, target_mib=4)
    rig.nak[2] = NakReason.OUT_OF_RANGE  # txid 1 is the RESYNC
    with caplog.at_level(logging.WARNING):
        rig.connect()
    assert "refused 4M of chunk 1 (OUT_OF_RANGE: test says no)" in caplog.text
    assert rig.pool.chunks == {} and rig.core.slots == []
    assert rig.ledger.num_pages == 0
    assert rig.core.next_command(rig.now) is None  # backing off
    rig.now += 1.5
    rig.settle()
    assert rig.ledger.num_pages == pages(4) == real_frames(rig.pool).num_pages


def test_a_refused_resync_falls_back_to_an_empty_balloon(rig: Rig) -> None:
    rig.connect()
    rig.lose_host()
    rig.answering = True
    rig.host = HostConnection()
    rig.core.connect(rig.now)
    rig.nak[1] = NakReason.OUT_OF_RANGE
    rig.settle()
    resyncs = [r for r in rig.requests if isinstance(r, Resync)]
    assert resyncs[-2].pages.num_pages == pages(10)  # refused
    assert resyncs[-1].pages == RangeSet.empty()  # "drop everything", accepted
    # Then everything was released and inflated afresh from new chunks.
    assert rig.ledger.num_pages == pages(10) == real_frames(rig.pool).num_pages
    assert min(s.chunk.seq for s in rig.core.slots) > 3


# -- sessions ----------------------------------------------------------------------------


def test_after_reconnecting_the_resync_comes_first_and_settles_unanswered_reports(
    rig: Rig,
) -> None:
    rig.target = pages(4)
    rig.connect()
    rig.answering = False
    rig.host_sends(Config(pages(10)))
    pending = [s for s in rig.core.slots if s.state is ChunkState.PENDING]
    assert len(pending) == 2
    rig.lose_host()  # the INFLATEs may or may not have been acted on
    assert all(s.state is ChunkState.UNCONFIRMED and not s.safe for s in pending)
    assert rig.core.state_bits(rig.now) & BalloonState.UNCONFIRMED
    count = len(rig.requests)
    rig.answering = True
    rig.connect()
    first = rig.requests[count]
    assert isinstance(first, Resync)
    assert first.pages == rig.held_frames()  # everything held, including the unconfirmed
    assert rig.ledger == real_frames(rig.pool) and rig.ledger.num_pages == pages(10)
    assert not rig.core.state_bits(rig.now) & BalloonState.UNCONFIRMED


def test_a_resync_with_a_lower_target_gives_back_the_rest_after_its_ack(rig: Rig) -> None:
    rig.connect()
    rig.lose_host()
    rig.target = pages(4)
    rig.answering = False
    rig.connect()
    [resync] = rig.held
    assert resync.pages.num_pages == pages(4)
    assert len(rig.pool.chunks) == 3  # nothing released before the host confirms
    rig.answer_held()
    assert len(rig.pool.chunks) == 1 and rig.ledger.num_pages == pages(4)


def test_reattached_chunks_are_kept_until_a_resync_confirms_them(local_pool: PagePool) -> None:
    chunks = [local_pool.pin(4 * MiB), local_pool.pin(4 * MiB)]
    rig = Rig(local_pool, target_mib=4, chunks=chunks)
    assert all(s.state is ChunkState.UNCONFIRMED for s in rig.core.slots)
    rig.core.stop(rig.now)  # no host: unconfirmed chunks cannot be released
    rig.settle()
    assert rig.core.stopped and len(rig.core.kept()) == 2
    assert all(c.path.exists() for c in chunks)


def test_reattached_chunks_are_resynced_then_followed_to_the_target(local_pool: PagePool) -> None:
    chunks = [local_pool.pin(4 * MiB), local_pool.pin(4 * MiB)]
    rig = Rig(local_pool, target_mib=4, chunks=chunks)
    rig.connect()
    assert rig.requests[0] == Resync(1, chunks[0].frames)  # the oldest, up to the target
    assert not chunks[1].path.exists()  # released after the RESYNC's ACK
    assert rig.ledger == chunks[0].frames


def test_a_host_sending_garbage_ends_the_session_with_a_clear_message(rig: Rig) -> None:
    rig.connect()
    rig.core.receive_data(b"this is not a frame at all, not even close" * 3, rig.now)
    assert not rig.core.session_open
    assert "the host broke the protocol" in rig.core.session_error
    assert "balloon of 10M" in rig.core.session_error
    assert rig.core.data_to_send()  # an ERROR frame for the host
    assert len(rig.pool.chunks) == 3  # the balloon is kept


def test_a_target_larger_than_the_guest_is_refused_in_words(rig: Rig) -> None:
    from protocol import codec

    rig.connect()
    kind, flags, txid, body = codec.encode_event(Config(3 * TOTAL // 4096), ranges=False)
    rig.core.receive_data(codec.build_frame(kind, flags, txid, body, None, 0), rig.now)
    assert rig.core.session_error.startswith(
        "host asked for a balloon of 3G, larger than this guest (1G): refusing"
    )
    assert rig.ledger == real_frames(rig.pool)


def test_answers_pings_and_stats_requests(rig: Rig) -> None:
    rig.connect()
    rig.host_sends(Ping(1))
    rig.host_sends(StatsRequest(1))
    stats = rig.stats[-1]
    assert stats.txid == 1
    tags = stats.as_dict()
    assert set(range(16)) <= set(tags)
    assert tags[StatTag.MEMTOT] == TOTAL
    assert tags[StatTag.BALLOON_PAGES] == pages(10)
    assert tags[StatTag.BALLOON_PENDING_PAGES] == 0
    assert tags[StatTag.BALLOON_STATE] == 0
    assert tags[StatTag.PSI_SOME_AVG10] == 0  # STATS_PRESSURE offered and accepted


def test_session_closed_by_the_host_keeps_the_balloon(rig: Rig) -> None:
    rig.connect()
    rig.host_sends(Bye(ByeReason.RESTART, "host restarting"))
    assert not rig.core.session_open
    assert "host restarting" in rig.core.session_error
    assert len(rig.pool.chunks) == 3


# -- frames that moved -------------------------------------------------------------------


def test_frames_found_moved_are_resynced_and_flagged(
    rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    rig.connect()
    victim = rig.core.slots[1].chunk
    true_frames = victim.frames
    # Doctor the record as if the kernel had moved the pages after the report: the
    # core must learn the real frames from the check, say so, and RESYNC.
    victim.frames = RangeSet.span(true_frames.first + (1 << 30), victim.pages)
    rig.core.request_verify()
    count = len(rig.requests)
    with caplog.at_level(logging.WARNING):
        rig.settle()
    assert "FRAMES MOVED: chunk 2 (4M): 1024 of 1024 frames" in caplog.text
    assert victim.frames == true_frames
    assert isinstance(rig.requests[count], Resync)
    assert rig.requests[count].pages == real_frames(rig.pool) == rig.ledger
    assert rig.core.state_bits(rig.now) & BalloonState.FRAMES_MOVED


def test_a_check_that_finds_nothing_sends_nothing(rig: Rig) -> None:
    rig.connect()
    count = len(rig.requests)
    rig.core.request_verify()
    assert isinstance(rig.core.next_command(rig.now), Verify)
    rig.core.verified([], rig.now)
    rig.settle()
    assert len(rig.requests) == count


# -- the guard in the core ----------------------------------------------------------------


def test_the_floor_stops_inflation_and_tells_the_host_at_once(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=10, min_free=16 * MiB)
    rig.snapshot = replace(PLENTY, available_bytes=24 * MiB)  # room for 8M only
    rig.core.observe(rig.snapshot, rig.now)
    rig.connect()
    assert rig.ledger.num_pages == pages(8)
    assert rig.core.state_bits(rig.now) & BalloonState.FLOOR_REACHED
    pushed = [s for s in rig.stats if s.txid == 0]
    assert pushed and pushed[-1].as_dict()[StatTag.BALLOON_STATE] & BalloonState.FLOOR_REACHED
    assert pushed[-1].as_dict()[StatTag.MIN_FREE] == 16 * MiB


def test_pressure_deflates_in_bounded_steps_then_holds_off(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=12, min_free=32 * MiB, holdoff_s=30)
    rig.connect()
    assert rig.ledger.num_pages == pages(12)
    rig.snapshot = replace(PLENTY, available_bytes=16 * MiB)  # under the floor
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(8)  # one step: one 4M chunk
    assert rig.core.state_bits(rig.now) & BalloonState.PRESSURE_DEFLATING
    rig.now += 0.5
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(8)  # steps are a second apart
    rig.now += 0.6
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(4)
    # Pressure gone: no re-inflation until the hold-off has passed...
    rig.snapshot = PLENTY
    rig.now += 1
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(4)
    rig.now += 31
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(12)
    assert not rig.core.state_bits(rig.now) & BalloonState.PRESSURE_DEFLATING


def test_without_deflate_on_oom_pressure_never_deflates(local_pool: PagePool) -> None:
    rig = Rig(local_pool, target_mib=8, min_free=32 * MiB, deflate_on_oom=False)
    rig.connect()
    assert not rig.core.features & Feature.DEFLATE_ON_OOM
    rig.snapshot = replace(PLENTY, available_bytes=1 * MiB)
    rig.core.observe(rig.snapshot, rig.now)
    rig.settle()
    assert rig.ledger.num_pages == pages(8)


def test_while_the_host_is_away_pressure_releases_only_answered_chunks(
    local_pool: PagePool,
) -> None:
    rig = Rig(local_pool, target_mib=4, min_free=32 * MiB)
    rig.connect()
    rig.answering = False
    rig.host_sends(Config(pages(8)))  # chunk 2 reported, unanswered
    rig.lose_host()
    rig.snapshot = replace(PLENTY, available_bytes=1 * MiB)
    for _ in range(3):
        rig.now += 1.1
        rig.core.observe(rig.snapshot, rig.now)
        rig.settle()
    states = [(s.chunk.seq, s.state) for s in rig.core.slots]
    assert states == [(2, ChunkState.UNCONFIRMED)]  # chunk 1 went back; 2 is kept


# -- stopping ----------------------------------------------------------------------------


def test_stop_deflates_everything_then_says_goodbye(rig: Rig) -> None:
    rig.connect()
    rig.core.stop(rig.now)
    rig.settle()
    assert rig.pool.chunks == {} and rig.ledger == RangeSet.empty()
    assert isinstance(rig.closed, Bye) and rig.closed.reason is ByeReason.SHUTDOWN
    assert rig.core.stopped and rig.core.kept() == []


def test_stop_without_the_host_releases_what_is_safe_and_keeps_the_rest(rig: Rig) -> None:
    rig.target = pages(4)
    rig.connect()
    rig.answering = False
    rig.host_sends(Config(pages(8)))
    rig.lose_host()
    rig.core.stop(rig.now)
    rig.settle()
    assert rig.core.stopped
    assert [s.chunk.seq for s in rig.core.kept()] == [2]  # its INFLATE was never answered
    assert list(rig.pool.chunks) == [2]


def test_deflates_pending_chunks_once_answered_when_stopping(rig: Rig) -> None:
    rig.answering = False
    rig.connect()
    rig.answer_held()  # the RESYNC; INFLATEs now wait
    rig.core.stop(rig.now)
    rig.settle()
    assert not rig.core.stopped and len(rig.pool.chunks) == 3
    rig.answering = True
    rig.answer_held()
    assert rig.core.stopped and rig.pool.chunks == {}
    assert isinstance(rig.closed, Bye)
