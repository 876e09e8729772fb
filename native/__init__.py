"""uballoon's native core: balloon chunks of real, pinned pages.

Theory of operation
-------------------
A balloon chunk is a page-aligned span of this process's memory whose frames the
guest agent reports to the host.  The host zeroes exactly the frames it is told,
so a reported frame must stay the chunk's until the host lets go of it.  The agent
drives a chunk through these steps, one call each (each call does its whole page
loop in C, with the GIL released, so the agent runs the long ones through
``trio.to_thread.run_sync``)::

    map_shared(fd, size) / map_anonymous(size, huge)   a span of address space
    lock(address, size)          populate every page writable, mlock, check all present
    advise(address, size, ...)   DONTDUMP, DONTFORK, (NO)HUGEPAGE
    pin_long_term(address, size) -> ring_fd    io_uring fixed buffers: a FOLL_LONGTERM
                                 pin, so the kernel will not migrate the frames
    read_ranges(address, size) -> RangeSet     the frames, read after pinning
    ...                          (a holder process may take the ring with take_fd;
                                 the pin lives as long as any process holds the
                                 ring, whether or not the span is still mapped)
    unpin(ring_fd); release(address, size)

Linux refuses io_uring fds in SCM_RIGHTS messages, so a ring cannot be sent over
a Unix socket; ``take_fd`` (pidfd_getfd) pulls it across instead.

Only this module touches cffi's ``lib``/``ffi``.  It takes and returns plain Python
values (ints, numpy arrays, ``RangeSet``), checks its arguments (``ValueError`` or
``TypeError`` for a bad one, before any system call), and turns every failure of
the kernel into ``protocol.errors.NativeError`` whose ``errno`` is the OS error
and whose message says what to do about it.

Page frame numbers in a ``RangeSet`` are 4 KiB frames (the wire's unit, whatever
the page size); ``read_pfns`` returns the kernel's PFNs, in ``PAGE_SIZE`` units.
"""

from __future__ import annotations

import enum
import errno
import os
import resource
from collections.abc import Iterable
from typing import Any

import numpy as np

from native._native import ffi, lib
from protocol.errors import NativeError
from protocol.ranges import RangeSet

__all__ = [
    "PAGE_SIZE",
    "FRAME_SIZE",
    "MAX_PIN_BYTES",
    "MAX_BUFFER_BYTES",
    "Advice",
    "DONTDUMP",
    "NOHUGEPAGE",
    "HUGEPAGE",
    "DONTFORK",
    "map_anonymous",
    "map_shared",
    "lock",
    "missing_pages",
    "advise",
    "pin_long_term",
    "unpin",
    "take_fd",
    "read_ranges",
    "read_pfns",
    "release",
    "move_pages",
    "numa_nodes",
    "punch_holes",
    "ranges_with_data",
]

PAGE_SIZE: int = int(lib.ub_page_size())
"""The kernel's base page size; every span is a whole number of these."""

FRAME_SIZE = 4096
"""The unit of the PFNs in a ``RangeSet`` (virtio's 4 KiB, whatever PAGE_SIZE is)."""

_MAX_BUFFERS = 16384
MAX_BUFFER_BYTES = 1 << 30
MAX_PIN_BYTES = _MAX_BUFFERS * MAX_BUFFER_BYTES
"""io_uring takes at most 16384 fixed buffers of at most 1 GiB each per ring."""

_CAP_IPC_LOCK = 14
_EHWPOISON = getattr(errno, "EHWPOISON", 133)  # not in every Python's errno module


class Advice(enum.IntFlag):
    """What ``advise`` may tell the kernel about a chunk."""

    DONTDUMP = lib.UB_ADVISE_DONTDUMP  # no core dump of it (a dump would touch it all)
    NOHUGEPAGE = lib.UB_ADVISE_NOHUGEPAGE  # 4 KiB pages only; khugepaged keeps away
    HUGEPAGE = lib.UB_ADVISE_HUGEPAGE  # transparent huge pages wanted
    DONTFORK = lib.UB_ADVISE_DONTFORK  # fork() must not copy it (pinned anonymous pages
    #                                    would be copied in full)


