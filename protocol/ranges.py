"""RangeSet: a set of 4 KiB page frame numbers, held as sorted ranges in numpy arrays.

Theory of operation
-------------------
A balloon of 1 GiB is 262,144 PFNs.  Turning them into Python ints costs more than
pinning the memory did, so every layer (the agent's page pool, the protocol events,
the host's ledger) holds pages as one ``RangeSet``: two uint64 arrays, ``starts`` and
``ends`` (exclusive), in canonical form:

* sorted by start, ``starts[i] < ends[i]``;
* disjoint and not even adjacent (``ends[i] < starts[i + 1]``), so two RangeSets
  holding the same pages hold identical arrays and ``==`` is array equality.

The set algebra (union, intersection, difference) works on the boundaries in bulk
with numpy: sort all boundary points once, take running coverage counts, keep the
segments the operation selects, merge neighbours.  A RangeSet is immutable; the
arrays it exposes are read-only views.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

_U64 = np.uint64
_EMPTY = np.zeros(0, dtype=_U64)
_EMPTY.setflags(write=False)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


class RangeSet:
    """An immutable set of page frame numbers, stored as canonical ranges."""

    __slots__ = ("_starts", "_ends", "_num_pages")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """Build from ``(start, count)`` pairs in any order (overlaps are merged).

        For bulk input use ``from_ranges`` or ``from_pfns``, which take arrays.
        Raises ValueError on a negative start or count.
        """
        pairs = list(ranges)
        if pairs:
            starts = np.array([p[0] for p in pairs], dtype=np.int64)
            counts = np.array([p[1] for p in pairs], dtype=np.int64)
            if (starts < 0).any() or (counts < 0).any():
                raise ValueError("a page range cannot have a negative start or count")
            built = RangeSet.from_ranges(starts.astype(_U64), counts.astype(_U64))
            self._starts, self._ends = built._starts, built._ends
            self._num_pages = built._num_pages
        else:
            self._starts, self._ends, self._num_pages = _EMPTY, _EMPTY, 0

    # -- construction -------------------------------------------------------------

    @classmethod
    def _canonical(cls, starts: np.ndarray, ends: np.ndarray) -> RangeSet:
        """Wrap arrays already in canonical form (trusted, not checked)."""
        self = cls.__new__(cls)
        self._starts = _readonly(np.ascontiguousarray(starts, dtype=_U64))
        self._ends = _readonly(np.ascontiguousarray(ends, dtype=_U64))
        self._num_pages = -1
        return self

    @classmethod
    def empty(cls) -> RangeSet:
        return cls._canonical(_EMPTY, _EMPTY)

    @classmethod
    def span(cls, start: int, count: int) -> RangeSet:
        """The ``count`` pages from ``start``."""
        if start < 0 or count < 0:
            raise ValueError("a page range cannot have a negative start or count")
        if count == 0:
            return cls.empty()
        return cls._canonical(np.array([start], _U64), np.array([start + count], _U64))

    @classmethod
    def from_ranges(
        cls, starts: Any, counts: Any, *, assume_sorted_disjoint: bool = False
    ) -> RangeSet:
        """Build from arrays of range starts and page counts, in any order.

        Empty ranges are dropped; overlapping and adjacent ranges are merged.
        With ``assume_sorted_disjoint`` the caller promises sorted, non-overlapping
        input (adjacent ranges are still merged) and the sort is skipped.
        """
        starts = np.asarray(starts, dtype=_U64).ravel()
        counts = np.asarray(counts, dtype=_U64).ravel()
        if starts.shape != counts.shape:
            raise ValueError("starts and counts differ in length")
        keep = counts != 0
        if not keep.all():
            starts, counts = starts[keep], counts[keep]
        if starts.size == 0:
            return cls.empty()
        ends = starts + counts
        if (ends < starts).any():
            raise ValueError("a page range runs past the end of the 64-bit PFN space")
        if not assume_sorted_disjoint:
            order = np.argsort(starts, kind="stable")
            starts, ends = starts[order], ends[order]
            # Overlap-tolerant merge: a range starts a new run only if it begins after
            # everything before it has ended.
            reach = np.maximum.accumulate(ends)
            new_run = np.empty(starts.size, dtype=bool)
            new_run[0] = True
            np.greater(starts[1:], reach[:-1], out=new_run[1:])
            run_starts = starts[new_run]
            last_of_run = np.empty(starts.size, dtype=bool)
            last_of_run[:-1] = new_run[1:]
            last_of_run[-1] = True
            return cls._canonical(run_starts, reach[last_of_run])
        return cls._merge_sorted(starts, ends)

    @classmethod
    def _merge_sorted(cls, starts: np.ndarray, ends: np.ndarray) -> RangeSet:
        """Merge adjacent ranges of sorted, disjoint input."""
        if starts.size <= 1:
            return cls._canonical(starts, ends)
        touching = np.flatnonzero(starts[1:] == ends[:-1])
        if not touching.size:
            return cls._canonical(starts, ends)
        keep_start = np.ones(starts.size, dtype=bool)
        keep_start[touching + 1] = False
        keep_end = np.ones(starts.size, dtype=bool)
        keep_end[touching] = False
        return cls._canonical(
            starts.take(np.flatnonzero(keep_start)), ends.take(np.flatnonzero(keep_end))
        )

    @classmethod
    def from_pfns(cls, pfns: Any) -> RangeSet:
        """Build from an array of PFNs in any order.

        Raises ValueError naming the first duplicate PFN: a page reported twice is a
        broken report, not a set.
        """
        a = np.asarray(pfns)
        if a.size == 0:
            return cls.empty()
        if a.dtype.kind not in "ui":
            raise ValueError("PFNs must be integers")
        if a.dtype.kind == "i":
            if (a < 0).any():
                raise ValueError("a PFN cannot be negative")
            a = a.astype(_U64)
        a = a.ravel()
        ascending = a[1:] > a[:-1]
        if not ascending.all():
            a = np.sort(a)
            same = a[1:] == a[:-1]
            if same.any():
                raise ValueError(f"PFN {int(a[1:][same][0]):#x} is listed more than once")
        # Break wherever the next PFN is not this one plus one.  (Index arrays, not
        # boolean masks: a half-full mask indexes 5x slower.)
        breaks = np.flatnonzero(np.diff(a) != 1)
        if breaks.size == a.size - 1:  # no two pages adjacent: every PFN is a range
            starts = a.astype(_U64)
            return cls._canonical(starts, starts + _U64(1))
        first = np.empty(breaks.size + 1, dtype=np.intp)
        first[0] = 0
        first[1:] = breaks + 1
        last = np.empty(breaks.size + 1, dtype=np.intp)
        last[:-1] = breaks
        last[-1] = a.size - 1
        ends = a.take(last).astype(_U64)
        ends += _U64(1)
        return cls._canonical(a.take(first).astype(_U64), ends)

    # -- views ----------------------------------------------------------------------

    @property
    def starts(self) -> np.ndarray:
        """Range starts (read-only uint64 array)."""
        return self._starts

    @property
    def ends(self) -> np.ndarray:
        """Range ends, exclusive (read-only uint64 array)."""
        return self._ends

    @property
    def counts(self) -> np.ndarray:
        """Pages per range (uint64 array)."""
        return self._ends - self._starts

    @property
    def num_ranges(self) -> int:
        return int(self._starts.size)

    @property
    def num_pages(self) -> int:
        if self._num_pages < 0:
            self._num_pages = int((self._ends - self._starts).sum(dtype=_U64))
        return self._num_pages

    @property
    def first(self) -> int:
        """Lowest PFN.  Raises ValueError when empty."""
        if not self._starts.size:
            raise ValueError("empty RangeSet has no first page")
        return int(self._starts[0])

    @property
    def last(self) -> int:
        """Highest PFN.  Raises ValueError when empty."""
        if not self._starts.size:
            raise ValueError("empty RangeSet has no last page")
        return int(self._ends[-1]) - 1

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Yield ``(start, count)`` as Python ints (for printing, JSON, small sets)."""
        for start, end in zip(self._starts.tolist(), self._ends.tolist(), strict=True):
            yield start, end - start

    def to_list(self) -> list[list[int]]:
        """``[[start, count], ...]`` for JSON."""
        return [[s, c] for s, c in self.ranges()]

    def to_pfns(self, dtype: Any = _U64) -> np.ndarray:
        """Every PFN in ascending order, as one array (``dtype`` uint32 for the wire).

        Raises ValueError if a PFN does not fit ``dtype``.
        """
        dtype = np.dtype(dtype)
        if not self._starts.size:
            return np.zeros(0, dtype=dtype)
        if int(self._ends[-1]) - 1 > np.iinfo(dtype).max:
            raise ValueError(f"PFN {int(self._ends[-1]) - 1:#x} does not fit in {dtype}")
        if self.num_ranges == self.num_pages:  # isolated pages
            return self._starts.astype(dtype)
        counts = self._ends - self._starts
        # start_i minus the pages before range i is never negative for disjoint ranges.
        before = np.cumsum(counts, dtype=_U64) - counts
        base = (self._starts - before).astype(dtype)
        out = np.repeat(base, counts.astype(np.intp))
        out += np.arange(out.size, dtype=dtype)
        return out

    # -- comparisons -----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return np.array_equal(self._starts, other._starts) and np.array_equal(
            self._ends, other._ends
        )

    def __hash__(self) -> int:
        return hash((self._starts.tobytes(), self._ends.tobytes()))

    def __bool__(self) -> bool:
        return bool(self._starts.size)

    def __contains__(self, pfn: object) -> bool:
        if not isinstance(pfn, int | np.integer) or pfn < 0:
            return False
        i = int(np.searchsorted(self._starts, _U64(pfn), side="right")) - 1
        return i >= 0 and int(pfn) < int(self._ends[i])

    def __repr__(self) -> str:
        shown = [f"({s:#x}, {c})" for s, c in _take(self.ranges(), 4)]
        more = f", ... {self.num_ranges - 4} more" if self.num_ranges > 4 else ""
        return f"RangeSet([{', '.join(shown)}{more}])"

    # -- set algebra -----------------------------------------------------------------

    def __or__(self, other: RangeSet) -> RangeSet:
        return self.union(other)

    def __and__(self, other: RangeSet) -> RangeSet:
        return self.intersection(other)

    def __sub__(self, other: RangeSet) -> RangeSet:
        return self.difference(other)

    def __xor__(self, other: RangeSet) -> RangeSet:
        return self._combine(other, np.logical_xor)

    def __le__(self, other: RangeSet) -> bool:
        return self.issubset(other)

    def __ge__(self, other: RangeSet) -> bool:
        return other.issubset(self)

    def union(self, other: RangeSet) -> RangeSet:
        if not other._starts.size:
            return self
        if not self._starts.size:
            return other
        return RangeSet.from_ranges(
            np.concatenate([self._starts, other._starts]),
            np.concatenate([self._ends - self._starts, other._ends - other._starts]),
        )

    def intersection(self, other: RangeSet) -> RangeSet:
        if not self._starts.size or not other._starts.size:
            return RangeSet.empty()
        return self._combine(other, np.logical_and)

    def difference(self, other: RangeSet) -> RangeSet:
        if not self._starts.size or not other._starts.size:
            return self
        return self._combine(other, lambda a, b: a & ~b)

    def issubset(self, other: RangeSet) -> bool:
        if not self._starts.size:
            return True
        return not self.difference(other)

    def isdisjoint(self, other: RangeSet) -> bool:
        if not self._starts.size or not other._starts.size:
            return True
        if self._ends[-1] <= other._starts[0] or other._ends[-1] <= self._starts[0]:
            return True
        # For each of our ranges, the other range that starts before our end must
        # end at or before our start.
        i = np.searchsorted(other._starts, self._ends, side="left") - 1
        valid = i >= 0
        return not (other._ends[i[valid]] > self._starts[valid]).any()

    def clip(self, start: int, end: int) -> RangeSet:
        """The pages in ``[start, end)``."""
        return self.intersection(RangeSet.span(start, max(0, end - start)))

    def _combine(self, other: RangeSet, select: Any) -> RangeSet:
        na, nb = self._starts.size, other._starts.size
        if na + nb == 0:
            return RangeSet.empty()
        points = np.concatenate([self._starts, self._ends, other._starts, other._ends])
        delta_a = np.zeros(points.size, dtype=np.int8)
        delta_a[:na] = 1
        delta_a[na : 2 * na] = -1
        delta_b = np.zeros(points.size, dtype=np.int8)
        delta_b[2 * na : 2 * na + nb] = 1
        delta_b[2 * na + nb :] = -1
        order = np.argsort(points, kind="stable")
        points = points[order]
        cover_a = np.cumsum(delta_a[order], dtype=np.int32)
        cover_b = np.cumsum(delta_b[order], dtype=np.int32)
        # The coverage after the last event at each distinct point holds until the next.
        last = np.empty(points.size, dtype=bool)
        last[:-1] = points[1:] != points[:-1]
        last[-1] = True
        points, cover_a, cover_b = points[last], cover_a[last], cover_b[last]
        chosen = select(cover_a[:-1] > 0, cover_b[:-1] > 0)
        return RangeSet._merge_sorted(points[:-1][chosen], points[1:][chosen])

    # -- slicing ---------------------------------------------------------------------

    def split_ranges(self, max_ranges: int) -> list[RangeSet]:
        """Cut into consecutive pieces of at most ``max_ranges`` ranges each."""
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        return [
            RangeSet._canonical(self._starts[i : i + max_ranges], self._ends[i : i + max_ranges])
            for i in range(0, self._starts.size, max_ranges)
        ]

    def split_pages(self, max_pages: int) -> list[RangeSet]:
        """Cut into consecutive pieces of at most ``max_pages`` pages each."""
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        pieces: list[RangeSet] = []
        rest = self
        while rest:
            head, rest = rest.take(max_pages)
            pieces.append(head)
        return pieces

    def take(self, n_pages: int) -> tuple[RangeSet, RangeSet]:
        """Split into (the lowest ``n_pages`` pages, the rest)."""
        if n_pages <= 0 or not self._starts.size:
            return RangeSet.empty(), self
        cum = np.cumsum(self._ends - self._starts, dtype=_U64)
        if n_pages >= int(cum[-1]):
            return self, RangeSet.empty()
        i = int(np.searchsorted(cum, _U64(n_pages), side="left"))
        before = int(cum[i - 1]) if i else 0
        cut = int(self._starts[i]) + (n_pages - before)
        head_starts = self._starts[: i + 1]
        head_ends = self._ends[: i + 1].copy()
        head_ends[-1] = cut
        tail_starts = self._starts[i:].copy()
        tail_starts[0] = cut
        tail_ends = self._ends[i:]
        if cut == int(self._ends[i]):
            tail_starts, tail_ends = tail_starts[1:], tail_ends[1:]
        return RangeSet._canonical(head_starts, head_ends), RangeSet._canonical(
            tail_starts, tail_ends
        )


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    out = []
    for item in iterator:
        if len(out) == n:
            break
        out.append(item)
    return out
