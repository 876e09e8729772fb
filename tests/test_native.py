"""native/: real pages, real pins, real page tables.

Every test maps, locks and pins real memory of this process (a few MiB each) and
checks the result against what the kernel reports about it: VmLck in
/proc/self/status, VmFlags in /proc/self/smaps, /proc/self/pagemap, and a second
process that maps the same tmpfs file.  Nothing is mocked.  Tests that need a
privilege this process lacks (CAP_SYS_ADMIN to see frame numbers, CAP_IPC_LOCK or a
large RLIMIT_MEMLOCK to lock) are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import native
from protocol.errors import NativeError
from protocol.ranges import RangeSet

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _can_lock(size: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return bool(_capabilities() >> 14 & 1) or soft == resource.RLIM_INFINITY or soft >= size


needs_pfns = pytest.mark.skipif(
    not _capabilities() >> 21 & 1, reason="reading PFNs needs CAP_SYS_ADMIN"
)
needs_lock = pytest.mark.skipif(
    not _can_lock(128 * MiB), reason="needs CAP_IPC_LOCK or RLIMIT_MEMLOCK >= 128 MiB"
)


def vm_locked_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmLck in /proc/self/status")


def vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that starts at ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == address
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping starts at {address:#x}")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# -- tmpfs ----------------------------------------------------------------------------


class Tmpfs:
    """A fresh private tmpfs mount (or a directory in /dev/shm where mounting fails)."""

    def __init__(self, root: Path, size: int, huge: str) -> None:
        self.path = root / f"tmpfs-{huge}"
        self.path.mkdir()
        options = f"size={size},huge={huge},mode=0700"
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "uballoon-test", str(self.path)],
            capture_output=True,
        )
        self.mounted = mounted.returncode == 0
        if not self.mounted:
            self.path.rmdir()
            self.path = Path(tempfile.mkdtemp(prefix="uballoon-test-", dir="/dev/shm"))

    def create(self, name: str, size: int) -> int:
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.posix_fallocate(fd, 0, size)
        return fd

    def close(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(self.path)], check=True)
            self.path.rmdir()
        else:
            shutil.rmtree(self.path)


@pytest.fixture(params=["within_size", "never"])
def tmpfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tmpfs]:
    mount = Tmpfs(tmp_path, 256 * MiB, request.param)
    try:
        yield mount
    finally:
        mount.close()


class Chunk:
    """A mapped chunk, released on exit whatever happened to it."""

    def __init__(self, address: int, size: int, fd: int | None = None) -> None:
        self.address, self.size, self.fd = address, size, fd
        self.ring: int | None = None

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ring is not None:
            native.unpin(self.ring)
        native.release(self.address, self.size)
        if self.fd is not None:
            os.close(self.fd)

    def pin(self) -> int:
        self.ring = native.pin_long_term(self.address, self.size)
        return self.ring


def anonymous(size: int, huge: bool = False) -> Chunk:
    return Chunk(native.map_anonymous(size, huge), size)


def page_addresses(chunk: Chunk) -> np.ndarray:
    return chunk.address + np.arange(0, chunk.size, native.PAGE_SIZE, dtype=np.uint64)


def shared(mount: Tmpfs, name: str, size: int) -> Chunk:
    fd = mount.create(name, size)
    return Chunk(native.map_shared(fd, size), size, fd)


# -- locking ---------------------------------------------------------------------------


@needs_lock
@pytest.mark.parametrize("huge", [False, True])
def test_lock_anonymous_shows_in_vmlck_until_release(huge: bool) -> None:
    size = 16 * MiB
    before = vm_locked_bytes()
    with anonymous(size, huge) as chunk:
        assert vm_locked_bytes() == before
        native.lock(chunk.address, size)
        assert vm_locked_bytes() == before + size
        assert native.missing_pages(chunk.address, size) == 0
    assert vm_locked_bytes() == before


@needs_lock
def test_lock_tmpfs_file_shows_in_vmlck_until_release(tmpfs: Tmpfs) -> None:
    size = 16 * MiB
    before = vm_locked_bytes()
    with shared(tmpfs, "chunk", size) as chunk:
        native.lock(chunk.address, size)
        assert vm_locked_bytes() == before + size
        assert native.missing_pages(chunk.address, size) == 0
    assert vm_locked_bytes() == before
    # The pages belong to the file, not to the process: they are still there.
    assert (tmpfs.path / "chunk").stat().st_blocks * 512 == size


def test_huge_chunks_are_aligned_to_huge_pages(tmp_path: Path) -> None:
    huge_page = 2 * MiB
    with anonymous(8 * MiB, huge=True) as chunk:
        assert chunk.address % huge_page == 0
        assert "hg" in vm_flags(chunk.address)
    with anonymous(8 * MiB, huge=False) as chunk:
        assert "nh" in vm_flags(chunk.address)
    mount = Tmpfs(tmp_path, 64 * MiB, "within_size")
    try:
        with shared(mount, "chunk", 8 * MiB) as chunk:
            assert chunk.address % huge_page == 0
    finally:
        mount.close()


def test_advise_sets_vm_flags() -> None:
    with anonymous(4 * MiB) as chunk:
        native.advise(chunk.address, chunk.size, native.DONTDUMP, native.DONTFORK)
        flags = vm_flags(chunk.address)
        assert {"dd", "dc"} <= flags
        native.advise(chunk.address, chunk.size, native.HUGEPAGE)
        assert "hg" in vm_flags(chunk.address)


@needs_lock
def test_lock_past_a_full_tmpfs_names_the_cause(tmp_path: Path) -> None:
    mount = Tmpfs(tmp_path, 4 * MiB, "never")
    try:
        if not mount.mounted:
            pytest.skip("cannot mount a tmpfs of limited size here")
        fd = os.open(mount.path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 8 * MiB)  # twice what the mount can hold
        with Chunk(native.map_shared(fd, 8 * MiB), 8 * MiB, fd) as chunk:
            with pytest.raises(NativeError, match="tmpfs mount is full") as info:
                native.lock(chunk.address, chunk.size)
            assert info.value.errno == errno.EFAULT
            assert "pages missing" in str(info.value)
    finally:
        mount.close()


def test_lock_over_rlimit_memlock_names_the_limit() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_IPC_LOCK in a child")
    code = (
        "import errno, resource, native\n"
        "from protocol.errors import NativeError\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))\n"
        "a = native.map_anonymous(4 << 20, False)\n"
        "try:\n"
        "    native.lock(a, 4 << 20)\n"
        "except NativeError as e:\n"
        "    assert e.errno == errno.ENOMEM, e.errno\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('locked past the limit')\n"
    )
    result = subprocess.run(
        [setpriv, "--bounding-set", "-ipc_lock", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "RLIMIT_MEMLOCK is 1048576 bytes" in result.stdout
    assert "CAP_IPC_LOCK" in result.stdout


def test_lock_of_an_unmapped_span_says_so() -> None:
    address = native.map_anonymous(4 * MiB, False)
    native.release(address, 4 * MiB)
    with pytest.raises(NativeError, match="not mapped") as info:
        native.lock(address, 4 * MiB)
    assert info.value.errno == errno.ENOMEM


# -- frames ----------------------------------------------------------------------------


@needs_lock
@needs_pfns
@pytest.mark.parametrize("huge", [False, True])
def test_read_ranges_equals_the_pfns_it_merges(huge: bool) -> None:
    size = 64 * MiB
    with anonymous(size, huge) as chunk:
        native.lock(chunk.address, size)
        chunk.pin()
        ranges = native.read_ranges(chunk.address, size)
        pfns = native.read_pfns(chunk.address, size)
        assert pfns.dtype == np.uint64 and pfns.size == size // native.PAGE_SIZE
        assert ranges == RangeSet.from_pfns(pfns)  # also: no frame appears twice
        assert ranges.num_pages == size // native.FRAME_SIZE
        assert 0 not in ranges
        # Pinned and locked: reading again gives the same frames.
        assert np.array_equal(native.read_pfns(chunk.address, size), pfns)


@needs_lock
@needs_pfns
def test_tmpfs_chunk_pins_and_reads(tmpfs: Tmpfs) -> None:
    size = 32 * MiB
    with shared(tmpfs, "chunk", size) as chunk:
        native.lock(chunk.address, size)
        native.advise(chunk.address, size, native.DONTDUMP)
        chunk.pin()
        ranges = native.read_ranges(chunk.address, size)
        assert ranges == RangeSet.from_pfns(native.read_pfns(chunk.address, size))
        assert ranges.num_pages == size // native.FRAME_SIZE


@needs_pfns
def test_frames_of_unlocked_pages_are_refused() -> None:
    with anonymous(4 * MiB) as chunk:
        with pytest.raises(NativeError, match="1024 of 1024 pages are not present") as info:
            native.read_ranges(chunk.address, chunk.size)
        assert info.value.errno == 0
        with pytest.raises(NativeError, match="not present"):
            native.read_pfns(chunk.address, chunk.size)


@needs_lock
@needs_pfns
def test_a_span_that_maps_one_page_twice_is_refused() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    page = native.PAGE_SIZE
    fd = os.memfd_create("uballoon-test")
    os.ftruncate(fd, page)
    with Chunk(native.map_anonymous(2 * page, False), 2 * page, fd) as chunk:
        for i in range(2):  # the same file page at both addresses
            at = libc.mmap(
                chunk.address + i * page,
                page,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | 0x10,  # MAP_FIXED
                fd,
                0,
            )
            assert at == chunk.address + i * page, ctypes.get_errno()
        native.lock(chunk.address, chunk.size)
        pfns = native.read_pfns(chunk.address, chunk.size)
        assert pfns[0] == pfns[1]
        with pytest.raises(NativeError, match="same page twice") as info:
            native.read_ranges(chunk.address, chunk.size)
        assert info.value.errno == errno.EEXIST


@needs_lock
def test_hidden_frame_numbers_are_an_error_not_pfn_zero() -> None:
    """Without CAP_SYS_ADMIN the kernel reports PFN 0 for every page."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not _capabilities() >> 21 & 1 or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_SYS_ADMIN in a child")
    code = (
        "import errno, native\n"
        "from protocol.errors import NativeError\n"
        "a = native.map_anonymous(1 << 20, False)\n"
        "native.lock(a, 1 << 20)\n"
        "try:\n"
        "    native.read_ranges(a, 1 << 20)\n"
        "except NativeError as e:\n"
        "    assert e.errno == errno.EPERM, e.errno\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('frames were readable')\n"
    )
    result = subprocess.run(
        [setpriv, "--bounding-set", "-sys_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "CAP_SYS_ADMIN" in result.stdout


@needs_lock
@needs_pfns
def test_second_process_sees_the_same_frames_of_a_tmpfs_chunk(tmpfs: Tmpfs) -> None:
    size = 16 * MiB
    code = (
        "import os, sys, native\n"
        "size = int(sys.argv[2])\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "a = native.map_shared(fd, size)\n"
        "native.lock(a, size)\n"
        "sys.stdout.buffer.write(native.read_pfns(a, size).tobytes())\n"
    )
    with shared(tmpfs, "chunk", size) as chunk:
        native.lock(chunk.address, size)
        chunk.pin()
        ours = native.read_pfns(chunk.address, size)
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmpfs.path / "chunk"), str(size)],
            capture_output=True,
            env=subprocess_env(),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
        theirs = np.frombuffer(result.stdout, dtype=np.uint64)
        assert np.array_equal(ours, theirs)


