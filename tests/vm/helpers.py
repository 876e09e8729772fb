"""What the VM tests drive: a real ``uballoon-host`` process, a wiretap between it and
the guests, ``uballoon-guest`` inside a guest, and small programs that run in the guest.

Theory of operation
-------------------
* ``Host`` runs ``uballoon-host`` (the installed entry point) with a generated TOML
  config, key files, a control socket, a QMP directory and a state file in a private
  temporary directory; it can be killed and started again on the same port and files.
  The tests read the host's view only through its control socket (``uballoonctl``'s
  protocol) and its QMP sockets, and wait on the control socket's ``watch`` stream —
  nothing polls on a timer.
* ``Wiretap`` is a relay process between the guests and the host (the guests connect
  to it at 10.0.2.2:PORT; it connects to the host per connection) that saves each
  direction of each connection.  The control plane shows the ledger's sizes, not its
  pages; ``Wiretap.ledger(name)`` replays every request the host *acknowledged*
  (INFLATE adds, DEFLATE removes, RESYNC replaces — the ledger's own rules, in the
  order the host handled them), which is exactly the page set the host's ledger holds
  for that guest once nothing is in flight.
* ``GuestAgent`` is ``uballoon-guest`` running in the guest, its log on stdout.
* The ``*_PY`` strings are programs run in the guest with the host's Python (numpy
  included): reading an agent's frames from ``/proc/PID/pagemap``, touching memory,
  holding a checksummed buffer, checking a per-page pattern, moving pages.

Every process started here is stopped by its ``close()``/context manager, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.harness import (
    HOST_IP_FROM_GUEST,
    PROJECT_DIR,
    CommandTimeout,
    GuestProcess,
    GuestVM,
    QMPClient,
    RamRegion,
)

MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096
VENV_BIN = Path(sys.prefix) / "bin"
KEY_ITEM = "key"  # the fw_cfg item (opt/uballoon/key) holding the guest's key


def fmt(size: int) -> str:
    """Bytes in MiB with one decimal, for messages."""
    return f"{size / MIB:.1f} MiB"


class Laps:
    """Wall time per phase of a test, printed as it goes (``pytest -s`` shows them)."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        print(f"[{now - self.start:6.1f}s] {what} ({now - self.last:.1f}s)", flush=True)
        self.last = now


def _dies_with_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel SIGKILLs it if this process dies without cleaning
    up (as the harness does for QEMU; only from the main thread, which PDEATHSIG follows)."""
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return argv


def _deadline_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


# ---------------------------------------------------------------------------------------
# The host


@dataclass
class GuestSpec:
    """One ``[guest.NAME]`` of the host's config."""

    name: str
    max_bytes: int
    min_bytes: int = 0
    shares: int = 1000
    key: bytes | None = None
    ram_map: Sequence[RamRegion] = ()


def _toml_size(value: int) -> str:
    return str(int(value))


def host_config(guests: Sequence[GuestSpec], key_dir: Path) -> str:
    """The TOML text for ``guests``; keys are written to ``key_dir`` (0600)."""
    lines = []
    for g in guests:
        lines.append(f"[guest.{g.name}]")
        lines.append(f"max = {_toml_size(g.max_bytes)}")
        lines.append(f"min = {_toml_size(g.min_bytes)}")
        lines.append(f"shares = {g.shares}")
        if g.key is not None:
            key_path = key_dir / f"{g.name}.key"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(g.key)
            lines.append(f'key_file = "{key_path}"')
        if g.ram_map:
            regions = ", ".join(
                f'{{ start = {r.guest_phys_start}, length = {r.size_bytes}, '
                f'file = "{r.path}", offset = {r.file_offset} }}'
                for r in g.ram_map
            )
            lines.append(f"ram = [ {regions} ]")
        lines.append("")
    return "\n".join(lines)


def free_tcp_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


class Control:
    """A blocking client of the host's control socket (JSON lines)."""

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, cmd: str, **args: Any) -> None:
        self._sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")

    def receive(self, timeout_s: float | None = None) -> dict[str, Any]:
        if timeout_s is not None:
            self._sock.settimeout(max(timeout_s, 0.001))
        while (end := self._buf.find(b"\n")) < 0:
            data = self._sock.recv(1 << 20)
            if not data:
                raise ConnectionError("uballoon-host closed the control connection")
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, cmd: str, **args: Any) -> Any:
        self.send(cmd, **args)
        reply = self.receive()
        if not reply.get("ok"):
            raise AssertionError(f"control {cmd} {args}: {reply.get('error')}")
        return reply["result"]


