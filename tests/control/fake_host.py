"""An in-memory ``HostControl`` for the control-plane tests.

It keeps guests as mutable records, applies ``set_target`` with the rules view.py
states (clamp to [floor, RAM] with ``clamp``, PolicyError without), and bumps a change
counter on every mutation so ``wait_change`` wakes watchers.  Tests move a guest's
``actual`` by hand (``set_actual``) or let it follow its target (``follow=True``).
"""

from __future__ import annotations

import dataclasses
import time

import trio

from host_backend.view import GuestStats, GuestStatus, PoolStatus
from protocol.errors import PolicyError
from protocol.units import format_size

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass
class FakeGuest:
    name: str
    ram_bytes: int
    min_bytes: int = 256 * MIB
    shares: int = 1000
    target_bytes: int | None = None
    actual_bytes: int | None = None
    freed_bytes: int = 0
    available_bytes: int | None = None
    pressure: float | None = None
    connected: bool = True
    reclaim: str = "punch"
    manual: bool = False
    reason: str = ""
    stats: dict[int, int] | None = None
    stats_time: float = 0.0
    interval_s: int = 0

    def __post_init__(self) -> None:
        if self.target_bytes is None:
            self.target_bytes = self.ram_bytes
        if self.actual_bytes is None:
            self.actual_bytes = self.ram_bytes

    def status(self) -> GuestStatus:
        assert self.target_bytes is not None and self.actual_bytes is not None
        return GuestStatus(
            name=self.name,
            ram_bytes=self.ram_bytes,
            min_bytes=self.min_bytes,
            shares=self.shares,
            target_bytes=self.target_bytes,
            actual_bytes=self.actual_bytes,
            ballooned_bytes=self.ram_bytes - self.actual_bytes,
            freed_bytes=self.freed_bytes,
            available_bytes=self.available_bytes,
            pressure=self.pressure,
            connected=self.connected,
            reclaim=self.reclaim,
            manual=self.manual,
            reason=self.reason,
        )


class FakeHost:
    """Implements host_backend.view.HostControl over FakeGuest records."""

    def __init__(self, capacity_bytes: int = 16 * GIB, *, follow: bool = False) -> None:
        self.capacity_bytes = capacity_bytes
        self.follow = follow
        """When true, a new target is reached at once (actual = target)."""
        self._guests: dict[str, FakeGuest] = {}
        self._changes = 0
        self._changed = trio.Event()
        self.calls: list[tuple] = []
        self.reads = 0
        self._read = trio.Event()

    # -- test helpers

    def add(self, name: str, ram_bytes: int, **fields) -> FakeGuest:
        guest = FakeGuest(name, ram_bytes, **fields)
        self._guests[name] = guest
        self.bump()
        return guest

    def remove(self, name: str) -> None:
        del self._guests[name]
        self.bump()

    def record(self, name: str) -> FakeGuest:
        return self._guests[name]

    def set_actual(self, name: str, actual_bytes: int) -> None:
        self._guests[name].actual_bytes = actual_bytes
        self.bump()

    def set_stats(self, name: str, values: dict[int, int], when: float | None = None) -> None:
        guest = self._guests[name]
        guest.stats = dict(values)
        guest.stats_time = time.time() if when is None else when
        self.bump()

    def bump(self) -> None:
        self._changes += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_read(self, seen: int) -> int:
        """Wait until the control plane has read the guests more than ``seen`` times."""
        while self.reads == seen:
            await self._read.wait()
        return self.reads

    def _note_read(self) -> None:
        self.reads += 1
        self._read.set()
        self._read = trio.Event()

    def _get(self, name: str) -> FakeGuest:
        try:
            return self._guests[name]
        except KeyError:
            raise PolicyError(f"unknown guest {name}") from None

    # -- HostControl

    def guests(self) -> list[GuestStatus]:
        self._note_read()
        return [self._guests[n].status() for n in sorted(self._guests)]

    def guest(self, name: str) -> GuestStatus:
        self._note_read()
        return self._get(name).status()

    def set_target(self, name: str, keep_bytes: int | None, *, clamp: bool) -> int:
        self.calls.append(("set_target", name, keep_bytes, clamp))
        guest = self._get(name)
        if keep_bytes is None:
            guest.manual = False
            guest.reason = "policy"
        else:
            if keep_bytes > guest.ram_bytes:
                if not clamp:
                    raise PolicyError(
                        f"{name}: {format_size(keep_bytes)} is more than its RAM "
                        f"({format_size(guest.ram_bytes)}); a target is the memory it keeps"
                    )
                keep_bytes = guest.ram_bytes
            if keep_bytes < guest.min_bytes:
                if not clamp:
                    raise PolicyError(
                        f"{name}: {format_size(keep_bytes)} is below its floor "
                        f"({format_size(guest.min_bytes)})"
                    )
                keep_bytes = guest.min_bytes
            guest.target_bytes = keep_bytes
            guest.manual = True
            guest.reason = "manual"
        if self.follow:
            guest.actual_bytes = guest.target_bytes
        self.bump()
        assert guest.target_bytes is not None
        return guest.target_bytes

    def stats(self, name: str) -> GuestStats | None:
        guest = self._get(name)
        if guest.stats is None:
            return None
        return GuestStats(values=dict(guest.stats), last_update=guest.stats_time,
                          polling_interval_s=guest.interval_s)

    def set_stats_interval(self, name: str, seconds: int) -> None:
        self.calls.append(("set_stats_interval", name, seconds))
        self._get(name).interval_s = seconds
        self.bump()

    def release(self, name: str) -> None:
        guest = self._get(name)
        if guest.connected:
            raise PolicyError(f"{name} is connected; only a disconnected guest can be released")
        del self._guests[name]
        self.bump()

    def pool(self) -> PoolStatus:
        committed = {g.name: g.ram_bytes - g.freed_bytes for g in self._guests.values()}
        return PoolStatus(
            capacity_bytes=self.capacity_bytes,
            free_bytes=self.capacity_bytes - sum(committed.values()),
            committed_bytes=committed,
            freed_bytes=sum(g.freed_bytes for g in self._guests.values()),
            ballooned_bytes=sum(g.ram_bytes - (g.actual_bytes or 0)
                                for g in self._guests.values()),
        )

    def changes(self) -> int:
        return self._changes

    async def wait_change(self, seen: int) -> int:
        while self._changes == seen:
            await self._changed.wait()
        return self._changes