# -- long-term pin ---------------------------------------------------------------------


@needs_lock
@needs_pfns
def test_pinned_pages_survive_move_pages_to_their_node() -> None:
    size = 4 * MiB
    with anonymous(size) as chunk:
        native.lock(chunk.address, size)
        chunk.pin()
        before = native.read_ranges(chunk.address, size)
        addresses = page_addresses(chunk)
        where = native.move_pages(0, addresses)
        assert where.shape == addresses.shape
        assert set(where.tolist()) <= set(native.numa_nodes())
        statuses = native.move_pages(0, addresses, where)
        assert np.array_equal(statuses, where)
        assert native.read_ranges(chunk.address, size) == before


@contextlib.contextmanager
def sysctl(path: str, value: str) -> Iterator[None]:
    """Set a /proc/sys file for the duration, and restore it."""
    knob = Path(path)
    if not knob.exists():
        yield
        return
    old = knob.read_text().strip()
    knob.write_text(value)
    try:
        yield
    finally:
        knob.write_text(old)


@needs_lock
@needs_pfns
@pytest.mark.skipif(len(native.numa_nodes()) < 2, reason="needs two NUMA nodes")
def test_pinned_pages_do_not_migrate_but_locked_ones_do() -> None:
    size = 4 * MiB
    # Automatic NUMA balancing makes the PTEs of (unpinned) pages PROT_NONE now and
    # then, and move_pages reports such pages as -ENOENT; keep it out of the way.
    with sysctl("/proc/sys/kernel/numa_balancing", "0"):
        with anonymous(size) as pinned, anonymous(size) as locked:
            native.lock(pinned.address, size)
            pinned.pin()
            native.lock(locked.address, size)  # after the sysctl: no PROT_NONE PTEs left
            home = int(native.move_pages(0, page_addresses(pinned))[0])
            other = next(n for n in native.numa_nodes() if n != home)
            frames = native.read_ranges(pinned.address, size)
            statuses = native.move_pages(0, page_addresses(pinned), other)
            assert not (statuses == other).any()
            assert native.read_ranges(pinned.address, size) == frames
            # mlock alone does not stop migration: the reason the pin exists.
            before = native.read_pfns(locked.address, size)
            were_elsewhere = native.move_pages(0, page_addresses(locked)) != other
            statuses = native.move_pages(0, page_addresses(locked), other)
            assert (statuses == other).all(), np.unique(statuses, return_counts=True)
            after = native.read_pfns(locked.address, size)
            assert were_elsewhere.any()
            assert (after != before)[were_elsewhere].all()


