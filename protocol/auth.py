"""Authentication: the guest's proof, the session keys, and per-frame MACs.

Theory of operation
-------------------
Each guest the host knows may have a secret key (at least 16 bytes, shared out of
band: a file on the host, ``-fw_cfg`` into a VM).  When the host holds a key for the
guest named in HELLO, it answers CHALLENGE with a fresh nonce and the guest must send
AUTH with::

    proof = HMAC-SHA256(key, "uballoon-v1 auth" || guest_nonce || host_nonce
                              || u8 len(name) || name || hello_body)

Both sides then derive::

    secret = HMAC-SHA256(key, "uballoon-v1 session" || guest_nonce || host_nonce
                               || SHA-256(hello_body))
    k_g2h  = HMAC-SHA256(secret, "guest-to-host")
    k_h2g  = HMAC-SHA256(secret, "host-to-guest")

After the AUTH frame (which itself carries a CRC) the guest's frames, and from WELCOME
on (sent once the proof checked out) the host's frames, carry
``HMAC-SHA256(k_direction, le64 seq || header || body)`` as its trailer, where ``seq``
counts the MAC'd frames sent in that direction from 0.  So:

* a replayed AUTH fails: the host nonce is fresh per connection;
* a frame replayed, reordered or dropped inside a session fails: ``seq`` differs;
* a frame reflected back to its sender fails: each direction has its own key;
* a frame from another session fails: the nonces differ;
* WELCOME's MAC proves the host knows the key too (mutual authentication).
"""

from __future__ import annotations

import hashlib
import hmac

PROOF_SIZE = 32
MIN_KEY_SIZE = 16


def check_key(key: bytes) -> bytes:
    """Return ``key`` if usable.  Raises ValueError saying why not."""
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"a guest key must be at least {MIN_KEY_SIZE} bytes, not {len(key)}")
    return key


def key_from_file_bytes(data: bytes) -> bytes:
    """A key file's contents are the key, byte for byte (a trailing newline included:
    both ends read the same file).  Raises ValueError if too short."""
    return check_key(data)


def proof(key: bytes, guest_nonce: bytes, host_nonce: bytes, name: str, hello_body: bytes) -> bytes:
    encoded = name.encode("ascii")
    mac = hmac.new(key, b"uballoon-v1 auth", hashlib.sha256)
    for part in (guest_nonce, host_nonce, bytes([len(encoded)]), encoded, hello_body):
        mac.update(part)
    return mac.digest()


def session_keys(
    key: bytes, guest_nonce: bytes, host_nonce: bytes, hello_body: bytes
) -> tuple[bytes, bytes]:
    """(guest-to-host key, host-to-guest key) for one authenticated session."""
    secret = hmac.new(
        key,
        b"uballoon-v1 session" + guest_nonce + host_nonce + hashlib.sha256(hello_body).digest(),
        hashlib.sha256,
    ).digest()
    g2h = hmac.new(secret, b"guest-to-host", hashlib.sha256).digest()
    h2g = hmac.new(secret, b"host-to-guest", hashlib.sha256).digest()
    return g2h, h2g


def frame_mac(key: bytes, seq: int, header: bytes, body: bytes | memoryview) -> bytes:
    mac = hmac.new(key, seq.to_bytes(8, "little"), hashlib.sha256)
    mac.update(header)
    mac.update(body)
    return mac.digest()


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
