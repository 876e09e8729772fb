"""Statistics: /proc and cgroup files to virtio's stats tags, and the RAM map.

Fake /proc and cgroup trees (written in the test) check the mapping exactly; a last
test reads this machine's real files and checks them against what the kernel says
elsewhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from guest_agent.stats import (
    UNLIMITED,
    BalloonFigures,
    Cgroup,
    MemorySource,
    Pressure,
    detect_cgroup,
    ram_layout,
    read_pressure,
    stats_entries,
)
from protocol.constants import BalloonState, StatTag
from protocol.ranges import RangeSet

GiB = 1 << 30
MEMINFO = """MemTotal:        8000000 kB
MemFree:         5000000 kB
MemAvailable:    6000000 kB
Buffers:           10000 kB
Cached:           500000 kB
"""
VMSTAT = """nr_file_pages 130000
pswpin 7
pswpout 9
pgfault 1000
pgmajfault 40
htlb_buddy_alloc_success 3
htlb_buddy_alloc_fail 1
oom_kill 2
allocstall_dma 1
allocstall_normal 4
allocstall_movable 5
pgscan_kswapd 100
pgscan_direct 200
pgsteal_kswapd 80
pgsteal_direct 150
"""
PSI = """some avg10=12.34 avg60=5.00 avg300=0.01 total=123456
full avg10=1.50 avg60=0.00 avg300=0.00 total=789
"""


def fake_proc(root: Path, *, cgroup_lines: str = "0::/\n", mountinfo: str = "",
              psi: str | None = PSI) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "vmstat").write_text(VMSTAT)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    if psi is not None:
        (proc / "pressure").mkdir()
        (proc / "pressure" / "memory").write_text(psi)
    return proc


def mountinfo_line(point: Path, fstype: str, options: str) -> str:
    return f"30 25 0:26 / {point} rw,nosuid - {fstype} {fstype} rw,{options}\n"


def test_a_vm_reports_the_machine_in_the_right_units(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    source = MemorySource(proc, cgroup=None)
    assert not source.in_container and source.has_pressure
    assert source.total_bytes == 8000000 * 1024
    snap = source.read()
    tags = dict(stats_entries(snap, BalloonFigures(512, 256, BalloonState.FLOOR_REACHED, 64 << 20),
                              pressure=True))
    assert tags[StatTag.MEMTOT] == 8000000 * 1024
    assert tags[StatTag.MEMFREE] == 5000000 * 1024
    assert tags[StatTag.AVAIL] == 6000000 * 1024
    assert tags[StatTag.CACHES] == 130000 * 4096  # nr_file_pages, as the kernel driver does
    assert tags[StatTag.SWAP_IN] == 7 * 4096 and tags[StatTag.SWAP_OUT] == 9 * 4096
    assert tags[StatTag.MAJFLT] == 40 and tags[StatTag.MINFLT] == 960
    assert (tags[StatTag.HTLB_PGALLOC], tags[StatTag.HTLB_PGFAIL]) == (3, 1)
    assert tags[StatTag.OOM_KILL] == 2 and tags[StatTag.ALLOC_STALL] == 10
    assert (tags[StatTag.ASYNC_SCAN], tags[StatTag.DIRECT_SCAN]) == (100, 200)
    assert (tags[StatTag.ASYNC_RECLAIM], tags[StatTag.DIRECT_RECLAIM]) == (80, 150)
    assert tags[StatTag.PSI_SOME_AVG10] == 1234  # hundredths of a percent
    assert tags[StatTag.PSI_SOME_AVG60] == 500 and tags[StatTag.PSI_SOME_AVG300] == 1
    assert tags[StatTag.PSI_FULL_AVG10] == 150
    assert tags[StatTag.PSI_SOME_TOTAL] == 123456 and tags[StatTag.PSI_FULL_TOTAL] == 789
    assert tags[StatTag.BALLOON_PAGES] == 512 and tags[StatTag.BALLOON_PENDING_PAGES] == 256
    assert tags[StatTag.BALLOON_STATE] == BalloonState.FLOOR_REACHED
    assert tags[StatTag.MIN_FREE] == 64 << 20 and tags[StatTag.CGROUP] == 0


def test_the_guard_reads_meminfo_and_psi_only_when_asked(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    source = MemorySource(proc, cgroup=None)
    (proc / "vmstat").unlink()  # the guard's snapshot does not need it
    snap = source.read_for_guard(pressure=False)
    assert (snap.total_bytes, snap.available_bytes, snap.free_bytes) == (
        8000000 * 1024, 6000000 * 1024, 5000000 * 1024)
    assert snap.pressure is None
    assert source.read_for_guard(pressure=True).pressure == read_pressure(
        proc / "pressure" / "memory")


def test_the_same_tags_every_time_and_psi_only_when_negotiated(tmp_path: Path) -> None:
    snap = MemorySource(fake_proc(tmp_path, psi=None), cgroup=None).read()
    assert snap.pressure is None
    with_psi = [t for t, _ in stats_entries(snap, BalloonFigures(), pressure=True)]
    without = [t for t, _ in stats_entries(snap, BalloonFigures(), pressure=False)]
    assert with_psi[:16] == list(range(16)) == without[:16]
    assert set(with_psi) - set(without) == set(range(0x8000, 0x8008))
    assert len(set(with_psi)) == len(with_psi)


def test_cgroup_v1_container_reports_the_container(tmp_path: Path) -> None:
    group = tmp_path / "cg" / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (group / "memory.usage_in_bytes").write_text(f"{GiB + 100 * 4096}\n")
    (group / "memory.stat").write_text(
        f"total_cache 400000000\ntotal_inactive_file {300 * 4096}\ntotal_pgfault 77\n"
        f"total_pgmajfault 7\nhierarchical_memory_limit {2 * GiB}\n"
    )
    (group / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    proc = fake_proc(
        tmp_path, cgroup_lines="4:memory:/docker/abc\n1:cpu:/\n",
        mountinfo=mountinfo_line(tmp_path / "cg" / "memory", "cgroup", "memory"),
    )
    found = detect_cgroup(proc)
    assert found == Cgroup(1, group, 2 * GiB)
    source = MemorySource(proc)
    assert source.in_container and source.total_bytes == 2 * GiB
    snap = source.read()
    assert snap.in_cgroup and snap.total_bytes == 2 * GiB
    assert snap.available_bytes == 2 * GiB - (GiB + 100 * 4096) + 300 * 4096
    assert snap.free_bytes == GiB - 100 * 4096
    assert snap.caches_bytes == 400000000
    assert (snap.minor_faults, snap.major_faults, snap.oom_kills) == (70, 7, 3)
    tags = dict(stats_entries(snap, BalloonFigures(), pressure=False))
    assert tags[StatTag.CGROUP] == 1 and tags[StatTag.MEMTOT] == 2 * GiB


def test_cgroup_v2_container_uses_its_limit_pressure_and_events(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    group = root / "system.slice" / "box"
    group.mkdir(parents=True)
    (root / "system.slice" / "memory.max").write_text(f"{GiB}\n")  # the parent is tighter
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text(f"{GiB // 2}\n")
    (group / "memory.stat").write_text(f"file 5000\ninactive_file {4096 * 10}\npgfault 50\n"
                                       "pgmajfault 5\n")
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (group / "memory.pressure").write_text(
        "some avg10=50.00 avg60=1.00 avg300=0.00 total=99\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    proc = fake_proc(tmp_path, cgroup_lines="0::/system.slice/box\n",
                     mountinfo=mountinfo_line(root, "cgroup2", "nsdelegate"))
    source = MemorySource(proc)
    assert source.cgroup == Cgroup(2, group, GiB)
    assert source.pressure_path == group / "memory.pressure"
    snap = source.read()
    assert snap.total_bytes == GiB
    assert snap.available_bytes == GiB // 2 + 40960
    assert snap.oom_kills == 1 and snap.caches_bytes == 5000
    assert snap.pressure == Pressure(50.0, 1.0, 0.0, 0.0, 0.0, 0.0, 99, 0)


def test_a_cgroup_without_a_real_limit_is_not_a_container(tmp_path: Path) -> None:
    group = tmp_path / "cg" / "memory" / "x"
    group.mkdir(parents=True)
    (group / "memory.stat").write_text(f"hierarchical_memory_limit {9223372036854771712}\n")
    proc = fake_proc(tmp_path, cgroup_lines="4:memory:/x\n",
                     mountinfo=mountinfo_line(tmp_path / "cg" / "memory", "cgroup", "memory"))
    assert detect_cgroup(proc).limit_bytes == UNLIMITED
    source = MemorySource(proc)
    assert not source.in_container and source.total_bytes == 8000000 * 1024


def test_psi_parsing_tolerates_missing_and_odd_files(tmp_path: Path) -> None:
    assert read_pressure(tmp_path / "nothing") is None
    (tmp_path / "bad").write_text("garbage\n")
    assert read_pressure(tmp_path / "bad") is None
    (tmp_path / "some").write_text("some avg10=0.50 avg60=0.00 avg300=0.00 total=5\n")
    assert read_pressure(tmp_path / "some") == Pressure(some_avg10=0.5, some_total_us=5)


def test_ram_layout_from_iomem_in_4k_frames(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "iomem").write_text(
        "00000000-00000fff : Reserved\n"
        "00001000-0009fbff : System RAM\n"
        "00100000-bfffffff : System RAM\n"
        "  01000000-02259aff : Kernel code\n"
        "100000000-13fffffff : System RAM\n"
    )
    # 0x9fbff is not a page end: the partial last page is not RAM we can name.
    assert ram_layout(proc, tmp_path / "none") == RangeSet(
        [(0x1, 0x9e), (0x100, 0xbff00), (0x100000, 0x40000)])


def test_ram_layout_falls_back_to_the_firmware_map(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "iomem").write_text("00000000-00000000 : System RAM\n")  # not root: zeros
    firmware = tmp_path / "memmap"
    for index, (start, end, kind) in enumerate(
        [(0x0, 0x9fbff, "System RAM"), (0xf0000, 0xfffff, "Reserved"),
         (0x100000, 0x7ffdffff, "System RAM")]
    ):
        entry = firmware / str(index)
        entry.mkdir(parents=True)
        (entry / "start").write_text(f"{start:#x}\n")
        (entry / "end").write_text(f"{end:#x}\n")
        (entry / "type").write_text(kind + "\n")
    assert ram_layout(proc, firmware) == RangeSet([(0, 0x9f), (0x100, 0x7fee0)])


def test_this_machine(tmp_path: Path) -> None:
    source = MemorySource()
    snap = source.read()
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024)
        for line in Path("/proc/meminfo").read_text().splitlines()
    )
    if not source.in_container:
        assert snap.total_bytes == meminfo["MemTotal"]
    assert 0 < snap.available_bytes <= snap.total_bytes
    assert snap.minor_faults > 0
    layout = ram_layout()
    if layout:
        assert layout.num_pages * 4096 >= meminfo["MemTotal"]


@pytest.mark.parametrize("value,expected", [(0.0, 0), (0.005, 1), (99.99, 9999), (100.0, 10000)])
def test_percent_to_hundredths(tmp_path: Path, value: float, expected: int) -> None:
    snap = MemorySource(fake_proc(tmp_path, psi=None), cgroup=None).read()
    snap = replace(snap, pressure=Pressure(some_avg10=value))
    tags = dict(stats_entries(snap, BalloonFigures(), pressure=True))
    assert tags[StatTag.PSI_SOME_AVG10] == expected
