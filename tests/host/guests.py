"""A scripted guest for host tests: the real GuestConnection over a real socket."""

import trio

from protocol.connection import GuestConnection
from protocol.constants import Feature
from protocol.events import (
    NEED_DATA,
    Ack,
    Challenge,
    Config,
    ConnectionClosed,
    Deflate,
    Error,
    Inflate,
    Nak,
    Ping,
    Pong,
    Resync,
    Stats,
    StatsRequest,
    Welcome,
)
from protocol.ranges import RangeSet

FEATURES = int(
    Feature.MUST_TELL_HOST | Feature.STATS_VQ | Feature.PFN_RANGES | Feature.STATS_PUSH
    | Feature.STABLE_PFNS | Feature.STATS_PRESSURE
)


async def connect(address):
    if address.startswith("unix:"):
        return await trio.open_unix_socket(address[5:])
    host, port = address[4:].rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


class FakeGuest:
    """Speaks the protocol like an agent would, one request at a time, and records
    every CONFIG it is sent."""

    def __init__(self, stream, name="vm1", key=None, total_pages=262144, features=FEATURES):
        self.stream = stream
        self.conn = GuestConnection(key)
        self.name = name
        self.total_pages = total_pages
        self.features = features
        self.configs = []
        self.welcome = None

    async def recv(self, configs=False):
        """Next event that is not a PING (PINGs are answered) or, unless ``configs``,
        a CONFIG (recorded either way)."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = await self.stream.receive_some(1 << 20)
                self.conn.receive_data(data)
                continue
            if isinstance(event, Ping):
                await self.stream.send_all(self.conn.send(Pong(event.txid)))
                continue
            if isinstance(event, Config):
                self.configs.append(event)
                if configs:
                    return event
                continue
            return event

    async def handshake(self):
        hello = self.conn.make_hello(
            name=self.name, features=self.features, total_pages=self.total_pages
        )
        await self.stream.send_all(self.conn.send(hello))
        event = await self.recv()
        if isinstance(event, Challenge):
            await self.stream.send_all(self.conn.send(self.conn.prove()))
            event = await self.recv()
        if isinstance(event, Welcome):
            self.welcome = event
            self.configs.append(event.config)
        return event

    async def request(self, make, pages):
        event = make(self.conn.next_txid, pages)
        await self.stream.send_all(self.conn.send(event))
        return await self.recv()

    async def inflate(self, pages):
        return await self.request(Inflate, pages)

    async def deflate(self, pages):
        return await self.request(Deflate, pages)

    async def resync(self, pages):
        return await self.request(Resync, pages)

    async def send(self, event):
        await self.stream.send_all(self.conn.send(event))

    async def wait_config(self, predicate):
        """Wait (reading, answering pings) until a CONFIG satisfies ``predicate``."""
        while not any(predicate(c) for c in self.configs):
            event = await self.recv(configs=True)
            if isinstance(event, StatsRequest):
                await self.send(Stats(((4, 1 << 20),), event.txid))
            elif isinstance(event, ConnectionClosed | Error):
                raise AssertionError(f"host closed: {event}")
        return next(c for c in self.configs if predicate(c))
