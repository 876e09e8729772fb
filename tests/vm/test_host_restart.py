"""``uballoon-host`` killed (SIGKILL) and started again with the same config and state file
while a guest holds a balloon.

What it shows: the agent keeps its balloon while the host is away, reconnects with
backoff and RESYNCs; the new host's ledger is rebuilt with the very same pages (the
RESYNC names exactly what the old host had acknowledged, and the agent's frames) and
the same freed count; the operator's target set before the restart still holds.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.vm.harness import GuestVM
from tests.vm.helpers import MIB, GuestAgent, Host, Laps, agent_frames, ram_data_pages

pytestmark = pytest.mark.vm

GUEST = "restart1"
VM = {"memory": "1G"}
HOST = {"stats_interval_s": 1.0}

BALLOON = 256 * MIB


def test_host_restart_rebuilds_the_ledger(vm: GuestVM, host: Host) -> None:
    lap = Laps()
    keep = vm.memory_bytes - BALLOON
    with GuestAgent(vm, host, GUEST) as agent:
        agent.wait_synced(timeout_s=180)
        done = host.ctl("set", GUEST, f"{keep // MIB}M", "--wait", "--timeout", "240")
        assert done.returncode == 0, done.stdout + done.stderr
        before = host.guest(GUEST)
        assert before["ballooned_bytes"] == before["freed_bytes"] == BALLOON
        assert before["manual"] and before["target_bytes"] == keep
        assert json.loads(host.state_path.read_text())["manual"] == {GUEST: keep}
        frames, _ = agent_frames(vm, agent.pid)
        assert host.tap.ledger(GUEST).pages == frames
        sessions = len(host.tap.sessions(GUEST))
        lap("inflated by an operator's target")

        mark = agent.mark()
        host.stop(signal.SIGKILL)
        agent.wait_log(r"lost the host .* retrying in", since=mark, timeout_s=60)
        host.start()
        agent.wait_synced(since=mark, timeout_s=180)
        lap("host restarted; the agent reconnected and resynchronised")

        after = host.wait_balloon(GUEST, BALLOON, timeout_s=60)
        assert after["connected"] and after["authenticated"] and after["reclaim"] == "punch"
        assert after["freed_bytes"] == before["freed_bytes"]
        assert after["manual"] and after["target_bytes"] == keep and after["reason"] == "manual"
        assert agent_frames(vm, agent.pid)[0] == frames
        new_sessions = host.tap.sessions(GUEST)[sessions:]
        assert new_sessions, "no new session after the restart"
        first_request, answer = new_sessions[-1].requests()[0]
        assert type(first_request).__name__ == "Resync" and type(answer).__name__ == "Ack"
        assert first_request.pages == frames
        assert answer.freed_pages * 4096 == BALLOON
        assert host.tap.ledger(GUEST).pages == frames
        assert ram_data_pages(vm, frames) == (0, BALLOON // 4096)
        assert "deflating" not in agent.log[mark:]

        host.set_keep(GUEST, vm.memory_bytes)
        host.wait_balloon(GUEST, 0)
        assert agent.stop() == 0, agent.log
        lap("deflated, stopped")
