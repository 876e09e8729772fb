"""QMP-compatible monitor sockets, one per guest, answering like QEMU's for the balloon.

Theory of operation
-------------------
For each guest the host knows, ``<qmp-dir>/<guest>.qmp`` (mode 0600; the directory 0700
if we create it) speaks the QEMU Machine Protocol as QEMU 8.x does for a VM started
with ``-device virtio-balloon-pci,id=balloon0``, so existing QMP clients (libvirt,
qmp-shell, ``qemu.qmp``, scripts) drive a uballoon guest unchanged:

- on connect, the greeting ``{"QMP": {"version": …, "capabilities": ["oob"]}}``;
  until ``qmp_capabilities`` every command answers CommandNotFound "Expecting
  capabilities negotiation with 'qmp_capabilities'", as QEMU does;
- ``balloon {"value": bytes}`` sets the memory the guest keeps (QEMU's meaning; a value
  above RAM is clamped, ``value <= 0`` is refused), ``query-balloon`` → ``{"actual":
  bytes}``;
- ``qom-get``/``qom-set``/``qom-list`` of ``guest-stats`` and
  ``guest-stats-polling-interval`` at ``/machine/peripheral/balloon0`` (and the paths
  QEMU resolves to it: ``balloon0``, ``peripheral/balloon0``, its ``virtio-backend``
  child), with QEMU's stat names, 2^64−1 for a stat never reported, and GenericError
  "guest hasn't updated any stats yet" before the first update (libvirt matches it);
- ``BALLOON_CHANGE`` events when ``actual`` changes, rate-limited as QEMU does
  (``EventThrottle``: at most one a second per guest, the latest value wins);
- errors with QEMU's classes and wording (CommandNotFound, GenericError,
  DeviceNotFound), the request's ``id`` echoed in every reply.

Layers.  ``JsonSplitter`` cuts the byte stream into JSON texts the way QEMU's
json-streamer does (bracket counting, so one message per line, several per line or one
over many reads all work).  ``QmpSession`` is one client's negotiation state and command
dispatch: plain code over ``HostControl``, no I/O.  ``GuestMonitor`` holds one guest's
clients and its event throttle; ``QmpService`` keeps the set of monitors (and sockets)
equal to the host's guests.  trio appears only in the ``serve_*``/``run`` coroutines.

Bounds.  A message may be at most ``MAX_MESSAGE_BYTES``; a longer one gets a
GenericError and the connection is dropped.  Each client has a bounded outgoing queue:
replies wait for room (back-pressure on that client only), an event that finds it full
drops the client, so a client that stops reading never holds anyone else up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from host_backend.control import UnixListener, bind_unix_listener, remove_socket_file
from host_backend.view import GuestStatus, HostControl
from protocol.constants import QEMU_STAT_NAMES
from protocol.errors import BalloonError, ErrorCode, PolicyError, RemoteProtocolError

__all__ = [
    "BALLOON_CHANGE_PERIOD_S",
    "MAX_MESSAGE_BYTES",
    "QEMU_VERSION",
    "UNREPORTED_STAT",
    "EventThrottle",
    "GuestMonitor",
    "JsonSplitter",
    "MessageTooLarge",
    "QmpService",
    "QmpSession",
    "serve_qmp",
]

log = logging.getLogger(__name__)

QEMU_VERSION = {"major": 8, "minor": 2, "micro": 0}  # what query-version claims to be
MAX_MESSAGE_BYTES = 64 * 1024  # no command we answer needs more than a few hundred bytes
READ_SIZE = 16 * 1024
CLIENT_QUEUE = 64  # messages queued for one client; an event that finds it full drops it
BALLOON_CHANGE_PERIOD_S = 1.0  # QEMU's rate limit for BALLOON_CHANGE
UNREPORTED_STAT = (1 << 64) - 1  # QEMU's value for a stat the guest never reported
NO_STATS_YET = "guest hasn't updated any stats yet"  # exact: libvirt matches this string
CAPABILITIES = ("oob",)  # what QEMU 8 offers on a socket monitor
UINT32_MAX = (1 << 32) - 1
INT64_RANGE = range(-(1 << 63), 1 << 63)


def _package_version() -> str:
    try:
        return metadata.version("uballoon")
    except metadata.PackageNotFoundError:
        return "unknown"


PACKAGE = f"uballoon {_package_version()}"


# --------------------------------------------------------------------------------------
# Framing


class MessageTooLarge(RemoteProtocolError):
    """A QMP message longer than the limit; the client is told, then dropped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.TOO_LARGE)


