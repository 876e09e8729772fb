"""The host-wide control socket: what ``uballoonctl`` talks to.

Theory of operation
-------------------
One Unix socket (owner-only, 0600) carries JSON lines: each request is one JSON object
on one line, each answer one JSON object on one line, in order.  docs/control.md is the
normative description; in short::

    -> {"cmd": "set", "name": "vm1", "size": "1536M", "id": 7}
    <- {"ok": true, "result": {"target_bytes": 1610612736, "guest": {...}}, "id": 7}
    -> {"cmd": "guest", "name": "vm9"}
    <- {"ok": false, "error": "unknown guest vm9"}

``watch`` turns the connection into a stream: a snapshot at once, then one after each
change, until the client closes it.

The control plane sees the host only through ``host_backend.view.HostControl``; what
a request means is decided by ``handle_request`` (plain code, no I/O), and trio lives
only in ``serve_control`` and the per-connection task below it.  Every read is bounded
(``MAX_REQUEST_BYTES``): a longer line gets an error and the connection is dropped,
which touches no other client.

This module also owns ``bind_unix_listener``, which the QMP sockets use too: the socket
file is created owner-only (no window in which another user could connect), a stale
socket left by a dead process is replaced, a live one is never stolen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from host_backend.view import GuestStats, GuestStatus, HostControl, PoolStatus
from protocol.constants import QEMU_STAT_NAMES, StatTag
from protocol.errors import BalloonError, ErrorCode, PolicyError, RemoteProtocolError
from protocol.units import parse_size

__all__ = [
    "COMMANDS",
    "MAX_REQUEST_BYTES",
    "LineBuffer",
    "UnixListener",
    "bind_unix_listener",
    "guest_json",
    "handle_request",
    "pool_json",
    "remove_socket_file",
    "serve_control",
    "serve_control_stream",
    "stat_name",
    "stats_json",
]

MAX_REQUEST_BYTES = 64 * 1024  # the longest request line; real ones are under 200 bytes
WATCH_MIN_INTERVAL_S = 0.1  # default pace of a watch stream: a snapshot costs O(guests)
COMMANDS = ("status", "guest", "set", "stats", "release", "pool", "watch")


# --------------------------------------------------------------------------------------
# Owner-only Unix sockets (shared with host_backend.qmp)


@dataclasses.dataclass
class UnixListener:
    """A listening Unix socket and the file it owns (removed by ``close``)."""

    listener: trio.SocketListener
    path: Path
    inode: int
    """The socket file's inode, so ``close`` never removes a file that replaced ours."""

    async def aclose(self) -> None:
        remove_socket_file(self.path, self.inode)  # first: closing may raise Cancelled
        await self.listener.aclose()


def remove_socket_file(path: Path, inode: int) -> None:
    """Unlink ``path`` if it is still the socket we bound (inode ``inode``)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PolicyError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a server so busy its backlog is full is still a live one
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # left behind by a process that died
        return
    except TimeoutError:
        pass  # live, only busy
    except OSError as exc:
        raise PolicyError(f"{path}: cannot check the existing socket: {exc.strerror}") from exc
    finally:
        probe.close()
    raise PolicyError(f"{path}: another process is serving this socket")


def bind_unix_listener(path: str | os.PathLike[str], backlog: int = 128) -> UnixListener:
    """Create a listening Unix socket at ``path`` with mode 0600.

    Raises PolicyError if ``path`` is live (another server) or is not a socket, and
    OSError if it cannot be bound (missing directory, name too long, permissions).
    """
    path = Path(path)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with mode 0777 & ~umask: tighten the umask around it
        # so the socket is owner-only from its first instant (a chmod afterwards leaves a
        # window in which anyone could connect).  No await between the two umask calls,
        # so no other task runs meanwhile; uballoon runs no threads that create files.
        old_umask = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)  # in case the umask already allowed less than we want
        inode = os.lstat(path).st_ino
        sock.listen(backlog)
        sock.setblocking(False)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise
    return UnixListener(listener, path, inode)


# --------------------------------------------------------------------------------------
# Framing and the meaning of requests (no I/O)


class LineTooLong(RemoteProtocolError):
    """A request line longer than the limit; the connection is dropped after saying so."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.TOO_LARGE)


