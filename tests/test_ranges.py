"""RangeSet against Python's own set of ints: every operation, any input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.ranges import RangeSet

pfn_sets = st.sets(st.integers(0, 300), max_size=120)
range_lists = st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 50)), max_size=30)


def rs(pages):
    return RangeSet.from_pfns(np.array(sorted(pages), dtype=np.uint64))


def as_set(r):
    return {int(p) for p in r.to_pfns()}


def canonical(r):
    s, e = r.starts, r.ends
    return bool((s < e).all()) and bool((e[:-1] < s[1:]).all())


@given(pfn_sets)
def test_from_pfns_round_trips(pages):
    r = rs(pages)
    assert as_set(r) == pages
    assert r.num_pages == len(pages)
    assert canonical(r)


@given(st.lists(st.integers(0, 300), max_size=120, unique=True))
def test_unsorted_pfns_give_the_same_set(pages):
    assert RangeSet.from_pfns(np.array(pages, dtype=np.uint32)) == rs(set(pages))


def test_duplicate_pfn_is_named():
    with pytest.raises(ValueError, match="0x5 is listed more than once"):
        RangeSet.from_pfns(np.array([7, 5, 5], dtype=np.uint32))


@given(range_lists)
def test_from_ranges_merges_overlaps(pairs):
    r = RangeSet(pairs)
    expected = set()
    for s, c in pairs:
        expected.update(range(s, s + c))
    assert r.num_pages == len(expected)
    assert canonical(r)
    assert all(p in r for p in list(expected)[:50])


@given(pfn_sets, pfn_sets)
def test_algebra_matches_python_sets(a, b):
    ra, rb = rs(a), rs(b)
    for got, want in [
        (ra | rb, a | b),
        (ra & rb, a & b),
        (ra - rb, a - b),
        (ra ^ rb, a ^ b),
    ]:
        assert as_set(got) == want
        assert canonical(got)
    assert ra.issubset(rb) == (a <= b)
    assert ra.isdisjoint(rb) == a.isdisjoint(b)
    assert (ra == rb) == (a == b)


@given(pfn_sets, st.integers(0, 400))
def test_take_splits_lowest_pages(a, n):
    head, tail = rs(a).take(n)
    lowest = set(sorted(a)[:n])
    assert as_set(head) == lowest
    assert as_set(tail) == a - lowest
    assert canonical(head) and canonical(tail)


@given(pfn_sets, st.integers(1, 40))
def test_split_pages_and_ranges_cover_the_set(a, n):
    r = rs(a)
    pieces = r.split_pages(n)
    assert all(p.num_pages <= n for p in pieces)
    union = RangeSet.empty()
    for p in pieces:
        assert union.isdisjoint(p)
        union = union | p
    assert union == r
    by_ranges = r.split_ranges(n)
    assert all(p.num_ranges <= n for p in by_ranges)
    assert sum(p.num_pages for p in by_ranges) == r.num_pages


def test_to_pfns_u32_refuses_large_pfn():
    with pytest.raises(ValueError, match="does not fit"):
        RangeSet.span(2**32, 1).to_pfns(np.uint32)


def test_arrays_are_read_only():
    r = RangeSet.span(10, 5)
    with pytest.raises(ValueError):
        r.starts[0] = 3
