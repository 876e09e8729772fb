"""The guard: keeps the balloon from starving its own guest.  Pure: no I/O, no clock.

Theory of operation
-------------------
The host decides how big the balloon should be; the guard decides how much of
that the guest can afford *now*.  It owns two rules and the state bits that
report them (``BalloonState``):

* **The floor** (``--min-free``).  A chunk is pinned only if available memory
  after it -- the last snapshot, minus what was pinned since that snapshot, minus
  the chunk -- stays at or above the floor.  A refusal sets FLOOR_REACHED; the
  agent pushes STATS at once so the host learns why the balloon stops short.

* **Pressure** (DEFLATE_ON_OOM).  Pressure is a PSI trigger firing (the kernel
  saw tasks stall on memory for 150 ms in a second), or available memory under
  the floor (the watermark).  While it lasts, ``shed_bytes`` asks the agent to
  give back one bounded step (``--oom-step``, at least one chunk) every
  ``step_interval_s``.  Without DEFLATE_ON_OOM the guard never deflates on its
  own; it still refuses to inflate under pressure.

Hysteresis, so the balloon does not flap: after pressure, nothing is pinned again
until pressure has stayed low (no trigger, PSI ``some avg10`` under
``calm_psi``, available above the floor) for ``holdoff_s``, *and* available
memory is comfortably above the floor (``min_free + comfort``).  PRESSURE_DEFLATING
is reported from the first step given back until that hold-off ends.

Every method takes ``now`` (monotonic seconds) from the caller; the guard keeps no
clock of its own, so tests drive it with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from guest_agent.stats import MemorySnapshot
from protocol.constants import BalloonState

__all__ = ["GuardConfig", "Guard"]


@dataclass(frozen=True)
class GuardConfig:
    min_free_bytes: int
    """The floor: available memory the guest always keeps."""
    step_bytes: int
    """Most memory given back per pressure step (at least one chunk is given)."""
    deflate_on_pressure: bool = True
    """DEFLATE_ON_OOM wanted: give memory back on pressure without the host."""
    holdoff_s: float = 30.0
    """Pressure must stay low this long before the balloon grows again."""
    step_interval_s: float = 1.0
    """Shortest time between two pressure steps."""
    comfort_bytes: int | None = None
    """Margin above the floor needed to grow again after pressure (default: half
    the floor, at least one step)."""
    calm_psi: float = 1.0
    """PSI ``some avg10`` (percent) under which memory pressure counts as low."""

    @property
    def comfort(self) -> int:
        if self.comfort_bytes is not None:
            return self.comfort_bytes
        return max(self.min_free_bytes // 2, self.step_bytes)


class Guard:
    """The floor and the pressure response; see the module docstring."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.snapshot: MemorySnapshot | None = None
        self._pinned_since_snapshot = 0
        self._floor_reached = False
        self._last_pressure: float | None = None  # start of the current hold-off
        self._last_trigger: float | None = None
        self._last_step: float | None = None
        self._shed_in_episode = False

    # -- inputs ------------------------------------------------------------------------

    def observe(self, snapshot: MemorySnapshot, now: float) -> None:
        """A fresh snapshot (the agent polls every ``--guard-interval``)."""
        self.snapshot = snapshot
        self._pinned_since_snapshot = 0
        if self._under_watermark():
            self._pressure_seen(now)
        elif self._last_pressure is not None and snapshot.pressure is not None:
            if snapshot.pressure.some_avg10 >= self.config.calm_psi:
                self._pressure_seen(now)  # still stalling: the hold-off starts over

    @property
    def wants_pressure(self) -> bool:
        """Whether the next snapshot should carry PSI (only a pressure episode reads it)."""
        return self._last_pressure is not None

    def pressure_event(self, now: float) -> None:
        """The PSI trigger fired."""
        self._last_trigger = now
        self._pressure_seen(now)

    def note_pinned(self, size_bytes: int) -> None:
        """A chunk was pinned since the last snapshot (it is not in it yet)."""
        self._pinned_since_snapshot += size_bytes

    def note_released(self, size_bytes: int) -> None:
        """A chunk went back to the guest since the last snapshot."""
        self._pinned_since_snapshot -= size_bytes

    def note_shed(self, now: float) -> None:
        """The agent gave memory back for a pressure step."""
        self._last_step = now
        self._shed_in_episode = True

    def at_target(self) -> None:
        """The balloon has what the host asked for: nothing is refused any more."""
        self._floor_reached = False

    # -- decisions ---------------------------------------------------------------------

    def available_bytes(self) -> int | None:
        """Available memory now, as far as the guard knows."""
        if self.snapshot is None:
            return None
        return self.snapshot.available_bytes - self._pinned_since_snapshot

    def under_pressure(self, now: float) -> bool:
        """Pressure now: a recent trigger, or available memory under the floor."""
        recent = (
            self._last_trigger is not None
            and now - self._last_trigger < max(self.config.step_interval_s, 1.0)
        )
        return recent or self._under_watermark()

    def may_pin(self, size_bytes: int, now: float) -> bool:
        """Whether a chunk of ``size_bytes`` may be pinned now.  A refusal because of
        the floor sets FLOOR_REACHED."""
        available = self.available_bytes()
        if available is None:
            return False  # no snapshot yet: do not take memory blind
        cfg = self.config
        if self._last_pressure is not None:
            if now - self._last_pressure < cfg.holdoff_s or self.under_pressure(now):
                return False
            if available - size_bytes < cfg.min_free_bytes + cfg.comfort:
                self._floor_reached = True
                return False
            self._end_episode()
        if available - size_bytes < cfg.min_free_bytes:
            self._floor_reached = True
            return False
        return True

    def shed_bytes(self, now: float, *, allowed: bool) -> int:
        """How much to give back now for pressure (0: nothing).  ``allowed`` is
        whether deflating on pressure is permitted (DEFLATE_ON_OOM negotiated, or
        wanted while the host is away)."""
        if not (allowed and self.config.deflate_on_pressure) or not self.under_pressure(now):
            return 0
        if self._last_step is not None and now - self._last_step < self.config.step_interval_s:
            return 0
        return self.config.step_bytes

    def state(self, now: float) -> BalloonState:
        bits = BalloonState(0)
        if self._floor_reached:
            bits |= BalloonState.FLOOR_REACHED
        if self._shed_in_episode and self._last_pressure is not None:
            if now - self._last_pressure < self.config.holdoff_s or self.under_pressure(now):
                bits |= BalloonState.PRESSURE_DEFLATING
        return bits

    # -- internals ---------------------------------------------------------------------

    def _under_watermark(self) -> bool:
        available = self.available_bytes()
        return available is not None and available < self.config.min_free_bytes

    def _pressure_seen(self, now: float) -> None:
        self._last_pressure = now

    def _end_episode(self) -> None:
        self._last_pressure = None
        self._shed_in_episode = False