class LineBuffer:
    """Splits received bytes into lines (without the newline), each at most ``max_bytes``.

    ``feed`` raises LineTooLong as soon as an unfinished line passes the limit, so a
    peer can never make us hold more than ``max_bytes`` plus one read.
    """

    def __init__(self, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._max_bytes = max_bytes
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self._buf += data
        lines = []
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end])
            if len(line) > self._max_bytes:
                raise LineTooLong(f"request longer than {self._max_bytes} bytes")
            lines.append(line.rstrip(b"\r"))
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > self._max_bytes:
            raise LineTooLong(f"request longer than {self._max_bytes} bytes")
        return lines


def stat_name(tag: int) -> str:
    """QEMU's name for a Linux stat (``stat-free-memory``), a readable one for ours
    (``psi-some-avg10``), ``tag-0x1234`` for a tag this version does not know."""
    try:
        known = StatTag(tag)
    except ValueError:
        return f"tag-{tag:#06x}"
    return QEMU_STAT_NAMES.get(known) or known.name.lower().replace("_", "-")


def guest_json(guest: GuestStatus) -> dict[str, Any]:
    """Every field of GuestStatus, under its own name (sizes in bytes)."""
    return dataclasses.asdict(guest)


def pool_json(pool: PoolStatus) -> dict[str, Any]:
    return {
        "capacity_bytes": pool.capacity_bytes,
        "free_bytes": pool.free_bytes,
        "committed_bytes": dict(pool.committed_bytes),
        "freed_bytes": pool.freed_bytes,
        "ballooned_bytes": pool.ballooned_bytes,
    }


def stats_json(stats: GuestStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "last_update": stats.last_update,
        "polling_interval_s": stats.polling_interval_s,
        "stats": [
            {"tag": tag, "name": stat_name(tag), "value": value}
            for tag, value in sorted(stats.values.items())
        ],
    }


def status_json(host: HostControl) -> dict[str, Any]:
    return {"guests": [guest_json(g) for g in host.guests()], "pool": pool_json(host.pool())}


