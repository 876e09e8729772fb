"""The dissector, run as users run it: ``python -m protocol dump``."""

import json
import subprocess
import sys

import numpy as np

from protocol.events import Actual, Inflate, Stats
from protocol.ranges import RangeSet
from tests.sessions import deliver, start


def run_dump(data):
    return subprocess.run(
        [sys.executable, "-m", "protocol", "dump", "-"],
        input=data, capture_output=True, check=False,
    )


def capture():
    """What a real authenticated guest sent: HELLO, AUTH, then MAC'd frames."""
    from protocol.connection import GuestConnection, HostConnection
    from protocol.events import Config, Welcome
    from tests.sessions import ALL_FEATURES, KEY

    guest, host = GuestConnection(KEY), HostConnection()
    sent = []
    hello = guest.make_hello(name="vm1", features=ALL_FEATURES, total_pages=1 << 20)
    sent.append(guest.send(hello))
    deliver(sent[-1], host)
    deliver(host.send(host.challenge(KEY)), guest)
    sent.append(guest.send(guest.prove()))
    deliver(sent[-1], host)
    deliver(host.send(Welcome(1, hello.features, 16 << 20, Config(0))), guest)
    pages = RangeSet.from_pfns(np.arange(1000, 1512, dtype=np.uint64))
    sent.append(guest.send(Inflate(1, pages)))
    sent.append(guest.send(Stats(((6, 1 << 30), (0x8012, 1)))))
    sent.append(guest.send(Actual(512)))
    return b"".join(sent)


def test_dump_prints_one_json_object_per_frame():
    result = run_dump(capture())
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [line["type"] for line in lines] == ["HELLO", "AUTH", "INFLATE", "STATS", "ACTUAL"]
    inflate = lines[2]
    assert inflate["pages"] == {"pages": 512, "ranges": [[1000, 512]]}
    assert "RANGES" in inflate["flags"] and "MAC" in inflate["flags"]
    assert lines[3]["balloon_state"] == ["FLOOR_REACHED"]
    assert "STABLE_PFNS" in lines[0]["feature_names"]


def test_dump_of_a_corrupt_stream_names_the_offset_and_fails():
    guest, _ = start(key=None, host_key=None)
    good = guest.send(Actual(1))
    bad = bytearray(guest.send(Actual(2)))
    bad[-2] ^= 0x40
    result = run_dump(good + bytes(bad))
    assert result.returncode == 1
    out = result.stdout.decode().splitlines()
    assert out[-1] == f"error at byte offset {len(good)}: CRC-32 mismatch on ACTUAL frame"
    assert b"Traceback" not in result.stderr


def test_dump_of_a_truncated_stream():
    guest, _ = start(key=None, host_key=None)
    data = guest.send(Actual(1))
    result = run_dump(data[:-1])
    assert result.returncode == 1
    assert result.stdout.decode().strip() == (
        "error at byte offset 0: stream ends inside a frame (23 bytes of it present)"
    )


def test_dump_of_garbage():
    result = run_dump(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert result.returncode == 1
    assert result.stdout.decode().startswith("error at byte offset 0: bad magic")
