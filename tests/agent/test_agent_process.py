"""Real ``uballoon-guest`` processes against a small host written here (trio and a
HostConnection) over real Unix and TCP sockets.

What the host is told is checked against the kernel: the agent's VmLck, the pin
holder's VmPin, and the chunk files' frames read through pagemap by mapping the
same files in this process.  No test sleeps to wait: each waits for a condition
(the host's ledger, a log line, a process exit) under a generous deadline.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import native
from guest_agent.holder import holder_pid
from guest_agent.pool import mounted_fs, wait_holder_gone
from protocol.constants import Feature
from protocol.events import Inflate, Resync
from protocol.ranges import RangeSet
from tests.agent.conftest import REPO, Mount, needs_root
from tests.agent.host import TestHost, serve
from tests.agent.processes import (
    AGENT,
    chunk_files,
    cleanup_state_dir,
    file_frames,
    run_agent,
    vm_status,
)

pytestmark = needs_root

MiB = 1 << 20


def pages(mib: float) -> int:
    return int(mib * 256)


async def wait_until(predicate, timeout: float = 60.0) -> None:
    """Until ``predicate()`` holds (for state another process changes)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def listen(transport: str, tmp_path: Path) -> tuple[list[trio.abc.Listener], str]:
    if transport == "unix":
        path = tmp_path / "host.sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(8)
        return [trio.SocketListener(sock)], f"unix:{path}"
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    return listeners, f"tcp:127.0.0.1:{port}"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run" / "vm1"
    try:
        yield path
    finally:
        cleanup_state_dir(path)


def base_args(address: str, *extra: str) -> list[str]:
    return ["--connect", address, "--name", "vm1", "--chunk", "16M", "--min-free", "64M",
            "--log-level", "debug", *extra]


# -- the whole life of a balloon ---------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_real_agent_inflates_deflates_and_stops_cleanly(
    tmp_path: Path, state: Path, transport: str,
) -> None:
    host = TestHost(target_pages=pages(64), stats_interval_ms=200)
    async with trio.open_nursery() as nursery:
        listeners, address = await listen(transport, tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(64))
            session = host.session
            assert session.requests[0] == Resync(1, RangeSet.empty())  # first, even if empty
            assert session.hello.total_pages * 4096 <= os.sysconf("SC_PHYS_PAGES") * 4096
            assert session.conn.negotiated(Feature.STABLE_PFNS)
            # What the host holds is what the kernel says the agent holds.
            assert file_frames(chunk_files(state)) == host.ledger
            assert vm_status(agent.pid, "VmLck") == 64 * MiB
            holder = holder_pid(state)
            assert holder is not None and vm_status(holder, "VmPin") == 64 * MiB
            await host.wait_for(lambda: session.actuals and session.actuals[-1] == pages(64))
            await host.wait_for(lambda: len(session.stats) >= 2)  # pushed every 200 ms

            await host.set_target(pages(16))
            await host.wait_for(lambda: host.ledger.num_pages == pages(16))
            await wait_until(lambda: vm_status(agent.pid, "VmLck") == 16 * MiB)
            assert file_frames(chunk_files(state)) == host.ledger
            assert vm_status(holder, "VmPin") == 16 * MiB

            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        assert host.ledger == RangeSet.empty()
        assert session.closed == "Bye"
        assert wait_holder_gone(state, holder)  # no process lingers...
        assert mounted_fs(state).point != state  # ...and no mount
        log = agent.log()
        assert "balloon at target: 64M" in log and "stopped; the balloon is empty" in log
        assert "PSI trigger armed on /proc/pressure/memory" in log
        nursery.cancel_scope.cancel()


async def test_authenticates_with_a_key_file(tmp_path: Path, state: Path) -> None:
    (tmp_path / "key").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    # The file's bytes are the key, both ends read the same file (protocol.auth).
    host = TestHost(target_pages=pages(16), key=(tmp_path / "key").read_bytes())
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address, "--key-file", str(tmp_path / "key")),
                             log_path=tmp_path / "agent.log", state_dir=state) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(16))
            assert host.session.conn.authenticated
            assert host.session.conn.negotiated(Feature.AUTH)
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        nursery.cancel_scope.cancel()