def test_move_pages_reports_an_offline_node() -> None:
    with anonymous(1 * MiB) as chunk:
        native.lock(chunk.address, chunk.size)
        with pytest.raises(NativeError, match="not online") as info:
            native.move_pages(0, [chunk.address], max(native.numa_nodes()) + 1)
        assert info.value.errno == errno.ENODEV


@needs_lock
def test_pin_refuses_a_disk_file_mapping_with_a_hint(tmp_path: Path) -> None:
    directory = _disk_directory(tmp_path)
    if directory is None:
        pytest.skip("no directory on a disk file system here")
    path = directory / f"uballoon-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 * MiB)
        with Chunk(native.map_shared(fd, 1 * MiB), 1 * MiB) as chunk:
            native.lock(chunk.address, chunk.size)
            with pytest.raises(NativeError, match="tmpfs") as info:
                native.pin_long_term(chunk.address, chunk.size)
            assert info.value.errno in (errno.EFAULT, errno.EOPNOTSUPP)
    finally:
        os.close(fd)
        path.unlink()


def test_pin_refuses_unmapped_and_read_only_spans() -> None:
    address = native.map_anonymous(1 * MiB, False)
    native.release(address, 1 * MiB)
    with pytest.raises(NativeError, match="not all mapped read-write") as info:
        native.pin_long_term(address, 1 * MiB)
    assert info.value.errno == errno.EFAULT

    read_only = mmap.mmap(-1, 1 * MiB, prot=mmap.PROT_READ)
    view = np.frombuffer(read_only, dtype=np.uint8)
    try:
        with pytest.raises(NativeError, match="IORING_REGISTER_BUFFERS") as info:
            native.pin_long_term(int(view.ctypes.data), 1 * MiB)
        assert info.value.errno == errno.EFAULT
    finally:
        del view
        read_only.close()


