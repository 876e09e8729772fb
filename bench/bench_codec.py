"""Benchmark of the PFN codec: one report of 262,144 PFNs (1 GiB of 4 KiB pages).

What is timed
-------------
*Ours* is the path a session really takes, integrity check included:

* build: ``codec.encode_event(Inflate(...))`` + ``codec.build_frame`` (CRC-32 trailer),
  starting from the ``RangeSet`` an event carries and ending with the frame's bytes;
* parse: ``FrameReader.feed`` + ``next_frame`` + ``verify_crc`` + ``decode_body``,
  starting from the frame's bytes and ending with an ``Inflate`` event holding a
  ``RangeSet`` (every check the codec makes on untrusted input included).

for both encodings (virtio's u32 PFN array, and (u64 start, u32 count) ranges) and
three layouts of the same number of PFNs, all below 2**32 so both encodings apply:

* ``fragmented``: sorted runs of 4 KiB pages averaging ~29 pages (what pinning 1 GiB
  of 4 KiB pages on a busy machine gives once sorted; see docs/protocol.md);
* ``thp``: aligned runs of 512 pages (transparent huge pages);
* ``isolated``: no two PFNs adjacent: one range per page, the worst case for both
  (the ranges body is 3x the array, and a ``RangeSet`` of 262,144 ranges is 4 MiB).

The *baseline* is plain construct, measured in the same run on the fragmented PFNs
(its speed does not depend on the layout): the
frame header with ``wire.Header``, the body with ``Array(n, Int32ul)``, the CRC with
``zlib.crc32``; build starts from a Python list of PFNs, parse ends with construct's
ListContainer.  The compiled variant (``.compile()``) is shown too, for scale only:
construct's docs say compiled parsers are not for untrusted input.

Extras: the fragmented layout with an HMAC-SHA256 trailer (an authenticated session),
and through the whole ``GuestConnection.send`` -> ``HostConnection.next_event`` path
(the per-transaction rules included).

Every timing is the median of several runs with the garbage collector off (as
``timeit`` does), after one untimed warm-up run; every result is checked against the
input, untimed.  Rates are PFNs per second by the wall clock; the figure in brackets
uses this thread's CPU time instead, which leaves out time lost to other processes
on a shared machine (page faults stay in).  The last line printed is one JSON object;
its headline ``build_pfn_per_s`` / ``parse_pfn_per_s`` are ours, u32 array,
fragmented layout, CRC-32 included.

    python bench/bench_codec.py [--quick] [--repeat N] [--seed S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import construct
import numpy as np
from construct import Array, Int32ul

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import auth, codec, wire  # noqa: E402
from protocol.connection import GuestConnection, HostConnection  # noqa: E402
from protocol.constants import (  # noqa: E402
    HEADER_SIZE,
    MAX_NEGOTIATED_MAX_BODY,
    Feature,
    MessageType,
)
from protocol.events import NEED_DATA, Config, Inflate, Welcome  # noqa: E402
from protocol.ranges import RangeSet  # noqa: E402

NUM_PFNS = 262_144  # 1 GiB of 4 KiB pages
GOAL_PFN_PER_S = 100e6
MEAN_RUN_PAGES = 29  # sorted 4 KiB runs on a busy machine (REFERENCE.md)
THP_PAGES = 512
BASE_PFN = 0x10_0000  # 4 GiB: above the PCI hole, as a guest's high RAM would be
TXID = 1


# -- layouts ---------------------------------------------------------------------------


def _from_runs(run_lengths: np.ndarray, gaps: np.ndarray) -> RangeSet:
    """Runs of the given lengths separated by gaps of at least one page."""
    starts = BASE_PFN + np.cumsum(gaps) + np.concatenate(([0], np.cumsum(run_lengths)[:-1]))
    return RangeSet.from_ranges(starts.astype(np.uint64), run_lengths.astype(np.uint64))


def _trim_runs(runs: np.ndarray, total: int) -> np.ndarray:
    """The first runs whose lengths sum to exactly ``total``."""
    cum = np.cumsum(runs)
    k = int(np.searchsorted(cum, total)) + 1
    runs = runs[:k].copy()
    runs[-1] -= int(cum[k - 1]) - total
    return runs


def make_layouts(seed: int) -> dict[str, RangeSet]:
    rng = np.random.default_rng(seed)
    # Geometric run lengths with mean 29 and gaps of the same distribution: free
    # memory of a busy machine, half of it taken.
    runs = _trim_runs(rng.geometric(1 / MEAN_RUN_PAGES, size=NUM_PFNS), NUM_PFNS)
    fragmented = _from_runs(runs, rng.geometric(1 / MEAN_RUN_PAGES, size=runs.size))
    # Huge pages: aligned 512-page runs, gaps of whole huge pages.
    n_huge = NUM_PFNS // THP_PAGES
    huge_gaps = rng.geometric(1 / 2, size=n_huge) * THP_PAGES
    thp = _from_runs(np.full(n_huge, THP_PAGES), huge_gaps)
    # Isolated pages: every PFN alone (random gaps of 1-8 pages).
    isolated = _from_runs(np.ones(NUM_PFNS, dtype=np.int64), rng.integers(1, 9, NUM_PFNS))
    layouts = {"fragmented": fragmented, "thp": thp, "isolated": isolated}
    for name, pages in layouts.items():
        assert pages.num_pages == NUM_PFNS, name
        assert pages.last < 2**32, name  # both encodings must apply
    assert thp.num_ranges == n_huge and isolated.num_ranges == NUM_PFNS
    return layouts


# -- timing ------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median (wall, CPU) time of ``fn()`` over ``repeat`` runs, after one warm-up.

    The CPU time is this thread's (page faults included, time spent waiting for a
    core excluded): on a shared machine it shows what the code costs when the wall
    time also shows the neighbours.
    """
    fn()
    wall, cpu = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            cpu_start = time.thread_time_ns()
            start = time.perf_counter_ns()
            fn()
            wall.append(time.perf_counter_ns() - start)
            cpu.append(time.thread_time_ns() - cpu_start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(wall) / 1e9, statistics.median(cpu) / 1e9


def rates(prefix: str, wall_s: float, cpu_s: float) -> dict[str, Any]:
    return {
        f"{prefix}_ms": round(wall_s * 1e3, 3),
        f"{prefix}_pfn_per_s": round(rate(wall_s)),
        f"{prefix}_cpu_pfn_per_s": round(rate(cpu_s)),
    }


def rate(seconds: float) -> float:
    return NUM_PFNS / seconds


# -- our path ----------------------------------------------------------------------------


def our_build(pages: RangeSet, ranges: bool, mac_key: bytes | None = None) -> bytes:
    kind, flags, txid, body = codec.encode_event(Inflate(TXID, pages), ranges=ranges)
    return codec.build_frame(kind, flags, txid, body, mac_key, 0)


def our_parse(frame: bytes, mac_key: bytes | None = None) -> Inflate:
    reader = codec.FrameReader(MAX_NEGOTIATED_MAX_BODY)
    reader.feed(frame)
    got = reader.next_frame()
    assert got is not None
    if mac_key is None:
        codec.verify_crc(got)
    else:  # what Connection._receive_frame does for a MAC'd frame
        want = auth.frame_mac(mac_key, 0, got.raw_header, got.body)
        if not auth.same(want, got.trailer):
            raise AssertionError("MAC mismatch")
    event = codec.decode_body(got.header, got.body, got.offset)
    assert isinstance(event, Inflate)
    return event


def bench_ours(pages: RangeSet, ranges: bool, repeat: int, mac_key: bytes | None = None) -> dict:
    frame = our_build(pages, ranges, mac_key)
    assert our_parse(frame, mac_key) == Inflate(TXID, pages)  # correctness, untimed
    return {
        "frame_bytes": len(frame),
        **rates("build", *median_seconds(lambda: our_build(pages, ranges, mac_key), repeat)),
        **rates("parse", *median_seconds(lambda: our_parse(frame, mac_key), repeat)),
    }


# -- the whole session path -------------------------------------------------------------


def _session(features: int) -> tuple[GuestConnection, HostConnection]:
    """An unauthenticated guest/host pair in ACTIVE with a large enough max_body."""
    guest, host = GuestConnection(None), HostConnection()
    hello = guest.make_hello(name="bench", features=features, total_pages=1 << 32)
    host.receive_data(guest.send(hello))
    assert host.next_event() == hello
    welcome = Welcome(1, features, 16 << 20, Config(0), window=1)
    guest.receive_data(host.send(welcome))
    assert guest.next_event() == welcome
    return guest, host


def bench_session(pages: RangeSet, ranges: bool, repeat: int) -> dict:
    """GuestConnection.send(Inflate) and HostConnection.receive_data + next_event: the
    codec plus the per-transaction rules.  A fresh session per run (untimed setup),
    since each INFLATE uses up a txid and a window slot."""
    features = int(Feature.PFN_RANGES) if ranges else 0
    times: dict[str, list[int]] = {"build": [], "build_cpu": [], "parse": [], "parse_cpu": []}
    for i in range(repeat + 1):
        guest, host = _session(features)
        gc.disable()
        try:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            data = guest.send(Inflate(1, pages))
            c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
            host.receive_data(data)
            event = host.next_event()
            c2, t2 = time.thread_time_ns(), time.perf_counter_ns()
        finally:
            gc.enable()
        assert event == Inflate(1, pages) and host.next_event() is NEED_DATA
        if i:  # the first run is the warm-up
            for key, value in (("build", t1 - t0), ("build_cpu", c1 - c0),
                               ("parse", t2 - t1), ("parse_cpu", c2 - c1)):
                times[key].append(value)
    median = {key: statistics.median(values) / 1e9 for key, values in times.items()}
    return {
        **rates("build", median["build"], median["build_cpu"]),
        **rates("parse", median["parse"], median["parse_cpu"]),
    }


# -- the plain-construct baseline ----------------------------------------------------------


def bench_construct(pages: RangeSet, repeat: int, compiled: bool) -> dict:
    pfns = pages.to_pfns().tolist()  # Python ints, construct's natural input
    body_layout = Array(NUM_PFNS, Int32ul)
    header_layout = wire.Header
    if compiled:
        body_layout = body_layout.compile()
        header_layout = header_layout.compile()

    def build() -> bytes:
        body = body_layout.build(pfns)
        header = header_layout.build(
            dict(version=1, type=MessageType.INFLATE, flags=0, txid=TXID, length=len(body))
        )
        return header + body + zlib.crc32(body, zlib.crc32(header)).to_bytes(4, "little")

    def parse() -> list[int]:
        header = header_layout.parse(frame[:HEADER_SIZE])
        body = frame[HEADER_SIZE : HEADER_SIZE + header.length]
        trailer = frame[HEADER_SIZE + header.length :]
        crc = zlib.crc32(body, zlib.crc32(frame[:HEADER_SIZE]))
        if crc.to_bytes(4, "little") != trailer:
            raise AssertionError("CRC mismatch")
        return body_layout.parse(body)

    frame = build()
    # The baseline builds exactly the frame our codec builds, and parses it back.
    assert frame == our_build(pages, ranges=False)
    assert list(parse()) == pfns
    return {
        **rates("build", *median_seconds(build, repeat)),
        **rates("parse", *median_seconds(parse, repeat)),
    }


# -- main ----------------------------------------------------------------------------------


def mps(pfn_per_s: float) -> str:
    return f"{pfn_per_s / 1e6:,.1f}"


def columns(measured: dict[str, Any]) -> str:
    """Build and parse rates: wall-clock median, and CPU-time median in brackets."""
    out = ""
    for way in ("build", "parse"):
        cpu = f"({mps(measured[f'{way}_cpu_pfn_per_s'])})"
        out += f"{mps(measured[f'{way}_pfn_per_s']):>10}{cpu:>11}"
    return out


HEADINGS = f"{'build':>10}{'(cpu)':>11}{'parse':>10}{'(cpu)':>11}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    parser.add_argument("--repeat", type=int, help="runs per measurement of our path")
    parser.add_argument("--seed", type=int, default=20240901, help="seed of the layouts")
    args = parser.parse_args(argv)
    repeat = args.repeat or (7 if args.quick else 31)
    construct_repeat = 2 if args.quick else 5

    started = time.perf_counter()
    load_before = os.getloadavg()
    layouts = make_layouts(args.seed)
    results: dict[str, Any] = {}
    below_goal, below_goal_cpu = [], []
    print(f"PFN codec: one report of {NUM_PFNS:,} PFNs (1 GiB of 4 KiB pages), integrity "
          f"check included; M PFN/s, median of {repeat} runs (construct: {construct_repeat}), "
          "wall clock and (this thread's CPU time)")
    print(f"load average {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print(f"{'layout':<11}{'ranges':>8}{'encoding':>9}{'frame bytes':>12}{HEADINGS}")
    for name, pages in layouts.items():
        entry: dict[str, Any] = {
            "num_ranges": pages.num_ranges,
            "mean_run_pages": round(pages.num_pages / pages.num_ranges, 2),
        }
        for encoding, ranges in (("u32", False), ("ranges", True)):
            measured = bench_ours(pages, ranges, repeat)
            entry[encoding] = measured
            for way in ("build", "parse"):
                if measured[f"{way}_pfn_per_s"] < GOAL_PFN_PER_S:
                    below_goal.append(f"{name}/{encoding}/{way}")
                if measured[f"{way}_cpu_pfn_per_s"] < GOAL_PFN_PER_S:
                    below_goal_cpu.append(f"{name}/{encoding}/{way}")
            print(f"{name:<11}{pages.num_ranges:>8,}{encoding:>9}{measured['frame_bytes']:>12,}"
                  f"{columns(measured)}")
        results[name] = entry

    fragmented = layouts["fragmented"]
    mac_key = b"k" * 32
    extras = {
        "fragmented_u32_mac": bench_ours(fragmented, False, repeat, mac_key),
        "fragmented_ranges_mac": bench_ours(fragmented, True, repeat, mac_key),
        "fragmented_u32_session": bench_session(fragmented, False, repeat),
        "fragmented_ranges_session": bench_session(fragmented, True, repeat),
    }
    labels = {
        "fragmented_u32_mac": "u32, HMAC-SHA256 trailer",
        "fragmented_ranges_mac": "ranges, HMAC-SHA256 trailer",
        "fragmented_u32_session": "u32, GuestConnection->HostConnection",
        "fragmented_ranges_session": "ranges, GuestConnection->HostConnection",
    }
    print()
    print(f"{'fragmented layout, other paths':<40}{HEADINGS}")
    for key, measured in extras.items():
        print(f"{labels[key]:<40}{columns(measured)}")

    plain = bench_construct(fragmented, construct_repeat, compiled=False)
    compiled = bench_construct(fragmented, construct_repeat, compiled=True)
    ours = results["fragmented"]["u32"]
    build_ratio = ours["build_pfn_per_s"] / plain["build_pfn_per_s"]
    parse_ratio = ours["parse_pfn_per_s"] / plain["parse_pfn_per_s"]
    build_ratio_cpu = ours["build_cpu_pfn_per_s"] / plain["build_cpu_pfn_per_s"]
    parse_ratio_cpu = ours["parse_cpu_pfn_per_s"] / plain["parse_cpu_pfn_per_s"]
    print()
    print(f"{'u32 array, fragmented layout, CRC-32':<40}{HEADINGS}")
    print(f"{'ours (numpy adapters)':<40}{columns(ours)}")
    print(f"{'construct Array(n, Int32ul)':<40}{columns(plain)}")
    print(f"{'construct compiled (trusted input only)':<40}{columns(compiled)}")
    cpu_ratios = [f"({ratio:,.0f}x)" for ratio in (build_ratio_cpu, parse_ratio_cpu)]
    print(f"{'ratio ours / construct':<40}{build_ratio:>9,.0f}x{cpu_ratios[0]:>11}"
          f"{parse_ratio:>9,.0f}x{cpu_ratios[1]:>11}")
    print()
    goal = f"{GOAL_PFN_PER_S / 1e6:.0f} M PFN/s"
    if below_goal:
        print(f"below {goal} (wall clock): {', '.join(below_goal)}")
        print(f"below {goal} (CPU time):   {', '.join(below_goal_cpu) or 'none'}")
    else:
        print(f"every layout and encoding reaches {goal} each way")
    load_after = os.getloadavg()
    print(f"({time.perf_counter() - started:.1f} s; load average now {load_after[0]:.2f})")

    summary = {
        "build_pfn_per_s": ours["build_pfn_per_s"],
        "parse_pfn_per_s": ours["parse_pfn_per_s"],
        "construct_build_pfn_per_s": plain["build_pfn_per_s"],
        "construct_parse_pfn_per_s": plain["parse_pfn_per_s"],
        "build_ratio": round(build_ratio, 1),
        "parse_ratio": round(parse_ratio, 1),
        "build_ratio_cpu": round(build_ratio_cpu, 1),
        "parse_ratio_cpu": round(parse_ratio_cpu, 1),
        "build_cpu_pfn_per_s": ours["build_cpu_pfn_per_s"],
        "parse_cpu_pfn_per_s": ours["parse_cpu_pfn_per_s"],
        "construct_compiled_build_pfn_per_s": compiled["build_pfn_per_s"],
        "construct_compiled_parse_pfn_per_s": compiled["parse_pfn_per_s"],
        "goal_pfn_per_s": int(GOAL_PFN_PER_S),
        "below_goal": below_goal,
        "below_goal_cpu": below_goal_cpu,
        "pfns": NUM_PFNS,
        "repeat": repeat,
        "construct_repeat": construct_repeat,
        "quick": args.quick,
        "seed": args.seed,
        "layouts": results,
        "extras": extras,
        "construct": {"plain": plain, "compiled": compiled},
        "env": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "construct": construct.__version__,
            "cpus": os.cpu_count(),
            "loadavg_before": round(load_before[0], 2),
            "loadavg_after": round(load_after[0], 2),
        },
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