# -- crash -----------------------------------------------------------------------------------


async def test_sigkill_mid_inflate_keeps_the_frames_and_a_restart_resyncs_them(
    tmp_path: Path, state: Path,
) -> None:
    host = TestHost(target_pages=pages(64))
    host.hold = lambda event: isinstance(event, Inflate)  # the reports stay in flight
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "first.log",
                             state_dir=state) as first:
            await host.wait_for(lambda: host.sessions and sum(
                isinstance(r, Inflate) for r in host.session.requests) >= 2)
            first.signal(signal.SIGKILL)
            await first.wait_exit()
        reported = RangeSet.empty()
        for request in host.session.requests:
            if isinstance(request, Inflate):
                reported |= request.pages
        files = chunk_files(state)
        held = file_frames(files)
        # The agent is gone; its frames are not: the files hold them, the holder pins them.
        assert reported and reported <= held
        holder = holder_pid(state)
        assert holder is not None
        # The holder pins every chunk file -- and perhaps a file the SIGKILL caught
        # between the holder's pin and the agent's rename (pinning-*: never reported,
        # dropped by the restart).  That window is real, if short: it made this
        # equality fail ~1 run in 40 before it allowed for it.
        in_chunks = sum(f.stat().st_size for f in files)
        half_made = sum(f.stat().st_size for f in state.glob("pinning-*"))
        assert in_chunks <= vm_status(holder, "VmPin") <= in_chunks + half_made

        host.hold = None
        count = len(host.sessions)
        async with run_agent(base_args(address), log_path=tmp_path / "second.log",
                             state_dir=state) as second:
            await host.wait_for(lambda: len(host.sessions) > count and host.session.requests)
            assert len(host.sessions) == count + 1
            resync = host.session.requests[0]
            assert isinstance(resync, Resync)
            assert resync.pages == held  # exactly the frames still held
            assert holder_pid(state) == holder  # the same holder kept them pinned throughout
            await host.wait_for(lambda: host.ledger.num_pages == pages(64))
            assert file_frames(chunk_files(state)) == host.ledger
            assert "reattached" in second.log()
            second.signal(signal.SIGTERM)
            assert await second.wait_exit() == 0
        assert host.ledger == RangeSet.empty()
        assert wait_holder_gone(state, holder)
        assert mounted_fs(state).point != state  # the earlier agent's mount is gone too
        nursery.cancel_scope.cancel()


async def test_release_drops_a_balloon_whose_host_is_gone(tmp_path: Path, state: Path) -> None:
    host = TestHost(target_pages=pages(32))
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(32))
            agent.signal(signal.SIGKILL)
            await agent.wait_exit()
        nursery.cancel_scope.cancel()
    holder = holder_pid(state)
    assert holder is not None and chunk_files(state)
    done = subprocess.run([*AGENT, "--release", "--state-dir", str(state)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "released 2 chunks (32M)" in done.stderr
    assert wait_holder_gone(state, holder)
    assert mounted_fs(state).point != state


async def test_sigterm_without_the_host_keeps_only_what_the_host_never_answered(
    tmp_path: Path, state: Path,
) -> None:
    host = TestHost(target_pages=pages(16))
    server = trio.CancelScope()

    async def serve_for_a_while(task_status: trio.TaskStatus) -> None:
        with server:
            await serve(host, listeners, task_status=task_status)

    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve_for_a_while)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(16))
            host.hold = lambda event: isinstance(event, Inflate)
            await host.set_target(pages(32))
            await host.wait_for(lambda: any(isinstance(r, Inflate) and r.pages - host.ledger
                                            for r in host.session.requests))
            server.cancel()  # the host is gone, one report unanswered
            await agent.wait_log(r"cannot reach the host")
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        log = agent.log()
        assert "stopped, keeping 1 chunk (16M) whose reports the host never answered" in log
        assert "uballoon-guest --release --state-dir" in log
        [kept] = chunk_files(state)
        assert kept.stat().st_size == 16 * MiB  # the answered 16M went back, this one stays
        holder = holder_pid(state)
        assert holder is not None and vm_status(holder, "VmPin") == 16 * MiB
        nursery.cancel_scope.cancel()


