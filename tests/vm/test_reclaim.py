"""Reclaim, end to end in a real guest: ``uballoon-guest`` inside a 2 GiB VM gives 1 GiB to
``uballoon-host`` outside, which punches it out of the VM's RAM file.

What it shows: the session is authenticated with stable frames (the host punches); the
RAM file's allocated size drops by ≥ 95% of the balloon; QMP's ``query-balloon`` says
so; a buffer the guest checksummed before is unchanged after inflate and deflate; the
guest then uses the memory again without an OOM kill.
"""

from __future__ import annotations

import signal

import pytest

from tests.vm.harness import GuestVM
from tests.vm.helpers import (
    GIB,
    KEEPER_PY,
    MIB,
    TOUCH_PY,
    USE_PY,
    GuestAgent,
    Host,
    Laps,
    fmt,
    guest_meminfo,
    guest_program,
    ram_allocated,
    wait_output,
)

pytestmark = pytest.mark.vm

GUEST = "vm1"
VM = {"memory": "2G"}
HOST = {"stats_interval_s": 1.0}

BALLOON = GIB
KEEPER_BYTES = 64 * MIB
REUSE_BYTES = 1232 * MIB  # ≥ 1.2 GiB


def test_inflate_frees_host_memory_and_keeps_guest_data(vm: GuestVM, host: Host) -> None:
    lap = Laps()
    with GuestAgent(vm, host, GUEST) as agent:
        agent.wait_synced(timeout_s=180)
        lap("agent connected")
        status = host.guest(GUEST)
        assert status["connected"] and status["authenticated"], status
        assert status["stable"] and status["reclaim"] == "punch", status

        # Make the host back the guest's free memory: touch it all, then free it.
        touched = int(vm.python(TOUCH_PY, str(192 * MIB), timeout_s=300).stdout.split()[1])
        assert touched >= GIB + GIB // 2, f"touched only {fmt(touched)}"
        lap(f"touched and freed {fmt(touched)}")

        with guest_program(vm, KEEPER_PY, str(KEEPER_BYTES)) as keeper:
            checksum = wait_output(keeper, r"ready ([0-9a-f]+)\n", timeout_s=120).group(1)
            peak = before = ram_allocated(vm)
            lap("checksummed")

            qmp = host.qmp(GUEST)
            try:
                assert qmp.execute("query-balloon") == {"actual": 2 * GIB}
                qmp.execute("balloon", {"value": 2 * GIB - BALLOON})

                def track(guest: dict) -> None:
                    nonlocal peak
                    peak = max(peak, ram_allocated(vm))

                status = host.wait_guest(
                    GUEST,
                    lambda g: g["ballooned_bytes"] >= BALLOON
                    and g["actual_bytes"] <= 2 * GIB - BALLOON,
                    timeout_s=300, what="1 GiB ballooned, and the guest's ACTUAL says so",
                    on_update=track,
                )
                after = ram_allocated(vm)
                lap("inflated")
                actual = qmp.execute("query-balloon")["actual"]
            finally:
                qmp.close()
            drop = before - after
            print(
                f"\nRAM file: {fmt(before)} before the inflate (peak {fmt(peak)}), "
                f"{fmt(after)} after; dropped {drop} bytes = {100 * drop / BALLOON:.1f}% of "
                f"the balloon ({100 * (peak - after) / BALLOON:.1f}% against the peak); "
                f"ledger freed {fmt(status['freed_bytes'])}; query-balloon actual {actual}"
            )
            assert status["ballooned_bytes"] == BALLOON
            assert status["freed_bytes"] == BALLOON
            assert actual == 2 * GIB - BALLOON
            assert drop >= 0.95 * BALLOON

            keeper.signal(signal.SIGUSR1)
            assert wait_output(keeper, r"sum 1 (\w+)\n", timeout_s=120).group(1) == checksum

            done = host.ctl("set", GUEST, "2G", "--wait", "--timeout", "300", timeout_s=330)
            assert done.returncode == 0, done.stdout + done.stderr
            lap("deflated")
            status = host.guest(GUEST)
            assert status["ballooned_bytes"] == 0 and status["actual_bytes"] == 2 * GIB

            keeper.signal(signal.SIGUSR1)
            assert wait_output(keeper, r"sum 2 (\w+)\n", timeout_s=120).group(1) == checksum

        used = vm.python(USE_PY, str(REUSE_BYTES), timeout_s=300, check=False)
        assert used.returncode == 0, used
        lap(f"used {fmt(REUSE_BYTES)} again")
        assert used.stdout.split()[:4] == ["used", str(REUSE_BYTES), "bad", "0"]
        assert guest_meminfo(vm)["oom_kill"] == 0
        assert agent.proc is not None and agent.proc.returncode is None, agent.log
    assert agent.proc.returncode == 0, agent.log
