"""The guard: the floor, pressure steps, hysteresis -- pure, with numbers for time --
and the wait on its PSI trigger.

The test that the guard works for real (a memory hog in a memory-limited cgroup
beside an inflated balloon, no OOM kill) is in test_agent_process.py, where a real
agent process runs.  What is *not* tested for real: a PSI trigger firing (this
machine's tests cannot make the kernel stall on memory on demand); the wait is
tested with another POLLPRI source (TCP urgent data), and arming the trigger is
checked in the process tests.
"""

from __future__ import annotations

import socket
from dataclasses import replace

import trio

from guest_agent.guard import Guard, GuardConfig
from guest_agent.service import PriorityWaiter
from guest_agent.stats import MemorySnapshot, Pressure
from protocol.constants import BalloonState

MiB = 1 << 20
CONFIG = GuardConfig(min_free_bytes=100 * MiB, step_bytes=64 * MiB, holdoff_s=30,
                     step_interval_s=1.0)


def snap(available_mib: float, psi: float = 0.0) -> MemorySnapshot:
    return MemorySnapshot(total_bytes=1 << 30, available_bytes=int(available_mib * MiB),
                          free_bytes=0, caches_bytes=0, pressure=Pressure(some_avg10=psi))


def test_no_pin_without_a_snapshot() -> None:
    assert not Guard(CONFIG).may_pin(MiB, 0.0)


def test_the_floor_counts_what_was_pinned_since_the_snapshot() -> None:
    guard = Guard(CONFIG)
    guard.observe(snap(250), 0.0)
    assert guard.may_pin(64 * MiB, 0.0)
    guard.note_pinned(64 * MiB)
    assert guard.may_pin(64 * MiB, 0.0)  # 250 - 64 - 64 = 122 >= 100
    guard.note_pinned(64 * MiB)
    assert not guard.may_pin(64 * MiB, 0.0)  # 250 - 128 - 64 = 58 < 100
    guard.observe(snap(250), 1.0)  # a new snapshot already shows those pins
    assert guard.may_pin(64 * MiB, 1.0)


def test_the_floor_refuses_exactly_at_the_line() -> None:
    guard = Guard(CONFIG)
    guard.observe(snap(164), 0.0)
    assert guard.may_pin(64 * MiB, 0.0)  # leaves exactly the floor
    assert not guard.may_pin(64 * MiB + 4096, 0.0)
    assert guard.state(0.0) & BalloonState.FLOOR_REACHED
    guard.at_target()
    assert not guard.state(0.0) & BalloonState.FLOOR_REACHED


def test_under_the_watermark_it_sheds_one_step_per_interval() -> None:
    guard = Guard(CONFIG)
    guard.observe(snap(50), 10.0)
    assert guard.under_pressure(10.0)
    assert guard.shed_bytes(10.0, allowed=True) == 64 * MiB
    guard.note_shed(10.0)
    assert guard.state(10.0) & BalloonState.PRESSURE_DEFLATING
    assert guard.shed_bytes(10.5, allowed=True) == 0  # too soon
    assert guard.shed_bytes(11.0, allowed=True) == 64 * MiB
    assert guard.shed_bytes(11.0, allowed=False) == 0  # DEFLATE_ON_OOM not negotiated


def test_a_psi_trigger_is_pressure_for_a_moment() -> None:
    guard = Guard(CONFIG)
    guard.observe(snap(900), 0.0)
    assert not guard.under_pressure(0.0)
    guard.pressure_event(5.0)
    assert guard.under_pressure(5.5)
    assert guard.shed_bytes(5.5, allowed=True) == 64 * MiB
    assert not guard.under_pressure(6.5)


def test_hysteresis_waits_for_calm_and_comfort() -> None:
    guard = Guard(CONFIG)  # comfort: max(50M, 64M) = 64M above the floor
    guard.observe(snap(50), 0.0)
    guard.note_shed(0.0)
    guard.observe(snap(900, psi=5.0), 10.0)  # plenty again, but still stalling
    assert not guard.may_pin(MiB, 20.0)
    assert not guard.may_pin(MiB, 39.0)  # the stall at 10 s restarted the hold-off
    assert guard.state(39.0) & BalloonState.PRESSURE_DEFLATING
    guard.observe(snap(900, psi=0.2), 41.0)
    assert guard.may_pin(MiB, 41.0)  # 31 s after the last sign of pressure
    assert not guard.state(41.0) & BalloonState.PRESSURE_DEFLATING


def test_after_pressure_it_grows_only_comfortably_above_the_floor() -> None:
    guard = Guard(CONFIG)
    guard.observe(snap(50), 0.0)
    guard.observe(snap(200), 40.0)
    assert not guard.may_pin(64 * MiB, 40.0)  # 200 - 64 = 136 < 100 + 64
    assert guard.state(40.0) & BalloonState.FLOOR_REACHED
    guard.observe(snap(240), 41.0)
    assert guard.may_pin(64 * MiB, 41.0)  # 176 >= 164: the episode is over
    guard.observe(snap(170), 42.0)
    assert guard.may_pin(64 * MiB, 42.0)  # from now on only the floor counts


def test_deflate_on_pressure_can_be_switched_off() -> None:
    guard = Guard(replace(CONFIG, deflate_on_pressure=False))
    guard.observe(snap(10), 0.0)
    assert guard.shed_bytes(0.0, allowed=True) == 0
    assert not guard.may_pin(MiB, 0.0)  # but it still does not inflate under pressure


async def test_the_trigger_wait_wakes_on_pollpri_only() -> None:
    """PriorityWaiter on a TCP socket: urgent (out-of-band) data is POLLPRI, as a fired
    PSI trigger is; ordinary data (POLLIN) must not wake it."""
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    with listener, sender, receiver, PriorityWaiter(receiver.fileno()) as waiter:
        woke = trio.Event()

        async def wait() -> None:
            await waiter.wait()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            sender.send(b"ordinary")
            with trio.move_on_after(0.3):
                await woke.wait()
            assert not woke.is_set()
            sender.send(b"!", socket.MSG_OOB)
            with trio.fail_after(10):
                await woke.wait()
