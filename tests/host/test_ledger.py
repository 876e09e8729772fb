"""The ledger: validation, the two figures, and the capacity invariant at every step."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from host_backend.config import GuestConfig, RamRegion
from host_backend.ledger import Ledger
from protocol.errors import NakReason, PolicyError
from protocol.ranges import RangeSet

GIB = 1 << 30
P = RangeSet.span


def vm(name="vm1", ram=GIB, regions=None):
    regions = regions if regions is not None else (RamRegion(0, ram, f"/dev/shm/{name}"),)
    return GuestConfig(name, ram, 0, 1000, None, regions)


def admitted(ledger, config, total_pages=None):
    return ledger.admit(
        config.name, config, total_pages=total_pages or config.max_bytes // 4096,
        ram_layout=RangeSet.empty(), features=0, authenticated=True, now=0.0,
    )


def test_reports_outside_the_configured_ram_map_are_refused():
    ledger = Ledger(4 * GIB // 4096)
    # pc machine above 3.5G: RAM over 3G sits at guest-physical 4G
    config = vm("big", 5 * GIB, (RamRegion(0, 3 * GIB, "f"), RamRegion(4 * GIB, 2 * GIB, "f", 3 * GIB)))
    record = admitted(ledger, config)
    hole = P((3 * GIB) // 4096 + 5, 1)
    refusal = ledger.check_inflate(record, P(0, 10) | hole)
    assert refusal.reason is NakReason.OUT_OF_RANGE
    assert refusal.pfn == hole.first and "outside guest big's RAM map" in refusal.message
    assert ledger.check_inflate(record, P((4 * GIB) // 4096, 100)) is None


def test_double_inflate_and_foreign_deflate_are_refused_and_change_nothing():
    ledger = Ledger(4 * GIB // 4096)
    record = admitted(ledger, vm())
    ledger.inflate(record, P(100, 10), P(100, 10), 1.0)
    before = (record.ballooned, record.freed)
    assert ledger.check_inflate(record, P(105, 10)).reason is NakReason.ALREADY_BALLOONED
    assert ledger.check_deflate(record, P(95, 10)).reason is NakReason.NOT_IN_BALLOON
    assert (record.ballooned, record.freed) == before
    ledger.check()


def test_hello_claiming_more_than_max_is_refused():
    ledger = Ledger(4 * GIB // 4096)
    try:
        admitted(ledger, vm(), total_pages=2 * GIB // 4096)
    except PolicyError as exc:
        assert "more than its configured max of 1G" in str(exc)
    else:
        raise AssertionError("accepted")


def test_resync_replaces_and_keeps_only_still_named_freed_pages():
    ledger = Ledger(4 * GIB // 4096)
    record = admitted(ledger, vm())
    ledger.inflate(record, P(0, 100), P(0, 100), 1.0)
    ledger.resync(record, P(50, 100), P(100, 50), 2.0)
    assert record.ballooned == P(50, 100)
    assert record.freed == P(50, 100)
    ledger.check()


def test_release_returns_capacity():
    ledger = Ledger(4 * GIB // 4096)
    record = admitted(ledger, vm())
    ledger.inflate(record, P(0, 1000), P(0, 1000), 1.0)
    assert ledger.free_pages() == 3 * GIB // 4096 + 1000
    ledger.disconnect(record, 2.0)
    ledger.release("vm1")
    assert ledger.free_pages() == 4 * GIB // 4096
    ledger.check()


class LedgerMachine(RuleBasedStateMachine):
    """Random accepted and refused reports from three guests; the invariant
    capacity = free + Σ (RAM − freed) and freed ⊆ ballooned ⊆ RAM map hold throughout,
    and a refused report never changes anything."""

    @initialize()
    def setup(self):
        self.ledger = Ledger(3 * GIB // 4096)
        self.records = [admitted(self.ledger, vm(f"vm{i}", GIB // 4)) for i in range(3)]
        self.pages = GIB // 4 // 4096

    def _pages(self, data):
        start = data.draw(st.integers(0, self.pages + 50))
        count = data.draw(st.integers(1, 300))
        return P(start, count)

    @rule(data=st.data(), who=st.integers(0, 2), reclaim=st.booleans())
    def inflate(self, data, who, reclaim):
        record = self.records[who]
        pages = self._pages(data)
        before = (record.ballooned, record.freed)
        refusal = self.ledger.check_inflate(record, pages)
        if refusal:
            assert (record.ballooned, record.freed) == before
            return
        self.ledger.inflate(record, pages, pages if reclaim else RangeSet.empty(), 1.0)

    @rule(data=st.data(), who=st.integers(0, 2))
    def deflate(self, data, who):
        record = self.records[who]
        pages = self._pages(data)
        if record.ballooned and data.draw(st.booleans()):
            pages = record.ballooned.take(data.draw(st.integers(1, record.ballooned.num_pages)))[0]
        if self.ledger.check_deflate(record, pages) is None:
            self.ledger.deflate(record, pages, 1.0)

    @rule(data=st.data(), who=st.integers(0, 2))
    def resync(self, data, who):
        record = self.records[who]
        pages = self._pages(data)
        if self.ledger.check_resync(record, pages) is None:
            self.ledger.resync(record, pages, pages - record.ballooned, 1.0)

    @invariant()
    def holds(self):
        if hasattr(self, "ledger"):
            self.ledger.check()


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
