"""The agent's service: the one module where trio lives.

Theory of operation
-------------------
``run(options)`` sets the balloon up (state directory, pin holder, reattaching
chunks an earlier agent left), builds an ``AgentCore`` and drives it with a few
tasks in one nursery:

* **connection** -- connect (``tcp:``, ``unix:``, ``vsock:``), run one session
  (a reader feeding ``core.receive_data``, a writer draining ``core.data_to_send``,
  a STATS pusher), and on loss reconnect with capped exponential backoff and
  jitter.  The balloon stays as it is while the host is away.  A host silent for
  three heartbeat intervals (or through the handshake deadline) is gone.
* **worker** -- asks ``core.next_command`` and runs it on the pool.  Pool calls
  block for long (pinning a GiB takes 0.1-5 s), so they run through
  ``trio.to_thread.run_sync`` with a limiter of one: the only thread, and the pool
  is never used by two at once.  Each call is shielded from cancellation, so a
  finished pin or release always reaches the core.
* **guard** -- a memory snapshot every ``guard_interval_s``; the PSI trigger
  (``/proc/pressure/memory``) waited on without a thread (``PriorityWaiter``).
* **verify** -- every ``verify_interval_s``, the worker re-reads every chunk's frames.
* **signals** -- SIGTERM/SIGINT: ``core.stop`` (deflate everything, BYE) within
  ``shutdown_timeout_s``; a second signal or the deadline: ``core.give_up``.

Every core call is followed by ``_notify()``, which wakes the writer and the worker.
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import trio

from guest_agent.agent import (
    DEFAULT_CHUNK_BYTES,
    WORKER_ERRORS,
    AgentConfig,
    AgentCore,
    Pin,
    Release,
    Verify,
)
from guest_agent.guard import GuardConfig
from guest_agent.holder import HolderClient, LocalPins, Pinner
from guest_agent.pool import PagePool, StateDir, wait_holder_gone
from guest_agent.stats import MemorySource, ram_layout
from protocol.addresses import Address
from protocol.errors import ErrorCode, NativeError
from protocol.ranges import RangeSet
from protocol.units import PAGE_SIZE, format_size

__all__ = ["Options", "PriorityWaiter", "run", "run_blocking", "open_stream"]

log = logging.getLogger("uballoon.service")

RECEIVE_SIZE = 1 << 20
PSI_TRIGGERS = (b"some 150000 1000000\0", b"some 300000 2000000\0")
"""150 ms of stall in 1 s; the kernel overwrites a write's last byte with NUL, hence
the explicit one.  Without CAP_SYS_RESOURCE a window must be a multiple of 2 s."""


@dataclass
class Options:
    """What the command line decided."""

    address: Address
    name: str
    state_dir: Path
    fallback_dir: Path | None = None
    key: bytes | None = None
    min_free_bytes: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    oom_step_bytes: int | None = None
    deflate_on_oom: bool = True
    long_term_pin: bool = True
    verify_interval_s: float = 10.0
    guard_interval_s: float = 0.5
    holdoff_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    reconnect_s: tuple[float, float] = (0.5, 30.0)
    proc: Path = field(default_factory=lambda: Path("/proc"))


def default_min_free(total_bytes: int) -> int:
    """5% of the guest's memory, at least 64 MiB."""
    return max(64 << 20, total_bytes // 20 // PAGE_SIZE * PAGE_SIZE)


async def open_stream(address: Address) -> trio.abc.Stream:
    """A byte stream to the host.  Raises OSError if it cannot be reached."""
    if address.kind == "tcp":
        return await trio.open_tcp_stream(address.host, address.port)
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    if address.kind == "vsock":
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await sock.connect((address.cid, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise ValueError(f"unknown transport {address.kind!r}")


class AgentService:
    def __init__(self, core: AgentCore, pool: PagePool, source: MemorySource,
                 options: Options) -> None:
        self.core = core
        self.pool = pool
        self.source = source
        self.options = options
        self._lot = trio.lowlevel.ParkingLot()
        # One pool call at a time, off the event loop (see the module docstring).
        self._limiter = trio.CapacityLimiter(1)
        self._done = trio.Event()

    def _notify(self) -> None:
        self._lot.unpark_all()

    async def _changed(self, timeout_s: float = float("inf")) -> None:
        with trio.move_on_after(timeout_s):
            await self._lot.park()

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self._worker)
            nursery.start_soon(self._guard_loop)
            nursery.start_soon(self._psi_loop)
            nursery.start_soon(self._verify_loop)
            nursery.start_soon(self._connection_loop)
            await self._done.wait()
            nursery.cancel_scope.cancel()

    # -- stopping ----------------------------------------------------------------------

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s received", signal.Signals(signum).name)
                break
            self.core.stop(trio.current_time())
            self._notify()
            with trio.move_on_after(self.options.shutdown_timeout_s) as deadline:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._second_signal, signals, nursery.cancel_scope)
                    while not self.core.stopped:
                        await self._changed(0.5)
                    nursery.cancel_scope.cancel()
            if deadline.cancelled_caught or not self.core.stopped:
                log.warning("could not finish deflating within %.0fs: releasing what is safe",
                            self.options.shutdown_timeout_s)
                self.core.give_up(trio.current_time())
                self._notify()
                with trio.move_on_after(self.options.shutdown_timeout_s):
                    while not self.core.stopped:
                        await self._changed(0.5)
        self._done.set()

    async def _second_signal(self, signals: object, scope: trio.CancelScope) -> None:
        async for signum in signals:  # type: ignore[attr-defined]
            log.warning("%s again: stopping now, releasing only what is safe",
                        signal.Signals(signum).name)
            self.core.give_up(trio.current_time())
            self._notify()
            return

    # -- the worker --------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            now = trio.current_time()
            command = self.core.next_command(now)
            if command is None:
                await self._changed(1.0)
                continue
            with trio.CancelScope(shield=True):
                await self._run(command)
            if self.pool.pins_lost:
                self.core.request_verify(urgent=True)
            self._notify()

    async def _run(self, command: Pin | Release | Verify) -> None:
        run = trio.to_thread.run_sync
        core = self.core
        if isinstance(command, Pin):
            try:
                chunk = await run(self.pool.pin, command.size_bytes, limiter=self._limiter)
            except WORKER_ERRORS as exc:
                core.pin_failed(command.size_bytes, exc, trio.current_time())
            else:
                core.pinned(chunk, trio.current_time())
        elif isinstance(command, Release):
            # Every chunk waiting to go, in one worker call and one request to the
            # pin holder: each thread hop and holder round trip costs milliseconds
            # of the guest's CPU, and a deflate releases many chunks at once.
            chunks = [command.chunk, *core.more_releases()]
            results = await run(self.pool.release_all, chunks, limiter=self._limiter)
            now = trio.current_time()
            for chunk, error in results:
                if error is not None:
                    core.release_failed(chunk, error, now)
            core.released_all([chunk for chunk, error in results if error is None], now)
        else:
            try:
                changes = await run(self.pool.check, command.chunks, limiter=self._limiter)
            except WORKER_ERRORS as exc:
                log.error("verifying the balloon's frames failed: %s", exc)
            else:
                core.verified(changes, trio.current_time())

    # -- timers ------------------------------------------------------------------------

    async def _guard_loop(self) -> None:
        while True:
            snapshot = self.source.read_for_guard(pressure=self.core.guard.wants_pressure)
            self.core.observe(snapshot, trio.current_time())
            self._notify()
            await trio.sleep(self.options.guard_interval_s)

    async def _verify_loop(self) -> None:
        while True:
            await trio.sleep(self.options.verify_interval_s)
            self.core.request_verify()
            self._notify()

    async def _psi_loop(self) -> None:
        """Wake on the PSI trigger (``wait_priority``); tell the core."""
        path = self.source.pressure_path
        if not self.source.has_pressure:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.info("no PSI trigger (%s: %s): watching available memory only", path,
                     exc.strerror)
            return
        try:
            for trigger in PSI_TRIGGERS:
                try:
                    os.write(fd, trigger)
                    break
                except OSError as exc:
                    last = exc
            else:
                log.info("no PSI trigger on %s (%s): watching available memory only", path,
                         last.strerror)
                return
            log.debug("PSI trigger armed on %s: %s", path, trigger.rstrip(b"\0").decode())
            with PriorityWaiter(fd) as waiter:
                while True:
                    await waiter.wait()
                    log.debug("PSI trigger: tasks stalled on memory")
                    self.core.pressure_event(trio.current_time())
                    self._notify()
        finally:
            os.close(fd)

    # -- the connection ----------------------------------------------------------------

    async def _connection_loop(self) -> None:
        first, cap = self.options.reconnect_s
        delay = first
        address = self.options.address
        while not self.core.stopping:
            try:
                with trio.fail_after(self.options.connect_timeout_s):
                    stream = await open_stream(address)
            except (OSError, trio.TooSlowError) as exc:
                reason = (
                    "no answer in time" if isinstance(exc, trio.TooSlowError)
                    else (exc.strerror or str(exc))
                )
                why = f"cannot reach the host at {address}: {reason}"
            else:
                log.info("connected to the host at %s", address)
                if await self._session(stream):
                    delay = first
                why = f"lost the host at {address}: {self.core.session_error}"
            if self.core.stopping:
                break
            wait = delay * random.uniform(0.8, 1.2)
            log.warning("%s; retrying in %s; %s kept", why, _seconds(wait), self.core.summary())
            await trio.sleep(wait)  # the backoff itself
            delay = min(delay * 2, cap)

    async def _session(self, stream: trio.abc.Stream) -> bool:
        """Run one session; return whether it got as far as WELCOME."""
        core = self.core
        core.connect(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream)
                nursery.start_soon(self._stats_pusher)
                await self._reader(stream)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            core.connection_lost(f"the connection broke ({_why(exc)})", trio.current_time())
        finally:
            self._notify()
            with trio.CancelScope(shield=True):
                last = core.data_to_send()
                with trio.move_on_after(2):
                    try:
                        if last:
                            await stream.send_all(last)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                await trio.aclose_forcefully(stream)
        return core.session_welcomed

    async def _reader(self, stream: trio.abc.Stream) -> None:
        core = self.core
        handshake_deadline = trio.current_time() + self.options.handshake_timeout_s
        while core.session_open:
            conn = core.conn
            assert conn is not None
            if core.active:
                beat = conn.welcome.heartbeat_ms / 1000 if conn.welcome else 0
                limit = 3 * beat if beat else float("inf")
                what = f"the host sent nothing for {_seconds(limit)} (3 heartbeats)"
            else:
                limit = handshake_deadline - trio.current_time()
                what = ("the host did not complete the handshake in "
                        f"{_seconds(self.options.handshake_timeout_s)}")
            with trio.move_on_after(max(0.0, limit)) as silence:
                data = await stream.receive_some(RECEIVE_SIZE)
            if silence.cancelled_caught:
                core.close_session(what, trio.current_time(), ErrorCode.TIMEOUT)
                break
            core.receive_data(bytes(data), trio.current_time())
            self._notify()

    async def _writer(self, stream: trio.abc.Stream) -> None:
        while True:
            data = self.core.data_to_send()
            if data:
                await stream.send_all(data)
            else:
                await self._lot.park()

    async def _stats_pusher(self) -> None:
        core = self.core
        while not core.active:
            await self._changed()
        conn = core.conn
        interval = conn.welcome.stats_interval_ms / 1000 if conn and conn.welcome else 0
        if not interval:
            return
        while core.conn is conn and core.active:
            await trio.sleep(interval)
            core.push_stats(trio.current_time())
            self._notify()


class PriorityWaiter:
    """Wait in trio for POLLPRI on a file descriptor, without a thread.

    A PSI trigger reports through POLLPRI, and poll on a PSI file always says
    "readable" as well, so ``trio.lowlevel.wait_readable`` (EPOLLIN) cannot wait on
    the file itself.  An epoll instance that watches the file for EPOLLPRI only is
    readable exactly when the trigger fired, and trio can wait on *that*.  (The
    alternative, a thread blocked in poll() with a timeout, costs a thread and up to
    a timeout's delay at shutdown.)
    """

    def __init__(self, fd: int) -> None:
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLPRI)

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self._epoll.fileno())
        # Consume the event.  (Checking the epoll fd's readiness may already have:
        # a PSI trigger reports each event once.  Either way one did happen.)
        self._epoll.poll(0)

    def close(self) -> None:
        self._epoll.close()

    def __enter__(self) -> PriorityWaiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(count: int) -> str:
    return f"{count} chunk" if count == 1 else f"{count} chunks"


