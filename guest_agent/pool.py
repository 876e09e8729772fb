"""The page pool: the balloon's memory, as chunk files on a private tmpfs.

Theory of operation
-------------------
The balloon is a list of chunks.  A chunk is a file in the state directory -- a
tmpfs the agent mounts (``mode=0700,huge=within_size,size=<guest RAM>``) -- so its
pages belong to the file, not to the agent: a crash or SIGKILL leaves them
allocated and owned by the balloon, never handed to another process while a
report of them may still be acted on (DESIGN.md, safety rule 2).

Pinning a chunk (``PagePool.pin``, one blocking call; the agent runs it in its
worker thread)::

    pinning-NNNNNNNN   create, set its size (ftruncate: no pages yet),
                       map MAP_SHARED, MADV_DONTDUMP|DONTFORK (+NOHUGEPAGE if 4 KiB),
                       lock (populate writable: the tmpfs allocates the pages, into
                       the file; + mlock + check every page present),
                       long-term pin by the pin holder (holder.py),
    chunk-NNNNNNNN     renamed: from here on it may have been reported,
                       frames read from pagemap *after* the pin.

A chunk whose size is a multiple of 2 MiB comes as huge pages (``within_size``);
the agent cuts a target's remainder into a separate small chunk of 4 KiB pages,
because one registration mixing the two is ~100x slower to pin.  Nothing reads or
writes a chunk's pages after they are reported.  Releasing a chunk: unpin, unmap
(munmap also unlocks), unlink -- the pages return to the guest.

Why the file's size is set and its pages are allocated by the populate, not by
``posix_fallocate``: on a ``huge=within_size`` tmpfs the page size is decided
against the file's size *before* the call (Linux 6.1), so fallocating an empty file
allocates 4 KiB pages; and a page fallocate allocated is cleared again on its first
fault anyway (tmpfs marks it not up to date).  Measured in a TCG guest (1 GiB, C):
fallocate 3.4 s then lock 4.0 s, in 4 KiB pages; sized with ftruncate, the lock
alone 4.1 s, in huge pages.  A full tmpfs fails before anything is allocated (the
size check), or cleanly during the lock (EFAULT, not SIGBUS); no memory: ENOMEM.

Invariants: a ``pinning-*`` (or ``probe-*``) file was never reported and may be
deleted at any time; a ``chunk-*`` file may have been, so only the agent core
decides when it goes.  ``NNNNNNNN`` orders chunks (deflate is LIFO) and keys the
holder's pins.  The pool is not thread-safe: one worker calls it at a time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import native
from guest_agent.holder import SOCKET_NAME, HolderClient, Pinner, holder_pid, process_alive
from protocol.errors import NativeError, PolicyError
from protocol.ranges import RangeSet
from protocol.units import format_size

__all__ = [
    "HUGE_PAGE",
    "Chunk",
    "StateDir",
    "PagePool",
    "MountInfo",
    "mounted_fs",
    "union_frames",
    "release_state_dir",
    "wait_holder_gone",
]

HUGE_PAGE = 2 << 20
_NAME_RE = re.compile(r"^(chunk|pinning|probe)-(\d{8})$")
LOCK_NAME = "agent.pid"

log = logging.getLogger("uballoon.pool")


@dataclass(eq=False)
class Chunk:
    """One pinned chunk of the balloon."""

    seq: int
    """Its number: files are ``chunk-<seq>``; higher is newer (deflated first)."""
    size_bytes: int
    huge: bool
    """Whether its pages are meant to be 2 MiB pages (size a multiple of 2 MiB)."""
    address: int
    """Where this process maps it (locked)."""
    frames: RangeSet
    """Its 4 KiB frames, read after pinning."""
    path: Path
    pin_times: dict[str, float] = field(default_factory=dict)
    """Seconds each phase of making it took (create, map, lock, pin, frames)."""
    release_times: dict[str, float] = field(default_factory=dict)
    """Seconds each phase of releasing it took (unpin, unmap, unlink)."""

    @property
    def pages(self) -> int:
        return self.size_bytes >> 12

    def __repr__(self) -> str:
        return f"Chunk({self.seq}, {format_size(self.size_bytes)}, {self.frames.num_ranges} ranges)"


def union_frames(chunks: Iterable[Chunk]) -> RangeSet:
    """All the chunks' frames as one RangeSet (one sort, not a union per chunk)."""
    sets = [c.frames for c in chunks if c.frames]
    if not sets:
        return RangeSet.empty()
    if len(sets) == 1:
        return sets[0]
    import numpy as np

    return RangeSet.from_ranges(
        np.concatenate([s.starts for s in sets]), np.concatenate([s.counts for s in sets])
    )


