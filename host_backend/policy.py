"""Redistribution policy: every guest's state and the host's capacity in, new targets out.

Theory of operation
-------------------
All sizes are 4 KiB pages.  A guest's *keep* is the memory it keeps (RAM − balloon); a
target is a keep, as QMP's ``balloon`` value is (the virtio num_pages is RAM − keep).
``compute_targets`` is pure — no I/O, clock, randomness or trio — and the host service
calls it every interval and on events, then sends each guest its ``Target.keep_pages``.

Capacity.  The host keeps ``capacity = free pool + Σ (RAM − host-freed)``.  A guest whose
balloon really frees host memory (``reclaims``) costs what it keeps, or the target it was
last granted if that is more, plus the pages of its balloon the host did not verifiably
free (``unfreed_pages``: capacity nobody can be given); an accounting-only guest costs
its whole RAM whatever its balloon, so it never makes room for anyone.

Goals.  A disconnected guest, or one with no statistics yet, stays where it is; a manual
target, clamped to [floor, RAM], is its guest's goal.  What capacity those leave is handed
to the other reclaiming guests in tiers.  Each tier is served in full before the next; a
tier that does not fit is split by shares (water-filling: the guest holding the fewest
pages per share is served first):

  1. every floor;
  2. what guests under pressure keep now — so no pressured guest is inflated while an
     idle guest has memory above its floor;
  3. one more step for each guest under pressure;
  4. what idle guests keep of their working set (used + headroom);
  5. the rest of their working sets;
  6. spare, by shares with ESX's idle-memory tax: a page beyond the working set costs
     1 / (1 − tax) pages of a guest's shares, so spare goes first to guests whose working
     sets are small for their shares, and idle memory is the first taken back.
An accounting-only guest frees nothing for others: it is held at its working set and
grown by a step while under pressure.

Steps.  A target moves at most ``step_pages`` from the current keep, and not at all by
less than ``threshold_pages`` unless it lands exactly on the floor, the RAM or a manual
target.  Growth is paid only from capacity free now — pressured guests first, then manual
targets, then the rest, by shares — so a target never promises memory the host has not
got back.  While the host is over capacity a small shrink is rounded up to the threshold,
and a pressured guest gives memory only in a round where every idle guest reaches its
floor; so if what the policy cannot move fits, compliant guests fit the capacity within
⌈deficit / step⌉ rounds.  A guest found below its floor (the floor was raised) is sent
straight back to it: the floor is a guarantee, the step only a pace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from protocol.errors import PolicyError
from protocol.units import PAGE_SIZE

__all__ = [
    "DEFAULT_PARAMS",
    "GuestState",
    "PolicyParams",
    "Target",
    "compute_targets",
    "pressure_reason",
]

_MIB = (1 << 20) // PAGE_SIZE  # pages in a MiB


@dataclass(frozen=True)
class GuestState:
    """One guest as the ledger sees it this round.

    name: the guest's configured name (unique)
    ram_pages: its RAM, the most it can keep (the ceiling)
    min_pages: its guaranteed floor; no target is ever below it
    shares: relative weight when memory is scarce (≥ 1)
    keep_pages: what it keeps now: RAM − its acknowledged balloon
    target_keep_pages: the target last sent, None before the first
    used_pages: memory its workload uses, the balloon not counted; None until its first
        statistics
    available_pages: its MemAvailable-like figure, None if not reported
    total_pages: its own MemTotal, for display only
    psi_some_avg10: memory PSI "some" avg10 in percent, None if not reported
    swapping: swap-in/out or major faults rose since the previous sample
    cannot_inflate: the guest said its balloon hit its free-memory floor
    manual_keep_pages: an operator's target, None when automatic
    connected: an agent is connected; if not, the policy cannot move it
    reclaims: inflating it really frees host memory (False: accounting only)
    unfreed_pages: pages of its balloon the host has not verifiably freed (a punch left
        data, or a page refilled); a reclaiming guest still costs the host those

    Raises PolicyError, naming the guest and the field, for a state that cannot hold.
    """

    name: str
    ram_pages: int
    min_pages: int
    shares: int
    keep_pages: int
    target_keep_pages: int | None = None
    used_pages: int | None = None
    available_pages: int | None = None
    total_pages: int | None = None
    psi_some_avg10: float | None = None
    swapping: bool = False
    cannot_inflate: bool = False
    manual_keep_pages: int | None = None
    connected: bool = True
    reclaims: bool = True
    unfreed_pages: int = 0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> PolicyError:
            return PolicyError(f"guest {self.name!r}: {field} = {getattr(self, field)} {why}")

        if not isinstance(self.name, str) or not self.name:
            raise PolicyError(f"guest name {self.name!r}: must be a non-empty string")
        for name in _PAGE_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise fail(name, "cannot be negative")
        if self.min_pages > self.ram_pages:
            raise fail("min_pages", f"is above ram_pages = {self.ram_pages}")
        if self.shares < 1:
            raise fail("shares", "must be at least 1")
        for name in ("keep_pages", "target_keep_pages"):
            value = getattr(self, name)
            if value is not None and value > self.ram_pages:
                raise fail(name, f"is above ram_pages = {self.ram_pages}")
        if self.unfreed_pages > self.ram_pages - self.keep_pages:
            balloon = self.ram_pages - self.keep_pages
            raise fail("unfreed_pages", f"is more than its balloon ({balloon})")
        psi = self.psi_some_avg10
        if psi is not None and not 0.0 <= psi <= 100.0:
            raise fail("psi_some_avg10", "is not a percentage")


_PAGE_FIELDS = tuple(f.name for f in fields(GuestState) if f.name.endswith("_pages"))


@dataclass(frozen=True)
class PolicyParams:
    """Tuning, with defaults from oVirt MOM, Proxmox AutoBalloon and VMware ESX.

    Raises PolicyError, naming the field, for values that cannot work together.
    """

    step_pages: int = 100 * _MIB  # most a target moves per round (Proxmox: 100 MiB per VM)
    threshold_pages: int = 10 * _MIB  # smaller changes are not made (MOM: 0.25%; of 4 GiB)
    idle_tax: float = 0.75  # ESX's Mem.IdleTax default
    headroom: float = 0.25  # free memory kept over what is used (MOM keeps 20% free)
    min_headroom_pages: int = 64 * _MIB  # so a nearly idle guest can still allocate
    pressure_psi: float = 10.0  # PSI some avg10 (%) above which a guest is under pressure
    low_available_fraction: float = 0.05  # available below this share of keep (MOM: 5%)

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> PolicyError:
            return PolicyError(f"policy: {field} = {getattr(self, field)} {why}")

        if self.step_pages < 1:
            raise fail("step_pages", "must be at least 1")
        if not 0 <= self.threshold_pages <= self.step_pages:
            raise fail("threshold_pages", f"must be within 0..step_pages ({self.step_pages})")
        if not 0.0 <= self.idle_tax < 1.0:
            raise fail("idle_tax", "must be in [0, 1)")
        if not self.headroom >= 0.0 or self.min_headroom_pages < 0:
            raise fail("headroom", "and min_headroom_pages cannot be negative")
        if not 0.0 <= self.pressure_psi <= 100.0:
            raise fail("pressure_psi", "is not a percentage")
        # A guest held at used + headroom must not look short of memory, or it would be
        # grown and shrunk in turn.
        if not 0.0 <= self.low_available_fraction * (1.0 + self.headroom) <= self.headroom:
            raise fail("low_available_fraction", "must be ≤ headroom / (1 + headroom)")


@dataclass(frozen=True)
class Target:
    """What the policy decided for one guest this round.

    keep_pages: the target to send (what the guest should keep)
    goal_pages: where the policy is heading, possibly several steps away
    reason: why, in a few words, for ``uballoonctl status``
    """

    keep_pages: int
    goal_pages: int
    reason: str


def pressure_reason(guest: GuestState, params: PolicyParams) -> str:
    """Why the guest is under memory pressure, or "" if it is not."""
    if guest.cannot_inflate:
        return "cannot inflate"
    if guest.swapping:
        return "swapping"
    if guest.psi_some_avg10 is not None and guest.psi_some_avg10 > params.pressure_psi:
        return f"psi {guest.psi_some_avg10:.0f}%"
    if (
        guest.available_pages is not None
        and guest.available_pages < params.low_available_fraction * guest.keep_pages
    ):
        return "low available"
    return ""


DEFAULT_PARAMS = PolicyParams()


def compute_targets(
    guests: Iterable[GuestState], capacity_pages: int, params: PolicyParams = DEFAULT_PARAMS
) -> dict[str, Target]:
    """New targets for every guest, keyed by name in name order.

    Raises PolicyError for a negative capacity or two guests with one name (a GuestState
    or PolicyParams that cannot hold raises when it is built).
    """
    p = params
    ordered = sorted(guests, key=lambda g: g.name)
    if capacity_pages < 0:
        raise PolicyError(f"capacity_pages = {capacity_pages} cannot be negative")
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.name == b.name:
            raise PolicyError(f"guest {a.name!r} is listed twice")
    pressure = {g.name: pressure_reason(g, p) for g in ordered}
    # Ballooned pages the host did not get back are capacity nobody can be given.
    unfreed = sum(g.unfreed_pages for g in ordered if g.reclaims)
    goal, why, auto_floor = _goals(ordered, max(0, capacity_pages - unfreed), pressure, p)

    # From goals to this round's targets: bounded steps, growth only from free capacity.
    committed = sum(_cost(g) for g in ordered)
    over = committed > capacity_pages
    budget = capacity_pages - committed
    target = {g.name: g.keep_pages for g in ordered}
    growth: list[tuple[int, GuestState, int, int]] = []  # priority, guest, wanted, reserved
    for g in ordered:
        keep, exact = g.keep_pages, {g.min_pages, g.ram_pages}
        if g.manual_keep_pages is not None:
            exact.add(goal[g.name])
        if keep < g.min_pages:
            target[g.name] = g.min_pages
            budget -= (g.min_pages - keep) if g.reclaims else 0
            why[g.name] = "floor" if g.connected else why[g.name]
            continue
        if not g.connected or goal[g.name] == keep:
            continue
        new = keep + max(-p.step_pages, min(p.step_pages, goal[g.name] - keep))
        small = abs(new - keep) < p.threshold_pages and new not in exact
        if new < keep and small and over and g.name in auto_floor:
            new, small = max(g.min_pages, keep - p.threshold_pages), False  # close any deficit
        if small:
            quiet = g.name in auto_floor and not pressure[g.name]
            why[g.name] = "steady" if quiet else why[g.name]
        elif new < keep or not g.reclaims:
            target[g.name] = new
        else:
            priority = 1 if g.manual_keep_pages is not None else 0 if pressure[g.name] else 2
            # growth granted before and not taken yet is already in ``committed``
            granted = 0 if over else max(0, (g.target_keep_pages or 0) - keep)
            growth.append((priority, g, new - keep, min(new - keep, granted)))

    # A pressured guest gives memory only in a round that takes every idle guest to its floor.
    if any(target[name] > floor for name, floor in auto_floor.items() if not pressure[name]):
        for g in ordered:
            if g.name in auto_floor and pressure[g.name]:
                target[g.name] = max(target[g.name], g.keep_pages)

    for priority in (0, 1, 2):
        tier = [(g, want, reserved) for prio, g, want, reserved in growth if prio == priority]
        wants = [want - reserved for _, want, reserved in tier]
        grants = _fill(max(budget, 0), [0] * len(tier), wants, [g.shares for g, _, _ in tier])
        for (g, want, reserved), grant in zip(tier, grants.tolist(), strict=True):
            more = reserved + grant
            if more < min(want, p.threshold_pages) and g.keep_pages + more != g.ram_pages:
                more = 0
            if more < want:
                why[g.name] += ", waiting for capacity"
            target[g.name] = g.keep_pages + more
            budget -= max(0, more - reserved)

    return {g.name: Target(target[g.name], goal[g.name], why[g.name]) for g in ordered}


def _goals(
    ordered: Sequence[GuestState], capacity: int, pressure: dict[str, str], p: PolicyParams
) -> tuple[dict[str, int], dict[str, str], dict[str, int]]:
    """Where each guest should end up, why, and the floors of the guests in the tiers."""
    goal: dict[str, int] = {}
    why: dict[str, str] = {}
    shared: list[GuestState] = []  # reclaiming guests the policy moves by itself
    planned = 0  # capacity held by everyone else
    for g in ordered:
        here = _clamp(g.keep_pages, g)
        if not g.connected:
            goal[g.name], why[g.name] = here, "disconnected"
        elif g.manual_keep_pages is not None:
            goal[g.name], why[g.name] = _clamp(g.manual_keep_pages, g), "manual"
        elif g.used_pages is None:
            goal[g.name], why[g.name] = here, "no statistics"
        elif not g.reclaims:
            if pressure[g.name]:
                goal[g.name] = min(g.ram_pages, here + p.step_pages)
                why[g.name] = f"accounting only, pressure: {pressure[g.name]}"
            else:
                goal[g.name] = _working_set(g, p)
                why[g.name] = "accounting only, idle tax"
        else:
            shared.append(g)
            continue
        planned += max(here, goal[g.name]) if g.reclaims else g.ram_pages
    for g, pages, reason in _share(shared, capacity - planned, pressure, p):
        goal[g.name], why[g.name] = pages, reason
    return goal, why, {g.name: g.min_pages for g in shared}


def _share(
    guests: Sequence[GuestState], pool: int, pressure: dict[str, str], p: PolicyParams
) -> list[tuple[GuestState, int, str]]:
    """Goals for the reclaiming guests the policy moves itself: ``pool`` pages in tiers."""
    if not guests:
        return []
    floor = np.array([g.min_pages for g in guests], dtype=np.int64)
    ram = np.array([g.ram_pages for g in guests], dtype=np.int64)
    keep = np.maximum(floor, [g.keep_pages for g in guests])
    shares = [g.shares for g in guests]
    hot = np.array([bool(pressure[g.name]) for g in guests])
    working = np.array([_working_set(g, p) for g in guests], dtype=np.int64)

    if pool < floor.sum():
        return [(g, int(f), "over capacity") for g, f in zip(guests, floor, strict=True)]
    held = floor
    for claim in (
        np.where(hot, keep, floor),  # 2. pressured guests keep what they have
        np.where(hot, np.minimum(ram, keep + p.step_pages), floor),  # 3. and grow a step
        np.where(hot, 0, np.minimum(keep, working)),  # 4. idle working sets, as held
        np.where(hot, 0, working),  # 5. idle working sets, in full
    ):
        held = _fill(pool, held, np.maximum(held, claim), shares)
    held = _fill(pool, held, np.where(hot, held, ram), shares, knee=working, tax=p.idle_tax)

    out = []
    for g, pages, is_hot in zip(guests, held.tolist(), hot.tolist(), strict=True):
        if is_hot:
            reason = f"pressure: {pressure[g.name]}"
            if pages < min(g.ram_pages, g.keep_pages + p.step_pages):
                reason += ", over capacity" if pages < g.keep_pages else ", no room"
        elif pages != g.keep_pages:
            reason = "idle tax" if pages < g.keep_pages else "shares"
        else:
            reason = "steady"
        out.append((g, pages, reason))
    return out


def _fill(
    pool: int,
    lo: Sequence[int] | np.ndarray,
    hi: Sequence[int] | np.ndarray,
    weight: Sequence[int],
    knee: np.ndarray | None = None,
    tax: float = 0.0,
) -> np.ndarray:
    """Water-fill ``pool`` pages: each claimant gets lo ≤ a ≤ hi with Σ a = pool (lo if the
    pool is smaller than Σ lo, hi if larger than Σ hi).  At a shared level λ each holds
    a = clamp(c⁻¹(weight · λ), lo, hi), where c(a), the cost of holding a pages, is one per
    page up to ``knee`` and 1 / (1 − tax) per page above it."""
    low = np.asarray(lo, dtype=np.int64)
    high = np.asarray(hi, dtype=np.int64)
    if pool <= low.sum():
        return low
    if pool >= high.sum():
        return high
    w = np.asarray(weight, dtype=np.float64)
    bend = high.astype(np.float64) if knee is None else np.asarray(knee, dtype=np.float64)
    slope = 1.0 - tax

    def holding(level: float) -> np.ndarray:
        x = w * level
        return np.clip(np.where(x <= bend, x, bend + (x - bend) * slope), low, high)

    cost_of_high = np.where(high <= bend, high, bend + (high - bend) / slope)
    level_lo, level_hi = 0.0, 2.0 * float((cost_of_high / w).max()) + 1.0
    # Bisect down to adjacent floats, keeping Σ⌊a(level_lo)⌋ ≤ pool < Σ⌊a(level_hi)⌋.
    for _ in range(100):
        mid = (level_lo + level_hi) / 2
        if np.floor(holding(mid)).sum() <= pool:
            level_lo = mid
        else:
            level_hi = mid
    exact = holding(level_lo)
    given = np.floor(exact).astype(np.int64)
    # Fewer pages are left than claimants still short: one each, nearest to a page first.
    short = int(pool - given.sum())
    room = np.flatnonzero(given < high)
    order = room[np.argsort(given[room] - exact[room], kind="stable")]
    assert 0 <= short <= len(order), "water-filling lost pages"
    given[order[:short]] += 1
    return given


def _working_set(g: GuestState, p: PolicyParams) -> int:
    """Used memory plus headroom, within [floor, RAM]."""
    used = g.used_pages or 0
    return _clamp(used + max(math.ceil(p.headroom * used), p.min_headroom_pages), g)


def _clamp(pages: int, g: GuestState) -> int:
    return max(g.min_pages, min(g.ram_pages, pages))


def _cost(g: GuestState) -> int:
    """Capacity the guest holds now, counting a larger target already granted to it and
    the pages of its balloon the host did not get back."""
    if not g.reclaims:
        return g.ram_pages
    granted = g.target_keep_pages if g.connected and g.target_keep_pages is not None else 0
    return max(g.keep_pages, granted) + g.unfreed_pages
