"""Fixtures for the agent's tests: private tmpfs mounts, pools of real pages, and
cleanup that leaves no process, mount or cgroup behind."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.holder import HolderClient, LocalPins, holder_pid, process_alive
from guest_agent.pool import PagePool, mounted_fs

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


CAN_MOUNT = bool(_capabilities() >> 21 & 1)  # CAP_SYS_ADMIN: mount, and read PFNs
needs_root = pytest.mark.skipif(
    not CAN_MOUNT or not _capabilities() >> 14 & 1,
    reason="needs CAP_SYS_ADMIN (mount, frame numbers) and CAP_IPC_LOCK",
)


def status_bytes(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmLck, VmPin, ...), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def kill_holder(directory: Path) -> None:
    pid = holder_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid)


def _wait_exit(pid: int, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not exit")
        time.sleep(0.01)  # not our child: nothing to wait() on


class Mount:
    """A private tmpfs for a test's state directory."""

    def __init__(self, path: Path, huge: str = "within_size", size: str = "2G") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"mode=0700,huge={huge},size={size}", "uballoon-test",
             str(path)],
            check=True, capture_output=True,
        )

    def cleanup(self) -> None:
        """Kill a holder left behind, then unmount everything mounted on the path."""
        kill_holder(self.path)
        while mounted_fs(self.path).point == self.path:
            done = subprocess.run(["umount", str(self.path)], capture_output=True)
            if done.returncode:
                subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs (huge=within_size) for a pool; cleaned up whatever happened."""
    if not CAN_MOUNT:
        pytest.skip("needs CAP_SYS_ADMIN to mount a tmpfs")
    mount = Mount(tmp_path / "state")
    try:
        yield mount.path
    finally:
        mount.cleanup()


@pytest.fixture
def unmounted_dir(tmp_path: Path) -> Iterator[Path]:
    """A path where the agent itself will mount its tmpfs; unmounted afterwards."""
    path = tmp_path / "run" / "uballoon"
    try:
        yield path
    finally:
        if path.exists():
            kill_holder(path)
            while mounted_fs(path).point == path:
                subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def local_pool(state_dir: Path) -> Iterator[PagePool]:
    """A pool whose pins live in this process."""
    pool = PagePool(state_dir, LocalPins())
    try:
        yield pool
    finally:
        for chunk in list(pool.chunks.values()):
            pool.release(chunk)
        pool.close()


@pytest.fixture
def holder_pool(state_dir: Path) -> Iterator[PagePool]:
    """A pool whose pins live in a real holder process."""
    pool = PagePool(state_dir, HolderClient.connect(state_dir),
                    reconnect=lambda: HolderClient.connect(state_dir))
    try:
        yield pool
    finally:
        for chunk in list(pool.chunks.values()):
            pool.release(chunk)
        if pool.pinner is not None:
            pool.pinner.stop()
        pool.close()
