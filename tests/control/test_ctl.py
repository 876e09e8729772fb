"""``uballoonctl`` as operators run it: a subprocess against a control socket served by
the test (the fake host behind it)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from host_backend.control import serve_control
from host_backend.ctl import format_stat_value, format_status, progress
from protocol.constants import BalloonState, StatTag
from protocol.units import PAGE_SIZE
from tests.control.fake_host import GIB, MIB, FakeHost
from tests.control.helpers import LineClient

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CTL = [sys.executable, "-m", "host_backend.ctl"]


async def ctl(control, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout_s):
        return await trio.run_process([*CTL, "--control", str(control),
                                       "--request-timeout", "60", *args],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=ENV)


def out(done: subprocess.CompletedProcess) -> str:
    return done.stdout.decode()


def err(done: subprocess.CompletedProcess) -> str:
    return done.stderr.decode()


@pytest.fixture
def host() -> FakeHost:
    h = FakeHost(capacity_bytes=8 * GIB)
    h.add("vm1", 2 * GIB, target_bytes=1536 * MIB, actual_bytes=1600 * MIB, manual=True,
          freed_bytes=448 * MIB, available_bytes=GIB, pressure=12.5, reason="manual")
    h.add("vm2", 4 * GIB, connected=False, reclaim="accounting")
    return h


@pytest.fixture
async def control(host, tmp_path, nursery) -> Path:
    path = tmp_path / "control.sock"
    await nursery.start(serve_control, host, path)
    return path


async def converge_in_steps(host: FakeHost, name: str, steps: int = 4) -> None:
    """A guest that moves to its new target in ``steps`` steps, each after the control
    plane has looked at the previous one (so a watcher sees every step)."""
    seen = host.changes()
    calls = len(host.calls)
    while len(host.calls) == calls:  # until an operator sets a target
        seen = await host.wait_change(seen)
    guest = host.record(name)
    start, target = guest.actual_bytes, guest.target_bytes
    for i in range(1, steps + 1):
        reads = host.reads
        host.set_actual(name, start + (target - start) * i // steps)
        await host.wait_read(reads)


# --------------------------------------------------------------------------------------
# Rendering


def test_progress_runs_from_the_start_to_the_target_within_a_page():
    assert progress(2 * GIB, 2 * GIB, GIB) == 0.0
    assert progress(2 * GIB, 1536 * MIB, GIB) == 0.5
    assert progress(2 * GIB, GIB + PAGE_SIZE - 1, GIB) == 1.0
    assert progress(GIB, GIB, GIB) == 1.0
    assert progress(GIB, 3 * GIB, 2 * GIB) == 0.0  # overshoot the wrong way: clamped


def test_stat_values_are_shown_in_their_units():
    assert format_stat_value(StatTag.MEMFREE, 1536 * MIB) == "1.5G"
    assert format_stat_value(StatTag.PSI_SOME_AVG10, 1234) == "12.34%"
    assert format_stat_value(StatTag.PSI_FULL_TOTAL, 2_500_000) == "2.500s"
    assert format_stat_value(StatTag.BALLOON_PAGES, 262144) == "1G (262144 pages)"
    state = BalloonState.FLOOR_REACHED | BalloonState.UNSTABLE_FRAMES
    assert format_stat_value(StatTag.BALLOON_STATE, state) == "floor_reached, unstable_frames"
    assert format_stat_value(StatTag.MAJFLT, 17) == "17"


def test_an_empty_host_says_so():
    assert format_status([]) == "no guests"


def test_ctl_imports_no_trio():
    code = "import sys, host_backend.ctl; print('trio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV,
                          check=True, timeout=30)
    assert done.stdout.decode().strip() == "False"


# --------------------------------------------------------------------------------------
# Commands


async def test_status_table(control):
    done = await ctl(control, "status")
    assert done.returncode == 0, err(done)
    lines = out(done).splitlines()
    assert lines[0].split() == ["GUEST", "RAM", "TARGET", "ACTUAL", "RECLAIMED", "AVAILABLE",
                                "PRESSURE", "CONNECTED", "MODE", "REASON"]
    assert lines[1].split() == ["vm1", "2G", "1.5G*", "1.6G", "448M", "1G", "12.5%", "yes",
                                "punch", "manual"]
    assert lines[2].split() == ["vm2", "4G", "4G", "4G", "0B", "-", "-", "no", "accounting",
                                "-"]
    assert lines[3].startswith("* set by an operator")
    assert lines[4] == "pool: capacity 8G, free 2.4G"


async def test_status_json_is_the_raw_result(control):
    done = await ctl(control, "--json", "status")
    result = json.loads(done.stdout)
    assert [g["name"] for g in result["guests"]] == ["vm1", "vm2"]
    assert result["pool"]["capacity_bytes"] == 8 * GIB


async def test_set_with_wait_shows_progress_until_the_target(control, host, nursery):
    host.record("vm1").actual_bytes = 2 * GIB
    nursery.start_soon(converge_in_steps, host, "vm1")
    done = await ctl(control, "set", "vm1", "1G", "--wait", "--timeout", "30")
    assert done.returncode == 0, err(done)
    lines = out(done).splitlines()
    assert lines[0] == "vm1: target 1G (of 2G RAM; actual 2G)"
    steps = [line for line in lines if line.startswith("vm1: ") and "% (actual" in line]
    assert len(steps) >= 2 and steps[-1].startswith("vm1: 100% (actual 1G -> target 1G")
    percents = [int(line.split()[1].rstrip("%")) for line in steps]
    assert percents == sorted(percents)
    assert lines[-1] == "vm1: reached 1G"
    assert host.calls[-1] == ("set_target", "vm1", GIB, False)


async def test_set_with_wait_draws_a_bar_on_a_terminal(control, host, nursery):
    host.record("vm1").actual_bytes = 2 * GIB
    nursery.start_soon(converge_in_steps, host, "vm1")
    master, slave = pty.openpty()
    with trio.fail_after(120):
        process = await trio.lowlevel.open_process(
            [*CTL, "--control", str(control), "--request-timeout", "120", "set", "vm1",
             "1536M", "--wait"],
            stdout=slave, stderr=subprocess.PIPE, env=ENV)
        os.close(slave)
        screen = b""
        async with trio.lowlevel.FdStream(master) as terminal:
            while b"reached" not in screen:
                try:
                    chunk = await terminal.receive_some(4096)
                except trio.BrokenResourceError:  # EIO: the program closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
        status = await process.wait()
        problem = await process.stderr.receive_some(65536)
        assert status == 0, problem
        await process.stderr.aclose()
    text = screen.decode()
    assert "\r\x1b[K" in text and "vm1 [" in text and "] 100%" in text
    assert "#" * 30 in text and "reached 1.5G" in text


async def test_set_auto_hands_back_to_the_policy(control, host):
    done = await ctl(control, "set", "vm1", "auto")
    assert done.returncode == 0, err(done)
    assert host.calls[-1] == ("set_target", "vm1", None, False)
    assert "the policy's" in out(done)


async def test_a_size_above_ram_is_refused_with_exit_1(control, host):
    done = await ctl(control, "set", "vm1", "3G")
    assert done.returncode == 1
    assert err(done).count("\n") == 1 and "more than its RAM" in err(done)
    assert host.record("vm1").target_bytes == 1536 * MIB


async def test_a_malformed_size_is_a_one_line_usage_error_with_exit_2(control, host):
    done = await ctl(control, "set", "vm1", "12Q")
    assert done.returncode == 2
    assert err(done).count("\n") == 1 and "invalid size '12Q'" in err(done)
    assert host.calls == []  # refused before asking the host


async def test_an_unknown_guest_is_exit_1(control):
    done = await ctl(control, "stats", "vm9")
    assert done.returncode == 1 and err(done) == "uballoonctl: unknown guest vm9\n"


async def test_a_missing_socket_is_a_one_line_error_with_exit_1(tmp_path):
    done = await ctl(tmp_path / "nope.sock", "status")
    assert done.returncode == 1
    assert err(done).count("\n") == 1 and "no such socket" in err(done)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try as another user")
async def test_the_control_socket_keeps_other_users_out(host, nursery):
    # A directory everyone may enter, so only the socket's own mode can refuse.
    directory = Path(tempfile.mkdtemp(prefix="uballoon-ctl-"))
    try:
        directory.chmod(0o755)
        path = directory / "control.sock"
        await nursery.start(serve_control, host, path)
        # Import everything as root, then become nobody (the interpreter lives in /root).
        as_nobody = ("import os, sys, host_backend.ctl as ctl; "
                     "ctl.build_parser().parse_args(sys.argv[1:]); "  # loads what it imports
                     "os.setgid(65534); os.setuid(65534); sys.exit(ctl.main(sys.argv[1:]))")

        async def run_as_nobody() -> subprocess.CompletedProcess:
            with trio.fail_after(30):
                return await trio.run_process(
                    [sys.executable, "-c", as_nobody, "--control", str(path), "status"],
                    capture_stdout=True, capture_stderr=True, check=False, env=ENV)

        done = await run_as_nobody()
        assert done.returncode == 1 and "permission denied" in err(done)
        assert err(done).count("\n") == 1
        path.chmod(0o666)  # what a world-writable socket would let in
        done = await run_as_nobody()
        assert done.returncode == 0, err(done)
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


async def test_stats_pool_guest_and_release(control, host):
    host.set_stats("vm1", {StatTag.MEMFREE: 300 * MIB, StatTag.PSI_SOME_AVG10: 1234,
                           StatTag.BALLOON_PAGES: 131072})
    host.record("vm1").interval_s = 5
    done = await ctl(control, "stats", "vm1")
    assert done.returncode == 0, err(done)
    text = out(done)
    assert "polled every 5s" in text
    rows = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()[2:]}
    assert rows == {"stat-free-memory": "300M", "psi-some-avg10": "12.34%",
                    "balloon-pages": "512M (131072 pages)"}

    done = await ctl(control, "stats", "vm2")
    assert done.returncode == 1 and "has not sent statistics yet" in err(done)

    done = await ctl(control, "pool")
    assert done.returncode == 0
    lines = out(done).splitlines()
    assert lines[0].split() == ["capacity", "8G"]
    assert lines[1].split()[:2] == ["free", "2.4G"]
    assert [line.split()[:2] for line in lines[3:5]] == [["vm1", "1.6G"], ["vm2", "4G"]]

    done = await ctl(control, "guest", "vm1")
    assert "  target         1.5G (set by an operator)\n" in out(done)

    done = await ctl(control, "release", "vm1")
    assert done.returncode == 1 and "connected" in err(done)
    done = await ctl(control, "release", "vm2")
    assert done.returncode == 0 and out(done).startswith("released vm2")
    assert [g.name for g in host.guests()] == ["vm1"]


async def test_watch_redraws_on_changes_and_ctrl_c_exits_0(control, host):
    with trio.fail_after(120):
        process = await trio.lowlevel.open_process(
            [*CTL, "--control", str(control), "watch", "--interval", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        lines = LineClient(process.stdout)

        async def next_table() -> list[str]:
            header = await lines.receive_line()
            assert header.startswith(b"--- ")
            table = []
            while (line := await lines.receive_line()) != b"\n":
                table.append(line.decode())
            return table

        first = await next_table()
        assert first[1].split()[3] == "1.6G"
        host.set_actual("vm1", 1536 * MIB)
        second = await next_table()
        assert second[1].split()[3] == "1.5G"
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0
        await process.stdout.aclose()
        await process.stderr.aclose()