# -- bad input ---------------------------------------------------------------------------------


async def test_an_unreachable_host_is_retried_with_a_clear_message(
    tmp_path: Path, state: Path,
) -> None:
    address = f"unix:{tmp_path / 'nobody.sock'}"
    async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                         state_dir=state) as agent:
        line = await agent.wait_log(r"cannot reach the host at unix:\S+nobody.sock: "
                                    r"No such file or directory; retrying in [0-9.]+s; "
                                    r"balloon of 0B kept", count=3)
        assert line
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit() == 0
    # Backoff: 0.5 s doubling, each with +-20% jitter.
    delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+)s", agent.log())]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2 and 1.6 <= delays[2] <= 2.4


async def test_a_host_sending_garbage_is_named_and_the_agent_reconnects(
    tmp_path: Path, state: Path,
) -> None:
    connections = []

    async def garbage(stream: trio.abc.Stream) -> None:
        connections.append(stream)
        async with stream:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nthis is no balloon host\r\n\r\n")
            await stream.receive_some(1 << 16)

    async with trio.open_nursery() as nursery:
        listeners, address = await listen("tcp", tmp_path)
        nursery.start_soon(trio.serve_listeners, garbage, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await agent.wait_log(r"error: the host broke the protocol: .*bad magic", count=1)
            await agent.wait_log(r"lost the host at tcp:127.0.0.1:\d+: the host broke the "
                                 r"protocol.*; retrying in")
            await wait_until(lambda: len(connections) >= 2)  # it came back
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        nursery.cancel_scope.cancel()


async def test_a_target_larger_than_the_guest_is_refused_and_the_balloon_kept(
    tmp_path: Path, state: Path,
) -> None:
    host = TestHost(target_pages=pages(32))
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(32))
            first = host.session
            await host.send_oversized_target(first.hello.total_pages + 1)
            await agent.wait_log(r"host asked for a balloon of \S+, larger than this guest "
                                 r"\(\S+\): refusing; the balloon of 32M stays as it is")
            await host.wait_for(lambda: first.closed is not None)
            # It reconnects, tells the host the same balloon, and nothing was lost.
            await host.wait_for(lambda: host.session is not first and host.session.requests)
            assert host.session.requests[0] == Resync(1, host.ledger)
            assert file_frames(chunk_files(state)) == host.ledger
            assert host.ledger.num_pages == pages(32)
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        nursery.cancel_scope.cancel()


async def test_a_silent_host_is_dropped_after_three_heartbeats(
    tmp_path: Path, state: Path,
) -> None:
    host = TestHost(target_pages=0, heartbeat_ms=200)  # promises pings, never sends one
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        async with run_agent(base_args(address), log_path=tmp_path / "agent.log",
                             state_dir=state) as agent:
            await agent.wait_log(r"the host sent nothing for 0.6s \(3 heartbeats\)")
            await host.wait_for(lambda: len(host.sessions) >= 2)
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
        assert isinstance(host.sessions[0].closed, str)
        nursery.cancel_scope.cancel()