_WHITESPACE = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_SCALAR_END = _WHITESPACE | _OPEN | _CLOSE | {ord('"')}
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts by counting brackets outside strings,
    as QEMU's json-streamer does.  Whether each text parses is for the caller to find
    out (a bad one gets an error reply; the stream goes on)."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._start: int | None = None  # start of the unfinished text, None between texts
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """The texts completed by ``data``.  Raises MessageTooLarge past the limit."""
        buf = self._buf
        buf += data
        texts: list[bytes] = []
        i, n = self._pos, len(buf)
        while i < n:
            c = buf[i]
            if self._start is None:  # between texts
                if c not in _WHITESPACE:
                    self._start = i
                    if c in _OPEN:
                        self._depth = 1
                    elif c == _QUOTE:
                        self._in_string = True
                    elif c in _CLOSE:  # a stray closer: a text of its own, which fails
                        texts.append(bytes(buf[i : i + 1]))
                        self._start = None
                i += 1
                continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == _BACKSLASH:
                    self._escape = True
                elif c == _QUOTE:
                    self._in_string = False
                    if self._depth == 0:  # a bare top-level string
                        texts.append(bytes(buf[self._start : i + 1]))
                        self._start = None
            elif self._depth == 0:  # a bare top-level scalar (1, true, ...) ends here
                if c in _SCALAR_END:
                    texts.append(bytes(buf[self._start : i]))
                    self._start = None
                    continue  # the delimiter starts the next text
            elif c == _QUOTE:
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    texts.append(bytes(buf[self._start : i + 1]))
                    self._start = None
            i += 1
        keep_from = n if self._start is None else self._start
        del buf[:keep_from]
        self._pos = n - keep_from
        if self._start is not None:
            self._start = 0
        if self._pos > self._max_bytes or any(len(t) > self._max_bytes for t in texts):
            raise MessageTooLarge(f"QMP input exceeds {self._max_bytes} bytes")
        return texts


def encode(message: Mapping[str, Any]) -> bytes:
    # QEMU's compact JSON (", " and ": "), and its monitor writes "\n" as "\r\n".
    return json.dumps(message).encode() + b"\r\n"


# --------------------------------------------------------------------------------------
# Events


def balloon_change_event(actual_bytes: int, wall_time_s: float | None = None) -> dict[str, Any]:
    """A BALLOON_CHANGE event; the timestamp is wall-clock time, as QEMU's."""
    now = time.time() if wall_time_s is None else wall_time_s
    seconds = math.floor(now)
    return {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        "event": "BALLOON_CHANGE",
        "data": {"actual": actual_bytes},
    }


