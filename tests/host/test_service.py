"""uballoon-host's service against scripted guests over real sockets: reclaim, the
ledger, targets, and hostile guests that must not hurt the others."""

import os
import struct

import pytest
import trio

from host_backend.config import HostConfig
from protocol import codec
from protocol.constants import ByeReason, MessageType
from protocol.errors import ErrorCode, NakReason
from protocol.events import NEED_DATA, Ack, Bye, ConnectionClosed, Error, Nak, Stats
from protocol.ranges import RangeSet
from tests.host.conftest import MIB, guest_config, wait_for
from tests.host.guests import FakeGuest, connect

P = RangeSet.span
PAGES = 64 * MIB // 4096


def allocated(path):
    return os.stat(path).st_blocks * 512


async def start_guest(host, **kwargs):
    guest = FakeGuest(await host.connect(), **kwargs)
    return guest, await guest.handshake()


async def test_authenticated_stable_guest_frees_host_memory(host_factory, ram_file, key_file):
    config = HostConfig(guests={"vm1": guest_config(ram_file=ram_file, key_file=key_file)})
    host = await host_factory(config)
    guest, welcome = await start_guest(host, key=key_file.read_bytes(), total_pages=PAGES)
    assert welcome.features & (1 << 54)  # AUTH accepted
    before = allocated(ram_file)
    answer = await guest.inflate(P(1024, 4096))  # 16 MiB
    assert answer == Ack(1, 4096)
    assert before - allocated(ram_file) == 16 * MIB
    with open(ram_file, "rb") as f:  # a hole reads back as zeros
        f.seek(1024 * 4096)
        assert f.read(4096) == bytes(4096)
    record = host.service.ledger.records["vm1"]
    assert record.ballooned == record.freed == P(1024, 4096)
    status = host.service.guest("vm1")
    assert status.reclaim == "punch" and status.freed_bytes == 16 * MIB
    assert await guest.deflate(P(1024, 1024)) == Ack(2, 0)
    assert record.ballooned == P(2048, 3072)
    host.service.ledger.check()


async def test_unauthenticated_guest_is_accounting_only(host_factory, ram_file):
    host = await host_factory(HostConfig(guests={"vm1": guest_config(ram_file=ram_file)}))
    guest, _ = await start_guest(host, total_pages=PAGES)
    before = allocated(ram_file)
    assert await guest.inflate(P(0, 1000)) == Ack(1, 0)
    assert allocated(ram_file) == before
    assert host.service.guest("vm1").reclaim == "accounting"


async def test_guest_without_stable_frames_is_accounting_only(host_factory, ram_file, key_file):
    config = HostConfig(guests={"vm1": guest_config(ram_file=ram_file, key_file=key_file)})
    host = await host_factory(config)
    guest, _ = await start_guest(
        host, key=key_file.read_bytes(), total_pages=PAGES, features=0x0400_0000_0000_0001 & 0
    )
    assert await guest.inflate(P(0, 10)) == Ack(1, 0)
    assert host.service.guest("vm1").reclaim == "accounting"


async def test_pfns_outside_the_ram_map_are_refused_and_others_keep_working(
    host_factory, ram_file
):
    config = HostConfig(
        guests={"vm1": guest_config(ram_file=ram_file), "vm2": guest_config("vm2")}
    )
    host = await host_factory(config)
    bad, _ = await start_guest(host, total_pages=PAGES)
    good, _ = await start_guest(host, name="vm2", total_pages=PAGES)
    answer = await bad.inflate(P(PAGES - 2, 4))
    assert isinstance(answer, Nak) and answer.reason is NakReason.OUT_OF_RANGE
    assert answer.pfn == PAGES and "outside guest vm1's RAM map" in answer.message
    assert not host.service.ledger.records["vm1"].ballooned
    # the refused guest stays connected and can go on; the other never noticed
    assert await bad.inflate(P(0, 4)) == Ack(2, 0)
    assert await good.inflate(P(0, 4)) == Ack(1, 0)
    host.service.ledger.check()


async def test_unknown_guest_and_too_large_guest_are_refused(host_factory):
    host = await host_factory(HostConfig(guests={"vm1": guest_config()}))
    _, answer = await start_guest(host, name="stranger", total_pages=PAGES)
    assert answer.code is ErrorCode.UNKNOWN_GUEST and "stranger" in answer.message
    _, answer = await start_guest(host, total_pages=PAGES * 2)
    assert answer.code is ErrorCode.GUEST_TOO_LARGE
    assert "more than its configured max of 64M" in answer.message