# -- the state directory ---------------------------------------------------------------


class MountInfo(NamedTuple):
    point: Path
    fstype: str
    options: str
    source: str


def mounted_fs(path: Path) -> MountInfo:
    """The file system holding ``path``: mount point, type, options and source."""
    target = os.path.realpath(path)
    best = MountInfo(Path("/"), "", "", "")
    best_len = -1
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            fstype, source, options = (right.split() + ["", "", ""])[:3]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            # Later lines are mounted on top of earlier ones: ">=" keeps the last.
            if inside and len(point) >= best_len:
                best, best_len = MountInfo(Path(point), fstype, options, source), len(point)
    return best


MOUNT_SOURCE = "uballoon"
"""The source name of the tmpfs the agent mounts (``mount`` shows it), so a later
agent knows the mount is its own to unmount."""


class StateDir:
    """The tmpfs where chunk files, the holder's socket and the agent's lock live."""

    def __init__(self, path: Path, *, mounted_here: bool = False, note: str = "") -> None:
        self.path = path
        self.mounted_here = mounted_here
        """True if an agent mounted the tmpfs (this one unmounts it when empty)."""
        self.note = note
        """What the operator should know about where the pages live."""
        self._lock_fd: int | None = None

    @classmethod
    def prepare(cls, path: Path, size_bytes: int, *, fallback: Path | None = None) -> StateDir:
        """Use ``path`` if it is a tmpfs mount; else mount one there; else fall back to
        a 0700 directory ``fallback`` on an existing tmpfs (and say so in ``note``).

        Raises PolicyError if none of that works.
        """
        path = Path(os.path.abspath(path))
        if fallback is not None and _has_chunks(fallback):
            return cls(fallback, note=f"reattaching to chunks left in the fallback {fallback}")
        mount = mounted_fs(path)
        if mount.point == path and mount.fstype == "tmpfs":
            ours = mount.source == MOUNT_SOURCE
            return cls(path, mounted_here=ours, note=f"using the tmpfs already mounted at {path}"
                       + (" by an earlier agent" if ours else ""))
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        errors = []
        for options in (f"mode=0700,huge=within_size,size={size_bytes}",
                        f"mode=0700,size={size_bytes}"):
            try:
                done = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", options, MOUNT_SOURCE, str(path)],
                    capture_output=True, text=True, timeout=60,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                break
            if done.returncode == 0:
                huge = "huge" in options
                return cls(path, mounted_here=True, note=(
                    f"mounted a private tmpfs at {path} ({format_size(size_bytes)}"
                    + (", huge pages within size)" if huge else ", no huge pages: this kernel "
                       "refused huge=within_size)")
                ))
            errors.append(" ".join(done.stderr.split()) or f"mount exited with {done.returncode}")
        if fallback is None:
            raise PolicyError(f"cannot mount a tmpfs at {path}: {errors[-1]}")
        if mounted_fs(fallback.parent).fstype != "tmpfs":
            raise PolicyError(
                f"cannot mount a tmpfs at {path} ({errors[-1]}) and {fallback.parent} is not a "
                "tmpfs either: give --state-dir on a tmpfs"
            )
        fallback.mkdir(mode=0o700, exist_ok=True)
        os.chmod(fallback, 0o700)
        return cls(fallback, note=(
            f"cannot mount a tmpfs at {path} ({errors[-1]}); using {fallback} on "
            f"{mounted_fs(fallback).point} instead: its huge page setting decides the page size, "
            "and its size limit caps the balloon"
        ))

    def lock(self) -> None:
        """Take the directory's lock for this agent.  Raises PolicyError naming the
        process that holds it."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = (self.path / LOCK_NAME).read_text().strip() if (
                self.path / LOCK_NAME).exists() else "?"
            raise PolicyError(
                f"another uballoon-guest (pid {other}) is using {self.path}; stop it first"
            ) from None
        self._lock_fd = fd
        (self.path / LOCK_NAME).write_text(f"{os.getpid()}\n")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def leftovers(self) -> list[str]:
        """Files that keep the directory in use (chunks, a live holder's socket)."""
        return sorted(
            name for name in os.listdir(self.path)
            if _NAME_RE.match(name) or name == SOCKET_NAME
        )

    def close(self, *, unmount: bool = True) -> bool:
        """Unlock; unmount what this process mounted if nothing is left in it.
        Returns True if it was unmounted."""
        self.unlock()
        if not (unmount and self.mounted_here) or self.leftovers():
            return False
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if done.returncode:
            log.warning("could not unmount %s: %s", self.path, done.stderr.strip())
            return False
        try:
            self.path.rmdir()
        except OSError:
            pass
        return True


def _has_chunks(directory: Path) -> bool:
    try:
        return any(_NAME_RE.match(name) for name in os.listdir(directory))
    except OSError:
        return False


# -- timings ---------------------------------------------------------------------------


@dataclass
class PhaseTimes:
    """Seconds spent per phase (for the benchmark and for slow-pin messages)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """Seconds per phase spent after ``snapshot()`` returned ``before``."""
        return {
            name: value - before.get(name, 0.0)
            for name, value in self.seconds.items()
            if value > before.get(name, 0.0)
        }


# -- the pool --------------------------------------------------------------------------


class PagePool:
    """Chunks of pinned pages in a state directory.

    ``pinner`` keeps the long-term pins (a ``HolderClient``, or ``LocalPins``);
    None means no long-term pins (frames may move: the host must only account).
    ``reconnect`` gets a fresh pinner when the holder died (pins are then re-taken
    by ``check``).  Calls block; none is safe to run concurrently with another.
    """

    def __init__(
        self,
        directory: Path,
        pinner: Pinner | None,
        *,
        reconnect: Callable[[], Pinner] | None = None,
    ) -> None:
        self.directory = directory
        self.pinner = pinner
        self.reconnect = reconnect
        self.times = PhaseTimes()
        self.chunks: dict[int, Chunk] = {}
        self.pins_lost = False
        """Set when the holder was found dead: every chunk needs checking."""
        seqs = [int(m.group(2)) for n in os.listdir(directory) if (m := _NAME_RE.match(n))]
        self._next_seq = max(seqs, default=0) + 1

    @property
    def stable(self) -> bool:
        """Whether chunks are long-term pinned (their frames cannot move)."""
        return self.pinner is not None

    # -- setup -------------------------------------------------------------------------

    def probe(self) -> str | None:
        """Try one long-term pin of a small chunk file.  Returns None if pins work,
        else why not (and the pool goes on without pins)."""
        if self.pinner is None:
            return "long-term pins are disabled"
        path = self.directory / "probe-00000000"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, HUGE_PAGE)
            self.pinner.pin(0, path, HUGE_PAGE)
            self.pinner.unpin(0)
        except (NativeError, OSError) as exc:
            self.pinner.close()
            self.pinner = None
            return str(exc)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        return None

    def reattach(self) -> list[Chunk]:
        """Take over the chunk files an earlier agent left: map and lock each, pin it
        again unless the holder still holds it, read its frames.  Files that were
        never reported (``pinning-*``, ``probe-*``) are deleted.  Returns the
        chunks, oldest first.

        Raises NativeError if a chunk cannot be mapped, locked or pinned.
        """
        held = self._held()
        seen: set[int] = set()
        for name in sorted(os.listdir(self.directory)):
            match = _NAME_RE.match(name)
            if not match:
                continue
            kind, seq = match.group(1), int(match.group(2))
            path = self.directory / name
            size = path.stat().st_size
            if kind != "chunk" or size == 0 or size % native.PAGE_SIZE:
                # Never reported (a chunk file is renamed only once it is whole).
                if seq in held:
                    self._unpin(seq)
                path.unlink(missing_ok=True)
                continue
            seen.add(seq)
            chunk = self._map(seq, path, size, pin=seq not in held)
            self.chunks[seq] = chunk
        for seq in set(held) - seen:
            self._unpin(seq)
        self._next_seq = max([self._next_seq, *[s + 1 for s in seen]])
        return [self.chunks[s] for s in sorted(seen)]

    # -- inflate and deflate -----------------------------------------------------------

    def pin(self, size_bytes: int) -> Chunk:
        """Make a chunk of ``size_bytes`` (a multiple of 4 KiB) of pinned pages.

        Raises ValueError for a bad size; NativeError if the tmpfs is full, memory
        cannot be had or locked, or the pin fails (the partial chunk is removed).
        """
        if size_bytes <= 0 or size_bytes % native.PAGE_SIZE:
            raise ValueError(f"a chunk is a positive multiple of 4 KiB, not {size_bytes}")
        self._ensure_pinner()
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"pinning-{seq:08d}"
        before = self.times.snapshot()
        chunk = self._map(seq, path, size_bytes, pin=True, create=True)
        chunk.pin_times = self.times.since(before)
        return chunk

    def release(self, chunk: Chunk, *, unpinned: bool = False) -> None:
        """Unpin, unmap and delete a chunk: its pages go back to the guest.
        (``unpinned``: ``release_all`` already dropped its pin.)

        Raises NativeError if unpinning or unmapping fails (the file is still
        deleted when unmapping worked).
        """
        self.chunks.pop(chunk.seq, None)
        before = self.times.snapshot()
        try:
            if self.pinner is not None and not unpinned:
                with self.times.phase("unpin"):
                    self._unpin(chunk.seq)
        finally:
            with self.times.phase("unmap"):
                native.release(chunk.address, chunk.size_bytes)
            with self.times.phase("unlink"):
                chunk.path.unlink(missing_ok=True)
            chunk.release_times.update(self.times.since(before))

    def release_all(self, chunks: list[Chunk]) -> list[tuple[Chunk, Exception | None]]:
        """``release`` every chunk, with one request to the pin holder for all their
        pins.  Returns each chunk with the error releasing it raised (None if none);
        a chunk that failed is still forgotten, as after ``release``."""
        unpinned = False
        if len(chunks) > 1 and self.pinner is not None:
            before = self.times.snapshot()
            try:
                with self.times.phase("unpin"):
                    self.pinner.unpin_all([c.seq for c in chunks])
            except NativeError:
                pass  # one at a time below, so each failure is told apart
            else:
                unpinned = True
                share = {name: value / len(chunks)
                         for name, value in self.times.since(before).items()}
                for chunk in chunks:
                    chunk.release_times.update(share)
        results: list[tuple[Chunk, Exception | None]] = []
        for chunk in chunks:
            try:
                self.release(chunk, unpinned=unpinned)
            except (NativeError, OSError) as exc:
                results.append((chunk, exc))
            else:
                results.append((chunk, None))
        return results

    def check(self, chunks: Iterable[Chunk] | None = None) -> list[tuple[Chunk, RangeSet]]:
        """Re-read the chunks' frames (all by default); pin again any chunk whose pin
        was lost.  Returns (chunk, frames now) for each chunk whose frames differ
        from ``chunk.frames`` (which is left for the caller to update).

        Raises NativeError if a frame cannot be read or a pin cannot be taken again.
        """
        todo = list(self.chunks.values() if chunks is None else chunks)
        held = self._held()
        changed = []
        for chunk in todo:
            if self.pinner is not None and chunk.seq not in held:
                log.warning(
                    "chunk %d (%s) lost its long-term pin (the pin holder died?): pinning it "
                    "again", chunk.seq, format_size(chunk.size_bytes),
                )
                self.pinner.pin(chunk.seq, chunk.path, chunk.size_bytes)
            frames = self._frames(chunk)
            if frames != chunk.frames:
                changed.append((chunk, frames))
        self.pins_lost = False
        return changed

    def close(self) -> None:
        """Drop this process's hold on the holder (the holder keeps its pins)."""
        if self.pinner is not None:
            self.pinner.close()

    # -- internals ---------------------------------------------------------------------

    def _map(self, seq: int, path: Path, size: int, *, pin: bool, create: bool = False) -> Chunk:
        huge = size % HUGE_PAGE == 0
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o600)
        address = 0
        pinned = False
        try:
            if create:
                with self.times.phase("create"):
                    _set_size(fd, size, self.directory)
            with self.times.phase("map"):
                address = native.map_shared(fd, size, huge=None if huge else False)
                native.advise(address, size, native.DONTDUMP, native.DONTFORK)
            with self.times.phase("lock"):
                try:
                    native.lock(address, size)
                except NativeError as exc:
                    if create and exc.errno == errno.EFAULT:
                        # A fault into a file of the right size fails only when the
                        # tmpfs cannot take another page.
                        raise _full(size, self.directory, str(exc)) from exc
                    raise
            if pin and self.pinner is not None:
                with self.times.phase("pin"):
                    self.pinner.pin(seq, path, size)
                pinned = True
            if create:
                final = self.directory / f"chunk-{seq:08d}"
                os.rename(path, final)
                path = final
            chunk = Chunk(seq, size, huge, address, RangeSet.empty(), path)
            chunk.frames = self._frames(chunk)
        except BaseException:
            if pinned:
                try:
                    self._unpin(seq)
                except NativeError as exc:
                    log.error("could not unpin the failed chunk %d: %s", seq, exc)
            if address:
                native.release(address, size)
            if create:
                path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.chunks[seq] = chunk
        return chunk

    def _frames(self, chunk: Chunk) -> RangeSet:
        with self.times.phase("frames"):
            try:
                frames = native.read_ranges(chunk.address, chunk.size_bytes)
            except NativeError as exc:
                if exc.errno:
                    raise
                # Pages not present: the kernel moved them (a collapse or migration
                # unmapped them here).  Fault them in again and read where they are now.
                native.lock(chunk.address, chunk.size_bytes)
                frames = native.read_ranges(chunk.address, chunk.size_bytes)
        # read_ranges' arrays may be views of a buffer sized for one run per page;
        # keep only the runs (a balloon holds hundreds of these for its lifetime).
        return RangeSet.from_ranges(frames.starts.copy(), frames.counts,
                                    assume_sorted_disjoint=True)

    def _held(self) -> dict[int, int]:
        if self.pinner is None:
            return {}
        self._ensure_pinner()
        try:
            return self.pinner.held()
        except NativeError:
            if self.reconnect is None:
                raise
            self._replace_pinner()
            return self.pinner.held()

    def _unpin(self, seq: int) -> None:
        if self.pinner is None:
            return
        try:
            self.pinner.unpin(seq)
        except NativeError:
            if getattr(self.pinner, "alive", True) or self.reconnect is None:
                raise
            # The holder is gone, and its pins with it: nothing left to unpin.
            self._replace_pinner()

    def _ensure_pinner(self) -> None:
        if self.pinner is not None and not getattr(self.pinner, "alive", True):
            self._replace_pinner()

    def _replace_pinner(self) -> None:
        assert self.reconnect is not None and self.pinner is not None
        log.warning("the pin holder is gone: starting a new one; every chunk is pinned again")
        self.pinner.close()
        self.pinner = self.reconnect()
        self.pins_lost = True


