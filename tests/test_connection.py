"""The Connection: the state table, the virtio ordering rules, authentication."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from protocol import codec
from protocol.connection import GuestConnection, HostConnection
from protocol.constants import ByeReason, Feature, MessageType
from protocol.errors import ErrorCode, LocalProtocolError, NakReason, RemoteProtocolError
from protocol.events import (
    NEED_DATA,
    Ack,
    Actual,
    Auth,
    Bye,
    Challenge,
    Config,
    ConnectionClosed,
    Deflate,
    Error,
    Hello,
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
from protocol.state import TRANSITIONS, Role, State
from tests.sessions import ALL_FEATURES, KEY, TOTAL_PAGES, deliver, start

P = RangeSet.span


# -- the table -------------------------------------------------------------------------


def conversation_at(state):
    """(guest, host) connections whose conversation is in ``state``."""
    guest, host = GuestConnection(KEY), HostConnection()
    if state is State.IDLE:
        return guest, host
    hello = guest.make_hello(name="vm1", features=ALL_FEATURES, total_pages=TOTAL_PAGES)
    deliver(guest.send(hello), host)
    if state is State.HELLO:
        return guest, host
    deliver(host.send(host.challenge(KEY)), guest)
    if state is State.CHALLENGED:
        return guest, host
    deliver(guest.send(guest.prove()), host)
    if state is State.AUTHENTICATED:
        return guest, host
    deliver(host.send(Welcome(1, hello.features | Feature.AUTH, 16 << 20, Config(0))), guest)
    if state is State.ACTIVE:
        return guest, host
    assert state is State.CLOSED
    deliver(guest.send(Bye()), host)
    return guest, host


def sample(kind, conn):
    """A valid-looking event of each type (what the per-message rules accept in ACTIVE)."""
    return {
        MessageType.HELLO: Hello("vm1", b"n" * 32, int(Feature.AUTH), TOTAL_PAGES),
        MessageType.CHALLENGE: Challenge(b"c" * 32),
        MessageType.AUTH: Auth(b"p" * 32),
        MessageType.WELCOME: Welcome(1, 0, 16 << 20, Config(0)),
        MessageType.CONFIG: Config(5),
        MessageType.INFLATE: Inflate(1, P(100, 5)),
        MessageType.DEFLATE: Deflate(1, P(100, 5)),
        MessageType.RESYNC: Resync(1, P(100, 5)),
        MessageType.ACK: Ack(1),
        MessageType.NAK: Nak(1, NakReason.INTERNAL),
        MessageType.ACTUAL: Actual(3),
        MessageType.STATS: Stats(((4, 1),)),
        MessageType.STATS_REQUEST: StatsRequest(1),
        MessageType.PING: Ping(1),
        MessageType.PONG: Pong(1),
        MessageType.BYE: Bye(ByeReason.NORMAL),
        MessageType.ERROR: Error(ErrorCode.INTERNAL, "x"),
    }[kind]


STATES = [State.IDLE, State.HELLO, State.CHALLENGED, State.AUTHENTICATED, State.ACTIVE, State.CLOSED]


@pytest.mark.parametrize(
    "state, sender, kind", list(itertools.product(STATES, list(Role), list(MessageType)))
)
def test_every_send_and_receive_is_checked_against_the_table(state, sender, kind):
    guest, host = conversation_at(state)
    us, them = (guest, host) if sender is Role.GUEST else (host, guest)
    event = sample(kind, us)
    allowed = (state, sender, kind) in TRANSITIONS
    # Sending: refused with UNEXPECTED exactly when the table has no entry.
    try:
        us.send(event)
    except LocalProtocolError as exc:
        assert not allowed or exc.code is not ErrorCode.UNEXPECTED, exc
    else:
        assert allowed
    # Receiving the same message: the peer refuses it exactly when not in the table.
    guest2, host2 = conversation_at(state)
    receiver = host2 if sender is Role.GUEST else guest2
    kind_, flags, txid, body = codec.encode_event(event, ranges=False)
    key = receiver._recv_key
    frame = codec.build_frame(kind_, flags, txid, body, key, receiver._recv_seq)
    receiver.receive_data(frame)
    try:
        result = receiver.next_event()
    except RemoteProtocolError as exc:
        assert not allowed or exc.code is not ErrorCode.UNEXPECTED, exc
        assert receiver.state is State.ERROR
    else:
        if result is NEED_DATA:
            # The receiver said BYE itself: what was legal before it crossed the BYE
            # on the wire is checked and dropped.
            assert state is State.CLOSED and (State.ACTIVE, sender, kind) in TRANSITIONS
        else:
            assert allowed


# -- handshake ---------------------------------------------------------------------------


def test_handshake_without_authentication():
    guest, host = start(key=None, host_key=None)
    assert guest.state is host.state is State.ACTIVE
    assert not guest.authenticated and not host.authenticated


def test_handshake_with_authentication_macs_every_frame():
    guest, host = start()
    assert guest.authenticated and host.authenticated
    data = guest.send(Actual(7))
    assert len(data) == 16 + 4 + 32
    assert deliver(data, host) == [Actual(7)]


def test_wrong_key_fails_authentication():
    guest = GuestConnection(b"w" * 32)
    host = HostConnection()
    deliver(guest.send(guest.make_hello(name="vm1", features=0, total_pages=10)), host)
    deliver(host.send(host.challenge(KEY)), guest)
    with pytest.raises(RemoteProtocolError, match="failed authentication") as info:
        deliver(guest.send(guest.prove()), host)
    assert info.value.code is ErrorCode.AUTH_FAILED
    # The host's last word reaches the guest even though the session has no keys.
    [err] = deliver(host.send(Error(ErrorCode.AUTH_FAILED, "bad key")), guest)
    assert err.code is ErrorCode.AUTH_FAILED and guest.state is State.CLOSED


def test_a_replayed_auth_from_another_session_is_refused():
    guest, host = GuestConnection(KEY), HostConnection()
    deliver(guest.send(guest.make_hello(name="vm1", features=0, total_pages=10)), host)
    deliver(host.send(host.challenge(KEY)), guest)
    recorded_hello = guest._hello_body
    recorded_auth = guest.send(guest.prove())
    # An attacker replays the recorded HELLO and AUTH to a new host session.
    host2 = HostConnection()
    hello_frame = codec.build_frame(MessageType.HELLO, 0, 0, recorded_hello, None, 0)
    deliver(hello_frame, host2)
    host2.send(host2.challenge(KEY))
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        deliver(recorded_auth, host2)


def test_host_must_challenge_only_guests_offering_auth():
    guest, host = GuestConnection(None), HostConnection()
    deliver(guest.send(guest.make_hello(name="vm1", features=0, total_pages=10)), host)
    with pytest.raises(LocalProtocolError, match="did not offer AUTH"):
        host.send(host.challenge(KEY))


def test_tampered_frame_in_authenticated_session_is_refused():
    guest, host = start()
    data = bytearray(guest.send(Actual(7)))
    data[17] ^= 1
    with pytest.raises(RemoteProtocolError, match="MAC mismatch") as info:
        deliver(bytes(data), host)
    assert info.value.code is ErrorCode.AUTH_FAILED


def test_replayed_frame_in_authenticated_session_is_refused():
    guest, host = start()
    data = guest.send(Actual(7))
    deliver(data, host)
    with pytest.raises(RemoteProtocolError, match="MAC mismatch"):
        deliver(data, host)


def test_reflected_frame_is_refused():
    guest, host = start()
    data = guest.send(guest.next_ping())
    with pytest.raises(RemoteProtocolError, match="MAC mismatch"):
        deliver(data, guest)  # bounced straight back to its sender


def test_unauthenticated_frame_injected_into_authenticated_session_is_refused():
    guest, host = start()
    forged = codec.build_frame(*codec.encode_event(Inflate(1, P(0, 10)), ranges=False), None, 0)
    with pytest.raises(RemoteProtocolError, match="unauthenticated INFLATE") as info:
        deliver(forged, host)
    assert info.value.code is ErrorCode.AUTH_FAILED


def test_mac_without_session_is_refused():
    guest, host = start(key=None, host_key=None)
    forged = codec.build_frame(MessageType.ACTUAL, 0, 0, b"\0\0\0\0", b"x" * 32, 0)
    with pytest.raises(RemoteProtocolError, match="no session key"):
        deliver(forged, host)


def test_welcome_cannot_accept_unoffered_or_forbidden_features():
    guest, host = GuestConnection(None), HostConnection()
    deliver(guest.send(guest.make_hello(name="vm1", features=1, total_pages=10)), host)
    with pytest.raises(LocalProtocolError, match="did not offer"):
        host.send(Welcome(1, 3, 16 << 20, Config(0)))
    guest2, host2 = GuestConnection(None), HostConnection()
    deliver(guest2.send(guest2.make_hello(name="vm1", features=0x18, total_pages=10)), host2)
    with pytest.raises(LocalProtocolError, match="never accepted"):
        host2.send(Welcome(1, 0x8, 16 << 20, Config(0)))
    # A host that breaks the rule anyway is caught by the guest.
    forged = codec.build_frame(
        *codec.encode_event(Welcome(1, 0x18, 16 << 20, Config(0)), ranges=False), None, 0
    )
    with pytest.raises(RemoteProtocolError, match="never accepts"):
        deliver(forged, guest2)


def test_target_larger_than_the_guest_is_refused_on_both_ends():
    guest, host = start()
    with pytest.raises(LocalProtocolError, match="larger than guest vm1"):
        host.send(Config(TOTAL_PAGES + 1))
    guest2, host2 = start(key=None, host_key=None)
    forged = codec.build_frame(
        *codec.encode_event(Config(TOTAL_PAGES + 1), ranges=False), None, 0
    )
    with pytest.raises(RemoteProtocolError, match="larger than this guest"):
        deliver(forged, guest2)


def test_max_body_switches_after_welcome():
    guest, host = start(max_body=4 << 20)
    assert guest.max_body == host.max_body == 4 << 20
    big = RangeSet.from_pfns(np.arange(0, 4_000_000, 2, dtype=np.uint64))
    assert guest.report_limit(big) is not None
    pieces = guest.split_report(big)
    assert all(guest.report_limit(p) is None for p in pieces)


# -- ordering rules --------------------------------------------------------------------


def test_pages_enter_the_balloon_only_when_acknowledged():
    guest, host = start()
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    assert not guest.ballooned
    assert not guest.may_reuse(P(100, 10))
    deliver(host.send(Ack(1)), guest)
    assert guest.ballooned == P(100, 10)


def test_deflate_of_unacknowledged_inflate_is_refused_on_both_ends():
    guest, host = start()
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    with pytest.raises(LocalProtocolError, match="unacknowledged"):
        guest.send(Deflate(2, P(105, 1)))
    forged = codec.build_frame(
        *codec.encode_event(Deflate(2, P(105, 1)), ranges=True), guest._send_key, guest._send_seq
    )
    with pytest.raises(RemoteProtocolError, match="unacknowledged") as info:
        deliver(forged, host)
    assert info.value.code is ErrorCode.ORDERING


def test_with_must_tell_host_pages_are_reusable_only_after_the_deflate_ack():
    guest, host = start()
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    deliver(host.send(Ack(1)), guest)
    deliver(guest.send(Deflate(2, P(100, 4))), host)
    assert not guest.may_reuse(P(100, 4))
    deliver(host.send(Ack(2)), guest)
    assert guest.may_reuse(P(100, 4))
    assert guest.ballooned == P(104, 6)


def test_without_must_tell_host_deflating_pages_are_reusable_at_once():
    guest, host = start(features=ALL_FEATURES & ~int(Feature.MUST_TELL_HOST))
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    deliver(host.send(Ack(1)), guest)
    deliver(guest.send(Deflate(2, P(100, 4))), host)
    assert guest.may_reuse(P(100, 4))
    assert not guest.may_reuse(P(100, 5))


def test_answers_go_in_order():
    guest, host = start()
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    deliver(guest.send(Inflate(2, P(200, 10))), host)
    with pytest.raises(LocalProtocolError, match="oldest unanswered"):
        host.send(Ack(2))
    forged = codec.build_frame(*codec.encode_event(Ack(2), ranges=False), host._send_key,
                               host._send_seq)
    with pytest.raises(RemoteProtocolError, match="oldest unanswered request is 1"):
        deliver(forged, guest)


def test_window_limits_requests_in_flight():
    guest, host = start(window=2)
    guest.send(Inflate(1, P(100, 1)))
    guest.send(Inflate(2, P(200, 1)))
    with pytest.raises(LocalProtocolError, match="window of 2"):
        guest.send(Inflate(3, P(300, 1)))


def test_txids_must_be_consecutive():
    guest, host = start()
    with pytest.raises(LocalProtocolError, match="out of sequence"):
        guest.send(Inflate(5, P(100, 1)))


def test_inflate_of_a_page_in_the_balloon_or_in_flight_is_refused():
    guest, host = start()
    deliver(guest.send(Inflate(1, P(100, 10))), host)
    with pytest.raises(LocalProtocolError, match="unacknowledged"):
        guest.send(Inflate(2, P(109, 2)))
    deliver(host.send(Ack(1)), guest)
    with pytest.raises(LocalProtocolError, match="already in the balloon"):
        guest.send(Inflate(2, P(109, 2)))


def test_resync_needs_an_empty_pipeline_and_blocks_others():
    guest, host = start()
    guest.send(Inflate(1, P(100, 1)))
    with pytest.raises(LocalProtocolError, match="RESYNC sent with 1"):
        guest.send(Resync(2, P(100, 1)))
    guest2, host2 = start()
    deliver(guest2.send(Resync(1, P(5, 5))), host2)
    with pytest.raises(LocalProtocolError, match="RESYNC is unanswered"):
        guest2.send(Inflate(2, P(100, 1)))
    deliver(host2.send(Ack(1)), guest2)
    assert guest2.ballooned == P(5, 5)


def test_a_large_resync_is_split_and_joined():
    guest, host = start(max_body=4 << 20, total_pages=4 << 20)
    pages = RangeSet.from_pfns(np.arange(0, 4_000_000, 2, dtype=np.uint64))
    data = guest.send(Resync(1, pages))
    assert data.count(b"UBLN") >= 2
    events = deliver(data, host)
    assert events == [Resync(1, pages)]


def test_stats_need_negotiation_and_requests_are_answered_once():
    guest, host = start(features=ALL_FEATURES & ~int(Feature.STATS_PUSH))
    with pytest.raises(LocalProtocolError, match="STATS_PUSH"):
        guest.send(Stats(((4, 1),)))
    deliver(host.send(host.next_stats_request()), guest)
    [stats] = deliver(guest.send(Stats(((4, 1),), 1)), host)
    assert stats.txid == 1
    with pytest.raises(LocalProtocolError, match="answers no STATS_REQUEST"):
        guest.send(Stats(((4, 1),), 1))


def test_pings_and_pongs_pair_up():
    guest, host = start()
    [ping] = deliver(host.send(host.next_ping()), guest)
    [pong] = deliver(guest.send(Pong(ping.txid)), host)
    assert pong.txid == ping.txid
    with pytest.raises(LocalProtocolError, match="answers no PING"):
        guest.send(Pong(ping.txid))


def test_end_of_stream_inside_a_frame_is_an_error():
    guest, host = start()
    data = guest.send(Actual(1))
    host.receive_data(data[:-3])
    assert host.next_event() is NEED_DATA
    host.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        host.next_event()


def test_clean_end_of_stream_and_bye():
    guest, host = start()
    assert deliver(guest.send(Bye(ByeReason.SHUTDOWN, "stopping")), host) == [
        Bye(ByeReason.SHUTDOWN, "stopping")
    ]
    assert host.state is State.CLOSED
    host.receive_data(b"")
    assert isinstance(host.next_event(), ConnectionClosed)


def test_after_an_error_only_an_error_can_be_sent():
    host = HostConnection()
    host.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        host.next_event()
    assert host.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        host.send(Ping(1))
    frame = host.send(Error(ErrorCode.MALFORMED, "not a uballoon stream"))
    assert frame.startswith(b"UBLN") and host.state is State.CLOSED


# -- a stateful test of the whole conversation ---------------------------------------------


class Conversation(RuleBasedStateMachine):
    """A guest and a host exchanging requests in any legal order, against a model.

    Model: ``acked`` (what the host acknowledged), the FIFO of unanswered requests.
    Invariants: the guest's ``ballooned`` equals the model; pages in an unanswered
    INFLATE are never reusable; with MUST_TELL_HOST, pages in an unanswered DEFLATE
    are not reusable either; every frame crosses with its MAC intact.
    """

    @initialize(window=st.integers(1, 4), tell=st.booleans(), ranges=st.booleans())
    def setup(self, window, tell, ranges):
        features = ALL_FEATURES
        if not tell:
            features &= ~int(Feature.MUST_TELL_HOST)
        if not ranges:
            features &= ~int(Feature.PFN_RANGES)
        self.guest, self.host = start(features=features, window=window)
        self.tell = tell
        self.acked = RangeSet.empty()
        self.queue = []  # (txid, kind, pages) unanswered, as the model sees them

    def _free_pages(self, data, count):
        busy = self.acked
        for _, _, pages in self.queue:
            busy = busy | pages
        start = data.draw(st.integers(0, 4000))
        candidate = P(start, count) - busy
        return candidate

    def _can_send(self):
        return len(self.queue) < self.guest.window and not any(
            k == "resync" for _, k, _ in self.queue
        )

    @precondition(lambda self: self._can_send())
    @rule(data=st.data(), count=st.integers(1, 64))
    def inflate(self, data, count):
        pages = self._free_pages(data, count)
        if not pages:
            return
        txid = self.guest.next_txid
        assert deliver(self.guest.send(Inflate(txid, pages)), self.host) == [Inflate(txid, pages)]
        self.queue.append((txid, "inflate", pages))

    @precondition(lambda self: self._can_send() and self.acked)
    @rule(data=st.data())
    def deflate(self, data):
        deflating = RangeSet.empty()
        for _, k, pages in self.queue:
            if k == "deflate":
                deflating = deflating | pages
        candidates = self.acked - deflating
        if not candidates:
            return
        n = data.draw(st.integers(1, candidates.num_pages))
        pages, _ = candidates.take(n)
        txid = self.guest.next_txid
        deliver(self.guest.send(Deflate(txid, pages)), self.host)
        self.queue.append((txid, "deflate", pages))

    @precondition(lambda self: not self.queue)
    @rule(data=st.data())
    def resync(self, data):
        keep = data.draw(st.integers(0, self.acked.num_pages))
        pages, _ = self.acked.take(keep)
        txid = self.guest.next_txid
        deliver(self.guest.send(Resync(txid, pages)), self.host)
        self.queue.append((txid, "resync", pages))

    @precondition(lambda self: self.queue)
    @rule(accept=st.booleans())
    def answer(self, accept):
        txid, kind, pages = self.queue.pop(0)
        reply = Ack(txid) if accept else Nak(txid, NakReason.INTERNAL, "no")
        deliver(self.host.send(reply), self.guest)
        if accept:
            if kind == "inflate":
                self.acked = self.acked | pages
            elif kind == "deflate":
                self.acked = self.acked - pages
            else:
                self.acked = pages

    @rule()
    def chatter(self):
        deliver(self.guest.send(Actual(self.acked.num_pages)), self.host)
        [ping] = deliver(self.host.send(self.host.next_ping()), self.guest)
        deliver(self.guest.send(Pong(ping.txid)), self.host)

    @invariant()
    def guest_view_matches_model(self):
        if hasattr(self, "guest"):
            assert self.guest.ballooned == self.acked

    @invariant()
    def unanswered_pages_are_not_reusable(self):
        if not hasattr(self, "guest"):
            return
        for _, kind, pages in self.queue:
            if kind == "inflate" or kind == "resync" and pages:
                assert not self.guest.may_reuse(pages)
            if kind == "deflate":
                assert self.guest.may_reuse(pages) == (not self.tell)
        if self.acked and not any(k == "deflate" for _, k, _ in self.queue):
            assert not self.guest.may_reuse(self.acked)


TestConversation = Conversation.TestCase
TestConversation.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
