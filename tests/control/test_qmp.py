"""QMP sockets: framing, QEMU's wording and classes, events, the socket set."""

from __future__ import annotations

import json
import logging
import os
import stat
from itertools import pairwise

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from host_backend.qmp import (
    MAX_MESSAGE_BYTES,
    NO_STATS_YET,
    UNREPORTED_STAT,
    EventThrottle,
    GuestMonitor,
    JsonSplitter,
    MessageTooLarge,
    QmpService,
    QmpSession,
    serve_qmp,
)
from protocol.constants import QEMU_STAT_NAMES, StatTag
from tests.control.fake_host import GIB, MIB, FakeHost
from tests.control.helpers import QmpClient, open_qmp, wait_for

BALLOON = "/machine/peripheral/balloon0"

# --------------------------------------------------------------------------------------
# Framing


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


@given(st.lists(json_objects, min_size=1, max_size=6), st.data())
def test_splitting_the_stream_anywhere_yields_the_same_messages(messages, data):
    separators = data.draw(st.lists(st.sampled_from(["", " ", "\n", "\r\n", "\t  "]),
                                    min_size=len(messages), max_size=len(messages)))
    stream = "".join(json.dumps(m, ensure_ascii=data.draw(st.booleans())) + s
                     for m, s in zip(messages, separators, strict=True)).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    splitter = JsonSplitter()
    texts = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        texts += splitter.feed(stream[start:end])
    assert [json.loads(t) for t in texts] == messages


@given(st.lists(st.binary(max_size=4096), max_size=40))
def test_arbitrary_bytes_raise_only_message_too_large_and_stay_bounded(chunks):
    splitter = JsonSplitter(max_bytes=1024)
    for chunk in chunks:
        try:
            splitter.feed(chunk)
        except MessageTooLarge:
            return
        assert len(splitter._buf) <= 1024


