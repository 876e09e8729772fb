"""Conformance with the kernel's own definitions in <linux/virtio_balloon.h>.

A small C program compiled against the header (Debian package linux-libc-dev) writes a
``struct virtio_balloon_config`` and an array of ``struct virtio_balloon_stat`` and
prints every constant the header defines; our layouts must decode the bytes exactly
and our constants must equal the header's.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol import codec, wire
from protocol.constants import Feature, MessageType, StatTag
from protocol.events import Config, Stats

HEADER = Path("/usr/include/linux/virtio_balloon.h")

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <linux/virtio_balloon.h>

#define FEATURE(name) printf("\"F_%s\": %d,", #name, VIRTIO_BALLOON_F_##name)
#define STAT(name) printf("\"S_%s\": %d,", #name, VIRTIO_BALLOON_S_##name)

int main(int argc, char **argv) {
    struct virtio_balloon_config config;
    struct virtio_balloon_stat stats[3];
    FILE *out = fopen(argv[1], "wb");
    memset(&config, 0, sizeof config);
    config.num_pages = 0x12345678;
    config.actual = 0x00abcdef;
    fwrite(&config, sizeof config, 1, out);
    stats[0].tag = VIRTIO_BALLOON_S_MEMFREE;  stats[0].val = 0x1122334455667788ULL;
    stats[1].tag = VIRTIO_BALLOON_S_MEMTOT;   stats[1].val = 2147483648ULL;
    stats[2].tag = VIRTIO_BALLOON_S_HTLB_PGFAIL; stats[2].val = 7;
    fwrite(stats, sizeof stats, 1, out);
    fclose(out);
    printf("{");
    FEATURE(MUST_TELL_HOST); FEATURE(STATS_VQ); FEATURE(DEFLATE_ON_OOM);
    FEATURE(FREE_PAGE_HINT); FEATURE(PAGE_POISON); FEATURE(REPORTING);
    STAT(SWAP_IN); STAT(SWAP_OUT); STAT(MAJFLT); STAT(MINFLT); STAT(MEMFREE);
    STAT(MEMTOT); STAT(AVAIL); STAT(CACHES); STAT(HTLB_PGALLOC); STAT(HTLB_PGFAIL);
#ifdef VIRTIO_BALLOON_S_OOM_KILL
    STAT(OOM_KILL); STAT(ALLOC_STALL); STAT(ASYNC_SCAN); STAT(DIRECT_SCAN);
    STAT(ASYNC_RECLAIM); STAT(DIRECT_RECLAIM);
#endif
    printf("\"S_NR\": %d, \"PFN_SHIFT\": %d, \"config_size\": %zu, \"stat_size\": %zu}\n",
           VIRTIO_BALLOON_S_NR, VIRTIO_BALLOON_PFN_SHIFT, sizeof config, sizeof stats[0]);
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if not HEADER.exists() or shutil.which("cc") is None:
        pytest.skip("needs a C compiler and <linux/virtio_balloon.h> (linux-libc-dev)")
    work = tmp_path_factory.mktemp("virtio")
    (work / "probe.c").write_text(PROGRAM)
    subprocess.run(["cc", "-O0", "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    out = subprocess.run(
        [str(work / "probe"), str(work / "bytes")], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout), (work / "bytes").read_bytes()


def test_feature_bits_equal_the_headers(kernel):
    constants, _ = kernel
    for name, bit in constants.items():
        if name.startswith("F_"):
            assert Feature[name[2:]] == 1 << bit, name


def test_stat_tags_equal_the_headers(kernel):
    constants, _ = kernel
    tags = {name[2:]: value for name, value in constants.items() if name.startswith("S_")}
    nr = tags.pop("NR")
    assert len(tags) == nr  # every tag the header defines was checked
    for name, value in tags.items():
        assert StatTag[name] == value, name
    assert constants["PFN_SHIFT"] == 12


def test_config_and_stats_decode_byte_for_byte(kernel):
    constants, data = kernel
    config_size, stat_size = constants["config_size"], constants["stat_size"]
    assert config_size == wire.VirtioBalloonConfig.sizeof() == 16
    assert stat_size == wire.StatEntry.sizeof() == 10
    config_bytes, stats_bytes = data[:config_size], data[config_size:]
    header = codec.FrameHeader(MessageType.CONFIG, 0, 0, len(config_bytes))
    assert codec.decode_body(header, config_bytes) == Config(0x12345678, 0x00ABCDEF)
    header = codec.FrameHeader(MessageType.STATS, 0, 0, len(stats_bytes))
    stats = codec.decode_body(header, stats_bytes)
    assert stats == Stats(((4, 0x1122334455667788), (5, 2147483648), (9, 7)))
    # ...and what we build is what the kernel's struct holds.
    assert codec.encode_event(Config(0x12345678, 0x00ABCDEF), ranges=False)[3] == config_bytes
    assert codec.encode_event(stats, ranges=False)[3] == stats_bytes
