"""The page pool: real chunk files, real pins (in a real holder process), real frames.

Each test checks the pool against what the kernel says: VmLck of this process (the
agent's mappings), VmPin of the holder (its long-term pins), the tmpfs files'
allocated blocks, /proc/self/pagemap through ``native.read_pfns``, and VmFlags.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import native
from guest_agent.holder import HolderClient, LocalPins, holder_pid
from guest_agent.pool import (
    PagePool,
    StateDir,
    mounted_fs,
    release_state_dir,
    union_frames,
    wait_holder_gone,
)
from protocol.errors import NativeError, PolicyError
from protocol.ranges import RangeSet
from tests.agent.conftest import REPO, Mount, kill_holder, needs_root, status_bytes

MiB = 1 << 20
MADV_COLLAPSE = 25

pytestmark = needs_root


def vm_flags(address: int) -> set[str]:
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == address
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping at {address:#x}")


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_pin_holds_exactly_the_pages_and_reports_their_frames(holder_pool: PagePool) -> None:
    pool = holder_pool
    holder = holder_pid(pool.directory)
    locked, pinned = status_bytes("self", "VmLck"), status_bytes(holder, "VmPin")
    sizes = [8 * MiB, 4 * MiB, 12 * 1024]  # two huge-page chunks and a 4 KiB remainder
    chunks = [pool.pin(size) for size in sizes]
    total = sum(sizes)
    assert status_bytes("self", "VmLck") == locked + total
    assert status_bytes(holder, "VmPin") == pinned + total
    for chunk, size in zip(chunks, sizes, strict=True):
        assert chunk.path.name == f"chunk-{chunk.seq:08d}"
        assert allocated(chunk.path) == size
        pfns = native.read_pfns(chunk.address, size)
        assert chunk.frames == RangeSet.from_pfns(pfns)
        assert chunk.frames.num_pages == size // 4096
        assert {"dd", "dc"} <= vm_flags(chunk.address)  # no core dump, no fork copy
    # Whole 2 MiB multiples come as huge pages: every 512 pages one aligned run.
    big = native.read_pfns(chunks[0].address, chunks[0].size_bytes).reshape(-1, 512)
    assert (big[:, 0] % 512 == 0).all()
    assert (np.diff(big, axis=1) == 1).all()
    assert chunks[0].huge and not chunks[2].huge
    assert "nh" in vm_flags(chunks[2].address)  # 4 KiB chunk: khugepaged keeps away
    assert union_frames(chunks).num_pages == total // 4096
    assert set(pool.pinner.held()) == {c.seq for c in chunks}

    for chunk in reversed(chunks):
        pool.release(chunk)
        assert not chunk.path.exists()
    assert status_bytes("self", "VmLck") == locked
    assert status_bytes(holder, "VmPin") == pinned
    assert pool.pinner.held() == {}


def test_release_all_drops_every_pin_in_one_request(holder_pool: PagePool) -> None:
    pool = holder_pool
    holder = holder_pid(pool.directory)
    pinned = status_bytes(holder, "VmPin")
    chunks = [pool.pin(4 * MiB) for _ in range(3)]
    assert status_bytes(holder, "VmPin") == pinned + 12 * MiB
    results = pool.release_all(chunks)
    assert [(c, e) for c, e in results] == [(c, None) for c in chunks]
    assert pool.pinner.held() == {} and pool.chunks == {}
    assert status_bytes(holder, "VmPin") == pinned
    assert not any(c.path.exists() for c in chunks)
    assert all({"unpin", "unmap", "unlink"} <= set(c.release_times) for c in chunks)


def test_the_holder_unpins_several_chunks_and_ignores_unknown_ones(state_dir: Path) -> None:
    path = state_dir / "chunk-00000001"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 2 * MiB)
    os.close(fd)
    client = HolderClient.connect(state_dir)
    try:
        client.pin(1, path, 2 * MiB)
        client.pin(2, path, 2 * MiB)
        client.unpin_all([1, 2, 7])
        assert client.held() == {}
        client.unpin_all([1])  # nothing held: still fine
    finally:
        client.stop()
        client.close()
        wait_holder_gone(state_dir, client.pid)


def test_a_chunk_is_allocated_by_locking_it_in_huge_pages(state_dir: Path) -> None:
    # The file is sized, not fallocated: on a huge=within_size tmpfs, a kernel that
    # decides the page size against the size before the call (Linux 6.1) would give
    # a fallocated empty file 4 KiB pages.
    pool = PagePool(state_dir, LocalPins())
    try:
        chunk = pool.pin(8 * MiB)
        assert chunk.frames.num_ranges <= 4
        pfns = native.read_pfns(chunk.address, chunk.size_bytes).reshape(-1, 512)
        assert (pfns[:, 0] % 512 == 0).all() and (np.diff(pfns, axis=1) == 1).all()
        assert {"create", "map", "lock", "pin", "frames"} <= set(chunk.pin_times)
        pool.release(chunk)
    finally:
        pool.close()


def test_a_chunk_that_cannot_be_had_leaves_nothing_behind(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "small", size="4M")
    try:
        pool = PagePool(mount.path, LocalPins())
        with pytest.raises(NativeError, match="tmpfs at .* is full") as info:
            pool.pin(8 * MiB)
        assert info.value.errno == 28  # ENOSPC
        assert os.listdir(mount.path) == []
        assert pool.chunks == {}
        pool.close()
    finally:
        mount.cleanup()


def test_a_new_agent_reattaches_to_the_same_frames(state_dir: Path) -> None:
    first = PagePool(state_dir, HolderClient.connect(state_dir))
    chunks = [first.pin(4 * MiB), first.pin(2 * MiB)]
    frames = {c.seq: c.frames for c in chunks}
    holder = holder_pid(state_dir)
    # A file being pinned when the agent died was never reported: it goes.
    (state_dir / "pinning-00000099").write_bytes(b"\0" * 4096)
    first.close()  # the agent is gone; the holder keeps the pins
    assert status_bytes(holder, "VmPin") == 6 * MiB

    second = PagePool(state_dir, HolderClient.connect(state_dir))
    try:
        assert holder_pid(state_dir) == holder  # the same holder, not a new one
        again = second.reattach()
        assert [c.seq for c in again] == sorted(frames)
        assert {c.seq: c.frames for c in again} == frames
        assert not (state_dir / "pinning-00000099").exists()
        assert status_bytes(holder, "VmPin") == 6 * MiB  # pinned once, not twice
        assert second.pin(2 * MiB).seq > max(frames)  # numbers only grow
    finally:
        for chunk in list(second.chunks.values()):
            second.release(chunk)
        for chunk in chunks:  # the first pool's mappings in this process
            native.release(chunk.address, chunk.size_bytes)
        second.pinner.stop()
        second.close()


def test_a_dead_holder_is_replaced_and_every_chunk_pinned_again(holder_pool: PagePool) -> None:
    pool = holder_pool
    chunks = [pool.pin(4 * MiB), pool.pin(4 * MiB)]
    old = holder_pid(pool.directory)
    kill_holder(pool.directory)
    assert pool.check() == []  # same frames: nothing moved while unpinned
    new = holder_pid(pool.directory)
    assert new is not None and new != old
    assert pool.pins_lost is False
    assert set(pool.pinner.held()) == {c.seq for c in chunks}
    assert status_bytes(new, "VmPin") == 8 * MiB


def _collapse(path: Path, size: int) -> None:
    """Make the kernel replace the file's 4 KiB pages by one new huge page
    (MADV_COLLAPSE through a mapping of our own, placed huge-page aligned by
    native.map_shared): a real, deterministic move.  Raises OSError if it refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    address = native.map_shared(fd, size)
    try:
        if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), MADV_COLLAPSE):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        native.release(address, size)
        os.close(fd)