def test_a_message_over_the_limit_is_refused_before_it_is_complete():
    splitter = JsonSplitter()
    splitter.feed(b'{"execute": "')
    with pytest.raises(MessageTooLarge):
        for _ in range(MAX_MESSAGE_BYTES // 4096 + 1):
            splitter.feed(b"a" * 4096)


def test_bare_scalars_and_stray_closers_come_out_as_texts_of_their_own():
    assert JsonSplitter().feed(b'1 "x" } {"a": "}"}') == [b"1", b'"x"', b"}", b'{"a": "}"}']


# --------------------------------------------------------------------------------------
# The session: QEMU's words


def session(host: FakeHost, negotiated: bool = True) -> QmpSession:
    s = QmpSession(GuestMonitor(host, "vm1"))
    if negotiated:
        assert s.handle(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    return s


def ask(s: QmpSession, command: str, arguments=None, **extra):
    message = {"execute": command, **extra}
    if arguments is not None:
        message["arguments"] = arguments
    return s.handle(json.dumps(message).encode())


def error(desc: str, error_class: str = "GenericError"):
    return {"error": {"class": error_class, "desc": desc}}


@pytest.fixture
def host() -> FakeHost:
    h = FakeHost()
    h.add("vm1", 2 * GIB, min_bytes=256 * MIB)
    return h


def test_greeting_looks_like_qemu_8(host):
    greeting = session(host, negotiated=False).greeting()
    qemu = greeting["QMP"]["version"]["qemu"]
    assert set(qemu) == {"major", "minor", "micro"} and qemu["major"] == 8
    assert all(isinstance(v, int) for v in qemu.values())
    assert "uballoon" in greeting["QMP"]["version"]["package"]
    assert greeting["QMP"]["capabilities"] == ["oob"]


def test_commands_before_negotiation_are_refused_as_qemu_does(host):
    s = session(host, negotiated=False)
    assert ask(s, "query-balloon", id="a1") == {
        **error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"),
        "id": "a1",
    }
    assert ask(s, "qmp_capabilities", id=7) == {"return": {}, "id": 7}
    assert ask(s, "qmp_capabilities") == error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")


def test_capabilities_negotiation_checks_what_is_enabled(host):
    s = session(host, negotiated=False)
    assert ask(s, "qmp_capabilities", {"enable": ["nope"]}) == error(
        "Parameter 'enable[0]' does not accept value 'nope'")
    assert ask(s, "qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    assert s.handle(b'{"execute": "query-balloon", "exec-oob": "query-balloon"}') == error(
        "QMP input member 'exec-oob' clashes with 'execute'")
    assert s.handle(b'{"exec-oob": "query-balloon"}') == error(
        "The command query-balloon does not support OOB")


def test_exec_oob_without_oob_is_an_unexpected_member(host):
    assert session(host).handle(b'{"exec-oob": "query-balloon"}') == error(
        "QMP input member 'exec-oob' is unexpected")


@pytest.mark.parametrize("text, desc", [
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "query-balloon", "arguments": []}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-balloon", "extra": 1}', "QMP input member 'extra' is unexpected"),
])
def test_malformed_requests_get_qemus_messages(host, text, desc):
    assert session(host).handle(text) == error(desc)


def test_unparsable_json_is_a_generic_error_and_the_session_goes_on(host):
    s = session(host)
    reply = s.handle(b'{"execute": nope}')
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error")
    assert ask(s, "query-balloon") == {"return": {"actual": 2 * GIB}}


def test_unknown_command_and_query_commands(host):
    s = session(host)
    assert ask(s, "quit", id={"x": 1}) == {
        **error("The command quit has not been found", "CommandNotFound"), "id": {"x": 1}}
    names = {c["name"] for c in ask(s, "query-commands")["return"]}
    assert {"qmp_capabilities", "query-version", "query-commands", "balloon",
            "query-balloon", "qom-get", "qom-set", "qom-list"} <= names


def test_query_version(host):
    version = ask(session(host), "query-version")["return"]
    assert version["qemu"]["major"] == 8 and "uballoon" in version["package"]


def test_balloon_sets_the_memory_the_guest_keeps_and_clamps_above_ram(host):
    s = session(host)
    assert ask(s, "balloon", {"value": 1536 * MIB}, id=1) == {"return": {}, "id": 1}
    assert host.record("vm1").target_bytes == 1536 * MIB
    assert ask(s, "balloon", {"value": 64 * GIB}) == {"return": {}}
    assert host.record("vm1").target_bytes == 2 * GIB
    assert host.calls[-1] == ("set_target", "vm1", 64 * GIB, True)


@pytest.mark.parametrize("arguments, desc", [
    ({"value": 0}, "Parameter 'value' expects a size"),
    ({"value": -4096}, "Parameter 'value' expects a size"),
    ({}, "Parameter 'value' is missing"),
    ({"value": "1G"}, "Invalid parameter type for 'value', expected: integer"),
    ({"value": True}, "Invalid parameter type for 'value', expected: integer"),
    ({"value": 1.5e9}, "Invalid parameter type for 'value', expected: integer"),
    ({"value": 2**64}, "Invalid parameter type for 'value', expected: integer"),
    ({"value": GIB, "force": True}, "Parameter 'force' is unexpected"),
])
def test_balloon_argument_errors(host, arguments, desc):
    assert ask(session(host), "balloon", arguments) == error(desc)
    assert not host.calls


def test_query_balloon_reports_actual(host):
    host.set_actual("vm1", 1 * GIB)
    assert ask(session(host), "query-balloon") == {"return": {"actual": GIB}}


def test_a_released_guest_is_a_generic_error(host):
    s = session(host)
    host.remove("vm1")
    assert ask(s, "query-balloon") == error("unknown guest vm1")


def test_guest_stats_before_the_first_update_fail_with_the_string_libvirt_matches(host):
    reply = ask(session(host), "qom-get", {"path": BALLOON, "property": "guest-stats"})
    assert reply == error("guest hasn't updated any stats yet")
    assert NO_STATS_YET == "guest hasn't updated any stats yet"


def test_guest_stats_use_qemus_names_and_unreported_reads_two_to_the_64_minus_1(host):
    host.set_stats("vm1", {StatTag.MEMFREE: 512 * MIB, StatTag.AVAIL: GIB,
                           StatTag.PSI_SOME_AVG10: 1234}, when=1_700_000_000.75)
    reply = ask(session(host), "qom-get", {"path": BALLOON, "property": "guest-stats"})
    stats = reply["return"]["stats"]
    assert reply["return"]["last-update"] == 1_700_000_000
    assert set(stats) == set(QEMU_STAT_NAMES.values())  # ours (PSI) are not QEMU's
    assert stats["stat-free-memory"] == 512 * MIB
    assert stats["stat-available-memory"] == GIB
    assert stats["stat-swap-in"] == UNREPORTED_STAT == 18446744073709551615


@pytest.mark.parametrize("path", [
    BALLOON, "balloon0", "peripheral/balloon0", "machine/peripheral/balloon0",
    "//machine/peripheral/balloon0", f"{BALLOON}/virtio-backend", "virtio-backend",
])
def test_the_paths_qemu_resolves_to_the_balloon(host, path):
    host.set_stats("vm1", {StatTag.MEMTOT: 2 * GIB})
    reply = ask(session(host), "qom-get", {"path": path, "property": "guest-stats"})
    assert reply["return"]["stats"]["stat-total-memory"] == 2 * GIB


def test_unknown_paths_and_properties(host):
    s = session(host)
    assert ask(s, "qom-get", {"path": "/machine/peripheral/balloon1",
                              "property": "guest-stats"}) == error(
        "Device '/machine/peripheral/balloon1' not found", "DeviceNotFound")
    assert ask(s, "qom-get", {"path": BALLOON, "property": "nope"}) == error(
        "Property 'virtio-balloon-pci.nope' not found")
    assert ask(s, "qom-get", {"path": BALLOON}) == error("Parameter 'property' is missing")
    assert ask(s, "qom-get", {"path": BALLOON, "property": "type"}) == {
        "return": "virtio-balloon-pci"}


def test_qom_list_walks_down_to_the_balloon(host):
    s = session(host)
    peripheral = ask(s, "qom-list", {"path": "/machine/peripheral"})["return"]
    assert {"name": "balloon0", "type": "child<virtio-balloon-pci>"} in peripheral
    props = {p["name"]: p["type"] for p in ask(s, "qom-list", {"path": BALLOON})["return"]}
    assert props["guest-stats"] == "guest statistics"
    assert props["guest-stats-polling-interval"] == "int"


def test_polling_interval_is_set_and_read_back(host):
    s = session(host)
    prop = {"path": BALLOON, "property": "guest-stats-polling-interval"}
    assert ask(s, "qom-get", prop) == {"return": 0}
    assert ask(s, "qom-set", {**prop, "value": 10}) == {"return": {}}
    assert host.calls[-1] == ("set_stats_interval", "vm1", 10)
    assert ask(s, "qom-get", prop) == {"return": 10}
    host.set_stats("vm1", {StatTag.MEMFREE: 1})
    assert ask(s, "qom-get", prop) == {"return": 10}


@pytest.mark.parametrize("value, desc", [
    (-1, "timer value must be greater than zero"),
    (2**32, "timer value is too big"),
    ("5", "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"),
    (2.5, "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"),
])
def test_polling_interval_errors_are_qemus(host, value, desc):
    reply = ask(session(host), "qom-set", {
        "path": BALLOON, "property": "guest-stats-polling-interval", "value": value})
    assert reply == error(desc)
    assert not host.calls


def test_guest_stats_are_read_only(host):
    reply = ask(session(host), "qom-set", {"path": BALLOON, "property": "guest-stats",
                                           "value": {}})
    assert reply == error("Property 'virtio-balloon-pci.guest-stats' is not writable")


# --------------------------------------------------------------------------------------
# BALLOON_CHANGE rate limit


def test_throttle_sends_the_first_at_once_and_the_latest_at_the_end_of_each_period():
    throttle = EventThrottle(1.0)
    assert throttle.offer({"n": 1}, now=10.0) == [{"n": 1}]
    assert throttle.offer({"n": 2}, now=10.2) == []
    assert throttle.offer({"n": 3}, now=10.5) == []
    assert throttle.expire(10.9) == []
    assert throttle.expire(11.0) == [{"n": 3}]  # the latest wins; a new period opens
    assert throttle.expire(12.0) == []  # nothing held: the period closes
    assert throttle.deadline is None
    assert throttle.offer({"n": 4}, now=12.1) == [{"n": 4}]
    assert throttle.offer({"n": 5}, now=12.5) == []
    # an offer after a missed expiry: the held one goes now, the new one waits
    assert throttle.offer({"n": 6}, now=13.5) == [{"n": 5}]
    assert throttle.expire(14.5) == [{"n": 6}]


@given(st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=30))
def test_throttle_never_sends_two_within_a_period_and_never_loses_the_last(gaps):
    throttle = EventThrottle(1.0)
    sent: list[tuple[float, int]] = []
    now = 0.0
    for n, gap in enumerate(gaps):
        now += gap
        sent += [(now, e["n"]) for e in throttle.expire(now)]
        sent += [(now, e["n"]) for e in throttle.offer({"n": n}, now)]
    while throttle.deadline is not None:
        now = throttle.deadline
        sent += [(now, e["n"]) for e in throttle.expire(now)]
    times = [t for t, _ in sent]
    assert all(b - a >= 1.0 - 1e-9 for a, b in pairwise(times))
    assert sent[-1][1] == len(gaps) - 1