def test_a_malformed_size_is_one_line_and_exit_2() -> None:
    done = subprocess.run([*AGENT, "--connect", "unix:/nowhere", "--min-free", "12Q"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("uballoon-guest: --min-free: invalid size '12Q'")
    for args in (["--chunk", "3M"], ["--connect", "udp:x"], ["--name", "bad name"]):
        done = subprocess.run([*AGENT, "--connect", "unix:/nowhere", *args],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


# -- frames that move --------------------------------------------------------------------------


async def test_without_pins_a_moved_chunk_is_caught_and_resynced(tmp_path: Path) -> None:
    """A real move: MADV_COLLAPSE (from this process) replaces the chunk file's 4 KiB pages
    with a new huge page.  Without a long-term pin the kernel is free to do that; the
    agent's periodic check must notice and tell the host the new frames."""
    mount = Mount(tmp_path / "state", huge="never")
    host = TestHost(target_pages=pages(2))
    try:
        async with trio.open_nursery() as nursery:
            listeners, address = await listen("unix", tmp_path)
            await nursery.start(serve, host, listeners)
            async with run_agent(
                base_args(address, "--no-pin", "--verify-interval", "0.3"),
                log_path=tmp_path / "agent.log", state_dir=mount.path,
            ) as agent:
                await host.wait_for(lambda: host.ledger.num_pages == pages(2))
                assert not host.session.hello.features & Feature.STABLE_PFNS
                before = host.ledger
                [path] = chunk_files(mount.path)
                _collapse(path)
                moved = file_frames([path])
                assert moved.isdisjoint(before)
                await agent.wait_log(r"FRAMES MOVED: chunk 1 \(2M\): 512 of 512 frames")
                await host.wait_for(lambda: host.ledger == moved)
                agent.signal(signal.SIGTERM)
                assert await agent.wait_exit() == 0
            nursery.cancel_scope.cancel()
    finally:
        mount.cleanup()


def _collapse(path: Path) -> None:
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    address = native.map_shared(fd, size)
    try:
        assert libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), 25) == 0, (
            os.strerror(ctypes.get_errno()))
    finally:
        native.release(address, size)
        os.close(fd)


# -- the guard, for real ---------------------------------------------------------------------

CGROUP_V1 = Path("/sys/fs/cgroup/memory")

HOG = """
import sys, time
step, total = int(sys.argv[1]), int(sys.argv[2])
blocks = []
while sum(map(len, blocks)) < total:
    block = bytearray(step)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    blocks.append(block)
    time.sleep(0.05)  # the rate limit: step bytes per 50 ms
print("hog got", sum(map(len, blocks)) >> 20, "MiB", flush=True)
"""


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        pytest.skip("needs the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    path = CGROUP_V1 / f"uballoon-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(768 * MiB))
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                import time

                time.sleep(0.05)  # the killed tasks leave the cgroup asynchronously


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


async def test_a_memory_hog_beside_the_balloon_gets_its_memory_without_an_oom_kill(
    tmp_path: Path, state: Path, cgroup: Path,
) -> None:
    host = TestHost(target_pages=pages(384))
    async with trio.open_nursery() as nursery:
        listeners, address = await listen("unix", tmp_path)
        await nursery.start(serve, host, listeners)
        args = ["--connect", address, "--name", "vm1", "--chunk", "32M", "--min-free", "128M",
                "--oom-step", "64M", "--guard-interval", "0.1", "--holdoff", "600",
                "--log-level", "debug"]
        async with run_agent(args, log_path=tmp_path / "agent.log", state_dir=state,
                             cgroup=cgroup) as agent:
            await host.wait_for(lambda: host.ledger.num_pages == pages(384))
            hello = host.session.hello
            assert hello.total_pages == pages(768)  # the container's limit, not the machine's
            assert hello.ram_layout == RangeSet.empty()
            assert "running in a container" in agent.log()
            # The hog wants 512M of a 768M cgroup that already holds a 384M balloon.
            hog = await trio.lowlevel.open_process(
                ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh",
                 sys.executable, "-c", HOG, str(8 * MiB), str(512 * MiB)],
                stdout=subprocess.PIPE,
            )
            with trio.fail_after(120):
                code = await hog.wait()
            output = await hog.stdout.receive_some(1024)
            assert code == 0, f"the hog died ({code}):\n{agent.log()}"
            assert b"hog got 512 MiB" in output
            assert oom_kills(cgroup) == 0
            assert host.ledger.num_pages < pages(384)  # the balloon made room...
            assert "memory pressure" in agent.log()
            assert agent.process.poll() is None  # ...and the agent lived through it
            stats = host.session  # the state went to the host as well
            agent.signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0
            assert stats.closed == "Bye"
        nursery.cancel_scope.cancel()