def registered_buffers(ring: int) -> list[tuple[int, int]]:
    """(address, length) of each fixed buffer of ``ring``, from its fdinfo."""
    buffers = []
    for line in Path(f"/proc/self/fdinfo/{ring}").read_text().splitlines():
        head, _, rest = line.strip().partition(": ")
        if head.isdigit() and "/" in rest:
            address, length = rest.split("/")
            buffers.append((int(address, 16), int(length)))
    return buffers


@needs_lock
@needs_pfns
def test_pin_registers_one_buffer_per_step() -> None:
    """Chunks over 1 GiB need several buffers; the split is the same arithmetic at
    any buffer size, so check it on 8 MiB + 4 KiB in 1 MiB buffers."""
    size = 8 * MiB + native.PAGE_SIZE
    with anonymous(size) as chunk:
        native.lock(chunk.address, size)
        ring = chunk.pin()
        assert registered_buffers(ring) == [(chunk.address, size)]
        native.unpin(ring)
        chunk.ring = None
        ring = native.pin_long_term(chunk.address, size, buffer_bytes=MiB)
        chunk.ring = ring
        expected = [(chunk.address + i * MiB, MiB) for i in range(8)]
        expected.append((chunk.address + 8 * MiB, native.PAGE_SIZE))
        assert registered_buffers(ring) == expected
        assert native.read_ranges(chunk.address, size).num_pages == size // native.FRAME_SIZE