async def test_balloon_change_events_at_most_once_a_second(autojump_clock):
    host = FakeHost()
    host.add("vm1", 2 * GIB)
    service = QmpService(host, None)
    arrivals: list[tuple[float, int]] = []
    final = 2 * GIB - 20 * MIB
    got_final = trio.Event()

    async def collect(client: QmpClient) -> None:
        while True:
            event = await client.next_event()
            assert event["event"] == "BALLOON_CHANGE"
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            arrivals.append((trio.current_time(), event["data"]["actual"]))
            if event["data"]["actual"] == final:
                got_final.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(service.monitor("vm1").serve_stream, server_end)
        client = QmpClient(client_end)
        await client.negotiate()
        nursery.start_soon(collect, client)
        start = trio.current_time()
        for i in range(1, 21):  # the guest deflates 1 MiB every 0.1 s for 2 s
            host.set_actual("vm1", 2 * GIB - i * MIB)
            await trio.sleep(0.1)
        with trio.fail_after(10):
            await got_final.wait()
        nursery.cancel_scope.cancel()

    times = [t for t, _ in arrivals]
    assert arrivals[0][1] == 2 * GIB - MIB and times[0] - start < 0.1  # the first at once
    assert all(b - a >= 1.0 - 1e-9 for a, b in pairwise(times))
    assert 2 <= len(arrivals) <= 4
    assert arrivals[-1][1] == final  # the latest value is never lost