DONTDUMP = Advice.DONTDUMP
NOHUGEPAGE = Advice.NOHUGEPAGE
HUGEPAGE = Advice.HUGEPAGE
DONTFORK = Advice.DONTFORK


# -- argument checks -------------------------------------------------------------------


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)


def _check_size(size_bytes: Any) -> int:
    size = _as_int(size_bytes, "size_bytes")
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(
            f"size_bytes must be a positive multiple of the page size ({PAGE_SIZE}), got {size}"
        )
    if size >= 1 << 63:
        raise ValueError(f"size_bytes {size} is larger than any address space")
    return size


def _check_span(address: Any, size_bytes: Any) -> tuple[int, int]:
    addr = _as_int(address, "address")
    size = _check_size(size_bytes)
    if addr <= 0 or addr % PAGE_SIZE:
        raise ValueError(f"address must be a positive multiple of {PAGE_SIZE}, got {addr:#x}")
    if addr + size > 1 << 64:
        raise ValueError(f"span {addr:#x} + {size} runs past the end of the address space")
    return addr, size


def _check_fd(fd: Any, name: str = "fd") -> int:
    value = _as_int(fd, name)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative file descriptor, got {value}")
    return value


# -- error messages --------------------------------------------------------------------


def _errname(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def _fail(what: str, err: int, hint: str = "") -> NativeError:
    message = f"{what}: {os.strerror(err)} ({_errname(err)})"
    if hint:
        message += f". {hint}"
    return NativeError(message, err)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _has_capability(bit: int) -> bool:
    status = _read_text("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _meminfo_kib(field: str) -> int | None:
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _locked_bytes() -> int:
    for line in (_read_text("/proc/self/status") or "").splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def _memlock_hint(size: int) -> str:
    """Why locking or pinning ``size`` more bytes may have run out of limit or memory."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if (
        not _has_capability(_CAP_IPC_LOCK)
        and soft != resource.RLIM_INFINITY
        and _locked_bytes() + size > soft
    ):
        return (
            f"RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK: raise the "
            "limit (ulimit -l, LimitMEMLOCK= in a systemd unit) or grant CAP_IPC_LOCK"
        )
    reasons = ["The guest is out of memory for it"]
    available = _meminfo_kib("MemAvailable")
    if available is not None:
        reasons[0] += f" (MemAvailable {available * 1024} bytes, chunk {size})"
    if _read_text("/proc/sys/vm/overcommit_memory") == "2":
        reasons.append("vm.overcommit_memory=2 (strict) refuses memory past CommitLimit")
    reasons.append("a cgroup memory limit (memory.max, memory.limit_in_bytes) was reached")
    return "; or ".join(reasons) + "; a smaller chunk may still fit"


# -- mapping ---------------------------------------------------------------------------


def map_anonymous(size_bytes: int, huge: bool) -> int:
    """Map ``size_bytes`` of private anonymous memory (not yet populated); return its address.

    ``huge=True`` aligns the span to the huge page size and applies MADV_HUGEPAGE;
    ``huge=False`` applies MADV_NOHUGEPAGE, so the chunk stays in 4 KiB pages even
    where THP is ``always``.  Anonymous memory dies with the process: use it for
    benchmarks and floors, not for pages the host may still punch.

    Raises ValueError/TypeError for a bad size, NativeError if mmap or madvise fails.
    """
    size = _check_size(size_bytes)
    out = ffi.new("uint64_t *")
    rc = lib.ub_map_anonymous(size, 1 if huge else 0, out)
    if rc:
        hint = ""
        if -rc == errno.ENOMEM:
            hint = "No address space or commit charge left. " + _memlock_hint(size)
        elif -rc == errno.EINVAL and huge:
            hint = "This kernel has no transparent huge pages (CONFIG_TRANSPARENT_HUGEPAGE)"
        raise _fail(f"mapping {size} bytes of anonymous memory failed", -rc, hint)
    return int(out[0])


def map_shared(fd: int, size_bytes: int, offset: int = 0, *, huge: bool | None = None) -> int:
    """Map ``size_bytes`` of the file ``fd`` from ``offset`` read-write and shared; return
    the address.

    The file must already be that long (``os.ftruncate`` it; ``lock`` then
    allocates the pages into the file, so a tmpfs file's pages outlive this
    process).  The span is placed so that huge pages of a
    tmpfs ``huge=`` mount can be mapped whole.  ``huge=True`` applies
    MADV_HUGEPAGE (needed on ``huge=advise`` mounts), ``huge=False`` MADV_NOHUGEPAGE,
    ``None`` leaves the mount's policy alone.

    Raises ValueError/TypeError for bad arguments, NativeError if mmap fails (EACCES:
    the fd is not open read-write; ENODEV: the file system cannot be mapped).
    """
    fd = _check_fd(fd)
    size = _check_size(size_bytes)
    off = _as_int(offset, "offset")
    if off < 0 or off % PAGE_SIZE:
        raise ValueError(f"offset must be a non-negative multiple of {PAGE_SIZE}, got {off}")
    out = ffi.new("uint64_t *")
    rc = lib.ub_map_shared(fd, size, off, -1 if huge is None else int(bool(huge)), out)
    if rc:
        hints = {
            errno.EACCES: "The file must be opened read-write (O_RDWR) for a shared mapping",
            errno.EBADF: "The fd is not open",
            errno.ENODEV: "This file system does not support mmap",
            errno.ENOMEM: "No address space left for it",
            errno.EINVAL: "Check the offset, and for hugetlbfs that the size and offset "
            "are multiples of its huge page size",
        }
        raise _fail(
            f"mapping {size} bytes of fd {fd} at offset {off} failed", -rc, hints.get(-rc, "")
        )
    return int(out[0])


# -- locking ---------------------------------------------------------------------------


def lock(address: int, size_bytes: int) -> None:
    """Populate every page of the span writable, mlock it, and check all pages are present.

    (mlock2 MLOCK_ONFAULT + MADV_POPULATE_WRITE, falling back to mlock on old kernels;
    then mincore.)  On failure the span may be partly populated and locked; the
    caller releases it.

    Raises ValueError/TypeError for a bad span; NativeError naming how many pages
    are missing and why: ENOMEM/EAGAIN/EPERM (RLIMIT_MEMLOCK without CAP_IPC_LOCK,
    out of memory, strict overcommit, a cgroup limit), EFAULT (a page would have
    raised SIGBUS: the file is shorter than the span or its tmpfs is full),
    or errno 0 when the calls succeeded yet pages are missing.
    """
    addr, size = _check_span(address, size_bytes)
    missing = ffi.new("uint64_t *")
    step = ffi.new("int *")
    rc = lib.ub_lock(addr, size, missing, step)
    pages = size // PAGE_SIZE
    what = f"locking {size} bytes at {addr:#x}"
    if rc:
        err = -rc
        call = {1: "mlock2", 2: "MADV_POPULATE_WRITE", 3: "mlock"}.get(step[0], "mincore")
        where = f"{what} failed in {call} with {missing[0]} of {pages} pages missing"
        if err == errno.ENOMEM and _unmapped(addr, size):
            hint = "Part of the span is not mapped"
        elif err in (errno.ENOMEM, errno.EAGAIN, errno.EPERM):
            hint = _memlock_hint(size)
        elif err == errno.EFAULT:
            hint = (
                "A page could not be faulted in (it would have raised SIGBUS): the file "
                "is shorter than the span (ftruncate it first), or its tmpfs mount is "
                "full (its size= option)"
            )
        elif err == _EHWPOISON:
            hint = "A page hit a hardware memory error"
        elif err == errno.EINVAL:
            hint = "The span is not ordinary memory (VM_IO/VM_PFNMAP) or not mapped"
        else:
            hint = ""
        raise _fail(where, err, hint)
    if missing[0]:
        raise NativeError(
            f"{what}: the calls succeeded but {missing[0]} of {pages} pages are not "
            f"present. {_memlock_hint(size)}",
            0,
        )


def _unmapped(addr: int, size: int) -> bool:
    """Whether part of the span has no mapping (mincore fails with ENOMEM then)."""
    return lib.ub_count_missing(addr, size, ffi.new("uint64_t *")) == -errno.ENOMEM


def missing_pages(address: int, size_bytes: int) -> int:
    """How many pages of the span are not resident (mincore).

    Raises ValueError/TypeError for a bad span, NativeError (ENOMEM: part of the
    span is not mapped).
    """
    addr, size = _check_span(address, size_bytes)
    out = ffi.new("uint64_t *")
    rc = lib.ub_count_missing(addr, size, out)
    if rc:
        raise _fail(
            f"mincore over {size} bytes at {addr:#x} failed",
            -rc,
            "Part of the span is not mapped" if -rc == errno.ENOMEM else "",
        )
    return int(out[0])


def advise(address: int, size_bytes: int, *advice: Advice) -> None:
    """Apply each of ``advice`` (DONTDUMP, NOHUGEPAGE, HUGEPAGE, DONTFORK) to the span.

    (NO)HUGEPAGE only shapes pages faulted in later: give it before ``lock``.
    Raises ValueError/TypeError for a bad span or advice (HUGEPAGE with NOHUGEPAGE),
    NativeError naming the advice madvise refused.
    """
    addr, size = _check_span(address, size_bytes)
    flags = Advice(0)
    for item in advice:
        if not isinstance(item, Advice):
            raise TypeError(f"advice must be native.Advice values, not {item!r}")
        flags |= item
    if Advice.HUGEPAGE in flags and Advice.NOHUGEPAGE in flags:
        raise ValueError("HUGEPAGE and NOHUGEPAGE contradict each other")
    if not flags:
        return
    failed = ffi.new("unsigned int *")
    rc = lib.ub_advise(addr, size, int(flags), failed)
    if rc:
        name = Advice(failed[0]).name if failed[0] else "madvise"
        hint = ""
        if -rc == errno.EINVAL and failed[0] in (Advice.HUGEPAGE, Advice.NOHUGEPAGE):
            hint = "This kernel has no transparent huge pages"
        elif -rc == errno.ENOMEM:
            hint = "Part of the span is not mapped"
        raise _fail(f"MADV_{name} on {size} bytes at {addr:#x} failed", -rc, hint)


# -- long-term pin ---------------------------------------------------------------------


def _io_uring_setup_hint(err: int) -> str:
    if err == errno.EPERM:
        setting = _read_text("/proc/sys/kernel/io_uring_disabled")
        meaning = {
            "1": "io_uring is limited to CAP_SYS_ADMIN and kernel.io_uring_group",
            "2": "io_uring is disabled for everyone",
        }.get(setting or "", "")
        if meaning:
            return (
                f"kernel.io_uring_disabled = {setting}: {meaning}; set it to 0 to allow "
                "long-term pins (without them the host may only account, never punch)"
            )
        return (
            "io_uring is refused: a seccomp filter (container runtimes block io_uring by "
            "default) or kernel.io_uring_disabled; without it the host may only account"
        )
    if err == errno.ENOSYS:
        return (
            "This kernel has no io_uring (CONFIG_IO_URING=n) or a seccomp filter hides it; "
            "without a long-term pin the host may only account, never punch"
        )
    if err in (errno.EMFILE, errno.ENFILE):
        return "Out of file descriptors: each pinned chunk holds one ring fd (raise ulimit -n)"
    if err == errno.ENOMEM:
        return "The kernel could not allocate the ring"
    return ""


def _io_uring_register_hint(err: int, size: int) -> str:
    if err == errno.EFAULT:
        return (
            "The span is not all mapped read-write, or it maps a file the kernel will not "
            "pin long-term: only anonymous memory, tmpfs/shmem/memfd and hugetlbfs can be "
            "(a disk file system's page cache cannot)"
        )
    if err == errno.EOPNOTSUPP:
        return (
            "The kernel does not pin this kind of memory long-term: file-backed memory "
            "other than tmpfs/shmem/hugetlbfs (and, on older kernels, tmpfs too)"
        )
    if err == errno.ENOMEM:
        return "Pinned pages count against RLIMIT_MEMLOCK too. " + _memlock_hint(size)
    if err == errno.EINVAL:
        return "The span is empty, or too large for one ring"
    return ""


def pin_long_term(address: int, size_bytes: int, *, buffer_bytes: int = MAX_BUFFER_BYTES) -> int:
    """Pin the span's pages so the kernel cannot migrate them; return the ring fd.

    Registers the span as io_uring fixed buffers of ``buffer_bytes`` each (at most
    1 GiB, the kernel's limit; smaller only to test the split) on a ring of one
    entry that never carries I/O: a FOLL_LONGTERM pin.  The pin lasts while any
    process holds the ring (a holder takes it with ``take_fd``: SCM_RIGHTS refuses
    io_uring fds) or until ``unpin``; the mapping itself may go.  Lock the span first, and read its
    frames only after pinning (pinning may migrate pages out of movable zones).

    Raises ValueError/TypeError for a bad span or one over 16384 buffers
    (MAX_PIN_BYTES at 1 GiB each); NativeError with a hint: EPERM/ENOSYS (io_uring
    disabled: kernel.io_uring_disabled, seccomp), EFAULT/EOPNOTSUPP (memory the
    kernel will not pin long-term, or a span not mapped read-write), ENOMEM
    (RLIMIT_MEMLOCK, out of memory), EMFILE (out of fds).
    """
    addr, size = _check_span(address, size_bytes)
    buffer = _as_int(buffer_bytes, "buffer_bytes")
    if buffer <= 0 or buffer % PAGE_SIZE or buffer > MAX_BUFFER_BYTES:
        raise ValueError(
            f"buffer_bytes must be a positive multiple of {PAGE_SIZE} up to "
            f"{MAX_BUFFER_BYTES}, got {buffer}"
        )
    if -(-size // buffer) > _MAX_BUFFERS:
        raise ValueError(
            f"a ring pins at most {_MAX_BUFFERS} buffers of {buffer} bytes, not {size} bytes"
        )
    ring = ffi.new("int *")
    stage = ffi.new("int *")
    rc = lib.ub_pin(addr, size, buffer, ring, stage)
    if rc:
        err = -rc
        if stage[0] == lib.UB_PIN_STAGE_SETUP:
            raise _fail("io_uring_setup for a long-term pin failed", err, _io_uring_setup_hint(err))
        raise _fail(
            f"pinning {size} bytes at {addr:#x} (IORING_REGISTER_BUFFERS) failed",
            err,
            _io_uring_register_hint(err, size),
        )
    return int(ring[0])


def unpin(ring_fd: int) -> None:
    """Drop the pin held by ``ring_fd`` (IORING_UNREGISTER_BUFFERS) and close the fd.

    Other processes holding a copy of the fd lose their pin too (the pin belongs
    to the ring, not the fd).  Raises ValueError/TypeError for a negative or
    non-int fd; NativeError: EBADF (not open), EOPNOTSUPP (not an io_uring fd;
    it is left open).
    """
    fd = _check_fd(ring_fd, "ring_fd")
    rc = lib.ub_unpin(fd)
    if rc:
        hints = {
            errno.EBADF: "The fd is not open",
            errno.EOPNOTSUPP: "The fd is not an io_uring ring (left open)",
        }
        raise _fail(f"unpinning ring fd {fd} failed", -rc, hints.get(-rc, ""))


def take_fd(pid: int, fd: int) -> int:
    """Duplicate process ``pid``'s fd ``fd`` into this process (pidfd_getfd); return it.

    This is how a holder process takes over a chunk's ring so the pin outlives
    the agent: Linux refuses io_uring fds in SCM_RIGHTS messages (EINVAL, since
    6.7 and in stable kernels with the CVE-2023-6531 fix).  The new fd is
    close-on-exec.  Raises ValueError/TypeError for bad arguments; NativeError:
    EPERM (no ptrace access to ``pid``: CAP_SYS_PTRACE, or kernel.yama.ptrace_scope),
    ESRCH (no such process), EBADF (it has no such fd), ENOSYS (kernel before 5.6).
    """
    pid_value = _as_int(pid, "pid")
    if pid_value <= 0:
        raise ValueError(f"pid must be positive, got {pid_value}")
    number = _check_fd(fd)
    out = ffi.new("int *")
    rc = lib.ub_take_fd(pid_value, number, out)
    if rc:
        ptrace = _read_text("/proc/sys/kernel/yama/ptrace_scope")
        hints = {
            errno.EPERM: "Taking another process's fd needs ptrace access to it: "
            "CAP_SYS_PTRACE, or the same user"
            + (f" with kernel.yama.ptrace_scope = {ptrace} allowing it" if ptrace else ""),
            errno.ESRCH: f"No process {pid_value}",
            errno.EBADF: f"Process {pid_value} has no fd {number}",
            errno.ENOSYS: "This kernel has no pidfd_getfd (Linux 5.6+)",
        }
        raise _fail(f"taking fd {number} of process {pid_value} failed", -rc, hints.get(-rc, ""))
    return int(out[0])


# -- frames ----------------------------------------------------------------------------


def _scan_error(what: str, addr: int, rc: int, scan: Any) -> NativeError | None:
    if rc:
        err = -rc
        hint = ""
        if err in (errno.EPERM, errno.EACCES):
            hint = "Cannot read /proc/self/pagemap (is /proc mounted, and readable here?)"
        elif err == errno.ENOSPC:
            hint = "Internal error: the run buffer was too small"
        elif err == errno.EEXIST:
            hint = "The span maps the same page twice; a balloon chunk never does"
        return _fail(f"{what} failed", err, hint)
    if scan.hidden:
        return NativeError(
            f"{what}: pagemap shows PFN 0 for {scan.hidden} of {scan.pages} pages: the "
            "kernel hides page frame numbers from processes without CAP_SYS_ADMIN in the "
            "initial user namespace (a container's root is not enough); run the agent "
            "with CAP_SYS_ADMIN, or offer the host no frame numbers",
            errno.EPERM,
        )
    if scan.missing:
        first = addr + int(scan.first_bad) * PAGE_SIZE
        return NativeError(
            f"{what}: {scan.missing} of {scan.pages} pages are not present (the first at "
            f"{first:#x}); lock the span before reading its frames",
            0,
        )
    return None


def read_ranges(address: int, size_bytes: int) -> RangeSet:
    """The span's frames as a sorted ``RangeSet`` of 4 KiB frames.

    C reads /proc/self/pagemap for the span in large preads, checks every page is
    present with a nonzero PFN, collects runs of consecutive frames in address
    order, then radix-sorts and merges them.

    Raises ValueError/TypeError for a bad span; NativeError: errno EPERM when the
    kernel hides PFNs (no CAP_SYS_ADMIN), errno 0 naming how many pages are not
    present, or the errno of a failed open/pread.
    """
    addr, size = _check_span(address, size_bytes)
    pages = size // PAGE_SIZE
    starts = np.empty(pages, dtype=np.uint64)
    counts = np.empty(pages, dtype=np.uint64)
    scan = ffi.new("struct ub_scan *")
    rc = lib.ub_read_ranges(
        addr,
        size,
        ffi.from_buffer("uint64_t[]", starts, require_writable=True),
        ffi.from_buffer("uint64_t[]", counts, require_writable=True),
        pages,
        scan,
    )
    error = _scan_error(f"reading the frames of {size} bytes at {addr:#x}", addr, rc, scan)
    if error is not None:
        raise error
    runs = int(scan.runs)
    # Copies, so the page-sized scratch arrays are not kept alive by the result.
    starts, counts = starts[:runs].copy(), counts[:runs].copy()
    if PAGE_SIZE != FRAME_SIZE:
        scale = np.uint64(PAGE_SIZE // FRAME_SIZE)
        starts, counts = starts * scale, counts * scale
    # C sorted and merged them and refused overlaps.  These frames are what the host
    # will zero, so check that claim (one O(runs) pass) rather than trust it.
    ends = starts + counts
    if runs and (
        (counts == 0).any() or (ends < starts).any() or (starts[1:] < ends[:-1]).any()
        or int(counts.sum()) * FRAME_SIZE != size
    ):
        raise NativeError(
            f"the frames read for {size} bytes at {addr:#x} are not a sorted set of "
            "distinct ranges covering the span (a bug in the native scan)"
        )
    return RangeSet.from_ranges(starts, counts, assume_sorted_disjoint=True)


def read_pfns(address: int, size_bytes: int) -> np.ndarray:
    """Every page's PFN (in PAGE_SIZE units), in address order, as a uint64 array.

    For tests and verification; the same checks and errors as ``read_ranges``.
    """
    addr, size = _check_span(address, size_bytes)
    pfns = np.empty(size // PAGE_SIZE, dtype=np.uint64)
    scan = ffi.new("struct ub_scan *")
    rc = lib.ub_read_pfns(
        addr, size, ffi.from_buffer("uint64_t[]", pfns, require_writable=True), scan
    )
    error = _scan_error(f"reading the PFNs of {size} bytes at {addr:#x}", addr, rc, scan)
    if error is not None:
        raise error
    return pfns


# -- release ---------------------------------------------------------------------------


def release(address: int, size_bytes: int) -> None:
    """Unmap the span (munmap, which also unlocks it).

    Pages still pinned by a ring stay allocated until it is unpinned; a tmpfs
    file's pages stay in the file until it is truncated or removed.
    Raises ValueError/TypeError for a bad span, NativeError if munmap fails.
    """
    addr, size = _check_span(address, size_bytes)
    rc = lib.ub_release(addr, size)
    if rc:
        raise _fail(f"releasing {size} bytes at {addr:#x} failed", -rc)


# -- NUMA ------------------------------------------------------------------------------


def move_pages(
    pid: int, addresses: Iterable[int] | np.ndarray, target_nodes: Any = None
) -> np.ndarray:
    """move_pages(2) for the pages at ``addresses`` of process ``pid`` (0: this one).

    ``target_nodes`` is one node for all pages, one per page, or None to only ask
    where each page is.  Returns an int32 array, one status per page: the node the
    page is on after the call, or -errno (-ENOENT: not present, -EFAULT: not
    mapped, -EACCES: shared with other processes, -EBUSY: busy).  A page the kernel
    could not migrate (a pinned one) gets no status from it and reads -EAGAIN.

    Raises ValueError/TypeError for bad arguments; NativeError: ENOSYS (no NUMA in
    this kernel), ENODEV (node not online), EPERM (another process's pages need
    CAP_SYS_NICE), ESRCH (no such process), EACCES (node outside the cpuset).
    """
    pid_value = _as_int(pid, "pid")
    if pid_value < 0:
        raise ValueError(f"pid must be >= 0, got {pid_value}")
    addrs = np.ascontiguousarray(np.asarray(addresses, dtype=np.uint64).ravel())
    count = int(addrs.size)
    # The kernel leaves the statuses of pages it failed to migrate unwritten.
    status = np.full(count, -errno.EAGAIN, dtype=np.int32)
    if count == 0:
        return status
    nodes_ptr: Any = ffi.NULL
    nodes = None
    if target_nodes is not None:
        if isinstance(target_nodes, int | np.integer) and not isinstance(target_nodes, bool):
            nodes = np.full(count, int(target_nodes), dtype=np.int32)
        else:
            nodes = np.ascontiguousarray(np.asarray(target_nodes, dtype=np.int32).ravel())
            if nodes.size != count:
                raise ValueError(f"{nodes.size} target nodes for {count} addresses")
        if (nodes < 0).any():
            raise ValueError("a NUMA node number cannot be negative")
        nodes_ptr = ffi.from_buffer("int[]", nodes)
    rc = lib.ub_move_pages(
        pid_value,
        count,
        ffi.from_buffer("uint64_t[]", addrs),
        nodes_ptr,
        ffi.from_buffer("int[]", status, require_writable=True),
    )
    if rc < 0:
        hints = {
            errno.ENOSYS: "This kernel has no NUMA page migration (CONFIG_NUMA/MIGRATION)",
            errno.ENODEV: f"A target node is not online (online: {numa_nodes()})",
            errno.EPERM: "Moving another process's pages needs CAP_SYS_NICE",
            errno.ESRCH: f"No process {pid_value}",
            errno.EACCES: "A target node is outside this process's cpuset",
        }
        raise _fail(f"move_pages of {count} pages failed", -int(rc), hints.get(-int(rc), ""))
    return status


def numa_nodes() -> list[int]:
    """The online NUMA nodes (``[0]`` on a kernel without NUMA)."""
    text = _read_text("/sys/devices/system/node/online")
    if not text:
        return [0]
    nodes: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        nodes.extend(range(int(low), int(high or low) + 1))
    return nodes


# -- host side: freeing a guest's RAM file ---------------------------------------------


def _byte_ranges(offsets: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
    offs = np.ascontiguousarray(np.asarray(offsets, dtype=np.uint64).ravel())
    lens = np.ascontiguousarray(np.asarray(lengths, dtype=np.uint64).ravel())
    if offs.shape != lens.shape:
        raise ValueError(f"{offs.size} offsets for {lens.size} lengths")
    if (lens == 0).any():
        raise ValueError("a byte range to punch cannot be empty")
    if ((offs + lens) < offs).any():
        raise ValueError("a byte range runs past the end of a 64-bit file")
    return offs, lens


def punch_holes(fd: int, offsets: Any, lengths: Any) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)`` each byte range of the file ``fd`` (one C
    loop for all of them): its memory or blocks are freed and it reads back as zeros.

    Raises ValueError for bad ranges; NativeError naming the failing range: EOPNOTSUPP
    (the file system cannot punch holes), EBADF/EACCES (fd not open for writing),
    EINVAL (unaligned on hugetlbfs).
    """
    fd = _check_fd(fd)
    offs, lens = _byte_ranges(offsets, lengths)
    if not offs.size:
        return
    done = ffi.new("uint64_t *")
    rc = lib.ub_punch_holes(
        fd, offs.size, ffi.from_buffer("uint64_t[]", offs), ffi.from_buffer("uint64_t[]", lens),
        done,
    )
    if rc < 0:
        i = int(done[0])
        hints = {
            errno.EOPNOTSUPP: "This file system cannot punch holes (use tmpfs, hugetlbfs, "
            "ext4 or xfs for guest RAM)",
            errno.EBADF: "The RAM file must be open for writing",
            errno.EINVAL: "On hugetlbfs only whole huge pages can be punched",
        }
        raise _fail(
            f"punching {int(lens[i])} bytes at offset {int(offs[i]):#x} failed "
            f"({i} of {offs.size} ranges done)",
            -int(rc),
            hints.get(-int(rc), ""),
        )


def ranges_with_data(fd: int, offsets: Any, lengths: Any) -> np.ndarray:
    """For each byte range of file ``fd``: True if any of it is allocated (SEEK_DATA),
    False if it is all hole.  Raises NativeError if the file system cannot say."""
    fd = _check_fd(fd)
    offs, lens = _byte_ranges(offsets, lengths)
    out = np.zeros(offs.size, dtype=np.uint8)
    if not offs.size:
        return out.astype(bool)
    rc = lib.ub_ranges_with_data(
        fd, offs.size, ffi.from_buffer("uint64_t[]", offs), ffi.from_buffer("uint64_t[]", lens),
        ffi.from_buffer("uint8_t[]", out, require_writable=True),
    )
    if rc < 0:
        raise _fail("looking for data in the RAM file failed (SEEK_DATA)", -int(rc))
    return out.astype(bool)
