"""The pin holder: a tiny process that keeps the balloon's long-term pins alive.

Theory of operation
-------------------
A long-term pin (io_uring fixed buffers, FOLL_LONGTERM) lives as long as some
process holds the ring's fd.  If the agent held its own rings, a SIGKILL in the
middle of a report would unpin frames the host is about to punch, and the kernel
could migrate them -- DESIGN.md's safety rule 1 broken by a crash.  So the pins
live in a separate, detached process (own session, ``oom_score_adj`` -1000) that
does nothing else.

The ring fd cannot be handed over: since Linux 6.7 the kernel refuses io_uring
fds in SCM_RIGHTS (EINVAL), and pidfd_getfd needs ptrace rights over the agent.
Instead the holder takes the pin itself: the agent names a chunk file in the
state directory, the holder maps it shared, registers the mapping as fixed
buffers (the pin is on the file's pages, the same frames the agent maps), and
unmaps it again -- the pin outlives the mapping.  The agent reads the frames from
its own mapping *after* the holder answered.

Protocol (SOCK_SEQPACKET, one ASCII message each way per request, the socket
``holder.sock`` in the 0700 state directory, peers checked with SO_PEERCRED)::

    PIN <seq> <file> <bytes>   ->  OK  |  ERR <errno> <message>
    UNPIN <seq> [<seq> ...]    ->  OK  |  OK not-held  |  ERR <errno> <message>
                                   (several at once: a deflate releases many chunks;
                                   those unpinned before an error stay unpinned)
    LIST                       ->  HELD [<seq>:<bytes> ...]
    EXIT                       ->  OK (and exits)  |  ERR 16 still holding N chunks

One agent at a time (a second connection is told ``ERR 16 busy``).  The holder
exits when it holds nothing and no agent is connected (or no agent came within
``IDLE_EXIT_S`` of its start), so nothing lingers after a clean stop.  While it
holds pins it ignores SIGTERM/SIGINT/SIGHUP (dropping them would unpin frames the
host may punch) and says so; ``uballoon-guest --release`` is the way to end it.

``HolderClient`` is the agent's (blocking) end; ``LocalPins`` is the same
interface with the rings kept in the calling process, for when no holder can run.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from protocol.errors import NativeError

__all__ = [
    "SOCKET_NAME",
    "PID_NAME",
    "Pinner",
    "HolderClient",
    "LocalPins",
    "holder_pid",
    "process_alive",
    "main",
]

SOCKET_NAME = "holder.sock"
PID_NAME = "holder.pid"
IDLE_EXIT_S = 30.0
START_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 600.0  # pinning a GiB of memory the hypervisor took back takes seconds
MAX_MESSAGE = 1 << 20
_FILE_RE = re.compile(r"^[a-z]+-\d{8}$")

log = logging.getLogger("uballoon.holder")


class Pinner(Protocol):
    """Where long-term pins live: the holder process, or this process."""

    def pin(self, seq: int, path: Path, size_bytes: int) -> None: ...

    def unpin(self, seq: int) -> None: ...

    def unpin_all(self, seqs: list[int]) -> None: ...

    def held(self) -> dict[int, int]: ...

    def close(self) -> None: ...


def holder_pid(state_dir: Path) -> int | None:
    """The pid the holder of ``state_dir`` recorded, if it is still running."""
    try:
        pid = int((state_dir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


# -- the agent's end -------------------------------------------------------------------


class HolderClient:
    """A connection to the state directory's holder (started if none runs).

    Every call blocks until the holder answers; the agent makes them from its one
    worker thread.  Raises NativeError when the holder refuses or is gone.
    """

    def __init__(self, state_dir: Path, sock: socket.socket) -> None:
        self.state_dir = state_dir
        self._sock = sock
        self.pid = holder_pid(state_dir)
        self.alive = True
        """False once the connection to the holder broke (its pins are gone with it)."""

    @classmethod
    def connect(cls, state_dir: Path, *, start: bool = True) -> HolderClient:
        """Connect to the running holder, or start one first if ``start``.

        Raises NativeError if there is none (and ``start`` is false) or it cannot
        be started.
        """
        path = state_dir / SOCKET_NAME
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return cls(state_dir, _connect(path))
            except _Busy as exc:
                # The previous agent's connection is still closing (or another agent
                # runs, which the state directory's lock prevents): wait, never start
                # a second holder beside a live one.
                if time.monotonic() > deadline:
                    raise NativeError(f"the pin holder of {state_dir} is {exc}",
                                      errno.EBUSY) from exc
                time.sleep(0.05)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if holder_pid(state_dir) is not None and time.monotonic() < deadline:
                    time.sleep(0.05)  # a holder that is starting or stopping
                    continue
                if not start:
                    raise NativeError(f"no pin holder is running for {state_dir}",
                                      exc.errno or 0) from exc
                break
        _spawn(state_dir)
        try:
            return cls(state_dir, _connect(path))
        except OSError as exc:
            raise NativeError(
                f"the pin holder for {state_dir} started but does not answer: {exc}", exc.errno or 0
            ) from exc

    def _call(self, request: str) -> str:
        try:
            self._sock.sendall(request.encode())
            ready, _, _ = select.select([self._sock], [], [], REPLY_TIMEOUT_S)
            if not ready:
                raise NativeError(
                    f"the pin holder did not answer {request.split()[0]} within "
                    f"{REPLY_TIMEOUT_S:.0f}s",
                    errno.ETIMEDOUT,
                )
            reply = self._sock.recv(MAX_MESSAGE).decode()
        except OSError as exc:
            self.alive = False
            raise NativeError(
                f"lost the pin holder (pid {self.pid}): {exc.strerror or exc}", exc.errno or 0
            ) from exc
        if not reply:
            self.alive = False
            raise NativeError(f"lost the pin holder (pid {self.pid}): it closed the connection",
                              errno.EPIPE)
        if reply.startswith("ERR "):
            _, code, message = (reply.split(" ", 2) + [""])[:3]
            raise NativeError(message, int(code) if code.isdigit() else 0)
        return reply

    def pin(self, seq: int, path: Path, size_bytes: int) -> None:
        """Have the holder pin ``size_bytes`` of the chunk file ``path`` (in the state
        directory) under ``seq``."""
        self._call(f"PIN {seq} {path.name} {size_bytes}")

    def unpin(self, seq: int) -> None:
        self._call(f"UNPIN {seq}")

    def unpin_all(self, seqs: list[int]) -> None:
        """Unpin several chunks in one request.  (A holder older than this request
        refuses it with EINVAL: then unpin them one at a time.)"""
        self._call("UNPIN " + " ".join(str(seq) for seq in seqs))

    def held(self) -> dict[int, int]:
        """seq -> bytes of every pin the holder holds."""
        reply = self._call("LIST")
        out = {}
        for item in reply.split()[1:]:
            seq, _, size = item.partition(":")
            out[int(seq)] = int(size)
        return out

    def stop(self) -> bool:
        """Ask the holder to exit; True if it agreed (it holds nothing)."""
        try:
            self._call("EXIT")
        except NativeError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True

    def close(self) -> None:
        self._sock.close()


class _Busy(Exception):
    """The holder serves another connection."""


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
        ready, _, _ = select.select([sock], [], [], START_TIMEOUT_S)
        if not ready:
            raise TimeoutError("the pin holder did not greet")
        greeting = sock.recv(MAX_MESSAGE).decode()
        if greeting != "READY":
            raise _Busy(greeting.split(" ", 2)[-1] if greeting.startswith("ERR ") else "busy")
    except BaseException:
        sock.close()
        raise
    return sock


def _spawn(state_dir: Path) -> None:
    """Start a detached holder for ``state_dir`` and wait until it listens."""
    command = [sys.executable, "-m", "guest_agent.holder", str(state_dir)]
    env = dict(os.environ)
    # The holder must import this very package, wherever it was imported from.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    child = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        cwd="/",
        env=env,
    )
    assert child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], START_TIMEOUT_S)
        line = child.stdout.readline().decode().strip() if ready else ""
    finally:
        child.stdout.close()
        # The first process forks the real holder and exits at once (double fork:
        # the holder is nobody's child and leaves no zombie behind).
        try:
            code = child.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    if not line.startswith("ready"):
        raise NativeError(
            f"could not start the pin holder for {state_dir} (exit status {code}); "
            "see its messages above",
            0,
        )


# -- in-process pins -------------------------------------------------------------------


class LocalPins:
    """Pins kept in this process: they die with it.  For tests, benchmarks, and a
    holder that cannot run."""

    def __init__(self) -> None:
        self._rings: dict[int, tuple[int, int]] = {}

    def pin(self, seq: int, path: Path, size_bytes: int) -> None:
        self._rings[seq] = (_pin_file(path, size_bytes), size_bytes)

    def unpin(self, seq: int) -> None:
        import native

        entry = self._rings.pop(seq, None)
        if entry is not None:
            native.unpin(entry[0])

    def unpin_all(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.unpin(seq)

    def held(self) -> dict[int, int]:
        return {seq: size for seq, (_, size) in self._rings.items()}

    def close(self) -> None:
        for seq in list(self._rings):
            self.unpin(seq)


def _pin_file(path: Path, size_bytes: int) -> int:
    """Map the chunk file, pin its pages long-term, unmap it; return the ring fd."""
    import native

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size < size_bytes:
            raise NativeError(f"{path.name} is shorter than {size_bytes} bytes", errno.EINVAL)
        address = native.map_shared(fd, size_bytes)
        try:
            return native.pin_long_term(address, size_bytes)
        finally:
            native.release(address, size_bytes)
    finally:
        os.close(fd)


# -- the holder process ----------------------------------------------------------------


class _Holder:
    def __init__(self, state_dir: Path, listener: socket.socket) -> None:
        self.state_dir = state_dir
        self.listener = listener
        self.client: socket.socket | None = None
        self.client_pid = 0
        self.pins: dict[int, tuple[int, int]] = {}  # seq -> (ring fd, bytes)
        self.started = time.monotonic()
        self.had_client = False

    def serve(self) -> None:
        while True:
            if not self.pins and self.client is None:
                if self.had_client or time.monotonic() - self.started > IDLE_EXIT_S:
                    log.info("holding nothing and no agent is connected: exiting")
                    return
            watch = [self.listener] + ([self.client] if self.client else [])
            ready, _, _ = select.select(watch, [], [], 1.0)
            for sock in ready:
                if sock is self.listener:
                    self._accept()
                elif self._handle() == "exit":
                    return

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in (0, os.getuid()):
            conn.send(b"ERR 1 not allowed")
            conn.close()
            return
        if self.client is not None and select.select([self.client], [], [], 0)[0]:
            self._handle()  # perhaps the old agent's goodbye (end of stream): see first
        if self.client is not None:
            conn.send(f"ERR 16 busy: another agent is connected (pid {self.client_pid})".encode())
            conn.close()
            return
        self.client, self.client_pid, self.had_client = conn, pid, True
        conn.send(b"READY")

    def _handle(self) -> str | None:
        assert self.client is not None
        try:
            data = self.client.recv(MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:
            held = sum(size for _, size in self.pins.values())
            if self.pins:
                log.warning(
                    "the agent (pid %s) went away; still holding the pins of %d chunk(s) (%d MiB) "
                    "until an agent reattaches or `uballoon-guest --release` runs",
                    self.client_pid, len(self.pins), held >> 20,
                )
            self.client.close()
            self.client = None
            return None
        words = data.decode(errors="replace").split()
        reply, action = self._answer(words)
        try:
            self.client.send(reply.encode())
        except OSError:
            pass
        return action

    def _answer(self, words: list[str]) -> tuple[str, str | None]:
        import native

        try:
            if words[:1] == ["PIN"] and len(words) == 4:
                seq, name, size = int(words[1]), words[2], int(words[3])
                if not _FILE_RE.match(name):
                    return f"ERR {errno.EINVAL} bad chunk file name {name!r}", None
                if seq in self.pins:
                    return f"ERR {errno.EEXIST} chunk {seq} is already pinned", None
                self.pins[seq] = (_pin_file(self.state_dir / name, size), size)
                return "OK", None
            if words[:1] == ["UNPIN"] and len(words) >= 2:
                held = False
                for seq in [int(word) for word in words[1:]]:
                    entry = self.pins.pop(seq, None)
                    if entry is not None:
                        native.unpin(entry[0])
                        held = True
                return ("OK", None) if held else ("OK not-held", None)
            if words == ["LIST"]:
                return " ".join(["HELD"] + [f"{s}:{n}" for s, (_, n) in self.pins.items()]), None
            if words == ["EXIT"]:
                if self.pins:
                    return f"ERR {errno.EBUSY} still holding {len(self.pins)} chunks", None
                return "OK", "exit"
        except NativeError as exc:
            return f"ERR {exc.errno} {exc}", None
        except OSError as exc:
            return f"ERR {exc.errno or 0} {exc.strerror or exc}", None
        except ValueError as exc:
            return f"ERR {errno.EINVAL} {exc}", None
        return f"ERR {errno.EINVAL} unknown request {' '.join(words)[:80]!r}", None


def _signal(signum: int, _frame: object) -> None:
    holder = _current
    if holder is None or not holder.pins:
        raise SystemExit(0)
    log.warning(
        "ignoring %s: holding %d chunk pins whose frames the host may punch; stop the "
        "agent, or run `uballoon-guest --release` to drop them",
        signal.Signals(signum).name, len(holder.pins),
    )


_current: _Holder | None = None


def main(argv: list[str] | None = None) -> int:
    """``python -m guest_agent.holder STATE_DIR``: become the state directory's holder."""
    global _current
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="uballoon-holder[%(process)d]: %(message)s", stream=sys.stderr
    )
    if len(args) != 1:
        print("usage: python -m guest_agent.holder STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(args[0])
    import native  # noqa: F401  (fail here, before "ready", if it cannot load)

    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")
    except OSError as exc:
        log.warning("cannot set oom_score_adj to -1000 (%s): the OOM killer may pick me",
                    exc.strerror)
    path = state_dir / SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # Only the agent starts a holder, and only after connecting failed, under
        # the state directory's lock: a socket file left here is stale.
        path.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(4)
    except OSError as exc:
        log.error("cannot listen on %s: %s", path, exc.strerror)
        return 1
    # Double fork: the first process exits, the holder is nobody's child.
    if os.fork():
        os._exit(0)
    os.setsid()
    pid_path = state_dir / PID_NAME
    pid_path.write_text(f"{os.getpid()}\n")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _signal)
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    _current = _Holder(state_dir, listener)
    try:
        _current.serve()
    finally:
        if not _current.pins:
            # Close before unlinking: a bound socket keeps its tmpfs busy.
            listener.close()
            if _current.client is not None:
                _current.client.close()
            for leftover in (path, pid_path):
                leftover.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
