"""The ledger: what every guest has given back, page by page.  Pure: no I/O, no trio.

Theory of operation
-------------------
Per guest the ledger keeps two page sets, never confused:

* ``ballooned`` — the pages the guest's agent holds, as acknowledged by the host
  (INFLATE adds, DEFLATE removes, RESYNC replaces);
* ``freed`` — the subset whose backing the host verifiably released (holes in the
  guest's RAM file).  Only freed memory is capacity the policy may hand out.

Every report is checked before anything changes: the pages must lie inside the guest's
*configured* RAM map (HELLO's layout is never trusted for that), an INFLATE must not
name a page already ballooned, a DEFLATE only pages that are.  A refused report
returns a ``Refusal`` (the NAK's reason and message) and leaves the ledger unchanged.

The invariant, checked by ``check()`` and in tests at every step::

    capacity = free pool + Σ over present guests (RAM − freed)

A guest is *present* from its first HELLO until an operator releases it; a guest that
disconnects keeps its balloon (its pages outlive its agent) and stays present.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from host_backend.config import GuestConfig
from host_backend.ramfile import RamMap
from protocol.constants import BalloonState, Feature, StatTag
from protocol.errors import NakReason, PolicyError
from protocol.events import Config
from protocol.ranges import RangeSet
from protocol.units import PAGE_SIZE, format_size

HISTORY = 64


@dataclass(frozen=True)
class Refusal:
    """Why a report was refused: what goes in the NAK."""

    reason: NakReason
    message: str
    pfn: int | None = None


@dataclass
class GuestRecord:
    """Everything the host knows about one guest."""

    name: str
    config: GuestConfig | None
    """None for an unnamed guest served for accounting only."""
    ram_pages: int
    min_pages: int = 0
    shares: int = 1000
    ram_map: RamMap | None = None
    present: bool = False
    connected: bool = False
    disconnected_at: float | None = None
    total_pages: int = 0
    """The guest's own MemTotal (HELLO); a target never exceeds it."""
    ram_layout: RangeSet = field(default_factory=RangeSet.empty)
    """HELLO's layout: shown to operators, never used to validate."""
    features: int = 0
    authenticated: bool = False
    ballooned: RangeSet = field(default_factory=RangeSet.empty)
    freed: RangeSet = field(default_factory=RangeSet.empty)
    actual: int = 0
    """The guest's last ACTUAL (pages)."""
    target_keep_pages: int | None = None
    """The keep last sent (RAM − num_pages), None before the first target."""
    manual_keep_pages: int | None = None
    reason: str = ""
    stats: dict[int, int] = field(default_factory=dict)
    previous_stats: dict[int, int] = field(default_factory=dict)
    stats_time: float | None = None
    stats_interval_s: int = 0
    history: deque[tuple[float, int, int, int]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    """(time, keep target, ballooned pages, freed pages) after each change."""
    refusals: int = 0
    """Consecutive refused reports (reset by an accepted one)."""
    map_trusted: bool = True
    """False when the guest's own RAM layout disagrees with the configured map: a map
    that may be wrong must not steer a punch."""

    @property
    def stable(self) -> bool:
        return bool(self.features & Feature.STABLE_PFNS)

    @property
    def reclaims(self) -> bool:
        """True when this guest's balloon really frees host memory: its RAM is a file
        the host can reach, and the session is authenticated with stable frames."""
        return (
            self.ram_map is not None and self.map_trusted and self.authenticated and self.stable
        )

    @property
    def reclaim_mode(self) -> str:
        return "punch" if self.reclaims else "accounting"

    @property
    def keep_pages(self) -> int:
        """What the guest keeps now, by the ledger: RAM − acknowledged balloon."""
        return max(0, self.ram_pages - self.ballooned.num_pages)

    @property
    def committed_pages(self) -> int:
        """What the guest may use on the host: RAM − freed (0 when not present)."""
        return self.ram_pages - self.freed.num_pages if self.present else 0

    @property
    def unfreed_pages(self) -> int:
        """Pages of a reclaiming guest's balloon the host did not verifiably free (a
        punch left data, or a page refilled): capacity nobody can be given.  0 for an
        accounting-only guest, which costs its whole RAM anyway."""
        return self.ballooned.num_pages - self.freed.num_pages if self.reclaims else 0

    def num_pages_for(self, keep_pages: int) -> int:
        """The virtio target (balloon size) that leaves the guest ``keep_pages``."""
        limit = self.total_pages or self.ram_pages
        return max(0, min(limit, self.ram_pages - keep_pages))

    def config_for(self, keep_pages: int) -> Config:
        """The virtio config that asks the guest to keep ``keep_pages``."""
        return Config(self.num_pages_for(keep_pages), min(self.actual, 0xFFFF_FFFF))

    @property
    def floor_reached(self) -> bool:
        return bool(self.stats.get(StatTag.BALLOON_STATE, 0) & BalloonState.FLOOR_REACHED)


class Ledger:
    """Every guest's record and the host's capacity, in 4 KiB pages."""

    def __init__(self, capacity_pages: int) -> None:
        self.capacity_pages = capacity_pages
        self.records: dict[str, GuestRecord] = {}

    # -- guests ------------------------------------------------------------------------

    def configure(self, config: GuestConfig) -> GuestRecord:
        """Create or update the record of a configured guest (not yet present)."""
        record = self.records.get(config.name)
        ram_map = RamMap(config.ram) if config.ram else None
        ram_pages = config.max_bytes // PAGE_SIZE
        if record is None:
            record = GuestRecord(config.name, config, ram_pages)
            self.records[config.name] = record
        record.config = config
        record.ram_pages = ram_pages
        record.min_pages = config.min_bytes // PAGE_SIZE
        record.shares = config.shares
        if not record.connected:
            record.ram_map = ram_map  # a connected guest's map changes on its next session
        return record

    def admit(
        self,
        name: str,
        config: GuestConfig | None,
        *,
        total_pages: int,
        ram_layout: RangeSet,
        features: int,
        authenticated: bool,
        now: float,
    ) -> GuestRecord:
        """Record a new session of ``name`` (after its handshake).

        Raises PolicyError if HELLO claims more RAM than the configuration allows.
        """
        if config is not None:
            if total_pages * PAGE_SIZE > config.max_bytes:
                raise PolicyError(
                    f"guest {name} says it has {format_size(total_pages * PAGE_SIZE)} of RAM, "
                    f"more than its configured max of {format_size(config.max_bytes)}"
                )
            record = self.configure(config)
            record.ram_map = RamMap(config.ram) if config.ram else None
        else:
            record = self.records.get(name) or GuestRecord(name, None, total_pages)
            record.ram_pages = max(total_pages, record.ram_pages)
            self.records[name] = record
        record.present = True
        record.connected = True
        record.disconnected_at = None
        record.total_pages = total_pages
        record.ram_layout = ram_layout
        record.features = features
        record.authenticated = authenticated
        record.map_trusted = record.ram_map is None or not ram_layout or (
            ram_layout <= record.ram_map.pages
        )
        record.refusals = 0
        self._remember(record, now)
        return record

    def disconnect(self, record: GuestRecord, now: float) -> None:
        record.connected = False
        record.disconnected_at = now
        self._remember(record, now)

    def release(self, name: str) -> GuestRecord:
        """Forget a disconnected guest's balloon; its capacity returns to the pool.
        Raises PolicyError if unknown or connected."""
        record = self.get(name)
        if record.connected:
            raise PolicyError(f"guest {name} is connected; stop its agent before releasing it")
        record.ballooned = RangeSet.empty()
        record.freed = RangeSet.empty()
        record.actual = 0
        record.present = False
        record.stats = {}
        record.stats_time = None
        if record.config is None:
            del self.records[name]
        return record

    def get(self, name: str) -> GuestRecord:
        try:
            return self.records[name]
        except KeyError:
            raise PolicyError(f"unknown guest {name!r}") from None

    # -- reports -----------------------------------------------------------------------

    def check_inflate(self, record: GuestRecord, pages: RangeSet) -> Refusal | None:
        refusal = self._check_inside(record, pages)
        if refusal:
            return refusal
        overlap = pages & record.ballooned
        if overlap:
            return Refusal(
                NakReason.ALREADY_BALLOONED,
                f"{overlap.num_pages} page(s) are already in the balloon",
                overlap.first,
            )
        if record.ballooned.num_pages + pages.num_pages > record.ram_pages:
            return Refusal(
                NakReason.TOO_MANY_PAGES,
                f"the balloon would hold more pages than the guest has ({record.ram_pages})",
            )
        return None

    def check_deflate(self, record: GuestRecord, pages: RangeSet) -> Refusal | None:
        outside = pages - record.ballooned
        if outside:
            return Refusal(
                NakReason.NOT_IN_BALLOON,
                f"{outside.num_pages} page(s) are not in the balloon",
                outside.first,
            )
        return None

    def check_resync(self, record: GuestRecord, pages: RangeSet) -> Refusal | None:
        refusal = self._check_inside(record, pages)
        if refusal:
            return refusal
        if pages.num_pages > record.ram_pages:
            return Refusal(
                NakReason.TOO_MANY_PAGES,
                f"RESYNC names {pages.num_pages} pages; the guest has {record.ram_pages}",
            )
        return None

    def _check_inside(self, record: GuestRecord, pages: RangeSet) -> Refusal | None:
        if record.ram_map is None:
            return None
        outside = record.ram_map.outside(pages)
        if outside:
            return Refusal(
                NakReason.OUT_OF_RANGE,
                f"PFN {outside.first:#x} is outside guest {record.name}'s RAM map "
                f"({outside.num_pages} page(s) outside)",
                outside.first,
            )
        return None

    def inflate(self, record: GuestRecord, pages: RangeSet, freed: RangeSet, now: float) -> None:
        """Apply an accepted INFLATE; ``freed`` ⊆ ``pages`` is what the host released."""
        assert freed <= pages and pages.isdisjoint(record.ballooned)
        record.ballooned = record.ballooned | pages
        record.freed = record.freed | freed
        record.refusals = 0
        self._remember(record, now)

    def deflate(self, record: GuestRecord, pages: RangeSet, now: float) -> None:
        assert pages <= record.ballooned
        record.ballooned = record.ballooned - pages
        record.freed = record.freed - pages
        record.refusals = 0
        self._remember(record, now)

    def resync(self, record: GuestRecord, pages: RangeSet, new_freed: RangeSet, now: float) -> None:
        """Replace the guest's balloon in one step; pages it no longer names stop
        counting as freed, and ``new_freed`` (punched now) are added."""
        record.ballooned = pages
        record.freed = (record.freed & pages) | (new_freed & pages)
        record.refusals = 0
        self._remember(record, now)

    def audit(self, record: GuestRecord, holes: RangeSet, now: float) -> int:
        """Correct ``freed`` to what is still a hole; returns pages that refilled."""
        still = record.freed & holes
        refilled = record.freed.num_pages - still.num_pages
        if refilled:
            record.freed = still
            self._remember(record, now)
        return refilled

    def refused(self, record: GuestRecord) -> int:
        record.refusals += 1
        return record.refusals

    # -- capacity ----------------------------------------------------------------------

    def free_pages(self) -> int:
        """The free pool: capacity minus what every present guest may use."""
        return self.capacity_pages - sum(r.committed_pages for r in self.records.values())

    def check(self) -> None:
        """Assert the ledger's invariants (used by tests at every step)."""
        committed = 0
        for r in self.records.values():
            assert r.freed <= r.ballooned, f"{r.name}: freed pages outside the balloon"
            assert r.ballooned.num_pages <= r.ram_pages, f"{r.name}: balloon larger than RAM"
            if r.ram_map is not None:
                assert not r.ram_map.outside(r.ballooned), f"{r.name}: pages outside RAM map"
            committed += r.committed_pages
        assert self.capacity_pages == self.free_pages() + committed

    def _remember(self, record: GuestRecord, now: float) -> None:
        record.history.append(
            (now, record.target_keep_pages or 0, record.ballooned.num_pages, record.freed.num_pages)
        )