@needs_lock
def test_a_holder_process_keeps_the_pin_after_we_let_go() -> None:
    """The pin belongs to the ring, not to the mapping or to this process: a holder
    takes the ring with take_fd, we unmap the span and close our fd, and the holder
    still has the buffer registered until it unpins."""
    size = 4 * MiB
    chunk = anonymous(size)
    native.lock(chunk.address, size)
    ring = chunk.pin()
    code = (
        "import socket, sys\n"
        "import native\n"
        "from pathlib import Path\n"
        "sock = socket.socket(fileno=int(sys.argv[1]))\n"
        "fd = native.take_fd(int(sys.argv[2]), int(sys.argv[3]))\n"
        "sock.sendall(b'taken')\n"
        "assert sock.recv(6) == b'closed'\n"
        "info = Path(f'/proc/self/fdinfo/{fd}').read_text()\n"
        "assert f'{int(sys.argv[4]):#x}/{int(sys.argv[5])}' in info, info\n"
        "native.unpin(fd)\n"
        "sock.sendall(b'ok')\n"
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        argv = [str(theirs.fileno()), str(os.getpid()), str(ring), str(chunk.address), str(size)]
        child = subprocess.Popen(
            [sys.executable, "-c", code, *argv], pass_fds=[theirs.fileno()], env=subprocess_env()
        )
        theirs.close()
        try:
            ours.settimeout(60)
            assert ours.recv(5) == b"taken"
            native.release(chunk.address, size)
            os.close(ring)
            ours.sendall(b"closed")
            assert ours.recv(2) == b"ok"
        finally:
            assert child.wait(timeout=60) == 0


def test_take_fd_names_the_cause_of_failure() -> None:
    with pytest.raises(NativeError, match="has no fd") as info:
        native.take_fd(os.getpid(), 100_000)
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="pid must be positive"):
        native.take_fd(0, 1)


def test_unpin_refuses_an_fd_that_is_not_a_ring(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(NativeError, match="not an io_uring ring") as info:
            native.unpin(fd)
        assert info.value.errno == errno.EOPNOTSUPP
        os.fstat(fd)  # still open: it was not ours to close
    finally:
        os.close(fd)
    with pytest.raises(NativeError, match="not open") as info:
        native.unpin(fd)
    assert info.value.errno == errno.EBADF


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -4096, 1000, 4097, 2 * MiB + 1])
def test_bad_sizes_are_refused_before_any_system_call(size: int) -> None:
    with pytest.raises(ValueError, match="size_bytes must be a positive multiple"):
        native.map_anonymous(size, False)
    with pytest.raises(ValueError, match="size_bytes must be a positive multiple"):
        native.lock(2 * MiB, size)
    with pytest.raises(ValueError, match="size_bytes must be a positive multiple"):
        native.read_ranges(2 * MiB, size)


@pytest.mark.parametrize("address", [0, -4096, 4095, 2 * MiB + 8])
def test_bad_addresses_are_refused(address: int) -> None:
    for call in (native.lock, native.pin_long_term, native.read_pfns, native.release):
        with pytest.raises(ValueError, match="address must be a positive multiple"):
            call(address, 4096)


def test_wrong_types_and_contradictions_are_refused() -> None:
    with pytest.raises(TypeError, match="size_bytes must be an int"):
        native.map_anonymous(4096.0, False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="size_bytes must be an int"):
        native.map_anonymous(True, False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fd must be a non-negative"):
        native.map_shared(-1, 4096)
    with pytest.raises(ValueError, match="offset must be a non-negative multiple"):
        native.map_shared(0, 4096, offset=100)
    with pytest.raises(ValueError, match="ring_fd must be a non-negative"):
        native.unpin(-1)
    with pytest.raises(ValueError, match="contradict"):
        native.advise(2 * MiB, 4096, native.HUGEPAGE, native.NOHUGEPAGE)
    with pytest.raises(TypeError, match="native.Advice"):
        native.advise(2 * MiB, 4096, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 16384 buffers"):
        native.pin_long_term(2 * MiB, native.MAX_PIN_BYTES + native.PAGE_SIZE)
    with pytest.raises(ValueError, match="buffer_bytes must be"):
        native.pin_long_term(2 * MiB, 4096, buffer_bytes=2 * native.MAX_BUFFER_BYTES)
    with pytest.raises(ValueError, match="2 target nodes for 1 addresses"):
        native.move_pages(0, [2 * MiB], [0, 0])


def test_map_shared_of_a_read_only_fd_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(NativeError, match="O_RDWR") as info:
            native.map_shared(fd, 4096)
        assert info.value.errno == errno.EACCES
    finally:
        os.close(fd)


def _disk_directory(tmp_path: Path) -> Path | None:
    """A writable directory on a file system whose page cache cannot be pinned."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mounts.append((fields[1], fields[2]))
    # Only file systems known to need dirty tracking: an overlay or 9p mount may
    # well keep its files on tmpfs, whose pages can be pinned.
    disk = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs"}
    for candidate in (tmp_path, REPO, Path("/var/tmp")):
        resolved = str(candidate.resolve())
        best = max(
            (m for m in mounts if resolved == m[0] or resolved.startswith(m[0].rstrip("/") + "/")),
            key=lambda m: len(m[0]),
            default=None,
        )
        if best and best[1] in disk and os.access(candidate, os.W_OK):
            return candidate
    return None
