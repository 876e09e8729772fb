"""Transport addresses as operators write them: ``tcp:HOST:PORT``, ``unix:PATH``,
``vsock:CID:PORT`` (and ``vsock:PORT`` to listen on any CID).

Parsing only; the services that open sockets live in guest_agent/ and host_backend/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import PolicyError

VMADDR_CID_ANY = 0xFFFF_FFFF
_FORMS = "tcp:HOST:PORT, unix:PATH or vsock:CID:PORT"


@dataclass(frozen=True)
class Address:
    kind: str
    """"tcp", "unix" or "vsock"."""
    host: str = ""
    """TCP host name or IP address (IPv6 without brackets)."""
    port: int = 0
    """TCP or vsock port."""
    path: str = ""
    """Unix socket path."""
    cid: int = 0
    """vsock context id (VMADDR_CID_ANY when listening on any)."""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.port}" if self.cid == VMADDR_CID_ANY else (
                f"vsock:{self.cid}:{self.port}"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str, *, listen: bool = False) -> Address:
    """Parse an address.  ``listen`` allows ``vsock:PORT`` (any CID).

    Raises PolicyError naming the text and the accepted forms.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise PolicyError(f"invalid address {text!r}: use {_FORMS}")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind == "tcp":
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", rest)
        if not match:
            raise PolicyError(f"invalid TCP address {text!r}: use tcp:HOST:PORT")
        host = match.group(1) or match.group(3)
        return Address(
            "tcp", host=host, port=_port(match.group(2) or match.group(4), text, 0xFFFF)
        )
    if kind == "vsock":
        parts = rest.split(":")
        if len(parts) == 1 and listen:
            return Address("vsock", cid=VMADDR_CID_ANY, port=_port(parts[0], text))
        if len(parts) == 2 and parts[0].isdigit():
            cid = int(parts[0])
            if cid > 0xFFFF_FFFF:
                raise PolicyError(f"invalid vsock CID in {text!r}")
            return Address("vsock", cid=cid, port=_port(parts[1], text))
        want = "vsock:PORT or vsock:CID:PORT" if listen else "vsock:CID:PORT"
        raise PolicyError(f"invalid vsock address {text!r}: use {want}")
    raise PolicyError(f"invalid address {text!r}: unknown transport {kind!r}; use {_FORMS}")


def _port(text: str, whole: str, highest: int = 0xFFFF_FFFF) -> int:
    if not text.isdigit() or not 0 <= int(text) <= highest:
        raise PolicyError(f"invalid port in {whole!r}")
    return int(text)
