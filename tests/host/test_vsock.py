"""vsock end to end: ``uballoon-host``'s vsock listener and the agent's vsock connector,
on a machine with a vsock loopback transport (the ``vsock_loopback`` module), where a
connection to CID 1 (VMADDR_CID_LOCAL) stays on the machine.

Anywhere else it skips, and it never probes by connecting: without a loopback a vsock
connection — even to this machine's own CID — leaves the machine through the
hypervisor's transport.  (Over vhost-vsock the same code runs between a VM and its
host; this machine has neither transport.)"""

import os
import secrets

import pytest
import trio

from guest_agent.service import open_stream
from host_backend.config import HostConfig
from host_backend.service import HostService, open_listeners, serve
from protocol.addresses import parse_address
from protocol.events import Ack
from protocol.ranges import RangeSet
from tests.host.conftest import MIB, guest_config
from tests.host.guests import FakeGuest

VMADDR_CID_LOCAL = 1
PAGES = 64 * MIB // 4096

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/sys/module/vsock_loopback"),
    reason="no vsock loopback transport here (module vsock_loopback): a vsock "
    "connection would leave this machine",
)


async def test_a_guest_reaches_the_host_over_vsock(nursery):
    service = HostService(HostConfig(guests={"vm1": guest_config()}), 1 << 30)
    port = 20_000 + secrets.randbelow(20_000)
    listeners = await open_listeners(parse_address(f"vsock:{port}", listen=True))
    await nursery.start(serve, service, listeners)
    stream = await open_stream(parse_address(f"vsock:{VMADDR_CID_LOCAL}:{port}"))
    try:
        guest = FakeGuest(stream, total_pages=PAGES)
        await guest.handshake()
        assert service.guest("vm1").connected
        assert await guest.inflate(RangeSet.span(0, 256)) == Ack(1, 0)
        service.set_target("vm1", 32 * MIB, clamp=False)
        assert (await guest.wait_config(lambda c: c.num_pages == PAGES // 2)).num_pages
        assert service.guest("vm1").ballooned_bytes == 256 * 4096
    finally:
        await trio.aclose_forcefully(stream)
