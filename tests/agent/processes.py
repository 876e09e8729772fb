"""Real ``uballoon-guest`` processes for tests, and the cleanup that leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import trio

import native
from guest_agent.holder import holder_pid
from guest_agent.pool import mounted_fs
from protocol.ranges import RangeSet
from tests.agent.conftest import REPO, kill_holder

AGENT = [sys.executable, "-m", "guest_agent.cli"]


class Agent:
    """One agent process; its messages go to a file the test reads."""

    def __init__(self, process: trio.Process, log_path: Path, state_dir: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.state_dir = state_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> re.Match:
        """Until ``pattern`` (a regex) appears ``count`` times in the log."""
        with trio.fail_after(timeout):
            while True:
                found = list(re.finditer(pattern, self.log()))
                if len(found) >= count:
                    return found[count - 1]
                if self.process.poll() is not None:
                    raise AssertionError(f"agent exited ({self.process.returncode}):\n{self.log()}")
                await trio.sleep(0.02)  # polling a file another process writes

    async def wait_exit(self, timeout: float = 60.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def run_agent(
    args: list[str], *, log_path: Path, state_dir: Path, cgroup: Path | None = None,
) -> AsyncIterator[Agent]:
    """Start ``uballoon-guest ARGS --state-dir STATE_DIR``; on exit SIGKILL it if it still
    runs.  With ``cgroup``, the agent starts inside that (v1 memory) cgroup."""
    command = [*AGENT, *args, "--state-dir", str(state_dir)]
    if cgroup is not None:
        command = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *command]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log_path, "ab") as log_file:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
        )
    agent = Agent(process, log_path, state_dir)
    try:
        yield agent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()


def cleanup_state_dir(state_dir: Path) -> None:
    """Kill a holder left behind and unmount the agent's tmpfs."""
    if state_dir.exists():
        kill_holder(state_dir)
        while mounted_fs(state_dir).point == state_dir:
            subprocess.run(["umount", "-l", str(state_dir)], check=True)


def vm_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def chunk_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("chunk-*"))


def file_frames(paths: list[Path]) -> RangeSet:
    """The frames of the chunk files' pages, seen by mapping them here (the same page
    cache pages the agent maps; reading page tables, never the pages)."""
    pfns = []
    for path in paths:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR)
        try:
            address = native.map_shared(fd, size)
            try:
                native.lock(address, size)
                pfns.append(native.read_pfns(address, size))
            finally:
                native.release(address, size)
        finally:
            os.close(fd)
    return RangeSet.from_pfns(np.concatenate(pfns)) if pfns else RangeSet.empty()


def holder_of(state_dir: Path) -> int | None:
    return holder_pid(state_dir)