class EventThrottle:
    """QEMU's rate limit for one event (monitor_qapi_event_queue): an event with no
    period running goes out at once and opens a period; events during a period replace
    one another, and the last goes out when the period ends, opening the next.  So at
    most one event per ``period_s``, and the latest value is never lost.

    Times are any monotonic clock (the service uses ``trio.current_time()``).
    """

    def __init__(self, period_s: float = BALLOON_CHANGE_PERIOD_S) -> None:
        self.period_s = period_s
        self.deadline: float | None = None
        """End of the running period; None when no period runs."""
        self._pending: dict[str, Any] | None = None

    def offer(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """The events to send now that ``event`` happened."""
        due = self.expire(now)
        if self.deadline is None:
            self.deadline = now + self.period_s
            due.append(event)
        else:
            self._pending = event
        return due

    def expire(self, now: float) -> list[dict[str, Any]]:
        """The held event, if its period ended by ``now``."""
        if self.deadline is None or now < self.deadline:
            return []
        if self._pending is None:
            self.deadline = None
            return []
        event, self._pending = self._pending, None
        self.deadline = now + self.period_s
        return [event]


# --------------------------------------------------------------------------------------
# One client's session (no I/O)


class _Failed(Exception):
    """A command failed; becomes ``{"error": {"class": …, "desc": …}}``.  Never leaves
    this module: to the client it is an answer, not a failure of uballoon."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _error(desc: str, error_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


_TYPE_WORDS = {"int": "integer", "str": "string", "list": "array"}


def _check_type(name: str, value: Any, kind: str) -> None:
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v in INT64_RANGE,
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list),
        "any": lambda v: True,
    }[kind](value)
    if not ok:
        raise _Failed(f"Invalid parameter type for '{name}', expected: {_TYPE_WORDS[kind]}")


def _check_args(args: Mapping[str, Any], required: Mapping[str, str],
                optional: Mapping[str, str] | None = None) -> None:
    """QAPI's argument checks, in its order: missing or mistyped members, then extras."""
    optional = optional or {}
    for name, kind in required.items():
        if name not in args:
            raise _Failed(f"Parameter '{name}' is missing")
        _check_type(name, args[name], kind)
    for name, kind in optional.items():
        if name in args:
            _check_type(name, args[name], kind)
    for name in args:
        if name not in required and name not in optional:
            raise _Failed(f"Parameter '{name}' is unexpected")


# The slice of QEMU's QOM tree a client can see: canonical path -> type.
_BALLOON = ("machine", "peripheral", "balloon0")
_BACKEND = (*_BALLOON, "virtio-backend")
_QOM_TREE = {
    (): "container",
    ("machine",): "container",
    ("machine", "peripheral"): "container",
    _BALLOON: "virtio-balloon-pci",
    _BACKEND: "virtio-balloon-device",
}
_STATS_PROPERTIES = {"guest-stats": "guest statistics", "guest-stats-polling-interval": "int"}


def _resolve(path: str) -> tuple[str, ...] | None:
    """QEMU's object_resolve_path over our tree: an absolute path (empty components
    ignored) or a partial one that is the tail of exactly one canonical path."""
    parts = tuple(p for p in path.split("/") if p)
    if path.startswith("/"):
        return parts if parts in _QOM_TREE else None
    if not parts:
        return None
    matches = [p for p in _QOM_TREE if len(p) >= len(parts) and p[len(p) - len(parts) :] == parts]
    return matches[0] if len(matches) == 1 else None


def _properties(obj: tuple[str, ...]) -> dict[str, str]:
    """Property name -> QOM type, for ``qom-list``."""
    props = {"type": "string"}
    for child, child_type in _QOM_TREE.items():
        if len(child) == len(obj) + 1 and child[: len(obj)] == obj:
            props[child[-1]] = f"child<{child_type}>"
    if _QOM_TREE[obj].startswith("virtio-balloon"):
        props.update(_STATS_PROPERTIES)
    return props


class QmpSession:
    """One QMP client of one guest: capabilities negotiation and command dispatch.

    ``greeting()`` is the first message; ``handle(text)`` answers one JSON text.
    """

    def __init__(self, monitor: GuestMonitor) -> None:
        self._monitor = monitor
        self.negotiated = False
        """True after qmp_capabilities; only then does the client get events."""
        self.oob = False
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "balloon": self._balloon,
            "query-balloon": self._query_balloon,
            "qom-list": self._qom_list,
            "qom-get": self._qom_get,
            "qom-set": self._qom_set,
        }

    @property
    def _host(self) -> HostControl:
        return self._monitor.host

    @property
    def _name(self) -> str:
        return self._monitor.name

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._query_version({}), "capabilities": list(CAPABILITIES)}}

    def handle(self, text: bytes) -> dict[str, Any]:
        """The reply to one JSON text (a request or something that fails as one)."""
        try:
            request = json.loads(text)
        except ValueError as exc:  # includes UnicodeDecodeError
            return _error(f"JSON parse error, {exc}")
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object")
        try:
            reply = {"return": self._dispatch(request)}
        except _Failed as exc:
            reply = _error(exc.desc, exc.error_class)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _dispatch(self, request: dict[str, Any]) -> Any:
        exec_key = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise _Failed(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise _Failed(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _Failed("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _Failed(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise _Failed("QMP input lacks member 'execute'")
        name = request[exec_key]
        if not self.negotiated and name != "qmp_capabilities":
            # QEMU's monitor replaces CommandNotFound's text while negotiating.
            raise _Failed("Expecting capabilities negotiation with 'qmp_capabilities'",
                          "CommandNotFound")
        command = self._commands.get(name)
        if command is None:
            raise _Failed(f"The command {name} has not been found", "CommandNotFound")
        if exec_key == "exec-oob":
            raise _Failed(f"The command {name} does not support OOB")
        try:
            return command(request.get("arguments", {}))
        except BalloonError as exc:  # unknown guest (released meanwhile), policy refusal
            raise _Failed(str(exc)) from exc

    # -- commands

    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            raise _Failed("Capabilities negotiation is already complete, command ignored",
                          "CommandNotFound")
        _check_args(args, {}, {"enable": "list"})
        enable = args.get("enable", [])
        for i, capability in enumerate(enable):
            _check_type(f"enable[{i}]", capability, "str")
            if capability not in CAPABILITIES:
                raise _Failed(f"Parameter 'enable[{i}]' does not accept value '{capability}'")
        self.oob = "oob" in enable
        self.negotiated = True
        return {}

    def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, {})
        return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        _check_args(args, {})
        return [{"name": name} for name in self._commands]

    def _balloon(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, {"value": "int"})
        value = args["value"]
        if value <= 0:
            raise _Failed("Parameter 'value' expects a size")
        # Like QEMU: the memory the guest keeps; above RAM is clamped, not refused.
        self._host.set_target(self._name, value, clamp=True)
        return {}

    def _query_balloon(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, {})
        return {"actual": self._host.guest(self._name).actual_bytes}

    @staticmethod
    def _object(path: str) -> tuple[str, ...]:
        obj = _resolve(path)
        if obj is None:
            raise _Failed(f"Device '{path}' not found", "DeviceNotFound")
        return obj

    def _qom_list(self, args: dict[str, Any]) -> list[dict[str, str]]:
        _check_args(args, {"path": "str"})
        obj = self._object(args["path"])
        return [{"name": n, "type": t} for n, t in _properties(obj).items()]

    def _qom_get(self, args: dict[str, Any]) -> Any:
        _check_args(args, {"path": "str", "property": "str"})
        obj = self._object(args["path"])
        prop = args["property"]
        props = _properties(obj)
        if prop not in props:
            raise _Failed(f"Property '{_QOM_TREE[obj]}.{prop}' not found")
        if prop == "type":
            return _QOM_TREE[obj]
        if props[prop].startswith("child<"):
            return "/" + "/".join((*obj, prop))
        if prop == "guest-stats":
            return self._guest_stats()
        return self._polling_interval()

    def _qom_set(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, {"path": "str", "property": "str", "value": "any"})
        obj = self._object(args["path"])
        prop = args["property"]
        type_name = _QOM_TREE[obj]
        if prop not in _properties(obj):
            raise _Failed(f"Property '{type_name}.{prop}' not found")
        if prop != "guest-stats-polling-interval":
            raise _Failed(f"Property '{type_name}.{prop}' is not writable")
        value = args["value"]
        _check_type(prop, value, "int")
        if value < 0:
            raise _Failed("timer value must be greater than zero")  # sic, QEMU's words
        if value > UINT32_MAX:
            raise _Failed("timer value is too big")
        self._host.set_stats_interval(self._name, value)
        self._monitor.stats_interval_s = value
        return {}

    def _guest_stats(self) -> dict[str, Any]:
        self._host.guest(self._name)  # unknown guest: its error, not "no stats yet"
        stats = self._host.stats(self._name)
        if stats is None:
            raise _Failed(NO_STATS_YET)
        return {
            "last-update": int(stats.last_update),
            "stats": {
                name: stats.values.get(tag, UNREPORTED_STAT)
                for tag, name in QEMU_STAT_NAMES.items()
            },
        }

    def _polling_interval(self) -> int:
        stats = self._host.stats(self._name)
        if stats is not None:
            return stats.polling_interval_s
        return self._monitor.stats_interval_s  # none reported yet: what was last set here


# --------------------------------------------------------------------------------------
# One guest's monitor: its clients, its events


@dataclasses.dataclass(eq=False)
class _Client:
    session: QmpSession
    outbox: trio.MemorySendChannel[dict[str, Any]]
    cancel_scope: trio.CancelScope


class GuestMonitor:
    """Everything QMP about one guest: the clients connected to it and its
    BALLOON_CHANGE throttle.  ``observe`` is fed the guest's ``actual`` by the service;
    ``serve_stream`` serves one client over any trio stream."""

    def __init__(self, host: HostControl, name: str,
                 period_s: float = BALLOON_CHANGE_PERIOD_S) -> None:
        self.host = host
        self.name = name
        self.stats_interval_s = 0
        """The polling interval last set through QMP (shown until stats arrive)."""
        self._throttle = EventThrottle(period_s)
        self._actual: int | None = None
        self._clients: set[_Client] = set()

    @property
    def deadline(self) -> float | None:
        """When a held BALLOON_CHANGE is due (``trio.current_time()`` clock)."""
        return self._throttle.deadline

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def observe(self, actual_bytes: int, now: float) -> None:
        """The guest's ``actual`` as of ``now``; a change is an event (rate-limited)."""
        if self._actual is None:
            self._actual = actual_bytes  # the baseline, not a change
            return
        if actual_bytes != self._actual:
            self._actual = actual_bytes
            for event in self._throttle.offer(balloon_change_event(actual_bytes), now):
                self._broadcast(event)

    def expire(self, now: float) -> None:
        for event in self._throttle.expire(now):
            self._broadcast(event)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for client in list(self._clients):
            if not client.session.negotiated:
                continue  # QEMU sends no events before capabilities negotiation
            try:
                client.outbox.send_nowait(event)
            except trio.WouldBlock:
                log.warning("QMP %s: dropping a client that does not read its events",
                            self.name)
                self._clients.discard(client)
                client.cancel_scope.cancel()
            except trio.ClosedResourceError:
                self._clients.discard(client)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one QMP client until it disconnects (or is dropped); closes ``stream``."""
        session = QmpSession(self)
        outbox, inbox = trio.open_memory_channel[dict[str, Any]](CLIENT_QUEUE)
        try:
            async with trio.open_nursery() as nursery:
                client = _Client(session, outbox, nursery.cancel_scope)
                nursery.start_soon(self._write, stream, inbox, nursery.cancel_scope)
                self._clients.add(client)
                try:
                    await outbox.send(session.greeting())
                    await self._read(stream, session, outbox)
                finally:
                    self._clients.discard(client)
                    outbox.close()  # the writer sends what is queued, then ends
        finally:
            await trio.aclose_forcefully(stream)

    async def _read(self, stream: trio.abc.Stream, session: QmpSession,
                    outbox: trio.MemorySendChannel[dict[str, Any]]) -> None:
        splitter = JsonSplitter()
        while True:
            try:
                data = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                texts = splitter.feed(data)
            except MessageTooLarge as exc:
                await outbox.send(_error(str(exc)))
                return
            for text in texts:
                await outbox.send(session.handle(text))

    async def _write(self, stream: trio.abc.Stream,
                     inbox: trio.MemoryReceiveChannel[dict[str, Any]],
                     cancel_scope: trio.CancelScope) -> None:
        try:
            async for message in inbox:
                await stream.send_all(encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            cancel_scope.cancel()  # the client is gone: stop reading for it too
        else:
            cancel_scope.cancel()  # all sent after the reader ended: done

    def close(self) -> None:
        """Drop every client (the guest is gone)."""
        for client in list(self._clients):
            client.cancel_scope.cancel()
        self._clients.clear()


# --------------------------------------------------------------------------------------
# The service: one monitor (and socket) per known guest


def _socket_name_ok(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if it does not exist (an existing one is left as
    the operator made it).  Raises PolicyError if it exists and is not a directory."""
    if path.exists():
        if not path.is_dir():
            raise PolicyError(f"--qmp-dir {path} exists and is not a directory")
        return
    path.mkdir(mode=0o700, parents=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


class QmpService:
    """Keeps one ``GuestMonitor`` per guest the host knows, and with ``qmp_dir`` one
    socket per monitor: created when a guest becomes known, removed when it is released.

    ``min_rescan_s`` paces rescans: each costs one ``host.guests()``, and the host's
    change counter may move thousands of times a second with many guests.
    """

    def __init__(self, host: HostControl, qmp_dir: str | os.PathLike[str] | None = None, *,
                 min_rescan_s: float = 0.05, period_s: float = BALLOON_CHANGE_PERIOD_S) -> None:
        self.host = host
        self.qmp_dir = None if qmp_dir is None else Path(qmp_dir)
        self.min_rescan_s = min_rescan_s
        self.period_s = period_s
        self._monitors: dict[str, GuestMonitor] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._skipped: set[str] = set()

    def monitor(self, name: str) -> GuestMonitor:
        """The monitor of guest ``name``.  Raises PolicyError if there is none."""
        try:
            return self._monitors[name]
        except KeyError:
            raise PolicyError(f"no QMP monitor for guest {name}") from None

    def socket_path(self, name: str) -> Path:
        if self.qmp_dir is None:
            raise PolicyError("QMP sockets are off (no --qmp-dir)")
        return self.qmp_dir / f"{name}.qmp"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; ``task_status.started()`` once every known guest's
        socket accepts connections.  Raises PolicyError if ``qmp_dir`` is not a directory."""
        if self.qmp_dir is not None:
            _ensure_private_dir(self.qmp_dir)
        async with trio.open_nursery() as nursery:
            try:
                seen = self.host.changes()
                await self._rescan(nursery, trio.current_time())
                task_status.started()
                while True:
                    deadlines = [m.deadline for m in self._monitors.values()
                                 if m.deadline is not None]
                    with trio.move_on_at(min(deadlines, default=math.inf)):
                        seen = await self.host.wait_change(seen)
                    now = trio.current_time()
                    for monitor in self._monitors.values():
                        monitor.expire(now)
                    await self._rescan(nursery, now)
                    await trio.sleep_until(now + self.min_rescan_s)
            finally:
                for name in list(self._monitors):
                    self._drop(name)

    async def _rescan(self, nursery: trio.Nursery, now: float) -> None:
        guests: dict[str, GuestStatus] = {g.name: g for g in self.host.guests()}
        for name in [n for n in self._monitors if n not in guests]:
            self._drop(name)
        for name, guest in guests.items():
            monitor = self._monitors.get(name)
            if monitor is None:
                monitor = await self._add(nursery, name)
            monitor.observe(guest.actual_bytes, now)

    async def _add(self, nursery: trio.Nursery, name: str) -> GuestMonitor:
        monitor = GuestMonitor(self.host, name, self.period_s)
        self._monitors[name] = monitor
        if self.qmp_dir is None:
            return monitor
        if not _socket_name_ok(name):
            if name not in self._skipped:
                log.warning("QMP: no socket for guest %r: the name cannot be a file name", name)
                self._skipped.add(name)
            return monitor
        try:
            unix = bind_unix_listener(self.socket_path(name))
        except (OSError, PolicyError) as exc:
            # One guest's socket failing (name too long for AF_UNIX, a foreign file in
            # the way) must not take QMP away from the others: say so and go on.
            log.warning("QMP: no socket for guest %s: %s", name, exc)
            return monitor
        self._scopes[name] = await nursery.start(self._serve_socket, monitor, unix)
        return monitor

    def _drop(self, name: str) -> None:
        self._monitors.pop(name).close()
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()

    @staticmethod
    async def _serve_socket(monitor: GuestMonitor, unix: UnixListener, *,
                            task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, monitor.serve_stream,
                                        [unix.listener])
                    task_status.started(scope)
        finally:
            remove_socket_file(unix.path, unix.inode)  # first: closing may raise Cancelled
            await trio.aclose_forcefully(unix.listener)


async def serve_qmp(host: HostControl, qmp_dir: str | os.PathLike[str], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``<qmp_dir>/<guest>.qmp`` for every guest ``host`` knows, following
    ``host.guests()`` as guests come and go, until cancelled (then the sockets are
    removed).  ``task_status.started()`` once the known guests' sockets accept
    connections.  Raises PolicyError if ``qmp_dir`` exists and is not a directory."""
    await QmpService(host, qmp_dir).run(task_status=task_status)