async def test_unknown_guests_may_be_served_for_accounting(host_factory):
    host = await host_factory(HostConfig(unknown_guests="account"))
    guest, _ = await start_guest(host, name="c1", total_pages=PAGES)
    assert await guest.inflate(P(0, 100)) == Ack(1, 0)
    assert host.service.guest("c1").reclaim == "accounting"


async def test_key_required_and_wrong_key(host_factory, key_file):
    host = await host_factory(HostConfig(guests={"vm1": guest_config(key_file=key_file)}))
    _, answer = await start_guest(host, total_pages=PAGES)
    assert answer.code is ErrorCode.AUTH_REQUIRED
    _, answer = await start_guest(host, key=b"w" * 32, total_pages=PAGES)
    assert answer.code is ErrorCode.AUTH_FAILED


async def test_impostor_cannot_displace_the_authenticated_guest(host_factory, key_file):
    host = await host_factory(HostConfig(guests={"vm1": guest_config(key_file=key_file)}))
    real, _ = await start_guest(host, key=key_file.read_bytes(), total_pages=PAGES)
    _, answer = await start_guest(host, total_pages=PAGES)  # no key, same name
    assert answer.code is ErrorCode.AUTH_REQUIRED
    assert await real.inflate(P(0, 8)) == Ack(1, 0)


async def test_newest_authenticated_session_wins(host_factory, key_file):
    host = await host_factory(HostConfig(guests={"vm1": guest_config(key_file=key_file)}))
    key = key_file.read_bytes()
    old, _ = await start_guest(host, key=key, total_pages=PAGES)
    assert await old.inflate(P(0, 8)) == Ack(1, 0)
    new, _ = await start_guest(host, key=key, total_pages=PAGES)
    assert await old.recv() == Bye(ByeReason.SUPERSEDED, "a newer session replaced this")
    assert await new.resync(P(0, 8)) == Ack(1, 0)
    assert host.service.guest("vm1").connected


async def test_injected_unauthenticated_frame_ends_only_that_session(host_factory, key_file):
    config = HostConfig(guests={"vm1": guest_config(key_file=key_file), "vm2": guest_config("vm2")})
    host = await host_factory(config)
    victim, _ = await start_guest(host, key=key_file.read_bytes(), total_pages=PAGES)
    other, _ = await start_guest(host, name="vm2", total_pages=PAGES)
    kind, flags, txid, body = codec.encode_event(Stats(((4, 1),)), ranges=False)
    await victim.stream.send_all(codec.build_frame(kind, flags, txid, body, None, 0))
    raw = await victim.stream.receive_some(4096)
    assert b"unauthenticated STATS frame" in raw
    assert await other.inflate(P(0, 8)) == Ack(1, 0)


async def test_garbage_and_oversized_frames_are_refused_with_a_reason(host_factory):
    host = await host_factory(HostConfig(guests={"vm2": guest_config("vm2")}))
    good, _ = await start_guest(host, name="vm2", total_pages=PAGES)
    garbage = await host.connect()
    await garbage.send_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    assert b"bad magic" in await garbage.receive_some(4096)
    huge = await host.connect()
    await huge.send_all(codec.pack_header(MessageType.HELLO, 0, 0, 1 << 30))
    assert b"exceeds the limit of 65536 bytes" in await huge.receive_some(4096)
    assert await good.inflate(P(0, 8)) == Ack(1, 0)


async def test_a_guest_that_keeps_misbehaving_is_dropped(host_factory, ram_file):
    host = await host_factory(
        HostConfig(max_naks=3, guests={"vm1": guest_config(ram_file=ram_file)})
    )
    guest, _ = await start_guest(host, total_pages=PAGES)
    for i in range(4):  # PFNs past the end of its RAM map: refused every time
        answer = await guest.inflate(P(PAGES + 10 * i, 1))
        assert isinstance(answer, Nak) and answer.reason is NakReason.OUT_OF_RANGE
    final = await guest.recv()
    assert isinstance(final, Error) and final.code is ErrorCode.MISBEHAVING
    assert "4 reports in a row refused" in final.message
    host.service.ledger.check()


