"""Inflate and deflate through the agent's page pool vs the fastest plain C way to pin.

    python bench/bench_pool.py [--sizes 1G,4G] [--runs 5] [--chunk 64M] [--no-holder]

For each size, alternately (so both see the same memory conditions):

* baseline: a tiny C program compiled here with gcc -- mmap, MADV_HUGEPAGE, mlock
  (inflate), munlock + munmap (deflate); and its 4 KiB variant (MADV_NOHUGEPAGE).
  It pins nothing long-term and reads no frames: it is the floor.
* pool: ``PagePool.pin`` in chunks (tmpfs file, sized, map, lock, long-term pin
  by the real holder process, frames from pagemap, sorted and merged), then the
  chunks' frames merged into the balloon's one RangeSet; deflate: ``release`` of
  every chunk (unpin, unmap, unlink).

This machine sits on a balloon of its own (free page reporting): memory left idle for
~2 s goes back to the hypervisor and the next touch of it is 5-10x slower.  So the
runs go back to back after a warm-up that touches the largest size both ways, and
each figure is the median of ``--runs``.

Prints GiB/s for both, the ratio (goal: pool >= 0.8 of the huge-page baseline),
where the pool's time goes by phase, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest_agent.holder import HolderClient, LocalPins  # noqa: E402
from guest_agent.pool import PagePool, union_frames, wait_holder_gone  # noqa: E402
from protocol.units import format_size, parse_size  # noqa: E402

GiB = 1 << 30

C_SOURCE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* pin SIZE HUGE: prints "inflate_seconds deflate_seconds" */
int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    size_t size = strtoull(argv[1], NULL, 10), align = 2UL << 20;
    int huge = atoi(argv[2]);
    double t0 = now();
    char *raw = mmap(NULL, size + align, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *p = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
    madvise(p, size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    if (mlock(p, size)) {
        perror("mlock");
        return 1;
    }
    double t1 = now();
    munlock(p, size);
    munmap(raw, size + align);
    double t2 = now();
    printf("%.9f %.9f\n", t1 - t0, t2 - t1);
    return 0;
}
"""


def build_baseline(directory: Path) -> Path:
    source = directory / "pin.c"
    source.write_text(C_SOURCE)
    binary = directory / "pin"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def baseline(binary: Path, size: int, huge: bool) -> tuple[float, float]:
    out = subprocess.run([str(binary), str(size), "1" if huge else "0"], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def pool_run(pool: PagePool, size: int, chunk: int) -> tuple[float, float, dict[str, float]]:
    pool.times.reset()
    start = time.perf_counter()
    chunks = []
    left = size
    while left:
        step = min(chunk, left)
        chunks.append(pool.pin(step))
        left -= step
    with pool.times.phase("merge"):
        balloon = union_frames(chunks)
    inflated = time.perf_counter()
    assert balloon.num_pages == size // 4096
    for c in reversed(chunks):
        pool.release(c)
    deflated = time.perf_counter()
    return inflated - start, deflated - inflated, dict(pool.times.seconds)


def mount_tmpfs(directory: Path, size: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode=0700,huge=within_size,size={size}",
                    "uballoon-bench", str(directory)], check=True)


def _page_reporting() -> dict[str, str]:
    """This machine's own free page reporting (it makes cold memory slow to pin)."""
    directory = Path("/sys/module/page_reporting/parameters")
    out = {}
    for name in ("page_reporting_order", "min_free_ms"):
        try:
            out[name] = (directory / name).read_text().strip()
        except OSError:
            pass
    return out


