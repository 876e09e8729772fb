"""Page migration against the balloon, in a guest with two NUMA nodes (one RAM file each).

``move_pages(2)`` is run as root in the guest on the agent's own pid, asking every page
of every balloon chunk to move to the other node:

* pinned (the default): nothing moves — no page changes node, no frame changes — and the
  host's ledger (what it acknowledged, replayed from the wire) is still exactly the
  agent's frames, every one of them a hole in the RAM files;
* ``--no-pin``: the pages do move; the agent's verification sees it (``FRAMES MOVED``,
  RESYNC) and the ledger follows the new frames; the host never punched (no stable
  frames: accounting only), so every old and new frame still holds data on the host.
"""

from __future__ import annotations

import json

import pytest

from tests.vm.harness import GuestVM
from tests.vm.helpers import (
    MIB,
    MOVE_PY,
    GuestAgent,
    Host,
    Laps,
    agent_frames,
    ram_data_pages,
)

pytestmark = pytest.mark.vm

GUEST = "numa1"
VM = {"memory": None, "numa_nodes": ["1G", "1G"]}
HOST = {"stats_interval_s": 1.0}

BALLOON = 256 * MIB
PAGES = BALLOON // 4096


def move_balloon(vm: GuestVM, agent: GuestAgent) -> dict:
    """move_pages(2) of every balloon page to the other node, on the agent's pid."""
    result: dict = json.loads(vm.python(MOVE_PY, str(agent.pid), timeout_s=180).stdout)
    print(f"move_pages: {result}")
    assert result["pages"] == PAGES
    return result


def test_pinned_balloon_pages_do_not_move(vm: GuestVM, host: Host) -> None:
    lap = Laps()
    with GuestAgent(vm, host, GUEST) as agent:
        agent.wait_synced(timeout_s=180)
        status = host.guest(GUEST)
        assert status["authenticated"] and status["stable"] and status["reclaim"] == "punch"
        host.set_keep(GUEST, vm.memory_bytes - BALLOON)
        host.wait_balloon(GUEST, BALLOON)
        lap("inflated")
        frames, info = agent_frames(vm, agent.pid)
        assert frames.num_pages == PAGES and info["duplicates"] == 0

        result = move_balloon(vm, agent)
        lap("move_pages")
        assert result["moved"] == 0 and result["frames_changed"] == 0
        assert result["nodes_after"] == result["nodes_before"]
        # The kernel tried to migrate every page and failed (the pin); it did not refuse
        # up front (a page mapped by another process reads -EACCES, a missing one -ENOENT).
        assert result["vmstat"].get("pgmigrate_fail", 0) >= PAGES, result["vmstat"]
        assert result["vmstat"].get("pgmigrate_success", 0) == 0, result["vmstat"]
        assert set(result["status"]) <= {"-EAGAIN", "-EBUSY"}, result["status"]

        assert agent_frames(vm, agent.pid)[0] == frames
        replay = host.tap.ledger(GUEST)
        assert replay.unanswered == 0 and replay.refused == 0
        assert replay.pages == frames
        status = host.guest(GUEST)
        assert status["ballooned_bytes"] == status["freed_bytes"] == BALLOON
        assert ram_data_pages(vm, frames) == (0, PAGES)  # every frame a hole, nothing else
        assert "FRAMES MOVED" not in agent.log

        host.set_keep(GUEST, vm.memory_bytes)
        host.wait_balloon(GUEST, 0)
        assert agent.stop() == 0, agent.log
        lap("deflated and stopped")


def test_unpinned_move_is_caught_and_never_punched(vm: GuestVM, host: Host) -> None:
    lap = Laps()
    with GuestAgent(vm, host, GUEST, "--no-pin", "--verify-interval", "1") as agent:
        agent.wait_synced(timeout_s=180)
        assert "no long-term pin here" in agent.log
        status = host.guest(GUEST)
        assert status["authenticated"] and not status["stable"]
        assert status["reclaim"] == "accounting"
        host.set_keep(GUEST, vm.memory_bytes - BALLOON)
        host.wait_balloon(GUEST, BALLOON)
        lap("inflated")
        before, _ = agent_frames(vm, agent.pid)
        assert host.tap.ledger(GUEST).pages == before

        mark = agent.mark()
        result = move_balloon(vm, agent)
        lap("move_pages")
        assert result["moved"] == PAGES and result["frames_changed"] == PAGES
        assert result["vmstat"].get("pgmigrate_success", 0) >= PAGES, result["vmstat"]
        agent.wait_log(r"FRAMES MOVED", since=mark, timeout_s=120)
        # The agent re-reads its frames every second, so it may have caught the pages
        # block by block while they moved: compare with the host once it has reported
        # the frames as they are now.
        moved_at = agent.mark()
        after, _ = agent_frames(vm, agent.pid)
        assert after.num_pages == PAGES and after.isdisjoint(before)
        for _ in range(10):
            replay = host.tap.ledger(GUEST)
            if replay.pages == after:
                break
            moved_at = agent.wait_log(r"host confirmed the balloon", since=moved_at).end()
        assert replay.pages == after
        assert replay.resyncs >= 2 and replay.refused == 0
        lap("the agent caught it and told the host")
        status = host.guest(GUEST)
        assert status["ballooned_bytes"] == BALLOON and status["freed_bytes"] == 0
        # No punch, ever: the old frames (given back to the guest by the migration) and
        # the new ones all still hold data in the RAM files.
        assert ram_data_pages(vm, before | after) == (2 * PAGES, 0)

        host.set_keep(GUEST, vm.memory_bytes)
        host.wait_balloon(GUEST, 0)
        assert agent.stop() == 0, agent.log
        lap("deflated and stopped")
