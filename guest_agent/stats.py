"""Memory statistics: what the guest (or its container) has, as virtio's stats tags.

Theory of operation
-------------------
``MemorySource.read()`` takes one ``MemorySnapshot`` from /proc/meminfo,
/proc/vmstat and /proc/pressure/memory -- or, when the agent runs in a memory
cgroup whose limit is below the machine's MemTotal (a container), from that
cgroup's files, so that "total", "available" and "free" are the container's:

========  ==========================================  ===========================================
          cgroup v2                                   cgroup v1
========  ==========================================  ===========================================
total     min(memory.max up the tree, MemTotal)       hierarchical_memory_limit (memory.stat)
used      memory.current                              memory.usage_in_bytes
reclaim.  inactive_file (memory.stat)                 total_inactive_file (memory.stat)
caches    file (memory.stat)                          total_cache (memory.stat)
faults    pgfault / pgmajfault (memory.stat)          total_pgfault / total_pgmajfault
OOM kills oom_kill (memory.events)                    oom_kill (memory.oom_control)
PSI       memory.pressure                             /proc/pressure/memory (v1 has none)
========  ==========================================  ===========================================

available = min(total - used + reclaimable, the machine's MemAvailable); free =
min(total - used, MemFree).  Swap and reclaim counters are the machine's in both
cases (a cgroup has no such counters that mean the same).

``stats_entries`` turns a snapshot plus the balloon's own figures into the
``(tag, value)`` pairs of a STATS message: always the same set of tags (the
virtio driver rule), bytes for memory and swap, counts for events, PSI in
hundredths of a percent with totals in microseconds.

Everything here reads files; nothing writes, and nothing needs root except
/proc/iomem (``ram_layout`` falls back to /sys/firmware/memmap).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from protocol.constants import BalloonState, StatTag
from protocol.ranges import RangeSet
from protocol.units import PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "Cgroup",
    "Pressure",
    "MemorySnapshot",
    "MemorySource",
    "BalloonFigures",
    "detect_cgroup",
    "read_pressure",
    "stats_entries",
    "ram_layout",
]

UNLIMITED = 1 << 62  # a cgroup limit at or above this means "no limit"


@dataclass(frozen=True)
class Pressure:
    """One PSI file (memory): stall percentages and cumulative stall times."""

    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0
    some_total_us: int = 0
    full_total_us: int = 0


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory of the guest (or container) at one moment.  Sizes are bytes."""

    total_bytes: int
    available_bytes: int
    free_bytes: int
    caches_bytes: int
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0
    major_faults: int = 0
    minor_faults: int = 0
    htlb_alloc: int = 0
    htlb_fail: int = 0
    oom_kills: int = 0
    alloc_stalls: int = 0
    async_scan: int = 0
    direct_scan: int = 0
    async_reclaim: int = 0
    direct_reclaim: int = 0
    pressure: Pressure | None = None
    """PSI of the memory resource, or None where it cannot be read."""
    in_cgroup: bool = False
    """True when total/available/free describe a container's cgroup."""


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup the agent runs in."""

    version: int
    """1 or 2."""
    path: Path
    """Its directory (under the cgroup mount)."""
    limit_bytes: int
    """The effective limit (the smallest one up the tree); UNLIMITED if none."""


@dataclass(frozen=True)
class BalloonFigures:
    """The balloon's own numbers, for the STATS message."""

    ballooned_pages: int = 0
    pending_pages: int = 0
    state: BalloonState = BalloonState(0)
    min_free_bytes: int = 0


