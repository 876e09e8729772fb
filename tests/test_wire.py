"""The byte layouts: construct is the single declaration, and every fast path is
proved identical to it."""

import struct

import numpy as np
import pytest
from construct import Array, Int32ul
from hypothesis import given
from hypothesis import strategies as st

from protocol import wire
from protocol.constants import MAGIC
from protocol.ranges import RangeSet
from tests.strategies import range_sets, u32_range_sets

fields = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
)


@given(fields)
def test_header_fast_path_builds_what_construct_builds(values):
    version, mtype, flags, txid, length = values
    declared = wire.Header.build(
        dict(version=version, type=mtype, flags=flags, txid=txid, length=length)
    )
    assert wire.HEADER_FAST.pack(MAGIC, version, mtype, flags, txid, length) == declared


@given(st.binary(min_size=16, max_size=16))
def test_header_fast_path_parses_what_construct_parses(raw):
    magic, version, mtype, flags, txid, length = wire.HEADER_FAST.unpack(raw)
    if magic != MAGIC:
        with pytest.raises(Exception):
            wire.Header.parse(raw)
        return
    c = wire.Header.parse(raw)
    assert (c.version, c.type, c.flags, c.txid, c.length) == (version, mtype, flags, txid, length)


def test_fixed_sizes_match_virtio():
    assert wire.Header.sizeof() == 16
    assert wire.VirtioBalloonConfig.sizeof() == 16  # struct virtio_balloon_config
    assert wire.StatEntry.sizeof() == 10  # struct virtio_balloon_stat, packed
    assert wire.PfnRange.sizeof() == 12


@given(u32_range_sets)
def test_pfn_array_adapter_equals_construct_array(pages):
    pfns = [int(p) for p in pages.to_pfns()]
    declared = Array(len(pfns), Int32ul).build(pfns)
    assert wire.PfnArrayBody.build(pages) == declared
    assert wire.PfnArrayBody.parse(declared) == pages


@given(st.lists(st.integers(0, 2**32 - 1), unique=True, max_size=200))
def test_pfn_array_in_any_order_parses_to_the_set(pfns):
    body = Array(len(pfns), Int32ul).build(pfns)
    assert wire.PfnArrayBody.parse(body) == RangeSet.from_pfns(np.array(pfns, np.uint64))


@given(range_sets())
def test_pfn_ranges_adapter_equals_construct_array(pages):
    items = [dict(start=s, count=c) for s, c in pages.ranges()]
    declared = Array(len(items), wire.PfnRange).build(items)
    assert wire.PfnRangesBody.build(pages) == declared
    assert wire.PfnRangesBody.parse(declared) == pages


def test_a_range_longer_than_u32_is_split_on_the_wire():
    pages = RangeSet.span(10, 2**32 + 5)
    body = wire.PfnRangesBody.build(pages)
    assert len(body) == 24
    assert wire.PfnRangesBody.parse(body) == pages


@pytest.mark.parametrize(
    "items, message",
    [
        ([(10, 0)], "count of 0"),
        ([(10, 5), (12, 5)], "must not overlap"),
        ([(20, 5), (10, 5)], "sorted"),
    ],
)
def test_bad_range_lists_are_named(items, message):
    body = b"".join(struct.pack("<QI", s, c) for s, c in items)
    with pytest.raises(ValueError, match=message):
        wire.PfnRangesBody.parse(body)


def test_duplicate_pfn_in_array_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        wire.PfnArrayBody.parse(struct.pack("<3I", 5, 9, 5))


def _values(container):
    """The leaf values of a parsed construct Container, in declaration order."""
    out = []
    for key, value in container.items():
        if key.startswith("_"):
            continue
        out.extend(_values(value) if hasattr(value, "items") else [value])
    return tuple(out)


@pytest.mark.parametrize("name", sorted(wire.FAST_BODIES))
@given(data=st.binary(max_size=24))
def test_fast_body_parses_exactly_what_the_declaration_parses(name, data):
    declared, fast = wire.FAST_BODIES[name]
    try:
        expected = _values(declared.parse(data))
    except Exception:
        assert len(data) != fast.size
        return
    assert len(data) == fast.size and fast.unpack(data) == expected


@pytest.mark.parametrize("name", sorted(wire.FAST_BODIES))
@given(data=st.data())
def test_fast_body_builds_exactly_what_the_declaration_builds(name, data):
    declared, fast = wire.FAST_BODIES[name]
    raw = data.draw(st.binary(min_size=fast.size, max_size=fast.size))
    values = fast.unpack(raw)
    container = declared.parse(raw)
    assert declared.build(container) == fast.pack(*values) == raw