def _full(size: int, directory: Path, detail: str = "") -> NativeError:
    return NativeError(
        f"allocating a chunk of {format_size(size)} failed: the tmpfs at {directory} is "
        "full (its size= option)" + (f" ({detail})" if detail else ""),
        errno.ENOSPC,
    )


def _set_size(fd: int, size: int, directory: Path) -> None:
    """Give the new chunk file its size (no pages yet: ``lock`` allocates them).

    Raises NativeError (ENOSPC) if the tmpfs has no room left for ``size`` bytes,
    before any page is allocated.
    """
    fs = os.fstatvfs(fd)
    if fs.f_blocks and fs.f_bavail * fs.f_frsize < size:  # f_blocks 0: a tmpfs without limit
        raise _full(size, directory)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        hint = {
            errno.EFBIG: f"the tmpfs at {directory} cannot hold a file that large",
            errno.ENOSPC: f"the tmpfs at {directory} is full (its size= option)",
        }.get(exc.errno or 0, "")
        raise NativeError(
            f"sizing a chunk file of {format_size(size)} failed: {exc.strerror}"
            + (f": {hint}" if hint else ""),
            exc.errno or 0,
        ) from exc


# -- the operator's release ------------------------------------------------------------


def release_state_dir(directory: Path) -> tuple[int, int, bool]:
    """Drop every chunk in ``directory`` and stop its holder: what
    ``uballoon-guest --release`` does once the host is gone for good.

    Returns (chunks dropped, bytes, whether a holder was stopped).  Raises
    PolicyError if an agent still runs on the directory.
    """
    state = StateDir(directory)
    state.lock()
    try:
        client = None
        if holder_pid(directory) is not None:
            try:
                client = HolderClient.connect(directory, start=False)
            except NativeError as exc:
                raise PolicyError(f"the pin holder of {directory} does not answer: {exc}") from exc
        count = total = 0
        for name in sorted(os.listdir(directory)):
            match = _NAME_RE.match(name)
            if not match:
                continue
            seq = int(match.group(2))
            path = directory / name
            if client is not None:
                client.unpin(seq)
            if match.group(1) == "chunk":
                count += 1
                total += path.stat().st_size
            path.unlink()
        stopped = False
        if client is not None:
            for seq in client.held():
                client.unpin(seq)
            stopped = client.stop()
            client.close()
            wait_holder_gone(directory, client.pid)
        return count, total, stopped
    finally:
        state.unlock()


def wait_holder_gone(directory: Path, pid: int | None, timeout_s: float = 10.0) -> bool:
    """Wait until the holder ``pid`` has exited and its socket is gone (a bound
    socket keeps the tmpfs busy).  Returns False if it is still there at the end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not (directory / SOCKET_NAME).exists() and (pid is None or not process_alive(pid)):
            return True
        time.sleep(0.01)  # polling a process we cannot wait() on (it is not our child)
    return False
