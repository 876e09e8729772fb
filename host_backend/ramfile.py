"""A guest's RAM as files the host can reach, and real reclaim: punching holes.

Theory of operation
-------------------
A VM whose RAM is one or more shared files (QEMU ``memory-backend-file,share=on`` on
/dev/shm or hugetlbfs) gives the host a way to free exactly the frames the guest's
balloon holds: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` at the file offsets of those
guest-physical pages.  A hole reads back as zeros, so no data of one guest can ever
reach another, and the guest touching a punched page just makes the host allocate it
again.

The RAM map (from the host's configuration, never from the guest's HELLO) says where
each guest-physical range lives: a list of (guest-physical start, length, file, file
offset).  ``RamMap`` is pure arithmetic; ``RamFiles`` holds the open files and does
the punching through native/ (one call per file per report, all ranges at once).

What is counted as *freed* is what is verifiably a hole afterwards: on tmpfs and
ordinary filesystems every punched range is checked with SEEK_DATA.  On hugetlbfs only
whole huge pages can be freed (punching part of one only zeroes it), so only those are
punched and counted; the rest of a report stays ballooned, not freed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import native
from host_backend.config import RamRegion
from protocol.errors import NativeError
from protocol.ranges import RangeSet
from protocol.units import PAGE_SHIFT, PAGE_SIZE


@dataclass(frozen=True)
class Piece:
    """The part of a page set that lives in one region's file."""

    region: int
    pages: RangeSet  # guest-physical PFNs
    offsets: np.ndarray  # file offsets, bytes
    lengths: np.ndarray  # bytes


class RamMap:
    """Guest-physical PFNs <-> (file, offset), for one guest."""

    def __init__(self, regions: tuple[RamRegion, ...]) -> None:
        self.regions = tuple(sorted(regions, key=lambda r: r.start))
        self.pages = RangeSet(
            [(r.start >> PAGE_SHIFT, r.length >> PAGE_SHIFT) for r in self.regions]
        )
        """Every guest-physical PFN the map covers."""

    def outside(self, pages: RangeSet) -> RangeSet:
        """The pages of ``pages`` that no region covers."""
        return pages - self.pages

    def pieces(self, pages: RangeSet) -> list[Piece]:
        """``pages`` cut by region, with their file offsets (pages outside are dropped)."""
        out = []
        for index, r in enumerate(self.regions):
            first = r.start >> PAGE_SHIFT
            part = pages.clip(first, first + (r.length >> PAGE_SHIFT))
            if not part:
                continue
            offsets = (part.starts - np.uint64(first)) * np.uint64(PAGE_SIZE) + np.uint64(r.offset)
            lengths = part.counts * np.uint64(PAGE_SIZE)
            out.append(Piece(index, part, offsets, lengths))
        return out

    def to_pages(self, region: int, offsets: np.ndarray, lengths: np.ndarray) -> RangeSet:
        """File byte ranges of ``region`` back to guest-physical PFNs."""
        r = self.regions[region]
        starts = (offsets - np.uint64(r.offset)) // np.uint64(PAGE_SIZE) + np.uint64(
            r.start >> PAGE_SHIFT
        )
        return RangeSet.from_ranges(starts, lengths // np.uint64(PAGE_SIZE))


class RamFiles:
    """The open RAM files of one guest.  Raises NativeError if a file cannot be opened."""

    def __init__(self, ram_map: RamMap) -> None:
        self.map = ram_map
        self._fds: dict[str, int] = {}
        self._unit: dict[str, int] = {}
        try:
            for r in ram_map.regions:
                if r.file not in self._fds:
                    fd = os.open(r.file, os.O_RDWR | os.O_CLOEXEC)
                    self._fds[r.file] = fd
                    self._unit[r.file] = max(PAGE_SIZE, os.fstatvfs(fd).f_bsize)
        except OSError as exc:
            self.close()
            raise NativeError(
                f"cannot open RAM file {exc.filename}: {exc.strerror} (is the VM running, "
                "with memory-backend-file,share=on?)",
                exc.errno or 0,
            ) from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def exist(self) -> bool:
        """True while every RAM file still exists (the VM has not been torn down)."""
        return all(os.path.exists(r.file) for r in self.map.regions)

    def punch(self, pages: RangeSet) -> RangeSet:
        """Release the host memory behind ``pages``; returns the pages now holes.

        Blocking (hundreds of ms for GiBs): the service runs it in a worker thread.
        Raises NativeError if the kernel refuses a punch (nothing is counted freed).
        """
        freed = RangeSet.empty()
        for piece in self.map.pieces(pages):
            r = self.map.regions[piece.region]
            fd, unit = self._fds[r.file], self._unit[r.file]
            offsets, lengths = piece.offsets, piece.lengths
            if unit > PAGE_SIZE:
                offsets, lengths = _whole_units(offsets, lengths, unit)
                if not offsets.size:
                    continue
            native.punch_holes(fd, offsets, lengths)
            if unit == PAGE_SIZE:
                # Verify: a range still holding data was not freed.
                has_data = native.ranges_with_data(fd, offsets, lengths)
                offsets, lengths = offsets[~has_data], lengths[~has_data]
            freed = freed | self.map.to_pages(piece.region, offsets, lengths)
        return freed

    def holes(self, pages: RangeSet) -> RangeSet:
        """The pages of ``pages`` whose backing is a hole now (an audit; no punching)."""
        holes = RangeSet.empty()
        for piece in self.map.pieces(pages):
            r = self.map.regions[piece.region]
            fd, unit = self._fds[r.file], self._unit[r.file]
            if unit > PAGE_SIZE:
                continue  # hugetlbfs cannot say; counted at punch time only
            has_data = native.ranges_with_data(fd, piece.offsets, piece.lengths)
            holes = holes | self.map.to_pages(
                piece.region, piece.offsets[~has_data], piece.lengths[~has_data]
            )
        return holes

    def allocated_bytes(self) -> int:
        """Host memory the RAM files hold now (st_blocks), all files together."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds.values())


def _whole_units(offsets: np.ndarray, lengths: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole ``unit``-sized (huge) pages inside each byte range."""
    u = np.uint64(unit)
    starts = (offsets + u - np.uint64(1)) // u * u
    ends = (offsets + lengths) // u * u
    keep = ends > starts
    return starts[keep], (ends - starts)[keep]
