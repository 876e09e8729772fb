"""The uballoon wire protocol: a virtio-balloon-style session over any byte stream.

Sans-IO (modelled on h11): ``GuestConnection`` / ``HostConnection`` turn bytes into
events and events into bytes; this package never does I/O itself.  The byte layouts
are in ``wire.py`` (construct), the one state table in ``state.py``, the rules in
``connection.py``; docs/protocol.md is the specification.
"""

from protocol.connection import GuestConnection, HostConnection, Pending
from protocol.constants import (
    BalloonState,
    ByeReason,
    Feature,
    Flag,
    MessageType,
    StatTag,
)
from protocol.errors import (
    BalloonError,
    ErrorCode,
    LocalProtocolError,
    NakReason,
    NativeError,
    PolicyError,
    ProtocolError,
    RemoteProtocolError,
)
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
    Event,
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
from protocol.state import Role, State

__all__ = [
    "NEED_DATA", "Ack", "Actual", "Auth", "BalloonError", "BalloonState", "Bye", "ByeReason",
    "Challenge", "Config", "ConnectionClosed", "Deflate", "Error", "ErrorCode", "Event",
    "Feature", "Flag", "GuestConnection", "Hello", "HostConnection", "Inflate",
    "LocalProtocolError", "MessageType", "Nak", "NakReason", "NativeError", "Pending", "Ping",
    "PolicyError", "Pong", "ProtocolError", "RangeSet", "RemoteProtocolError", "Resync", "Role",
    "State", "StatTag", "Stats", "StatsRequest", "Welcome",
]
