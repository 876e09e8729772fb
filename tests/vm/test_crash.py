"""SIGKILL of the agent in the middle of an inflate, while a checker in the guest grabs
all the memory it can and checks a per-page pattern in it over and over.

What it shows: the checker never sees a page of its own zeroed or changed (the host
punched only balloon pages, and no balloon page went back to the guest's allocator
while a report of it could still be acted on); the restarted agent finds the same pin
holder, reattaches the chunk files and RESYNCs before anything else; afterwards the
host's ledger (replayed from what it acknowledged) is exactly the agent's frames, each
one a hole in the RAM file; SIGTERM then deflates everything and stops agent and holder.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.vm.harness import GuestVM
from tests.vm.helpers import (
    CHECKER_PY,
    MIB,
    GuestAgent,
    Host,
    Laps,
    agent_frames,
    fmt,
    guest_meminfo,
    guest_program,
    ram_data_pages,
    wait_output,
)

pytestmark = pytest.mark.vm

GUEST = "crash1"
VM = {"memory": "1536M"}
HOST = {"stats_interval_s": 1.0}

BALLOON = 512 * MIB
KILL_AT = 128 * MIB  # SIGKILL once the host has acknowledged this much of the balloon
STEP = 16 * MIB  # the checker grabs this much at a time
LOW = 192 * MIB  # ... while MemAvailable stays above this
CHUNK = 64 * MIB  # --chunk: several chunks to a balloon, so the kill lands mid-inflate


def test_sigkill_mid_inflate_loses_no_data(vm: GuestVM, host: Host) -> None:
    lap = Laps()
    ram = vm.memory_bytes
    agent = GuestAgent(vm, host, GUEST, "--chunk", str(CHUNK))
    restarted = GuestAgent(vm, host, GUEST, "--chunk", str(CHUNK))
    try:
        agent.start()
        agent.wait_synced(timeout_s=180)
        holder = agent.holder_pid()
        assert holder is not None
        # Room for the agent to come back and finish the balloon once the checker is full.
        cap = guest_meminfo(vm)["available"] - BALLOON - 256 * MIB
        lap(f"agent up; the checker may take {fmt(cap)}")

        with guest_program(vm, CHECKER_PY, str(LOW), str(STEP), str(cap)) as checker:
            wait_output(checker, r"grabbed", timeout_s=120)
            host.set_keep(GUEST, ram - BALLOON)
            host.wait_guest(
                GUEST, lambda g: g["ballooned_bytes"] >= KILL_AT, timeout_s=240,
                what=f"{fmt(KILL_AT)} ballooned",
            )
            # From here the agent hears nothing from the host: its next reports are
            # punched and acknowledged by the host, and never answered as far as the
            # agent knows — the window of docs/safety.md gaps 4 and 8.
            host.tap.hold()
            seen = host.guest(GUEST)["ballooned_bytes"]
            at_kill = host.wait_guest(
                GUEST, lambda g: g["ballooned_bytes"] > seen, timeout_s=240,
                what="a report the agent never heard answered",
            )
            agent.kill()
            host.tap.release()
            punched = host.tap.ledger(GUEST).pages  # what the host acknowledged and punched
            grabbed = re.findall(r"grabbed (\d+)", checker.stdout)
            lap(f"SIGKILLed the agent at {fmt(punched.num_pages * 4096)} ballooned (at most "
                f"{fmt(seen)} of it acknowledged to the agent); the checker had "
                f"{fmt(int(grabbed[-1]))}")
            files = dict(
                line.rsplit(None, 1) for line in vm.run(
                    f"cd {agent.state_dir} && stat -c '%n %s' *", check=True
                ).stdout.splitlines()
            )
            chunk_bytes = sum(int(v) for k, v in files.items() if k.startswith("chunk-"))
            print(f"left in the state directory: {files}")
            # The host had acknowledged (and punched) reports the agent never heard answered,
            # and the inflate was not over.
            assert at_kill["ballooned_bytes"] <= punched.num_pages * 4096 < BALLOON

            full = wait_output(checker, r"full (\d+)", timeout_s=300)
            lap(f"the checker is full: {fmt(int(full.group(1)))}")

            restarted.start()
            restarted.wait_synced(timeout_s=180)
            log = restarted.log
            assert re.search(r"reattached \d+ chunks? \(", log), log
            assert restarted.holder_pid() == holder
            first_report = re.search(r"telling the host the whole balloon|inflating", log)
            assert first_report and first_report.group(0).startswith("telling"), log
            host.wait_balloon(GUEST, BALLOON)
            lap("restarted, resynchronised, balloon at target")
            # The new session's first report is the RESYNC of every chunk file left,
            # and it names every page the host had punched for the killed agent.
            resync, answer = host.tap.sessions(GUEST)[-1].requests()[0]
            assert type(resync).__name__ == "Resync" and type(answer).__name__ == "Ack"
            assert resync.pages.num_pages * 4096 == chunk_bytes
            assert punched <= resync.pages

            frames, info = agent_frames(vm, restarted.pid)
            assert frames.num_pages * 4096 == BALLOON and info["duplicates"] == 0
            replay = host.tap.ledger(GUEST)
            assert replay.pages == frames
            status = host.guest(GUEST)
            assert status["ballooned_bytes"] == status["freed_bytes"] == BALLOON
            assert ram_data_pages(vm, frames) == (0, BALLOON // 4096)

            # Two more full rounds of the checker after all that, then its verdict.
            mark = len(checker.stdout)
            wait_output(checker, r"round \d+ bad", since=mark, timeout_s=120)
            mark = wait_output(checker, r"round \d+ bad", since=mark, timeout_s=120).end()
            wait_output(checker, r"round \d+ bad", since=mark, timeout_s=120)
            checker.signal(signal.SIGTERM)
            verdict = wait_output(checker, r"status (\d+) (\d+) (\d+)", timeout_s=120)
            rounds, bad, pages = (int(x) for x in verdict.groups())
            lap(f"checker: {rounds} rounds over {fmt(pages * 4096)}, {bad} bad pages")
            assert "BAD" not in checker.stdout and bad == 0, checker.stdout[-2000:]
            assert rounds >= 3

        assert restarted.stop() == 0, restarted.log
        assert "stopped; the balloon is empty" in restarted.log
        assert host.guest(GUEST)["ballooned_bytes"] == 0
        assert vm.run(["kill", "-0", str(holder)]).returncode != 0, "the holder outlived it"
        assert guest_meminfo(vm)["oom_kill"] == 0
        lap("stopped cleanly")
    finally:
        restarted.close()
        agent.close()
