"""Prometheus metrics: every figure of ``uballoonctl status`` as a gauge, over HTTP.

Theory of operation
-------------------
``render_metrics`` turns what ``HostControl`` shows (guests and pool) into Prometheus
text exposition format 0.0.4: for each metric a ``# HELP`` and a ``# TYPE … gauge``
line, then one sample per guest labelled ``guest="NAME"`` (label values escaped: ``\\``,
``"`` and newline).  A figure a guest has not reported (available memory, pressure
before its first statistics) is left out for that guest rather than faked as 0.

``serve_metrics`` answers ``GET /metrics`` (and ``HEAD``) with a minimal HTTP/1.1
server: one request per connection, ``Connection: close``, a bounded request head and
a deadline to send it, so a stuck scraper holds one socket for at most
``REQUEST_TIMEOUT_S`` (plus a bounded lingering close after the answer).  Other paths
get 404, other methods 405.  The address is ``HOST:PORT`` and defaults to loopback:
metrics name guests and sizes, so exposing them beyond this machine is an operator's
explicit choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from host_backend.view import GuestStatus, HostControl, PoolStatus
from protocol.errors import PolicyError

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_HOST",
    "GUEST_GAUGES",
    "parse_metrics_address",
    "render_metrics",
    "serve_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST_HEAD = 8 * 1024
REQUEST_TIMEOUT_S = 10.0
LINGER_S = 2.0  # after answering, how long to drain what the client still sends
MAX_LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class Gauge:
    name: str
    help: str
    value: Callable[[GuestStatus], float | int | bool | None]


GUEST_GAUGES = (
    Gauge("uballoon_guest_ram_bytes", "The guest's RAM (its ceiling).", lambda g: g.ram_bytes),
    Gauge("uballoon_guest_min_bytes", "The guest's guaranteed floor.", lambda g: g.min_bytes),
    Gauge("uballoon_guest_shares", "The guest's shares of spare capacity.", lambda g: g.shares),
    Gauge("uballoon_guest_target_bytes", "Memory the guest should keep (RAM minus the target "
          "balloon), as QMP's balloon value.", lambda g: g.target_bytes),
    Gauge("uballoon_guest_actual_bytes", "Memory the guest keeps now (RAM minus its balloon), "
          "as QMP query-balloon's actual.", lambda g: g.actual_bytes),
    Gauge("uballoon_guest_ballooned_bytes", "Memory the guest's agent holds in its balloon "
          "(acknowledged pages).", lambda g: g.ballooned_bytes),
    Gauge("uballoon_guest_freed_bytes", "Memory the host verifiably got back from the guest "
          "(0 when accounting only).", lambda g: g.freed_bytes),
    Gauge("uballoon_guest_available_bytes", "The guest's available memory from its last "
          "statistics.", lambda g: g.available_bytes),
    Gauge("uballoon_guest_pressure_some_avg10", "The guest's PSI memory 'some avg10', in "
          "percent, from its last statistics.", lambda g: g.pressure),
    Gauge("uballoon_guest_connected", "1 while the guest's agent is connected.",
          lambda g: g.connected),
    Gauge("uballoon_guest_manual", "1 while an operator's target holds.", lambda g: g.manual),
    Gauge("uballoon_guest_authenticated", "1 if the guest's session is authenticated.",
          lambda g: g.authenticated),
    Gauge("uballoon_guest_stable", "1 if the guest negotiated stable (long-term pinned) "
          "frames.", lambda g: g.stable),
    Gauge("uballoon_guest_floor_reached", "1 while the guest says it cannot inflate further.",
          lambda g: g.floor_reached),
    Gauge("uballoon_guest_reclaim_punch", "1 if the host frees the guest's balloon (punch), "
          "0 if it is accounting only.", lambda g: g.reclaim == "punch"),
)

POOL_GAUGES = (
    ("uballoon_pool_capacity_bytes", "Host capacity for guests.",
     lambda p: p.capacity_bytes),
    ("uballoon_pool_free_bytes", "Capacity not committed to any guest (negative when guests "
     "are promised more than the host has).", lambda p: p.free_bytes),
    ("uballoon_pool_freed_bytes", "Memory the host got back from all balloons.",
     lambda p: p.freed_bytes),
    ("uballoon_pool_ballooned_bytes", "Memory held in all balloons.",
     lambda p: p.ballooned_bytes),
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(name: str, help_text: str, samples: Iterable[tuple[str, float | int | bool]]
            ) -> list[str]:
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} gauge"]
    lines += [f"{name}{labels} {_number(value)}" for labels, value in samples]
    return lines


def render_metrics(guests: list[GuestStatus], pool: PoolStatus) -> str:
    """The exposition text for ``guests`` and ``pool`` (ends with a newline)."""
    lines: list[str] = []
    labels = {g.name: f'{{guest="{escape_label_value(g.name)}"}}' for g in guests}
    for gauge in GUEST_GAUGES:
        samples = [(labels[g.name], v) for g in guests if (v := gauge.value(g)) is not None]
        lines += _family(gauge.name, gauge.help, samples)
    lines += _family("uballoon_guests", "Guests the host knows.", [("", len(guests))])
    lines += _family("uballoon_guests_connected", "Guests whose agent is connected.",
                     [("", sum(g.connected for g in guests))])
    for name, help_text, value in POOL_GAUGES:
        lines += _family(name, help_text, [("", value(pool))])
    lines += _family(
        "uballoon_pool_committed_bytes",
        "Per guest, what it may use on the host: RAM minus host-freed.",
        [(f'{{guest="{escape_label_value(name)}"}}', committed)
         for name, committed in sorted(pool.committed_bytes.items())],
    )
    return "\n".join(lines) + "\n"


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``/``PORT`` (loopback).

    Raises PolicyError naming the text if it is not an address.
    """
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise PolicyError(f"invalid --metrics address {text!r}: write an IPv6 host as [::1]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise PolicyError(f"invalid --metrics address {text!r}: use HOST:PORT, e.g. "
                          f"127.0.0.1:9750")
    return host or DEFAULT_HOST, int(port_text)


