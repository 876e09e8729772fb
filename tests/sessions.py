"""Helpers that drive a guest and a host Connection against each other in memory."""

from protocol.connection import GuestConnection, HostConnection
from protocol.constants import Feature
from protocol.events import NEED_DATA, Config, Welcome
from protocol.ranges import RangeSet

KEY = b"k" * 32
TOTAL_PAGES = 1 << 20
ALL_FEATURES = int(
    Feature.MUST_TELL_HOST
    | Feature.STATS_VQ
    | Feature.DEFLATE_ON_OOM
    | Feature.PFN_RANGES
    | Feature.STATS_PUSH
    | Feature.STATS_PRESSURE
    | Feature.STABLE_PFNS
)


def deliver(data, to):
    """Feed ``data`` to connection ``to`` and return every event it yields."""
    to.receive_data(data)
    events = []
    while (event := to.next_event()) is not NEED_DATA:
        events.append(event)
        if type(event).__name__ == "ConnectionClosed":
            break
    return events


def start(
    *, key=KEY, host_key=KEY, features=ALL_FEATURES, window=4, max_body=16 << 20,
    total_pages=TOTAL_PAGES,
):
    """A guest and a host connection through HELLO (and authentication) to ACTIVE."""
    guest = GuestConnection(key)
    host = HostConnection()
    hello = guest.make_hello(
        name="vm1", features=features, total_pages=total_pages,
        ram_layout=RangeSet.span(0, total_pages),
    )
    [got] = deliver(guest.send(hello), host)
    assert got == hello
    if host_key is not None and key is not None:
        deliver(host.send(host.challenge(host_key)), guest)
        deliver(guest.send(guest.prove()), host)
    accepted = hello.features
    welcome = Welcome(1, accepted, max_body, Config(0), 1000, 5000, window)
    [got] = deliver(host.send(welcome), guest)
    assert got == welcome
    return guest, host