async def test_no_events_before_negotiation(autojump_clock):
    host = FakeHost()
    host.add("vm1", 2 * GIB)
    service = QmpService(host, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(service.monitor("vm1").serve_stream, server_end)
        client = QmpClient(client_end)
        await client.receive()  # greeting
        host.set_actual("vm1", GIB)
        await trio.sleep(5)
        reply = await client.execute("qmp_capabilities")
        assert reply == {"return": {}} and client.events == []
        host.set_actual("vm1", GIB // 2)
        with trio.fail_after(5):
            assert (await client.next_event())["data"] == {"actual": GIB // 2}
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# Sockets


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_sockets_follow_the_guests_and_are_owner_only(tmp_path):
    host = FakeHost(follow=True)
    host.add("vm1", 2 * GIB)
    qmp_dir = tmp_path / "qmp"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_qmp, host, qmp_dir)
        assert mode(qmp_dir) == 0o700
        assert stat.S_ISSOCK(os.lstat(qmp_dir / "vm1.qmp").st_mode)
        assert mode(qmp_dir / "vm1.qmp") == 0o600

        host.add("vm2", GIB)
        await wait_for(lambda: (qmp_dir / "vm2.qmp").exists())
        assert mode(qmp_dir / "vm2.qmp") == 0o600
        client = await open_qmp(qmp_dir / "vm2.qmp")
        await client.negotiate()
        assert await client.execute("query-balloon") == {"return": {"actual": GIB}}

        host.remove("vm2")
        await wait_for(lambda: not (qmp_dir / "vm2.qmp").exists())
        with trio.fail_after(5):
            assert await client.receive() is None  # the monitor went with the guest
        await client.aclose()
        assert (qmp_dir / "vm1.qmp").exists()
        nursery.cancel_scope.cancel()
    assert not (qmp_dir / "vm1.qmp").exists()  # removed on the way out


async def test_many_clients_on_one_socket_all_see_the_change(tmp_path):
    host = FakeHost(follow=True)
    host.add("vm1", 2 * GIB)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_qmp, host, tmp_path)
        clients = [await open_qmp(tmp_path / "vm1.qmp") for _ in range(5)]
        for client in clients:
            await client.negotiate()
        assert await clients[0].execute("balloon", {"value": GIB}, id=1) == {
            "return": {}, "id": 1}
        with trio.fail_after(5):
            for client in clients:
                event = await client.next_event()
                assert event["event"] == "BALLOON_CHANGE"
                assert event["data"] == {"actual": GIB}
            for client in clients:
                assert await client.execute("query-balloon") == {"return": {"actual": GIB}}
                await client.aclose()
        nursery.cancel_scope.cancel()


async def test_an_oversized_message_drops_only_that_client(tmp_path):
    host = FakeHost()
    host.add("vm1", 2 * GIB)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_qmp, host, tmp_path)
        good = await open_qmp(tmp_path / "vm1.qmp")
        await good.negotiate()
        bad = await open_qmp(tmp_path / "vm1.qmp")
        await bad.negotiate()

        async def flood() -> None:
            try:
                await bad.stream.send_all(b'{"execute": "' + b"x" * (10 * 1024 * 1024))
            except trio.BrokenResourceError:
                pass  # the server hung up mid-flood, as it should

        nursery.start_soon(flood)
        with trio.fail_after(10):
            reply = await bad.reply()
            assert reply == error(f"QMP input exceeds {MAX_MESSAGE_BYTES} bytes")
            try:
                assert await bad.receive() is None
            except trio.BrokenResourceError:
                pass  # closing a socket with unread input resets it: dropped either way
            assert await good.execute("query-balloon") == {"return": {"actual": 2 * GIB}}
        await good.aclose()
        await bad.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_socket_is_replaced_and_a_foreign_file_only_skips_its_guest(
        tmp_path, caplog):
    import socket as stdlib_socket

    stale = stdlib_socket.socket(stdlib_socket.AF_UNIX)
    stale.bind(str(tmp_path / "vm1.qmp"))
    stale.close()  # a socket file nobody serves, as a crashed host leaves it
    (tmp_path / "vm2.qmp").write_text("not a socket")
    host = FakeHost()
    host.add("vm1", GIB)
    host.add("vm2", GIB)
    host.add("../escape", GIB)
    with caplog.at_level(logging.WARNING, logger="host_backend.qmp"):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_qmp, host, tmp_path)
            client = await open_qmp(tmp_path / "vm1.qmp")
            await client.negotiate()
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert (tmp_path / "vm2.qmp").read_text() == "not a socket"
    assert not (tmp_path.parent / "escape.qmp").exists()
    assert "vm2" in caplog.text and "escape" in caplog.text


async def test_clients_that_vanish_mid_conversation_do_not_hurt_the_server(tmp_path):
    host = FakeHost(follow=True)
    host.add("vm1", 2 * GIB)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_qmp, host, tmp_path)
        for i in range(3):
            client = await open_qmp(tmp_path / "vm1.qmp")
            await client.negotiate()
            # Ask, and hang up without reading: closing with unread data resets the
            # connection, so the server's next read or write fails rather than ending.
            await client.send({"execute": "balloon", "arguments": {"value": GIB + i * MIB}})
            await client.send({"execute": "query-balloon"})
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
            host.set_actual("vm1", GIB // 2 + i * MIB)  # an event for nobody
            await trio.testing.wait_all_tasks_blocked()
        survivor = await open_qmp(tmp_path / "vm1.qmp")
        with trio.fail_after(10):
            await survivor.negotiate()
            assert (await survivor.execute("query-balloon"))["return"]["actual"] > 0
        await survivor.aclose()
        nursery.cancel_scope.cancel()
