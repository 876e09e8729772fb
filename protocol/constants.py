"""Numbers both peers must agree on: message types, header flags, feature bits, stats tags.

Feature bits 0-23 keep virtio-balloon's device meanings (VIRTIO 1.x, Linux
``include/uapi/linux/virtio_balloon.h``); virtio reserves 24-41 for transport features,
so uballoon's own bits live at 50-63.  Stats tags 0-15 are Linux's; ours start at 0x8000.
docs/protocol.md is the normative description of every value here.
"""

from __future__ import annotations

import enum

MAGIC = b"UBLN"
HEADER_VERSION = 1  # frame format version carried in every header
PROTOCOL_VERSIONS = frozenset({1})  # message-semantics versions this code speaks

HEADER_SIZE = 16
CRC_TRAILER_SIZE = 4
MAC_TRAILER_SIZE = 32
NONCE_SIZE = 32

HANDSHAKE_MAX_BODY = 64 * 1024  # until WELCOME sets the negotiated maximum
MIN_NEGOTIATED_MAX_BODY = 4 * 1024 * 1024  # a 1 GiB report of u32 PFNs fits in one frame
MAX_NEGOTIATED_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_BODY = 16 * 1024 * 1024
MAX_WINDOW = 64  # most INFLATE/DEFLATE/RESYNC transactions a host may allow in flight


class MessageType(enum.IntEnum):
    HELLO = 0x01  # guest -> host
    CHALLENGE = 0x02  # host -> guest
    AUTH = 0x03  # guest -> host
    WELCOME = 0x04  # host -> guest
    CONFIG = 0x05  # host -> guest
    INFLATE = 0x10  # guest -> host
    DEFLATE = 0x11  # guest -> host
    RESYNC = 0x12  # guest -> host
    ACK = 0x13  # host -> guest
    NAK = 0x14  # host -> guest
    ACTUAL = 0x20  # guest -> host
    STATS = 0x21  # guest -> host
    STATS_REQUEST = 0x22  # host -> guest
    PING = 0x30  # either
    PONG = 0x31  # either
    BYE = 0x3E  # either
    ERROR = 0x3F  # either


class Flag(enum.IntFlag):
    """Header flags.  Any other bit set is an error."""

    RANGES = 0x0001  # PFN body is (u64 start, u32 count) ranges, not a u32 array
    MORE = 0x0002  # RESYNC only: further parts of this transaction follow
    MAC = 0x8000  # the trailer is a 32-byte HMAC-SHA256, not a CRC-32


PFN_MESSAGES = frozenset({MessageType.INFLATE, MessageType.DEFLATE, MessageType.RESYNC})
REQUEST_MESSAGES = PFN_MESSAGES  # guest requests the host answers with ACK or NAK


class Feature(enum.IntFlag):
    """Feature bits, offered in HELLO and accepted in WELCOME (a 64-bit mask)."""

    # virtio-balloon device features (same bit, same meaning)
    MUST_TELL_HOST = 1 << 0
    STATS_VQ = 1 << 1
    DEFLATE_ON_OOM = 1 << 2
    FREE_PAGE_HINT = 1 << 3  # never accepted: a punched page reads back as zeros
    PAGE_POISON = 1 << 4  # never accepted, for the same reason
    REPORTING = 1 << 5  # free page reporting; this version has no message for it
    # uballoon features
    PFN_RANGES = 1 << 50  # INFLATE/DEFLATE/RESYNC may carry sorted ranges
    STATS_PUSH = 1 << 51  # the guest pushes STATS every stats_interval_ms
    STATS_PRESSURE = 1 << 52  # STATS include PSI memory pressure (tags 0x8000-0x8007)
    STABLE_PFNS = 1 << 53  # reported frames are long-term pinned: the host may punch them
    AUTH = 1 << 54  # the guest holds a per-guest key and can authenticate


NEVER_ACCEPTED = Feature.FREE_PAGE_HINT | Feature.PAGE_POISON | Feature.REPORTING
VIRTIO_DEVICE_BITS = (1 << 24) - 1
UBALLOON_BITS = ((1 << 64) - 1) ^ ((1 << 50) - 1)


class StatTag(enum.IntEnum):
    """STATS tags.  Linux's 0-15 (virtio's ``VIRTIO_BALLOON_S_*``), ours from 0x8000."""

    SWAP_IN = 0  # bytes swapped in
    SWAP_OUT = 1  # bytes swapped out
    MAJFLT = 2  # major faults
    MINFLT = 3  # minor faults
    MEMFREE = 4  # free memory, bytes
    MEMTOT = 5  # total memory, bytes
    AVAIL = 6  # available memory, bytes
    CACHES = 7  # disk caches, bytes
    HTLB_PGALLOC = 8  # hugetlb page allocations
    HTLB_PGFAIL = 9  # hugetlb page allocation failures
    OOM_KILL = 10  # OOM killer invocations
    ALLOC_STALL = 11  # allocation stalls
    ASYNC_SCAN = 12  # pages scanned by kswapd
    DIRECT_SCAN = 13  # pages scanned by direct reclaim
    ASYNC_RECLAIM = 14  # pages reclaimed by kswapd
    DIRECT_RECLAIM = 15  # pages reclaimed by direct reclaim
    # uballoon: memory pressure from /proc/pressure/memory (or the cgroup's memory.pressure)
    PSI_SOME_AVG10 = 0x8000  # hundredths of a percent (12.34% -> 1234)
    PSI_SOME_AVG60 = 0x8001
    PSI_SOME_AVG300 = 0x8002
    PSI_FULL_AVG10 = 0x8003
    PSI_FULL_AVG60 = 0x8004
    PSI_FULL_AVG300 = 0x8005
    PSI_SOME_TOTAL = 0x8006  # microseconds stalled, cumulative
    PSI_FULL_TOTAL = 0x8007
    # uballoon: the balloon's own state
    BALLOON_PAGES = 0x8010  # 4 KiB pages the host has acknowledged
    BALLOON_PENDING_PAGES = 0x8011  # 4 KiB pages reported, not yet acknowledged
    BALLOON_STATE = 0x8012  # BalloonState bits
    MIN_FREE = 0x8013  # the guest's floor (--min-free), bytes
    CGROUP = 0x8014  # 1 when MEMTOT/AVAIL/MEMFREE describe a container's cgroup


class BalloonState(enum.IntFlag):
    """Bits of the BALLOON_STATE stat."""

    FLOOR_REACHED = 1 << 0  # cannot inflate further without going under --min-free
    PRESSURE_DEFLATING = 1 << 1  # deflating because the guest is under memory pressure
    UNSTABLE_FRAMES = 1 << 2  # no long-term pin: the frames may move (accounting only)
    UNCONFIRMED = 1 << 3  # holding pages the host has not confirmed
    FRAMES_MOVED = 1 << 4  # a verification found frames that differ from the report


# QEMU's names for the Linux tags, as in QMP `qom-get ... guest-stats`.
QEMU_STAT_NAMES = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
}


class ByeReason(enum.IntEnum):
    NORMAL = 0  # going away, nothing wrong
    SHUTDOWN = 1  # the sender's service is stopping
    SUPERSEDED = 2  # a newer session of this guest replaced this one
    RELEASED = 3  # an operator released the balloon
    RESTART = 4  # the sender restarts and will reconnect


def feature_names(mask: int) -> list[str]:
    """Names of the bits set in ``mask`` (unknown bits as ``bitN``)."""
    names = []
    for bit in range(64):
        if mask >> bit & 1:
            try:
                names.append(Feature(1 << bit).name or f"bit{bit}")
            except ValueError:
                names.append(f"bit{bit}")
    return names
