"""The control socket: JSON lines over a real Unix socket, against the fake host."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from host_backend.control import (
    MAX_REQUEST_BYTES,
    LineBuffer,
    LineTooLong,
    bind_unix_listener,
    handle_request,
    serve_control,
    stat_name,
)
from protocol.constants import StatTag
from protocol.errors import PolicyError
from tests.control.fake_host import GIB, MIB, FakeHost
from tests.control.helpers import LineClient


@pytest.fixture
def host() -> FakeHost:
    h = FakeHost(capacity_bytes=8 * GIB)
    h.add("vm1", 2 * GIB, min_bytes=512 * MIB, available_bytes=GIB, pressure=1.5)
    h.add("vm2", 4 * GIB, connected=False, reclaim="accounting")
    return h


async def connect(path) -> LineClient:
    return LineClient(await trio.open_unix_socket(str(path)))


@pytest.fixture
async def served(host, tmp_path, nursery):
    path = tmp_path / "control.sock"
    await nursery.start(serve_control, host, path)
    return path


# --------------------------------------------------------------------------------------
# Framing and request meaning (no I/O)


@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=8),
       st.data())
def test_lines_survive_any_split(lines, data):
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buffer = LineBuffer()
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += buffer.feed(stream[start:end])
    assert out == [line.rstrip(b"\r") for line in lines]


def test_a_line_over_the_limit_is_refused_before_it_ends():
    buffer = LineBuffer(max_bytes=100)
    buffer.feed(b"x" * 100)
    with pytest.raises(LineTooLong):
        buffer.feed(b"x")


def test_stat_names_are_qemus_for_linux_tags_and_readable_for_ours():
    assert stat_name(StatTag.MEMFREE) == "stat-free-memory"
    assert stat_name(StatTag.OOM_KILL) == "oom-kill"
    assert stat_name(StatTag.PSI_SOME_AVG10) == "psi-some-avg10"
    assert stat_name(0x7777) == "tag-0x7777"


@pytest.mark.parametrize("request_, message", [
    ([], "a request must be a JSON object"),
    ({}, "a request needs a 'cmd' string"),
    ({"cmd": "reboot"}, "unknown command 'reboot'"),
    ({"cmd": "guest"}, "guest: 'name' must be a non-empty string"),
    ({"cmd": "set", "name": "vm1"}, "set: 'size' is missing"),
    ({"cmd": "set", "name": "vm1", "size": "12Q"}, "invalid size '12Q'"),
    ({"cmd": "set", "name": "vm1", "size": 1.5}, "set: 'size' must be bytes"),
    ({"cmd": "set", "name": "vm1", "size": GIB, "clamp": "yes"}, "set: 'clamp' must be"),
    ({"cmd": "guest", "name": "vm9"}, "unknown guest vm9"),
])
def test_bad_requests_are_one_line_policy_errors(host, request_, message):
    with pytest.raises(PolicyError) as caught:
        handle_request(host, request_)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------
# Over the socket


async def test_socket_is_owner_only(served):
    assert stat.S_IMODE(os.lstat(served).st_mode) == 0o600


async def test_status_guest_and_pool(served):
    client = await connect(served)
    status = await client.request("status", id="s1")
    assert status["ok"] is True and status["id"] == "s1"
    guests = {g["name"]: g for g in status["result"]["guests"]}
    assert list(guests) == ["vm1", "vm2"]
    assert guests["vm1"]["ram_bytes"] == 2 * GIB
    assert guests["vm1"]["pressure"] == 1.5
    assert guests["vm2"]["connected"] is False and guests["vm2"]["reclaim"] == "accounting"
    assert status["result"]["pool"]["capacity_bytes"] == 8 * GIB

    guest = await client.request("guest", name="vm1")
    assert guest["result"] == guests["vm1"]
    pool = await client.request("pool")
    assert pool["result"]["committed_bytes"] == {"vm1": 2 * GIB, "vm2": 4 * GIB}
    assert pool["result"]["free_bytes"] == 2 * GIB
    await client.aclose()


async def test_set_takes_bytes_sizes_and_auto_and_never_clamps_unless_asked(served, host):
    client = await connect(served)
    reply = await client.request("set", name="vm1", size="1536M")
    assert reply["ok"] and reply["result"]["target_bytes"] == 1536 * MIB
    assert reply["result"]["guest"]["manual"] is True
    assert host.calls[-1] == ("set_target", "vm1", 1536 * MIB, False)

    reply = await client.request("set", name="vm1", size=3 * GIB)
    assert reply == {"ok": False, "error": reply["error"]}
    assert "more than its RAM" in reply["error"]
    assert host.record("vm1").target_bytes == 1536 * MIB

    reply = await client.request("set", name="vm1", size=3 * GIB, clamp=True)
    assert reply["result"]["target_bytes"] == 2 * GIB

    reply = await client.request("set", name="vm1", size="auto")
    assert reply["ok"] and reply["result"]["guest"]["manual"] is False
    assert host.calls[-1] == ("set_target", "vm1", None, False)
    await client.aclose()


async def test_stats_and_release(served, host):
    client = await connect(served)
    assert (await client.request("stats", name="vm1"))["result"] == {"name": "vm1",
                                                                     "stats": None}
    host.set_stats("vm1", {StatTag.AVAIL: GIB, StatTag.PSI_SOME_AVG10: 250}, when=1000.5)
    stats = (await client.request("stats", name="vm1"))["result"]["stats"]
    assert stats["last_update"] == 1000.5
    assert stats["stats"] == [
        {"tag": 6, "name": "stat-available-memory", "value": GIB},
        {"tag": 0x8000, "name": "psi-some-avg10", "value": 250},
    ]
    assert (await client.request("stats", name="nope"))["error"] == "unknown guest nope"

    refused = await client.request("release", name="vm1")
    assert refused["ok"] is False and "connected" in refused["error"]
    assert (await client.request("release", name="vm2"))["result"] == {"released": "vm2"}
    assert [g.name for g in host.guests()] == ["vm1"]
    await client.aclose()


async def test_bad_json_is_answered_and_the_connection_goes_on(served):
    client = await connect(served)
    await client.send(b"{not json\n")
    reply = await client.receive()
    assert reply["ok"] is False and reply["error"].startswith("invalid JSON")
    assert (await client.request("pool"))["ok"] is True
    await client.aclose()


async def test_pipelined_requests_are_answered_in_order(served):
    client = await connect(served)
    await client.send(b"".join(json.dumps({"cmd": "guest", "name": n, "id": i}).encode()
                               + b"\n" for i, n in enumerate(["vm1", "vm9", "vm2"])))
    replies = [await client.receive() for _ in range(3)]
    assert [r["id"] for r in replies] == [0, 1, 2]
    assert [r["ok"] for r in replies] == [True, False, True]
    await client.aclose()


async def test_a_10mb_line_gets_an_error_and_only_that_client_is_dropped(served, nursery):
    good = await connect(served)
    bad = await connect(served)

    async def flood() -> None:
        try:
            await bad.stream.send_all(b"x" * (10 * 1024 * 1024))
        except trio.BrokenResourceError:
            pass  # the server hung up mid-flood, as it should

    nursery.start_soon(flood)
    with trio.fail_after(10):
        reply = await bad.receive()
        assert reply == {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}
        try:
            assert await bad.receive() is None
        except trio.BrokenResourceError:
            pass  # closing with unread input resets the connection: dropped either way
        assert (await good.request("pool"))["ok"] is True
    await good.aclose()
    await bad.aclose()


async def test_watch_streams_a_snapshot_then_one_per_change(served, host):
    client = await connect(served)
    await client.send({"cmd": "watch", "min_interval_s": 0, "id": "w"})
    with trio.fail_after(10):
        first = await client.receive()
        assert first["ok"] and first["id"] == "w"
        assert first["result"]["guests"][0]["actual_bytes"] == 2 * GIB
        host.set_actual("vm1", GIB)
        second = await client.receive()
        assert second["result"]["guests"][0]["actual_bytes"] == GIB
        assert second["changes"] > first["changes"]
    await client.aclose()


async def test_watch_one_guest_and_its_release_ends_the_stream(served, host):
    client = await connect(served)
    await client.send({"cmd": "watch", "name": "vm2", "min_interval_s": 0})
    with trio.fail_after(10):
        assert (await client.receive())["result"]["name"] == "vm2"
        host.set_actual("vm1", GIB)  # another guest: nothing new for this stream
        host.set_actual("vm2", 3 * GIB)
        assert (await client.receive())["result"]["actual_bytes"] == 3 * GIB
        host.remove("vm2")
        assert await client.receive() == {"ok": False, "error": "unknown guest vm2"}
        assert await client.receive() is None
    await client.aclose()


async def test_watch_of_an_unknown_guest_is_an_error(served):
    client = await connect(served)
    assert await client.request("watch", name="vm9") == {"ok": False,
                                                        "error": "unknown guest vm9"}
    await client.aclose()


async def test_the_socket_is_removed_on_the_way_out_and_never_stolen(tmp_path, host):
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, host, path)
        with pytest.raises(PolicyError, match="another process is serving"):
            bind_unix_listener(path)
        nursery.cancel_scope.cancel()
    assert not path.exists()

    path.write_text("precious")
    with pytest.raises(PolicyError, match="not a socket"):
        bind_unix_listener(path)
    assert path.read_text() == "precious"

    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, host, stale)
        client = await connect(stale)
        assert (await client.request("pool"))["ok"]
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_watcher_that_vanishes_does_not_take_the_server_down(served, host):
    for _ in range(3):
        watcher = await connect(served)
        await watcher.send({"cmd": "watch", "min_interval_s": 0})
        await trio.testing.wait_all_tasks_blocked()  # the first snapshot is on its way
        # Hang up without reading it: closing a Unix socket with unread data resets the
        # connection, so the server's next read or write fails rather than ending.
        await watcher.aclose()
        for i in range(20):
            host.set_actual("vm1", GIB + i * MIB)
            await trio.testing.wait_all_tasks_blocked()
    client = await connect(served)
    with trio.fail_after(10):
        assert (await client.request("pool"))["ok"]
    await client.aclose()
