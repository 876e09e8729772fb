"""The one transition table of a uballoon session.

Every state change of a Connection comes from ``TRANSITIONS``, keyed by
(state, who sends, message type).  Both ends keep the same conversation state: a
guest's Connection looks up its own sends under ``Role.GUEST`` and what it receives
under ``Role.HOST``, and the host's the other way round.  A (state, sender, message)
triple not in the table is a protocol error: ``LocalProtocolError`` if we were asked
to send it (nothing changes), ``RemoteProtocolError`` if we received it (the
Connection moves to ``ERROR``).  From ``ERROR`` the only thing left to do is send an ERROR frame (our last
word); from ``CLOSED`` nothing.

::

    IDLE --HELLO(g)--> HELLO --WELCOME(h)-------------------------------> ACTIVE
                         |                                                 ^
                         +--CHALLENGE(h)--> CHALLENGED --AUTH(g)--> AUTHENTICATED
                                                          --WELCOME(h)-----+
    ACTIVE --INFLATE/DEFLATE/RESYNC/ACTUAL/STATS/PING/PONG(g)--> ACTIVE
    ACTIVE --CONFIG/ACK/NAK/STATS_REQUEST/PING/PONG(h)--------> ACTIVE
    any of HELLO..ACTIVE --BYE or ERROR (either)--> CLOSED
    ERROR (local: we detected a violation) --ERROR(us)--> CLOSED

The per-transaction rules (ordering, window, which pages a report may name) are not
states; ``connection.py`` enforces them on top of this table.
"""

from __future__ import annotations

import enum

from protocol.constants import MessageType as M


class Role(enum.Enum):
    GUEST = "guest"
    HOST = "host"

    @property
    def peer(self) -> Role:
        return Role.HOST if self is Role.GUEST else Role.GUEST


class State(enum.Enum):
    IDLE = "idle"  # nothing sent yet
    HELLO = "hello"  # HELLO sent, waiting for the host's answer
    CHALLENGED = "challenged"  # the host asked for authentication
    AUTHENTICATED = "authenticated"  # the guest's proof was sent/accepted; WELCOME next
    ACTIVE = "active"  # the session is running
    CLOSED = "closed"  # BYE or ERROR went one way or the other
    ERROR = "error"  # we detected a protocol violation (local state)


G, H = Role.GUEST, Role.HOST

_GUEST_IN_SESSION = (M.INFLATE, M.DEFLATE, M.RESYNC, M.ACTUAL, M.STATS, M.PING, M.PONG)
_HOST_IN_SESSION = (M.CONFIG, M.ACK, M.NAK, M.STATS_REQUEST, M.PING, M.PONG)
_OPEN = (State.HELLO, State.CHALLENGED, State.AUTHENTICATED, State.ACTIVE)

TRANSITIONS: dict[tuple[State, Role, M], State] = {
    (State.IDLE, G, M.HELLO): State.HELLO,
    (State.HELLO, H, M.CHALLENGE): State.CHALLENGED,
    (State.HELLO, H, M.WELCOME): State.ACTIVE,
    (State.CHALLENGED, G, M.AUTH): State.AUTHENTICATED,
    (State.AUTHENTICATED, H, M.WELCOME): State.ACTIVE,
    **{(State.ACTIVE, G, m): State.ACTIVE for m in _GUEST_IN_SESSION},
    **{(State.ACTIVE, H, m): State.ACTIVE for m in _HOST_IN_SESSION},
    **{(s, r, m): State.CLOSED for s in _OPEN for r in (G, H) for m in (M.BYE, M.ERROR)},
    (State.ERROR, G, M.ERROR): State.CLOSED,
    (State.ERROR, H, M.ERROR): State.CLOSED,
}
