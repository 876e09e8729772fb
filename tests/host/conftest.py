import os
import secrets

import pytest
import trio

from host_backend.config import GuestConfig, HostConfig, RamRegion
from host_backend.service import HostService, open_listeners, serve
from protocol.addresses import parse_address

MIB = 1 << 20


@pytest.fixture
def ram_file():
    """A 64 MiB 'guest RAM' file on /dev/shm, fully allocated like a running VM's."""
    path = f"/dev/shm/uballoon-test-{secrets.token_hex(4)}.ram"
    with open(path, "wb") as f:
        f.write(b"\xa5" * (64 * MIB))
    yield path
    os.unlink(path)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "vm1.key"
    path.write_bytes(secrets.token_bytes(32))
    return path


class Host:
    def __init__(self, service, address, streams):
        self.service = service
        self.address = address
        self._streams = streams

    async def connect(self):
        """A client stream to this host, closed when the test ends."""
        from tests.host.guests import connect

        stream = await connect(self.address)
        self._streams.append(stream)
        return stream


@pytest.fixture
async def host_factory(tmp_path, nursery):
    """Start a real HostService on a Unix socket: ``await host_factory(config)``."""
    streams = []

    async def start(config: HostConfig, capacity=1 << 30):
        service = HostService(config, capacity)
        address = f"unix:{tmp_path}/host-{secrets.token_hex(3)}.sock"
        listeners = await open_listeners(parse_address(address, listen=True))
        await nursery.start(serve, service, listeners)
        return Host(service, address, streams)

    yield start
    for stream in streams:
        await trio.aclose_forcefully(stream)


def guest_config(name="vm1", ram=64 * MIB, ram_file=None, key_file=None, min_bytes=0):
    regions = (RamRegion(0, ram, ram_file),) if ram_file else ()
    return GuestConfig(name, ram, min_bytes, 1000, str(key_file) if key_file else None, regions)


async def wait_for(service, predicate, timeout=30):
    """Wait until ``predicate()`` holds, re-checking after every change the host makes."""
    with trio.fail_after(timeout):
        seen = service.changes()
        while not predicate():
            seen = await service.wait_change(seen)
