"""What the control plane (QMP sockets, the control socket and ``uballoonctl``, metrics)
sees of the host, and the one way it acts on it.

The host core implements ``HostControl``; the control plane depends on nothing else,
so QMP, the control socket and the metrics endpoint are tested against a small fake.
All sizes are bytes at this boundary (QMP's unit); the core keeps 4 KiB pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GuestStatus:
    """One guest, as an operator sees it."""

    name: str
    ram_bytes: int
    """The guest's RAM (its ceiling, ``max``)."""
    min_bytes: int
    """Guaranteed floor: the memory the guest always keeps."""
    shares: int
    target_bytes: int
    """Memory the guest should keep (QMP's ``balloon`` value): RAM minus the target balloon."""
    actual_bytes: int
    """Memory the guest keeps now (QMP ``query-balloon``'s ``actual``): RAM minus its balloon."""
    ballooned_bytes: int
    """What the agent holds in its balloon (acknowledged pages)."""
    freed_bytes: int
    """What the host verifiably got back (holes in the RAM file); 0 when accounting only."""
    available_bytes: int | None
    """The guest's available memory from its last statistics, if any."""
    pressure: float | None
    """PSI memory ``some avg10`` percent from its last statistics, if any."""
    connected: bool
    reclaim: str
    """"punch" (file-backed RAM the host frees) or "accounting" (nothing freed on the host)."""
    manual: bool
    """True while an operator's target holds (until ``set GUEST auto``)."""
    reason: str = ""
    """Why the target is what it is (the policy's word), for ``status``."""
    authenticated: bool = False
    stable: bool = False
    """True when the guest negotiated STABLE_PFNS (its frames are long-term pinned)."""
    floor_reached: bool = False
    """The guest says it cannot inflate further without going under its --min-free."""


@dataclass(frozen=True)
class GuestStats:
    """The latest statistics of one guest."""

    values: Mapping[int, int]
    """Raw (tag, value) as the guest sent them (``protocol.constants.StatTag``)."""
    last_update: float
    """Wall-clock time (``time.time()``) of the update."""
    polling_interval_s: int
    """How often the host asks for statistics (QMP ``guest-stats-polling-interval``); 0 = off."""


@dataclass(frozen=True)
class PoolStatus:
    """Where the host's capacity went: capacity = free + Σ (RAM − freed)."""

    capacity_bytes: int
    free_bytes: int
    """May be negative when guests are promised more than the host has."""
    committed_bytes: Mapping[str, int] = field(default_factory=dict)
    """Per guest: RAM − host-freed, what it may use on the host."""
    freed_bytes: int = 0
    ballooned_bytes: int = 0


class HostControl(Protocol):
    """Implemented by the host core; used by the control plane.  Methods that act raise
    ``protocol.errors.PolicyError`` with a one-line message an operator can read."""

    def guests(self) -> list[GuestStatus]:
        """Every known guest, sorted by name."""
        ...

    def guest(self, name: str) -> GuestStatus:
        """One guest.  Raises PolicyError("unknown guest NAME") if there is none."""
        ...

    def set_target(self, name: str, keep_bytes: int | None, *, clamp: bool) -> int:
        """Set (or with None clear, back to the policy) the memory ``name`` keeps.

        With ``clamp`` (QMP's ``balloon``), a value above RAM is clamped to RAM and one
        below the floor to the floor; without it (``uballoonctl``) either raises
        PolicyError.  Returns the target that now applies, in bytes.  A target set
        while the guest is away is applied when it returns.
        """
        ...

    def stats(self, name: str) -> GuestStats | None:
        """The guest's latest statistics, or None if it has sent none yet."""
        ...

    def set_stats_interval(self, name: str, seconds: int) -> None:
        """How often to ask ``name`` for statistics (0 turns polling off)."""
        ...

    def release(self, name: str) -> None:
        """Forget a disconnected guest's balloon for good (its VM is gone) and return
        its capacity to the pool.  Raises PolicyError if the guest is connected."""
        ...

    def pool(self) -> PoolStatus:
        ...

    def changes(self) -> int:
        """A counter bumped whenever any figure above changes (for watchers: poll it,
        or await ``wait_change``)."""
        ...

    async def wait_change(self, seen: int) -> int:
        """Wait until ``changes()`` differs from ``seen``; returns the new counter."""
        ...