def gibs(size: int, seconds: float) -> float:
    return size / GiB / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1G,4G")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--chunk", default="64M")
    parser.add_argument("--no-holder", action="store_true",
                        help="keep the pins in this process instead of the holder")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    chunk = parse_size(args.chunk)

    work = Path(tempfile.mkdtemp(prefix="uballoon-bench-"))
    state = work / "state"
    state.mkdir()
    binary = build_baseline(work)
    mount_tmpfs(state, max(sizes) + GiB)
    pinner = LocalPins() if args.no_holder else HolderClient.connect(state)
    pool = PagePool(state, pinner)
    results = {}
    try:
        # Warm-up: bring the largest size back from the hypervisor, both ways.
        for _ in range(2):
            baseline(binary, max(sizes), True)
            pool_run(pool, max(sizes), chunk)
        for size in sizes:
            runs: dict[str, list[float]] = {k: [] for k in (
                "c_huge_in", "c_huge_out", "c_4k_in", "c_4k_out", "pool_in", "pool_out")}
            phases: list[dict[str, float]] = []
            for _ in range(args.runs):
                # Each timed run right after an untimed one of the same kind: the
                # memory it takes was just freed, not yet handed to the hypervisor.
                baseline(binary, size, True)
                a, b = baseline(binary, size, True)
                runs["c_huge_in"].append(a)
                runs["c_huge_out"].append(b)
                pool_run(pool, size, chunk)
                a, b, phase = pool_run(pool, size, chunk)
                runs["pool_in"].append(a)
                runs["pool_out"].append(b)
                phases.append(phase)
                baseline(binary, size, False)
                a, b = baseline(binary, size, False)
                runs["c_4k_in"].append(a)
                runs["c_4k_out"].append(b)
            med = {k: statistics.median(v) for k, v in runs.items()}
            best = {k: min(v) for k, v in runs.items()}
            phase_med = {k: statistics.median(p.get(k, 0.0) for p in phases)
                         for k in phases[0]}
            label = format_size(size)
            row: dict[str, object] = {}
            for stat, table in (("median", med), ("best", best)):
                figures = {
                    "c_huge_inflate_gibs": gibs(size, table["c_huge_in"]),
                    "c_huge_deflate_gibs": gibs(size, table["c_huge_out"]),
                    "c_4k_inflate_gibs": gibs(size, table["c_4k_in"]),
                    "c_4k_deflate_gibs": gibs(size, table["c_4k_out"]),
                    "pool_inflate_gibs": gibs(size, table["pool_in"]),
                    "pool_deflate_gibs": gibs(size, table["pool_out"]),
                }
                figures["inflate_ratio"] = (figures["pool_inflate_gibs"]
                                            / figures["c_huge_inflate_gibs"])
                figures["deflate_ratio"] = (figures["pool_deflate_gibs"]
                                            / figures["c_huge_deflate_gibs"])
                row[stat] = {k: round(v, 3) for k, v in figures.items()}
                print(f"{label} {stat:>6}: inflate  C huge {figures['c_huge_inflate_gibs']:6.2f}"
                      f"  C 4K {figures['c_4k_inflate_gibs']:6.2f}  pool "
                      f"{figures['pool_inflate_gibs']:6.2f} GiB/s  ratio "
                      f"{figures['inflate_ratio']:.2f} | deflate  C huge "
                      f"{figures['c_huge_deflate_gibs']:6.1f}  C 4K "
                      f"{figures['c_4k_deflate_gibs']:5.1f}  pool "
                      f"{figures['pool_deflate_gibs']:6.1f} GiB/s  ratio "
                      f"{figures['deflate_ratio']:.2f}")
            row["pool_inflate_s_all_runs"] = [round(x, 3) for x in runs["pool_in"]]
            row["c_huge_inflate_s_all_runs"] = [round(x, 3) for x in runs["c_huge_in"]]
            row["pool_phase_ms"] = {k: round(v * 1000, 2) for k, v in phase_med.items()}
            results[label] = row
            print(f"{label} phases: " + ", ".join(
                f"{k} {v}ms" for k, v in row["pool_phase_ms"].items()))
    finally:
        for c in list(pool.chunks.values()):
            pool.release(c)
        if isinstance(pinner, HolderClient):
            pinner.stop()
            pinner.close()
            wait_holder_gone(state, pinner.pid)
        else:
            pinner.close()
        subprocess.run(["umount", str(state)], check=True)
        for name in os.listdir(work):
            path = work / name
            path.rmdir() if path.is_dir() else path.unlink()
        work.rmdir()
    summary = {
        "bench": "pool",
        "page_reporting": _page_reporting(),
        "chunk": format_size(chunk),
        "pins": "in-process" if args.no_holder else "holder",
        "runs": args.runs,
        "goal_inflate_ratio": 0.8,
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
