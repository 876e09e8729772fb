"""uballoon's one error tree.

Every failure uballoon raises on purpose is a ``BalloonError``::

    BalloonError
     ├── ProtocolError(code)          # code = the wire error (ErrorCode) sent to the peer
     │    ├── LocalProtocolError      # we were asked to do something illegal
     │    └── RemoteProtocolError     # the peer sent something illegal
     ├── NativeError(errno)           # pinning/reading pages failed; the message says why
     └── PolicyError                  # a target or configuration that cannot hold

Transport failures are not part of this tree: they stay trio's
``ClosedResourceError`` (we closed it) and ``BrokenResourceError`` (the peer or the
network did).  Nothing in uballoon signals failure by returning ``None``.

The wire codes live here (not in the codec) because both the exceptions and the
ERROR/NAK messages carry them.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by an ERROR frame (and by ``ProtocolError.code``)."""

    MALFORMED = 1  # a frame or body that does not parse
    UNSUPPORTED_VERSION = 2  # no protocol version in common / unknown header version
    INTEGRITY = 3  # CRC-32 mismatch (a MAC mismatch is AUTH_FAILED)
    TOO_LARGE = 4  # body length above the negotiated maximum
    UNEXPECTED = 5  # a message not allowed in the current state
    AUTH_REQUIRED = 6  # the host requires authentication and the guest did not offer it
    AUTH_FAILED = 7  # wrong proof, or an unauthenticated frame in an authenticated session
    UNKNOWN_GUEST = 8  # the host does not serve a guest of this name
    GUEST_TOO_LARGE = 9  # HELLO claims more RAM than the host configured for the guest
    SUPERSEDED = 10  # a newer session of the same guest replaced this one
    TIMEOUT = 11  # handshake or heartbeat deadline passed
    ORDERING = 12  # a transaction broke the virtio ordering rules or the window
    BAD_FEATURES = 13  # accepted features that were never offered, or forbidden ones
    INTERNAL = 14  # the sender failed internally
    SHUTTING_DOWN = 15  # the sender is going away
    MISBEHAVING = 16  # too many refused requests; the host gives up on the session


class NakReason(enum.IntEnum):
    """Why the host refused an INFLATE, DEFLATE or RESYNC (carried by NAK)."""

    OUT_OF_RANGE = 1  # a PFN outside the guest's configured RAM map
    ALREADY_BALLOONED = 2  # INFLATE of a page already in the balloon
    NOT_IN_BALLOON = 3  # DEFLATE of a page not in the balloon
    RECLAIM_FAILED = 4  # the host could not release the backing memory
    TOO_MANY_PAGES = 5  # more pages than the guest has
    INTERNAL = 6  # the host failed for another reason


class BalloonError(Exception):
    """Root of every error uballoon raises on purpose."""


class ProtocolError(BalloonError):
    """The protocol was violated; ``code`` is what goes on the wire in an ERROR."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    ``offset`` is the byte offset in the received stream of the frame that failed,
    when known (the dissector prints it).
    """

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.MALFORMED, offset: int | None = None
    ) -> None:
        super().__init__(message, code)
        self.offset = offset


class NativeError(BalloonError):
    """A system call on balloon pages failed.  ``errno`` is the OS error number (0 if
    the failure was a check rather than a system call); the message says what to do."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class PolicyError(BalloonError):
    """A target, size or configuration that cannot hold (names what is wrong)."""