# -- parsing ---------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _key_values(text: str | None, unit: int = 1) -> dict[str, int]:
    """``name value [kB]`` lines (meminfo, vmstat, memory.stat) as a dict."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2:
            try:
                value = int(parts[1])
            except ValueError:
                continue
            if len(parts) >= 3 and parts[2] == "kB":
                value *= 1024
            out[parts[0]] = value * unit
    return out


# The few lines of /proc/meminfo and /proc/vmstat a snapshot uses.  The guard reads
# them every half second; parsing every line (~230 of them) in Python cost ~4x as
# much, which a one-vCPU guest pays out of the time it could spend inflating.
_MEMINFO_RE = re.compile(r"^(MemTotal|MemFree|MemAvailable):[ \t]+(\d+) kB$", re.M)
_VMSTAT_RE = re.compile(
    r"^(nr_file_pages|pgfault|pgmajfault|oom_kill|pswpin|pswpout|htlb_buddy_alloc_success"
    r"|htlb_buddy_alloc_fail|pgscan_kswapd|pgscan_direct|pgsteal_kswapd|pgsteal_direct"
    r"|allocstall_\w+) (\d+)$",
    re.M,
)


def _meminfo(text: str | None) -> dict[str, int]:
    return {name: int(value) << 10 for name, value in _MEMINFO_RE.findall(text or "")}


def _vmstat(text: str | None) -> dict[str, int]:
    return {name: int(value) for name, value in _VMSTAT_RE.findall(text or "")}


def read_pressure(path: Path) -> Pressure | None:
    """Parse a PSI file (``some avg10=.. avg60=.. avg300=.. total=..`` and ``full ...``).

    Returns None if the file cannot be read (no PSI: CONFIG_PSI=n or psi=0).
    """
    text = _read(path)
    if text is None:
        return None
    fields: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            name, _, value = item.partition("=")
            try:
                fields[f"{kind}_{name}"] = float(value)
            except ValueError:
                continue
    if "some_avg10" not in fields:
        return None
    return Pressure(
        some_avg10=fields.get("some_avg10", 0.0),
        some_avg60=fields.get("some_avg60", 0.0),
        some_avg300=fields.get("some_avg300", 0.0),
        full_avg10=fields.get("full_avg10", 0.0),
        full_avg60=fields.get("full_avg60", 0.0),
        full_avg300=fields.get("full_avg300", 0.0),
        some_total_us=int(fields.get("some_total", 0)),
        full_total_us=int(fields.get("full_total", 0)),
    )


def _mounts(proc: Path) -> list[tuple[Path, str, str]]:
    """(mount point, fs type, super options) from mountinfo."""
    out = []
    for line in (_read(proc / "self" / "mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        left_fields, right_fields = left.split(), right.split()
        if len(left_fields) < 5 or len(right_fields) < 3:
            continue
        point = left_fields[4].replace("\\040", " ")
        out.append((Path(point), right_fields[0], right_fields[2]))
    return out


def _limit_v2(directory: Path, root: Path) -> int:
    limit = UNLIMITED
    current = directory
    while True:
        text = _read(current / "memory.max")
        if text is not None and text.strip() != "max":
            try:
                limit = min(limit, int(text))
            except ValueError:
                pass
        if current == root or root not in current.parents:
            return limit
        current = current.parent


def detect_cgroup(proc: Path = Path("/proc")) -> Cgroup | None:
    """The memory cgroup of this process, if the memory controller is mounted.

    Reads /proc/self/cgroup and /proc/self/mountinfo; prefers cgroup v2 when its
    memory controller is enabled for the process's cgroup.
    """
    lines = (_read(proc / "self" / "cgroup") or "").splitlines()
    mounts = _mounts(proc)
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            for point, fstype, _ in mounts:
                if fstype != "cgroup2":
                    continue
                directory = point / relative.lstrip("/")
                if (directory / "memory.max").exists() or (directory / "memory.current").exists():
                    return Cgroup(2, directory, _limit_v2(directory, point))
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if "memory" not in controllers.split(","):
            continue
        for point, fstype, options in mounts:
            if fstype == "cgroup" and "memory" in options.split(","):
                directory = point / relative.lstrip("/")
                stat = _key_values(_read(directory / "memory.stat"))
                limit = stat.get("hierarchical_memory_limit")
                if limit is None:
                    text = _read(directory / "memory.limit_in_bytes")
                    limit = int(text) if text and text.strip().isdigit() else UNLIMITED
                return Cgroup(1, directory, min(limit, UNLIMITED))
    return None


# -- the source ------------------------------------------------------------------------


class MemorySource:
    """Reads snapshots of this guest's (or container's) memory.

    ``proc`` and ``cgroup`` exist for tests; by default the real /proc and the
    cgroup found from /proc/self/cgroup.  A cgroup whose limit is not below the
    machine's MemTotal is not a container: the machine's figures are used.
    """

    def __init__(self, proc: Path = Path("/proc"), cgroup: Cgroup | None | bool = True) -> None:
        self.proc = proc
        found = detect_cgroup(proc) if cgroup is True else (cgroup or None)
        machine_total = _key_values(_read(proc / "meminfo")).get("MemTotal", 0)
        self.machine_total_bytes = machine_total
        self.cgroup: Cgroup | None = None
        if isinstance(found, Cgroup) and found.limit_bytes < machine_total:
            self.cgroup = found
        self.pressure_path = proc / "pressure" / "memory"
        if self.cgroup is not None and self.cgroup.version == 2:
            if (self.cgroup.path / "memory.pressure").exists():
                self.pressure_path = self.cgroup.path / "memory.pressure"
        self.has_pressure = read_pressure(self.pressure_path) is not None

    @property
    def in_container(self) -> bool:
        return self.cgroup is not None

    @property
    def total_bytes(self) -> int:
        """The memory this guest (or container) has: MemTotal or the cgroup limit."""
        if self.cgroup is not None:
            return min(self.cgroup.limit_bytes, self.machine_total_bytes)
        return self.machine_total_bytes

    def read_for_guard(self, *, pressure: bool) -> MemorySnapshot:
        """What the guard looks at every ``--guard-interval``: total, available and free
        memory, and PSI only if ``pressure`` (the guard reads it during a pressure
        episode).  Outside a container that is /proc/meminfo alone: vmstat and PSI,
        which only STATS need, would double the cost of every tick.  Everything else
        in the snapshot reads zero."""
        if self.cgroup is not None:
            return self.read()
        meminfo = _meminfo(_read(self.proc / "meminfo"))
        return MemorySnapshot(
            total_bytes=meminfo.get("MemTotal", 0),
            available_bytes=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
            free_bytes=meminfo.get("MemFree", 0),
            caches_bytes=0,
            pressure=read_pressure(self.pressure_path) if pressure and self.has_pressure
            else None,
        )

    def read(self) -> MemorySnapshot:
        """One snapshot.  Files that cannot be read count as zeros (never an error:
        statistics must not stop the balloon)."""
        meminfo = _meminfo(_read(self.proc / "meminfo"))
        vmstat = _vmstat(_read(self.proc / "vmstat"))
        pressure = read_pressure(self.pressure_path) if self.has_pressure else None
        total = meminfo.get("MemTotal", 0)
        available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
        free = meminfo.get("MemFree", 0)
        caches = vmstat.get("nr_file_pages", 0) << PAGE_SHIFT
        faults = vmstat.get("pgfault", 0)
        major = vmstat.get("pgmajfault", 0)
        oom_kills = vmstat.get("oom_kill", 0)
        if self.cgroup is not None:
            group = self.cgroup
            limit = min(group.limit_bytes, total)
            if group.version == 2:
                used = _int(_read(group.path / "memory.current"))
                stat = _key_values(_read(group.path / "memory.stat"))
                reclaimable = stat.get("inactive_file", 0)
                caches = stat.get("file", 0)
                faults, major = stat.get("pgfault", faults), stat.get("pgmajfault", major)
                oom_kills = _key_values(_read(group.path / "memory.events")).get("oom_kill", 0)
            else:
                used = _int(_read(group.path / "memory.usage_in_bytes"))
                stat = _key_values(_read(group.path / "memory.stat"))
                reclaimable = stat.get("total_inactive_file", 0)
                caches = stat.get("total_cache", 0)
                faults = stat.get("total_pgfault", faults)
                major = stat.get("total_pgmajfault", major)
                oom_kills = _key_values(_read(group.path / "memory.oom_control")).get(
                    "oom_kill", 0
                )
            available = max(0, min(limit - used + reclaimable, available))
            free = max(0, min(limit - used, free))
            total = limit
        return MemorySnapshot(
            total_bytes=total,
            available_bytes=available,
            free_bytes=free,
            caches_bytes=caches,
            swap_in_bytes=vmstat.get("pswpin", 0) << PAGE_SHIFT,
            swap_out_bytes=vmstat.get("pswpout", 0) << PAGE_SHIFT,
            major_faults=major,
            minor_faults=max(0, faults - major),
            htlb_alloc=vmstat.get("htlb_buddy_alloc_success", 0),
            htlb_fail=vmstat.get("htlb_buddy_alloc_fail", 0),
            oom_kills=oom_kills,
            alloc_stalls=sum(v for k, v in vmstat.items() if k.startswith("allocstall_")),
            async_scan=vmstat.get("pgscan_kswapd", 0),
            direct_scan=vmstat.get("pgscan_direct", 0),
            async_reclaim=vmstat.get("pgsteal_kswapd", 0),
            direct_reclaim=vmstat.get("pgsteal_direct", 0),
            pressure=pressure,
            in_cgroup=self.cgroup is not None,
        )


def _int(text: str | None) -> int:
    try:
        return int((text or "0").strip())
    except ValueError:
        return 0


# -- the wire form ---------------------------------------------------------------------

_U64 = (1 << 64) - 1


def _hundredths(percent: float) -> int:
    return max(0, math.floor(percent * 100 + 0.5))


def stats_entries(
    snapshot: MemorySnapshot, balloon: BalloonFigures, *, pressure: bool
) -> tuple[tuple[int, int], ...]:
    """The STATS entries for ``snapshot``: the 16 Linux tags, then uballoon's.

    ``pressure`` adds the PSI tags (STATS_PRESSURE negotiated and PSI readable);
    the same set of tags is sent every time.
    """
    s = snapshot
    values: list[tuple[int, int]] = [
        (StatTag.SWAP_IN, s.swap_in_bytes),
        (StatTag.SWAP_OUT, s.swap_out_bytes),
        (StatTag.MAJFLT, s.major_faults),
        (StatTag.MINFLT, s.minor_faults),
        (StatTag.MEMFREE, s.free_bytes),
        (StatTag.MEMTOT, s.total_bytes),
        (StatTag.AVAIL, s.available_bytes),
        (StatTag.CACHES, s.caches_bytes),
        (StatTag.HTLB_PGALLOC, s.htlb_alloc),
        (StatTag.HTLB_PGFAIL, s.htlb_fail),
        (StatTag.OOM_KILL, s.oom_kills),
        (StatTag.ALLOC_STALL, s.alloc_stalls),
        (StatTag.ASYNC_SCAN, s.async_scan),
        (StatTag.DIRECT_SCAN, s.direct_scan),
        (StatTag.ASYNC_RECLAIM, s.async_reclaim),
        (StatTag.DIRECT_RECLAIM, s.direct_reclaim),
    ]
    if pressure:
        p = s.pressure or Pressure()
        values += [
            (StatTag.PSI_SOME_AVG10, _hundredths(p.some_avg10)),
            (StatTag.PSI_SOME_AVG60, _hundredths(p.some_avg60)),
            (StatTag.PSI_SOME_AVG300, _hundredths(p.some_avg300)),
            (StatTag.PSI_FULL_AVG10, _hundredths(p.full_avg10)),
            (StatTag.PSI_FULL_AVG60, _hundredths(p.full_avg60)),
            (StatTag.PSI_FULL_AVG300, _hundredths(p.full_avg300)),
            (StatTag.PSI_SOME_TOTAL, p.some_total_us),
            (StatTag.PSI_FULL_TOTAL, p.full_total_us),
        ]
    values += [
        (StatTag.BALLOON_PAGES, balloon.ballooned_pages),
        (StatTag.BALLOON_PENDING_PAGES, balloon.pending_pages),
        (StatTag.BALLOON_STATE, int(balloon.state)),
        (StatTag.MIN_FREE, balloon.min_free_bytes),
        (StatTag.CGROUP, 1 if s.in_cgroup else 0),
    ]
    return tuple((int(tag), min(max(0, int(value)), _U64)) for tag, value in values)


# -- the RAM map -----------------------------------------------------------------------


@dataclass
class _Span:
    start: int
    end: int  # inclusive, as /proc/iomem prints it
    kind: str = field(default="")


def _pfns(spans: list[_Span]) -> RangeSet:
    starts, counts = [], []
    for span in spans:
        first = -(-span.start // PAGE_SIZE)
        last = (span.end + 1) // PAGE_SIZE
        if last > first:
            starts.append(first)
            counts.append(last - first)
    return RangeSet.from_ranges(starts, counts)


def ram_layout(proc: Path = Path("/proc"), firmware: Path = Path("/sys/firmware/memmap")) -> (
    RangeSet
):
    """Guest-physical RAM ("System RAM") as 4 KiB PFN ranges.

    From /proc/iomem's top-level entries (root sees real addresses; others see
    zeros), else from /sys/firmware/memmap.  Empty if neither says anything.
    """
    spans: list[_Span] = []
    for line in (_read(proc / "iomem") or "").splitlines():
        if line.startswith(" "):
            continue  # a child entry (kernel code, ...) inside a top-level range
        head, _, name = line.partition(" : ")
        low, _, high = head.partition("-")
        if name.strip() != "System RAM":
            continue
        try:
            spans.append(_Span(int(low, 16), int(high, 16)))
        except ValueError:
            continue
    if spans and any(s.end for s in spans):
        return _pfns(spans)
    spans = []
    try:
        entries = sorted(os.listdir(firmware))
    except OSError:
        entries = []
    for entry in entries:
        kind = (_read(firmware / entry / "type") or "").strip()
        if kind != "System RAM":
            continue
        try:
            start = int((_read(firmware / entry / "start") or "").strip(), 16)
            end = int((_read(firmware / entry / "end") or "").strip(), 16)
        except ValueError:
            continue
        spans.append(_Span(start, end, kind))
    return _pfns(spans)