def _string_arg(request: Mapping[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{request.get('cmd')}: '{key}' must be a non-empty string")
    return value


def _size_arg(request: Mapping[str, Any]) -> int | None:
    """``size``: bytes (int), a size string (``1536M``), or ``"auto"``/null for None."""
    if "size" not in request:
        raise PolicyError("set: 'size' is missing (bytes, a size such as 1536M, or \"auto\")")
    size = request["size"]
    if size is None or size == "auto":
        return None
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise PolicyError("set: 'size' must be bytes, a size such as 1536M, or \"auto\"")
    return parse_size(size)


def handle_request(host: HostControl, request: Any) -> Any:
    """The result of one request other than ``watch``.

    Raises PolicyError with a one-line message for a malformed request and passes on the
    host's own PolicyError (unknown guest, target out of range, ...).
    """
    if not isinstance(request, dict):
        raise PolicyError("a request must be a JSON object")
    cmd = request.get("cmd")
    if cmd == "status":
        return status_json(host)
    if cmd == "guest":
        return guest_json(host.guest(_string_arg(request, "name")))
    if cmd == "set":
        name = _string_arg(request, "name")
        keep_bytes = _size_arg(request)
        clamp = request.get("clamp", False)
        if not isinstance(clamp, bool):
            raise PolicyError("set: 'clamp' must be true or false")
        target = host.set_target(name, keep_bytes, clamp=clamp)
        return {"target_bytes": target, "guest": guest_json(host.guest(name))}
    if cmd == "stats":
        name = _string_arg(request, "name")
        host.guest(name)  # an unknown guest is an error, not "no stats yet"
        return {"name": name, "stats": stats_json(host.stats(name))}
    if cmd == "release":
        name = _string_arg(request, "name")
        host.release(name)
        return {"released": name}
    if cmd == "pool":
        return pool_json(host.pool())
    if cmd == "watch":
        raise PolicyError("watch is a stream; it is served by the connection, not here")
    if not isinstance(cmd, str):
        raise PolicyError("a request needs a 'cmd' string (" + ", ".join(COMMANDS) + ")")
    raise PolicyError(f"unknown command {cmd!r} (one of " + ", ".join(COMMANDS) + ")")


def watch_snapshot(host: HostControl, name: str | None) -> Any:
    """What a watch stream sends: the whole status, or one guest's when ``name`` is set."""
    if name is None:
        return status_json(host)
    return guest_json(host.guest(name))


def _parse_watch(request: Mapping[str, Any]) -> tuple[str | None, float]:
    name = request.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise PolicyError("watch: 'name' must be a non-empty string")
    interval = request.get("min_interval_s", WATCH_MIN_INTERVAL_S)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not math.isfinite(interval)
        or not 0 <= interval <= 3600
    ):
        raise PolicyError("watch: 'min_interval_s' must be a number of seconds, 0-3600")
    return name, float(interval)


def encode_line(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _answer(request: Any, **fields: Any) -> dict[str, Any]:
    if "error" in fields:  # one line, whatever the message: the CLI prints it as one
        fields["error"] = " ".join(fields["error"].split("\n"))
    if isinstance(request, dict) and "id" in request:
        fields["id"] = request["id"]
    return fields


# --------------------------------------------------------------------------------------
# The server


async def serve_control(
    host: HostControl,
    path: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` (mode 0600) until cancelled, then remove it.

    ``task_status.started(path)`` once clients can connect.  Raises PolicyError if
    another process serves ``path`` or it is not a socket, OSError if it cannot be bound.
    """
    unix = bind_unix_listener(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                trio.serve_listeners, lambda stream: _serve_client(host, stream), [unix.listener]
            )
            task_status.started(unix.path)
    finally:
        remove_socket_file(unix.path, unix.inode)


async def serve_control_stream(host: HostControl, stream: trio.abc.Stream) -> None:
    """Serve one control connection over any trio stream (the socket server's handler;
    tests use it over in-memory streams).  Returns when the peer closes."""
    await _serve_client(host, stream)


async def _serve_client(host: HostControl, stream: trio.abc.Stream) -> None:
    lines = LineBuffer()
    try:
        while True:
            data = await stream.receive_some(MAX_REQUEST_BYTES)
            if not data:
                return
            try:
                batch = lines.feed(data)
            except LineTooLong as exc:
                await stream.send_all(encode_line({"ok": False, "error": str(exc)}))
                return
            for line in batch:
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    await stream.send_all(
                        encode_line({"ok": False, "error": f"invalid JSON: {exc}"})
                    )
                    continue
                if isinstance(request, dict) and request.get("cmd") == "watch":
                    await _watch(host, stream, request)
                    return
                try:
                    reply = _answer(request, ok=True, result=handle_request(host, request))
                except BalloonError as exc:
                    reply = _answer(request, ok=False, error=str(exc))
                await stream.send_all(encode_line(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client went away mid-answer: nothing to tell anyone


async def _watch(host: HostControl, stream: trio.abc.Stream, request: dict[str, Any]) -> None:
    """Stream snapshots until the client closes the connection (or the watched guest
    goes away: then a last error line).  Anything else the client sends is discarded."""
    try:
        name, interval_s = _parse_watch(request)
        if name is not None:
            host.guest(name)  # an unknown guest is an error at once
    except BalloonError as exc:
        await stream.send_all(encode_line(_answer(request, ok=False, error=str(exc))))
        return
    # Transport errors are caught inside the nursery: escaping it they would arrive
    # wrapped in an ExceptionGroup, which the connection handler does not expect.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_peer_closes, stream, nursery.cancel_scope)
        try:
            await _send_snapshots(host, stream, request, name, interval_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the watcher went away
        nursery.cancel_scope.cancel()


async def _until_peer_closes(stream: trio.abc.Stream, cancel_scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(MAX_REQUEST_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    cancel_scope.cancel()


async def _send_snapshots(host: HostControl, stream: trio.abc.Stream, request: dict[str, Any],
                          name: str | None, interval_s: float) -> None:
    seen = host.changes()
    last: Any = None
    while True:
        try:
            snapshot = watch_snapshot(host, name)
        except BalloonError as exc:
            await stream.send_all(encode_line(_answer(request, ok=False, error=str(exc))))
            return
        if snapshot != last:
            await stream.send_all(
                encode_line(_answer(request, ok=True, changes=seen, result=snapshot))
            )
            last = snapshot
        # Pace the stream: every snapshot costs a walk over all guests.
        await trio.sleep(interval_s)
        seen = await host.wait_change(seen)