async def test_silent_client_is_dropped_after_the_handshake_deadline(host_factory):
    host = await host_factory(HostConfig(handshake_timeout_s=0.5, guests={"vm1": guest_config()}))
    silent = await host.connect()
    with trio.fail_after(30):
        data = await silent.receive_some(4096)
    assert b"nothing heard" in data or data == b""


async def test_operator_target_reaches_the_guest(host_factory):
    host = await host_factory(HostConfig(guests={"vm1": guest_config()}))
    guest, welcome = await start_guest(host, total_pages=PAGES)
    host.service.set_target("vm1", 48 * MIB, clamp=False)
    config = await guest.wait_config(lambda c: c.num_pages == PAGES // 4)
    assert config.num_pages == 16 * MIB // 4096
    with pytest.raises(Exception, match="more than guest vm1's RAM"):
        host.service.set_target("vm1", 128 * MIB, clamp=False)
    assert host.service.set_target("vm1", 128 * MIB, clamp=True) == 64 * MIB


async def test_a_ram_map_that_disagrees_with_the_guest_is_not_used_to_punch(
    host_factory, ram_file, key_file
):
    config = HostConfig(guests={"vm1": guest_config(ram_file=ram_file, key_file=key_file)})
    host = await host_factory(config)
    guest = FakeGuest(await host.connect(), key=key_file.read_bytes(), total_pages=PAGES)
    # The guest says it has RAM at 4 GiB: the configured identity map cannot be right.
    hello = guest.conn.make_hello(
        name="vm1", features=guest.features, total_pages=PAGES,
        ram_layout=P(0, PAGES // 2) | P((4 << 30) // 4096, PAGES // 2),
    )
    await guest.send(hello)
    await guest.recv()  # CHALLENGE
    await guest.send(guest.conn.prove())
    await guest.recv()  # WELCOME
    before = allocated(ram_file)
    assert await guest.inflate(P(0, 1000)) == Ack(1, 0)
    assert allocated(ram_file) == before
    status = host.service.guest("vm1")
    assert status.reclaim == "accounting" and status.authenticated


async def test_a_guest_that_stops_reading_is_dropped_and_the_others_keep_working(
    host_factory, monkeypatch, caplog
):
    from host_backend import service as service_module

    monkeypatch.setattr(service_module, "SEND_TIMEOUT_S", 1.0)
    config = HostConfig(guests={"vm1": guest_config(), "vm2": guest_config("vm2")})
    host = await host_factory(config)
    stuck, _ = await start_guest(host, total_pages=PAGES)  # never reads again
    good, _ = await start_guest(host, name="vm2", total_pages=PAGES)
    # Far more CONFIGs than a socket buffer holds: the host must neither block on
    # the stuck guest nor lose its other guests.
    for i in range(20_000):
        host.service.set_target("vm1", (32 + 16 * (i % 2)) * MIB, clamp=False)
    host.service.set_target("vm2", 16 * MIB, clamp=False)
    assert (await good.wait_config(lambda c: c.num_pages == PAGES * 3 // 4)).num_pages
    await wait_for(host.service, lambda: "vm1" not in host.service.sessions)
    assert "guest vm1" in caplog.text and "too slow; dropped" in caplog.text
    assert not host.service.guest("vm1").connected
    assert host.service.guest("vm2").connected
    assert await good.inflate(P(0, 8)) == Ack(1, 0)
    host.service.ledger.check()


async def test_a_silent_guest_is_dropped_after_three_heartbeats(host_factory):
    host = await host_factory(HostConfig(heartbeat_s=0.2, guests={"vm1": guest_config()}))
    silent, _ = await start_guest(host, total_pages=PAGES)  # neither reads nor answers
    await wait_for(host.service, lambda: "vm1" not in host.service.sessions)
    data = b""
    with trio.fail_after(30):
        while chunk := await silent.stream.receive_some(1 << 16):
            data += chunk
    silent.conn.receive_data(data)
    events = []
    while (event := silent.conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    errors = [e for e in events if isinstance(e, Error)]
    assert errors and errors[-1].code is ErrorCode.TIMEOUT, events
    assert "nothing heard" in errors[-1].message or "PINGs unanswered" in errors[-1].message