def test_without_a_pin_the_check_catches_frames_that_moved(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "never", huge="never")
    pool = PagePool(mount.path, None)
    try:
        chunk = pool.pin(2 * MiB)
        before = chunk.frames
        _collapse(chunk.path, chunk.size_bytes)
        [(moved, now)] = pool.check()
        assert moved is chunk
        assert now != before and now.isdisjoint(before)
        assert now == RangeSet.from_pfns(native.read_pfns(chunk.address, chunk.size_bytes))
        assert chunk.frames == before  # the caller decides what to do with it
        pool.release(chunk)
    finally:
        mount.cleanup()


def test_with_the_pin_the_frames_do_not_move(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "never", huge="never")
    pool = PagePool(mount.path, HolderClient.connect(mount.path))
    try:
        chunk = pool.pin(2 * MiB)
        with pytest.raises(OSError) as info:
            _collapse(chunk.path, chunk.size_bytes)  # the kernel cannot move pinned pages
        assert info.value.errno == 11  # EAGAIN
        assert pool.check() == []
        pool.release(chunk)
        pool.pinner.stop()
        pool.close()
    finally:
        mount.cleanup()


def test_probe_reports_why_pins_do_not_work(state_dir: Path) -> None:
    class Refusing(LocalPins):
        def pin(self, seq: int, path: Path, size_bytes: int) -> None:
            raise NativeError("io_uring_setup for a long-term pin failed: EPERM", 1)

    assert PagePool(state_dir, LocalPins()).probe() is None
    pool = PagePool(state_dir, Refusing())
    assert "io_uring_setup" in (pool.probe() or "")
    assert not pool.stable and pool.pinner is None
    assert os.listdir(state_dir) == []
    chunk = pool.pin(2 * MiB)  # still works: locked, not pinned
    pool.release(chunk)


