"""Hypothesis strategies for every protocol event."""

import numpy as np
from hypothesis import strategies as st

from protocol import events as ev
from protocol.constants import ByeReason, Feature, NEVER_ACCEPTED
from protocol.errors import ErrorCode, NakReason
from protocol.ranges import RangeSet

U32 = 2**32 - 1
U64 = 2**64 - 1

names = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
nonces = st.binary(min_size=32, max_size=32)
txids = st.integers(1, U32)
messages = st.text(max_size=60)


@st.composite
def range_sets(draw, max_ranges=40, max_pfn=2**40, min_pages=0):
    n = draw(st.integers(0, max_ranges))
    starts = draw(st.lists(st.integers(0, max_pfn), min_size=n, max_size=n))
    counts = draw(st.lists(st.integers(1, 600), min_size=n, max_size=n))
    rs = RangeSet.from_ranges(np.array(starts, np.uint64), np.array(counts, np.uint64))
    if rs.num_pages < min_pages:
        rs = rs | RangeSet.span(draw(st.integers(0, max_pfn)), min_pages)
    return rs


u32_range_sets = range_sets(max_pfn=2**31)
nonempty_u32_range_sets = range_sets(max_pfn=2**31, min_pages=1)
configs = st.builds(ev.Config, num_pages=st.integers(0, U32), actual=st.integers(0, U32))
offerable = st.integers(0, U64).map(lambda m: m & ~int(NEVER_ACCEPTED))

hellos = st.builds(
    ev.Hello,
    name=names,
    nonce=nonces,
    features=st.integers(0, U64),
    total_pages=st.integers(1, U64),
    ram_layout=range_sets(max_ranges=5),
    page_size=st.sampled_from([4096, 16384, 65536]),
    versions=st.frozensets(st.integers(1, 31), min_size=1),
)
welcomes = st.builds(
    ev.Welcome,
    version=st.integers(1, 31),
    features=st.integers(0, U64),
    max_body=st.integers(4 << 20, 64 << 20),
    config=configs,
    stats_interval_ms=st.integers(0, U32),
    heartbeat_ms=st.integers(0, U32),
    window=st.integers(1, 64),
)
stats = st.builds(
    ev.Stats,
    entries=st.dictionaries(st.integers(0, 0xFFFF), st.integers(0, U64), max_size=20).map(
        lambda d: tuple(d.items())
    ),
    txid=st.integers(0, U32),
)

# Events whose bodies carry no PFN set (any encoding).
plain_events = st.one_of(
    hellos,
    st.builds(ev.Challenge, nonce=nonces),
    st.builds(ev.Auth, proof=nonces),
    welcomes,
    configs,
    st.builds(ev.Ack, txid=txids, freed_pages=st.integers(0, U64)),
    st.builds(
        ev.Nak,
        txid=txids,
        reason=st.sampled_from(NakReason),
        message=messages,
        pfn=st.none() | st.integers(0, U64 - 1),
    ),
    st.builds(ev.Actual, actual=st.integers(0, U32)),
    stats,
    st.builds(ev.StatsRequest, txid=txids),
    st.builds(ev.Ping, txid=txids),
    st.builds(ev.Pong, txid=txids),
    st.builds(ev.Bye, reason=st.sampled_from(ByeReason), message=messages),
    st.builds(ev.Error, code=st.sampled_from(ErrorCode), message=messages),
)
pfn_events = st.one_of(
    st.builds(ev.Inflate, txid=txids, pages=nonempty_u32_range_sets),
    st.builds(ev.Deflate, txid=txids, pages=nonempty_u32_range_sets),
    st.builds(ev.Resync, txid=txids, pages=u32_range_sets, more=st.booleans()),
)
any_event = st.one_of(plain_events, pfn_events)