def _seconds(value: float) -> str:
    if value == float("inf"):
        return "ever"
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__


# -- setting up ------------------------------------------------------------------------


def _start_pinner(state: StateDir, wanted: bool) -> tuple[Pinner | None, str]:
    """The holder (started if needed), or why there are no long-term pins."""
    if not wanted:
        return None, "long-term pins disabled (--no-pin)"
    try:
        return HolderClient.connect(state.path), ""
    except NativeError as exc:
        log.warning("%s; keeping the pins in this process instead: they will not survive it",
                    exc)
        return LocalPins(), ""


async def run(options: Options) -> int:
    """Run the agent until SIGTERM/SIGINT.  Returns the exit status.

    Raises PolicyError/NativeError for a setup that cannot work (the CLI prints them).
    """
    source = MemorySource(options.proc)
    total_bytes = source.total_bytes
    if source.in_container:
        log.info("running in a container: its memory cgroup's limit of %s is this guest's size",
                 format_size(total_bytes))
    state = StateDir.prepare(options.state_dir, total_bytes, fallback=options.fallback_dir)
    log.info("%s", state.note)
    state.lock()
    pool: PagePool | None = None
    try:
        pinner, why_not = _start_pinner(state, options.long_term_pin)
        pool = PagePool(
            state.path, pinner,
            reconnect=(lambda: HolderClient.connect(state.path))
            if isinstance(pinner, HolderClient) else None,
        )
        problem = await trio.to_thread.run_sync(pool.probe) if pinner is not None else why_not
        if problem:
            log.warning(
                "no long-term pin here (%s): frames may move, so STABLE_PFNS is not offered "
                "and the host will only account for the balloon", problem,
            )
        chunks = await trio.to_thread.run_sync(pool.reattach)
        if chunks:
            log.info(
                "reattached %s (%s) left by an earlier agent; the host will be told "
                "(RESYNC) before anything else", _chunks(len(chunks)),
                format_size(sum(c.size_bytes for c in chunks)),
            )
        min_free = options.min_free_bytes
        if min_free is None:
            min_free = default_min_free(total_bytes)
        guard = GuardConfig(
            min_free_bytes=min_free,
            step_bytes=options.oom_step_bytes or options.chunk_bytes,
            deflate_on_pressure=options.deflate_on_oom,
            holdoff_s=options.holdoff_s,
            step_interval_s=max(options.guard_interval_s, 0.25),
        )
        config = AgentConfig(
            name=options.name,
            total_pages=total_bytes // PAGE_SIZE,
            guard=guard,
            chunk_bytes=options.chunk_bytes,
            key=options.key,
            ram_layout=RangeSet.empty() if source.in_container else ram_layout(options.proc),
        )
        core = AgentCore(config, snapshot=source.read, chunks=chunks, stable=pool.stable,
                         pressure_stats=source.has_pressure)
        core.observe(source.read(), trio.current_time())
        log.info(
            "guest %s: %s of memory, floor %s, chunks of %s; connecting to %s",
            options.name, format_size(total_bytes), format_size(min_free),
            format_size(options.chunk_bytes), options.address,
        )
        await AgentService(core, pool, source, options).serve()
        kept = core.kept()
        if kept:
            log.warning(
                "stopped, keeping %s (%s) whose reports the host never answered: "
                "they stay allocated%s; restart the agent to hand them over, or run "
                "`uballoon-guest --release --state-dir %s` once the host is gone for good",
                _chunks(len(kept)), format_size(sum(s.chunk.size_bytes for s in kept)),
                " and pinned by the pin holder" if isinstance(pool.pinner, HolderClient) else "",
                state.path,
            )
        else:
            log.info("stopped; the balloon is empty")
        return 0
    finally:
        if pool is not None:
            _close_pool(pool, state)
        state.close(unmount=True)


def run_blocking(options: Options) -> int:
    """``run`` under a fresh trio event loop (the command line's entry)."""
    return trio.run(run, options)


def _close_pool(pool: PagePool, state: StateDir) -> None:
    pinner = pool.pinner
    if isinstance(pinner, HolderClient):
        try:
            if not pinner.held():
                pinner.stop()
                pinner.close()
                if not wait_holder_gone(state.path, pinner.pid):
                    log.warning("the pin holder (pid %s) did not exit", pinner.pid)
                return
        except NativeError as exc:
            log.warning("the pin holder: %s", exc)
    pool.close()