# -- the state directory -----------------------------------------------------------------


def test_state_dir_mounts_locks_and_unmounts(unmounted_dir: Path) -> None:
    state = StateDir.prepare(unmounted_dir, 64 * MiB)
    assert state.mounted_here and "huge pages within size" in state.note
    point, fstype, options, source = mounted_fs(unmounted_dir)
    assert (point, fstype, source) == (unmounted_dir, "tmpfs", "uballoon")
    assert "huge=within_size" in options and "mode=700" in options
    state.lock()
    with pytest.raises(PolicyError, match=f"pid {os.getpid()}"):
        StateDir(unmounted_dir).lock()
    (unmounted_dir / "chunk-00000001").write_bytes(b"x")
    assert state.close() is False  # a chunk is left: stays mounted
    assert mounted_fs(unmounted_dir).point == unmounted_dir
    (unmounted_dir / "chunk-00000001").unlink()
    again = StateDir.prepare(unmounted_dir, 64 * MiB)  # already mounted: used as it is
    assert again.mounted_here and "by an earlier agent" in again.note  # ours to unmount
    assert again.close() is True
    assert mounted_fs(unmounted_dir).point != unmounted_dir


def test_state_dir_falls_back_when_mounting_is_not_allowed(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to drop CAP_SYS_ADMIN")
    fallback = Path(tempfile.mkdtemp(prefix="uballoon-test-", dir="/dev/shm")) / "balloon"
    code = (
        "import sys; from pathlib import Path; from guest_agent.pool import StateDir\n"
        "s = StateDir.prepare(Path(sys.argv[1]), 1 << 26, fallback=Path(sys.argv[2]))\n"
        "print(s.path); print(s.note)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(
            [setpriv, "--bounding-set", "-sys_admin", sys.executable, "-c", code,
             str(tmp_path / "state"), str(fallback)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        path, note = done.stdout.splitlines()
        assert Path(path) == fallback
        assert note.startswith("cannot mount a tmpfs at") and "/dev/shm" in note
        assert fallback.stat().st_mode & 0o777 == 0o700
        assert mounted_fs(tmp_path / "state").point != tmp_path / "state"
    finally:
        shutil.rmtree(fallback.parent)


def test_release_drops_every_chunk_and_stops_the_holder(state_dir: Path) -> None:
    pool = PagePool(state_dir, HolderClient.connect(state_dir))
    chunks = [pool.pin(4 * MiB), pool.pin(2 * MiB)]
    holder = holder_pid(state_dir)
    pool.close()  # the agent died
    count, total, stopped = release_state_dir(state_dir)
    assert (count, total, stopped) == (2, 6 * MiB, True)
    assert [n for n in os.listdir(state_dir) if n.startswith(("chunk", "holder"))] == []
    assert holder_pid(state_dir) is None
    assert wait_holder_gone(state_dir, holder)  # the process has exited, too
    for chunk in chunks:
        native.release(chunk.address, chunk.size_bytes)