# --------------------------------------------------------------------------------------
# HTTP


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large"}


def http_response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
                  head_only: bool = False, extra: Iterable[str] = ()) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def respond(host: HostControl, head: bytes) -> bytes:
    """The response to one request head (the bytes before the blank line)."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return http_response(400, b"bad request\n")
    method, target, _version = parts
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return http_response(405, b"method not allowed\n", extra=["Allow: GET, HEAD"])
    if path != "/metrics":
        return http_response(404, b"not found; metrics are at /metrics\n",
                             head_only=method == "HEAD")
    body = render_metrics(host.guests(), host.pool()).encode()
    return http_response(200, body, content_type=CONTENT_TYPE, head_only=method == "HEAD")


async def _read_head(stream: trio.abc.Stream) -> bytes | int | None:
    """The request head; or an HTTP status to answer with; or None if the peer left."""
    buf = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_REQUEST_HEAD:
                return 431
            data = await stream.receive_some(4096)
            if not data:
                return None
            buf += data
        return bytes(buf[:end])
    return 408


async def _serve_client(host: HostControl, stream: trio.SocketStream) -> None:
    try:
        head = await _read_head(stream)
        if head is None:
            return
        if isinstance(head, int):
            reason = _REASONS[head].lower().encode()
            await stream.send_all(http_response(head, reason + b"\n"))
        else:
            await stream.send_all(respond(host, head))
        # Lingering close: closing with unread input would reset the connection and
        # could destroy the answer before the client reads it (a 431 in particular).
        await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            drained = 0
            while drained < MAX_LINGER_BYTES and (data := await stream.receive_some(65536)):
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the scraper went away


async def serve_metrics(
    host: HostControl,
    address: str | tuple[str, int] = f"{DEFAULT_HOST}:9750",
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` at ``address`` (``"HOST:PORT"`` or ``(host, port)``) until
    cancelled.  ``task_status.started((host, port))`` with the port bound (useful with
    port 0).  Raises PolicyError for a malformed address, OSError if it cannot be bound.
    """
    host_name, port = parse_metrics_address(address) if isinstance(address, str) else address
    listeners = await trio.open_tcp_listeners(port, host=host_name)
    bound_port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners,
                            lambda stream: _serve_client(host, stream), listeners)
        task_status.started((host_name, bound_port))