class Host:
    """A ``uballoon-host`` process; see the module docstring.

    ``port`` is where the host listens (127.0.0.1); with ``wiretap=True`` the guests
    should connect to ``guest_port`` (the relay) instead, which is what
    ``connect_address`` gives them.
    """

    def __init__(
        self,
        guests: Sequence[GuestSpec],
        *,
        capacity: int | None = None,
        policy_interval_s: float | None = None,
        stats_interval_s: float = 1.0,
        wiretap: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.guests = list(guests)
        self.dir = Path(tempfile.mkdtemp(prefix="ubvm-host-"))
        os.chmod(self.dir, 0o700)
        self.config_path = self.dir / "host.toml"
        self.config_path.write_text(host_config(self.guests, self.dir))
        self.control_path = self.dir / "control.sock"
        self.qmp_dir = self.dir / "qmp"
        self.state_path = self.dir / "state.json"
        self.log_path = self.dir / "host.log"
        self.port = free_tcp_port()
        self.argv = [
            str(VENV_BIN / "uballoon-host"),
            "--listen", f"tcp:127.0.0.1:{self.port}",
            "--config", str(self.config_path),
            "--control", str(self.control_path),
            "--qmp-dir", str(self.qmp_dir),
            "--state-file", str(self.state_path),
            "--stats-interval", str(stats_interval_s),
            "--log-level", "debug",
        ]
        if capacity is not None:
            self.argv += ["--capacity", str(capacity)]
        if policy_interval_s is not None:
            self.argv += ["--policy-interval", str(policy_interval_s)]
        self.argv += list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.wiretap = Wiretap(self.port, self.dir / "capture") if wiretap else None
        self.starts = 0

    # -- lifetime ------------------------------------------------------------------

    @property
    def tap(self) -> Wiretap:
        """The wiretap (a host started with ``wiretap=True``)."""
        assert self.wiretap is not None, "this host has no wiretap"
        return self.wiretap

    @property
    def guest_port(self) -> int:
        return self.wiretap.port if self.wiretap is not None else self.port

    @property
    def connect_address(self) -> str:
        """What a guest's ``--connect`` says."""
        return f"tcp:{HOST_IP_FROM_GUEST}:{self.guest_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the host and wait until its control socket answers."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"==== start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                _dies_with_us(self.argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.dir, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"uballoon-host exited ({self.proc.returncode}):\n{self.log()}"
                )
            try:
                with Control(self.control_path, timeout_s=5) as c:
                    c.request("status")
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"uballoon-host did not come up:\n{self.log()}") from None
                # The socket appears when the host is ready; there is nothing to wait on.
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Stop the host with ``sig`` (SIGKILL after ``timeout_s``); its exit status."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def __enter__(self) -> Host:
        try:
            if self.wiretap is not None:
                self.wiretap.start()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        if self.wiretap is not None:
            self.wiretap.close()
        keep = os.environ.get("UBALLOON_VM_LOGS")  # a directory to keep logs and captures in
        if keep:
            target = Path(keep) / self.dir.name
            shutil.copytree(self.dir, target, ignore=shutil.ignore_patterns("*.key", "*.sock"),
                            dirs_exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-tail:])

    # -- the control plane -----------------------------------------------------------

    def control(self) -> Control:
        return Control(self.control_path)

    def request(self, cmd: str, **args: Any) -> Any:
        with self.control() as c:
            return c.request(cmd, **args)

    def guest(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("guest", name=name)
        return result

    def wait_status(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout_s: float,
        what: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow ``status`` (every guest and the pool) on the ``watch`` stream until
        ``predicate(STATUS)`` holds; the STATUS that satisfied it."""
        return self._watch({}, predicate, timeout_s, what, on_update)

    def wait_guest(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout_s: float,
        what: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the guest on the control socket's ``watch`` stream until
        ``predicate(GUEST)`` holds; the GUEST that satisfied it."""
        return self._watch({"name": name}, predicate, timeout_s, f"{name}: {what}", on_update)

    def _watch(
        self,
        args: dict[str, Any],
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        what: str,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        with self.control() as c:
            c.send("watch", min_interval_s=0.05, **args)
            while True:
                try:
                    reply = c.receive(timeout_s=_deadline_left(deadline))
                except TimeoutError:
                    raise AssertionError(
                        f"{what}: not within {timeout_s:.0f}s; last: {last}\n"
                        f"host log:\n{self.log(25)}"
                    ) from None
                if not reply.get("ok"):
                    raise AssertionError(f"watch {args}: {reply.get('error')}")
                last = reply["result"]
                if on_update is not None:
                    on_update(last)
                if predicate(last):
                    return last

    def set_keep(self, name: str, keep_bytes: int | str) -> None:
        """An operator's target: ``name`` keeps ``keep_bytes`` (``"auto"``: the policy)."""
        self.request("set", name=name, size=keep_bytes)

    def wait_balloon(self, name: str, balloon_bytes: int, *, timeout_s: float = 240.0,
                     **kwargs: Any) -> dict[str, Any]:
        """Until the ledger holds exactly ``balloon_bytes`` for ``name`` and the guest's
        ACTUAL says the same."""
        return self.wait_guest(
            name,
            lambda g: g["ballooned_bytes"] == balloon_bytes
            and g["actual_bytes"] == g["ram_bytes"] - balloon_bytes,
            timeout_s=timeout_s, what=f"a balloon of {fmt(balloon_bytes)}", **kwargs,
        )

    def ctl(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``uballoonctl --control SOCKET ARGS`` (the operator's command)."""
        return subprocess.run(
            [str(VENV_BIN / "uballoonctl"), "--control", str(self.control_path), *args],
            capture_output=True, text=True, timeout=timeout_s,
        )

    def qmp(self, name: str) -> QMPClient:
        """A QMP client of the host's socket for ``name`` (close it when done)."""
        return QMPClient(self.qmp_dir / f"{name}.qmp")


# ---------------------------------------------------------------------------------------
# The wiretap


class Wiretap:
    """A relay process saving both directions of every guest connection."""

    def __init__(self, upstream_port: int, capture_dir: Path) -> None:
        self.upstream_port = upstream_port
        self.dir = capture_dir
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            _dies_with_us([sys.executable, "-m", "tests.vm.helpers", "relay",
                           str(self.upstream_port), str(self.dir)]),
            cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready PORT", or EOF if it failed
        if not line.startswith("ready "):
            self.close()
            raise AssertionError(f"the wiretap did not start: {line!r}")
        self.port = int(line.split()[1])

    def _signal(self, sig: int, answer: str, timeout_s: float = 30.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(sig)
        ready = selectors.DefaultSelector()
        ready.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not ready.select(timeout_s):
                raise AssertionError(f"the wiretap did not answer {answer!r}")
        finally:
            ready.close()
        line = self.proc.stdout.readline().strip()
        assert line == answer, line

    def hold(self) -> None:
        """From now on, hold back what the host sends (it is still captured)."""
        self._signal(signal.SIGUSR1, "held")

    def release(self) -> None:
        """Let what was held back through, and everything after it."""
        self._signal(signal.SIGUSR2, "released")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def sessions(self, name: str) -> list[Session]:
        """Every captured connection of guest ``name``, oldest first."""
        out = []
        for g2h in sorted(self.dir.glob("*.g2h")):
            session = Session.parse(g2h.read_bytes(), g2h.with_suffix(".h2g").read_bytes())
            if session.name == name:
                out.append(session)
        return out

    def ledger(self, name: str) -> Replay:
        """The host's ballooned set for ``name`` as its acknowledgements built it."""
        from protocol.ranges import RangeSet

        pages = RangeSet.empty()
        replay = Replay(pages)
        for session in self.sessions(name):
            for request, answer in session.requests():
                kind = type(request).__name__
                if answer is None:
                    replay.unanswered += 1
                    continue
                if type(answer).__name__ != "Ack":
                    replay.refused += 1
                    continue
                if kind == "Inflate":
                    pages = pages | request.pages
                elif kind == "Deflate":
                    pages = pages - request.pages
                else:
                    pages = request.pages
                    replay.resyncs += 1
                replay.acked += 1
        replay.pages = pages
        replay.sessions = len(self.sessions(name))
        return replay


@dataclass
class Replay:
    pages: Any  # RangeSet
    acked: int = 0
    refused: int = 0
    unanswered: int = 0
    resyncs: int = 0
    sessions: int = 0


@dataclass
class Session:
    """One captured connection: the guest's requests and the host's answers."""

    name: str
    guest_events: list[Any] = field(default_factory=list)
    host_events: list[Any] = field(default_factory=list)

    @staticmethod
    def _events(data: bytes) -> list[Any]:
        from protocol import codec
        from protocol.constants import MAX_NEGOTIATED_MAX_BODY

        reader = codec.FrameReader(MAX_NEGOTIATED_MAX_BODY)
        reader.feed(data)
        events = []
        while (frame := reader.next_frame()) is not None:
            events.append(codec.decode_body(frame.header, frame.body, frame.offset))
        return events  # a frame cut by a killed connection is left out

    @classmethod
    def parse(cls, g2h: bytes, h2g: bytes) -> Session:
        guest_events = cls._events(g2h)
        name = getattr(guest_events[0], "name", "") if guest_events else ""
        return cls(name, guest_events, cls._events(h2g))

    def requests(self) -> list[tuple[Any, Any]]:
        """(INFLATE/DEFLATE/RESYNC, its ACK or NAK or None), in the order sent; the parts
        of a RESYNC are joined."""
        from protocol.events import Ack, Deflate, Inflate, Nak, Resync

        answers = {e.txid: e for e in self.host_events if isinstance(e, Ack | Nak)}
        out: list[tuple[Any, Any]] = []
        parts: dict[int, Any] = {}
        for e in self.guest_events:
            if isinstance(e, Resync):
                if e.txid in parts:
                    parts[e.txid] = Resync(e.txid, parts[e.txid].pages | e.pages, e.more)
                else:
                    parts[e.txid] = e
                if not e.more:
                    out.append((parts[e.txid], answers.get(e.txid)))
            elif isinstance(e, Inflate | Deflate):
                out.append((e, answers.get(e.txid)))
        return out


def _relay(upstream_port: int, capture_dir: str) -> None:
    """The wiretap process: accept on 127.0.0.1 (ephemeral), connect each connection to
    the host, forward both ways, append each direction to NNNN.g2h / NNNN.h2g as it is
    received.  SIGUSR1 holds back what the host sends (still captured: the host did
    send it) and prints "held"; SIGUSR2 lets it through again and prints "released"."""
    listener = socket.create_server(("127.0.0.1", 0))
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    flags = {"hold": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.update(hold=True))
    signal.signal(signal.SIGUSR2, lambda *_: flags.update(hold=False))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    print("ready", listener.getsockname()[1], flush=True)
    count = 0
    holding = False
    peers: dict[socket.socket, tuple[socket.socket, Any]] = {}
    upstream: set[socket.socket] = set()
    held: dict[socket.socket, bytearray] = {}  # guest socket -> bytes from the host

    def close_pair(sock: socket.socket) -> None:
        other, _ = peers.get(sock, (None, None))
        for s in (sock, other):
            if s is None or s not in peers:
                continue
            sel.unregister(s)
            peers.pop(s)[1].close()
            upstream.discard(s)
            held.pop(s, None)
            s.close()

    while True:
        for key, _ in sel.select():
            if key.data == "signal":
                wake_r.recv(4096)
                if flags["hold"] != holding:
                    holding = flags["hold"]
                    if not holding:
                        for guest_sock, pending in list(held.items()):
                            with contextlib.suppress(OSError):
                                guest_sock.sendall(pending)
                        held.clear()
                    print("held" if holding else "released", flush=True)
                continue
            if key.data == "listener":
                conn, _ = listener.accept()
                try:
                    up = socket.create_connection(("127.0.0.1", upstream_port), timeout=10)
                except OSError:
                    conn.close()  # the host is down: the guest sees the connection closed
                    continue
                count += 1
                up.settimeout(30)
                conn.settimeout(30)
                base = Path(capture_dir) / f"{count:04d}"
                peers[conn] = (up, open(f"{base}.g2h", "wb", buffering=0))
                peers[up] = (conn, open(f"{base}.h2g", "wb", buffering=0))
                upstream.add(up)
                sel.register(conn, selectors.EVENT_READ, "peer")
                sel.register(up, selectors.EVENT_READ, "peer")
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock not in peers:
                continue
            other, capture = peers[sock]
            try:
                data = sock.recv(1 << 16)
                if data:
                    capture.write(data)
                    if holding and sock in upstream:
                        held.setdefault(other, bytearray()).extend(data)
                    else:
                        other.sendall(data)
            except OSError:
                data = b""
            if not data:
                close_pair(sock)


# ---------------------------------------------------------------------------------------
# The agent in a guest


def wait_output(
    proc: GuestProcess, pattern: str, *, since: int = 0, timeout_s: float = 120.0,
    what: str = "",
) -> re.Match[str]:
    """Wait until ``pattern`` (a regex) appears in ``proc``'s stdout after offset
    ``since``; the match (offsets into the whole stdout).

    Raises AssertionError with the output so far if it exits or times out first.
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while True:
        found = regex.search(proc.stdout, since)
        if found:
            return found
        if proc.returncode is not None:
            raise AssertionError(
                f"{what or pattern!r}: the process exited ({proc.returncode}) first:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"{what or pattern!r}: not within {timeout_s:.0f}s:\n{proc.stdout[-4000:]}"
            )
        # Take in what the guest sends, up to a short slice (returns early when it exits).
        with contextlib.suppress(CommandTimeout):
            proc.wait(min(left, 0.2))


class GuestAgent:
    """``uballoon-guest`` in ``vm``, its log (stderr) on its stdout."""

    def __init__(
        self, vm: GuestVM, host: Host, name: str, *args: str, key: bool = True
    ) -> None:
        self.vm = vm
        self.host = host
        self.name = name
        argv = [
            "uballoon-guest", "--connect", host.connect_address, "--name", name,
            "--log-level", "info", *args,
        ]
        if key:
            argv += ["--key-file", vm.fw_cfg_path(KEY_ITEM)]
        self.argv = argv
        self.proc: GuestProcess | None = None
        self.state_dir = f"/run/uballoon/{name}"

    def start(self) -> GuestAgent:
        self.proc = self.vm.spawn("exec " + " ".join(self.argv) + " 2>&1")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        assert self.proc is not None
        return self.proc.stdout

    def mark(self) -> int:
        """An offset into the log: ``wait_log(..., since=mark)`` looks only after it."""
        assert self.proc is not None
        self.proc.poll()  # take in what has arrived first
        return len(self.log)

    def wait_log(self, pattern: str, *, since: int = 0, timeout_s: float = 120.0) -> re.Match[str]:
        assert self.proc is not None
        return wait_output(self.proc, pattern, since=since, timeout_s=timeout_s)

    def wait_synced(self, since: int = 0, timeout_s: float = 120.0) -> None:
        """Until the host acknowledged this session's RESYNC."""
        self.wait_log(r"host confirmed the balloon", since=since, timeout_s=timeout_s)

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM: deflate, say goodbye, exit.  Returns the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.signal(signal.SIGTERM)
        return self.proc.wait(timeout_s).returncode

    def kill(self) -> None:
        """SIGKILL the agent alone (its pin holder runs in a session of its own)."""
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(60)

    def holder_pid(self) -> int | None:
        rc, out, _ = self.vm.run(["cat", f"{self.state_dir}/holder.pid"])
        return int(out.split()[0]) if rc == 0 and out.strip() else None

    def close(self) -> None:
        """Make sure nothing of this agent is left: stop it, else kill it and release."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.stop(timeout_s=60)
            except Exception:  # noqa: BLE001 - cleanup must go on
                self.proc.kill()
                with contextlib.suppress(Exception):
                    self.proc.wait(30)
        if self.proc.returncode != 0 or self.holder_pid() is not None:
            with contextlib.suppress(Exception):
                self.vm.run(["uballoon-guest", "--release", "--name", self.name], timeout_s=60)

    def __enter__(self) -> GuestAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def agent_frames(vm: GuestVM, pid: int) -> tuple[Any, dict[str, Any]]:
    """The frames of every chunk agent ``pid`` maps, read from its pagemap in the guest:
    (RangeSet, the script's JSON with ``chunks``, ``pages``, ``duplicates``)."""
    from protocol.ranges import RangeSet

    out = vm.python(FRAMES_PY, str(pid), timeout_s=120).stdout
    info: dict[str, Any] = json.loads(out)
    return RangeSet(tuple(r) for r in info["ranges"]), info


# ---------------------------------------------------------------------------------------
# Host memory behind a guest


def ram_allocated(vm: GuestVM) -> int:
    """Bytes the guest's RAM files hold on the host now (st_blocks)."""
    return sum(os.stat(p).st_blocks * 512 for p in vm.ram_files)


def ram_data_pages(vm: GuestVM, pages: Any) -> tuple[int, int]:
    """Of ``pages`` (guest-physical frames, a RangeSet), how many are backed by data in
    the RAM files and how many are holes, found with SEEK_DATA/SEEK_HOLE per range."""
    data = holes = 0
    fds: dict[Path, int] = {}
    try:
        for start, count in pages.ranges():
            for region in vm.ram_map:
                first = region.guest_phys_start // PAGE
                last = first + region.size_bytes // PAGE
                lo, hi = max(start, first), min(start + count, last)
                if lo >= hi:
                    continue
                fd = fds.get(region.path)
                if fd is None:
                    fd = fds[region.path] = os.open(region.path, os.O_RDONLY)
                offset = region.file_offset + (lo - first) * PAGE
                end = offset + (hi - lo) * PAGE
                while offset < end:
                    try:
                        next_data = os.lseek(fd, offset, os.SEEK_DATA)
                    except OSError:  # ENXIO: no data after offset
                        next_data = end
                    next_data = min(next_data, end)
                    holes += (next_data - offset) // PAGE
                    if next_data >= end:
                        break
                    next_hole = min(os.lseek(fd, next_data, os.SEEK_HOLE), end)
                    data += (next_hole - next_data) // PAGE
                    offset = next_hole
    finally:
        for fd in fds.values():
            os.close(fd)
    return data, holes


# ---------------------------------------------------------------------------------------
# Programs run in the guest

MEMINFO_PY = r"""
import json
info = {}
for line in open("/proc/meminfo"):
    k, v = line.split(":")
    info[k] = int(v.split()[0]) * 1024
vm = dict(l.split() for l in open("/proc/vmstat"))
print(json.dumps({"available": info["MemAvailable"], "total": info["MemTotal"],
                  "free": info["MemFree"], "oom_kill": int(vm.get("oom_kill", 0))}))
"""

# argv: agent pid.  Prints the frames of the chunk files the agent maps.
FRAMES_PY = r"""
import json, re, sys
import numpy as np
pid = int(sys.argv[1])
spans = []
for line in open(f"/proc/{pid}/maps"):
    parts = line.split(None, 5)
    if len(parts) == 6 and re.search(r"/chunk-\d{8}$", parts[5].strip()):
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        spans.append((lo, hi))
pfns = []
with open(f"/proc/{pid}/pagemap", "rb") as f:
    for lo, hi in spans:
        f.seek(lo // 4096 * 8)
        raw = np.frombuffer(f.read((hi - lo) // 4096 * 8), dtype=np.uint64)
        if not (raw >> np.uint64(63)).all():
            sys.exit(f"a page at {lo:#x}-{hi:#x} is not present")
        pfns.append(raw & np.uint64((1 << 55) - 1))
all_ = np.sort(np.concatenate(pfns)) if pfns else np.zeros(0, np.uint64)
if all_.size and not all_[0]:
    sys.exit("pagemap shows PFN 0: no CAP_SYS_ADMIN?")
ranges = []
if all_.size:
    breaks = np.flatnonzero(np.diff(all_) != 1) + 1
    starts = all_[np.r_[0, breaks]]
    counts = np.diff(np.r_[0, breaks, all_.size])
    ranges = [[int(s), int(c)] for s, c in zip(starts, counts)]
print(json.dumps({"chunks": len(spans), "pages": int(all_.size),
                  "duplicates": int(all_.size - np.unique(all_).size), "ranges": ranges}))
"""

# argv: bytes to leave available.  Touches (MemAvailable - that) of anonymous memory,
# then frees it, so the host backs the guest's free memory.
TOUCH_PY = r"""
import mmap, sys
reserve = int(sys.argv[1])
avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
             if line.startswith("MemAvailable:"))
size = max(0, avail - reserve) // (2 << 20) * (2 << 20)
m = mmap.mmap(-1, size)
m[::4096] = b"\1" * (size // 4096)
m.close()
print("touched", size, flush=True)
"""

# argv: size.  Holds SIZE bytes of random data; prints "ready HEX", then "sum N HEX"
# on each SIGUSR1 (N counts from 1); exits 0 on SIGTERM.
KEEPER_PY = r"""
import hashlib, mmap, os, signal, sys
size = int(sys.argv[1])
buf = mmap.mmap(-1, size)
for i in range(0, size, 1 << 24):
    buf[i:i + (1 << 24)] = os.urandom(min(1 << 24, size - i))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
print("ready", hashlib.blake2b(buf).hexdigest(), flush=True)
n = 0
while signal.sigwait({signal.SIGUSR1, signal.SIGTERM}) == signal.SIGUSR1:
    n += 1
    print("sum", n, hashlib.blake2b(buf).hexdigest(), flush=True)
"""

# argv: size.  Allocates SIZE bytes, writes every page (its own number in its first
# and last word; the guest kernel zeroes the rest), reads it all back.
USE_PY = r"""
import mmap, sys
import numpy as np
size = int(sys.argv[1])
n = size // 4096
m = mmap.mmap(-1, size)
pages = np.frombuffer(m, dtype=np.uint64).reshape(n, 512)
ids = np.arange(n, dtype=np.uint64) | np.uint64(0xA5A5 << 48)
pages[:, 0] = ids
pages[:, 511] = ~ids
bad = int((pages[:, 0] != ids).sum()) + int((pages[:, 511] != ~ids).sum())
print("used", size, "bad", bad, flush=True)
sys.exit(1 if bad else 0)
"""

# argv: low-water bytes, step bytes, max bytes.  Grabs memory STEP at a time while
# MemAvailable stays above LOW (and MAX in all), writing into every page its own pattern
# (a seed and the page's number in its first word, the complement in its last: a page
# the host zeroes fails both), and re-checks everything it holds after every step and,
# once full, in rounds forever.  Prints "grabbed N" per step, "full N" when it stops
# grabbing, "round R bad B pages P" after each round once full, "BAD page N zeroed|
# changed" for a wrong page, and "status R B P" when SIGTERM ends it.
CHECKER_PY = r"""
import mmap, os, signal, sys
import numpy as np
low, step, cap = (int(a) for a in sys.argv[1:4])
seed = np.uint64(0x5EED << 48)
blocks = []  # (uint64 view as pages x 512 words, page numbers)
pages = rounds = bad = 0
stop = False
signal.signal(signal.SIGTERM, lambda *_: globals().update(stop=True))

def available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024

def check(view, ids):
    global bad
    wrong = (view[:, 0] != ids) | (view[:, 511] != ~ids)
    if wrong.any():
        for k in np.flatnonzero(wrong)[:5]:
            what = "zeroed" if not view[k].any() else "changed"
            print("BAD page", int(ids[k] & ~seed), what, flush=True)
        bad += int(wrong.sum())
        view[wrong, 0] = ids[wrong]
        view[wrong, 511] = ~ids[wrong]

full = False
while not stop:
    if not full:
        if available() - step < low or pages * 4096 + step > cap:
            full = True
            os.nice(10)  # from here on it only re-checks: let the guest's other work run
            print("full", pages * 4096, flush=True)
        else:
            n = step // 4096
            view = np.frombuffer(mmap.mmap(-1, step), dtype=np.uint64).reshape(n, 512)
            ids = np.arange(pages, pages + n, dtype=np.uint64) | seed
            view[:, 0] = ids
            view[:, 511] = ~ids
            blocks.append((view, ids))
            pages += n
            print("grabbed", pages * 4096, flush=True)
    for view, ids in blocks:
        check(view, ids)
    rounds += 1
    if full:
        print("round", rounds, "bad", bad, "pages", pages, flush=True)
print("status", rounds, bad, pages, flush=True)
"""

# argv: step bytes, target bytes, spare bytes.  Grows a working set STEP at a time up to
# TARGET, each step only once MemAvailable has room for it plus SPARE (the memory comes
# from the balloon as the host raises this guest's target), and holds it.  Prints
# "have N" per step and "done N" at the end; exits on SIGTERM.
GROW_PY = r"""
import mmap, signal, sys
step, target, spare = (int(a) for a in sys.argv[1:4])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
def available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
blocks = []
have = 0
while True:
    if have < target and available() >= step + spare:
        m = mmap.mmap(-1, step)
        m[::4096] = b"\1" * (step // 4096)
        blocks.append(m)
        have += step
        print("have", have, flush=True)
        if have >= target:
            print("done", have, flush=True)
    # Paces the loop: a workload re-reading /proc/meminfo, not a test waiting.
    elif signal.sigtimedwait({signal.SIGTERM}, 0.25) is not None:
        break
"""

# argv: agent pid.  For every page of the agent's chunk mappings: its NUMA node and frame
# before and after move_pages(2) to the other node, run as root on the agent's pid.
# One call per 2 MiB: the kernel gives up a whole call at the first batch it cannot
# migrate, so one call for everything would try only the first huge page.  The
# kernel's own counts of migrations tried (/proc/vmstat) show every page was tried.
MOVE_PY = r"""
import errno, json, re, sys
import numpy as np
import native
pid = int(sys.argv[1])
spans = []
for line in open(f"/proc/{pid}/maps"):
    parts = line.split(None, 5)
    if len(parts) == 6 and re.search(r"/chunk-\d{8}$", parts[5].strip()):
        spans.append(tuple(int(x, 16) for x in parts[0].split("-")))
addrs = np.concatenate([np.arange(lo, hi, 4096, dtype=np.uint64) for lo, hi in spans])
def read_frames():
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for lo, hi in spans:
            f.seek(lo // 4096 * 8)
            out.append(np.frombuffer(f.read((hi - lo) // 4096 * 8), dtype=np.uint64))
    return np.concatenate(out) & np.uint64((1 << 55) - 1)
def counts(values):
    out = {}
    for k, v in zip(*np.unique(values, return_counts=True)):
        k = int(k)
        out[str(k) if k >= 0 else "-" + errno.errorcode.get(-k, str(-k))] = int(v)
    return out
def vmstat():
    return {k: int(v) for k, v in (l.split() for l in open("/proc/vmstat"))}
before_nodes = native.move_pages(pid, addrs)
before_frames = read_frames()
targets = np.where(before_nodes == 0, 1, 0).astype(np.int32)
counters = vmstat()
status = np.concatenate([
    native.move_pages(pid, addrs[i:i + 512], targets[i:i + 512])
    for i in range(0, addrs.size, 512)
])
counters = {k: v - counters[k] for k, v in vmstat().items()
            if k.startswith(("pgmigrate_", "thp_migration_")) and v != counters[k]}
after_nodes = native.move_pages(pid, addrs)
after_frames = read_frames()
print(json.dumps({
    "pages": int(addrs.size),
    "nodes_before": counts(before_nodes),
    "status": counts(status),
    "vmstat": counters,
    "moved": int((after_nodes != before_nodes).sum()),
    "frames_changed": int((after_frames != before_frames).sum()),
    "nodes_after": counts(after_nodes),
}))
"""


def guest_meminfo(vm: GuestVM) -> dict[str, int]:
    """MemAvailable, MemTotal, MemFree and /proc/vmstat oom_kill of the guest."""
    result: dict[str, int] = json.loads(vm.python(MEMINFO_PY, timeout_s=60).stdout)
    return result


def new_key() -> bytes:
    return secrets.token_bytes(32)


@contextlib.contextmanager
def guest_program(vm: GuestVM, code: str, *args: str) -> Iterator[GuestProcess]:
    """A guest program (``code`` with the host's Python); killed on exit if still running."""
    proc = vm.spawn([vm.python_executable, "-c", code, *args])
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(30)


def main(argv: list[str]) -> int:
    if argv[:1] == ["relay"]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _relay(int(argv[1]), argv[2])
        return 0
    print("usage: python -m tests.vm.helpers relay UPSTREAM_PORT CAPTURE_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
