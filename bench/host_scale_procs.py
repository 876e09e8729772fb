"""The processes of ``bench_host_scale.py``: the uballoon host, the bare trio servers,
and the workers that run the simulated guests.  Not run by hand.

    python bench/host_scale_procs.py host   --listen ADDR [--state-file P] [--gc MODE] ...
    python bench/host_scale_procs.py bare   --listen ADDR --clients guests|raw
    python bench/host_scale_procs.py worker

Each reads one JSON command per line on stdin and answers with one JSON line on
stdout; it exits when stdin closes, so a benchmark that dies, however it dies, takes
its processes with it.  Logs go to stderr.

* ``host`` runs the real ``HostService`` (``serve`` over ``open_listeners``) with one
  hook: a ``Session`` subclass that, after the service has handled an ACTUAL, counts
  it if it carries the value this round expects.  ``push`` calls
  ``service.set_target`` for every connected guest and returns once every guest's
  ACTUAL has been handled.
* ``bare`` accepts connections in one task (no task per connection).  With
  ``--clients guests`` it greets each simulated guest with a WELCOME (built by a
  ``HostConnection``, untimed) and then pushes the same CONFIG frame every round,
  reading the ACTUAL back as 24 bytes; with ``--clients raw``, bytes both ways.
* ``worker`` runs simulated guests (``GuestConnection`` over a socket, one task each)
  and bare clients, as many of each as it is told.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_backend import service as service_module  # noqa: E402
from host_backend.config import HostConfig  # noqa: E402
from host_backend.service import HostService, Session, open_listeners, serve, tune_gc  # noqa: E402
from protocol import codec  # noqa: E402
from protocol.addresses import parse_address  # noqa: E402
from protocol.connection import GuestConnection, HostConnection  # noqa: E402
from protocol.constants import DEFAULT_MAX_BODY, Feature  # noqa: E402
from protocol.events import (  # noqa: E402
    NEED_DATA,
    Actual,
    Bye,
    Config,
    ConnectionClosed,
    Error,
    Hello,
    Ping,
    Pong,
    Stats,
    StatsRequest,
    Welcome,
)
from protocol.units import PAGE_SIZE  # noqa: E402


def _frame(event: Any) -> bytes:
    kind, flags, txid, body = codec.encode_event(event, ranges=False)
    return codec.build_frame(kind, flags, txid, body, None, 0)


# The bare servers' exchange: one CONFIG frame out (a session without a MAC sends the
# same bytes for the same event every time), one ACTUAL frame back.
PUSH_EVENT = Config(65536, 0)
PUSH_MESSAGE = _frame(PUSH_EVENT)
REPLY_MESSAGE = _frame(Actual(65536))
PUSH_BYTES, REPLY_BYTES = len(PUSH_MESSAGE), len(REPLY_MESSAGE)
RAW_GREETING = b"\x00"  # the raw server's one byte on accept: the client is connected
GUEST_FEATURES = int(
    Feature.MUST_TELL_HOST | Feature.STATS_VQ | Feature.PFN_RANGES | Feature.STABLE_PFNS
)
CONNECTS_IN_FLIGHT = 64  # per worker: well inside the listeners' backlog
PUSH_TIMEOUT_S = 120.0


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_s() -> float:
    """This process's user + system CPU time."""
    return time.process_time()


def answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def commands(handlers: dict[str, Any]) -> None:
    """Run the JSON commands read from stdin until it closes."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with stdin:
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                try:
                    reply = await handlers[request.pop("cmd")](**request)
                except Exception as exc:  # the benchmark shows it and stops
                    logging.exception("command failed")
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                answer(reply)


async def listen(text: str) -> tuple[list[trio.SocketListener], str]:
    """Listeners for ``text`` and the address clients should use (a TCP port 0 is
    replaced by the port the OS picked)."""
    address = parse_address(text, listen=True)
    listeners = await open_listeners(address)
    if address.kind == "tcp":
        port = listeners[0].socket.getsockname()[1]
        return listeners, f"tcp:{address.host}:{port}"
    return listeners, text


# -- the uballoon host ------------------------------------------------------------------


class BenchSession(Session):
    bench_round = -1

    async def _handle(self, event: Any) -> None:
        await super()._handle(event)
        if type(event) is Actual:
            service = self.service
            assert isinstance(service, BenchService)
            service.bench_actual(self, event.actual)


class BenchService(HostService):
    """The real service plus a counter of the ACTUALs a round is waiting for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bench_round = 0
        self.bench_expect = -1
        self.bench_remaining = 0
        self.bench_done = trio.Event()
        self.policy_s = 0.0
        self.policy_runs = 0

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        await BenchSession(self, stream, service_module._peer(stream)).run()

    def bench_actual(self, session: BenchSession, actual: int) -> None:
        if actual == self.bench_expect and session.bench_round != self.bench_round:
            session.bench_round = self.bench_round
            self.bench_remaining -= 1
            if self.bench_remaining == 0:
                self.bench_done.set()

    def run_policy(self) -> None:
        start = time.perf_counter()
        super().run_policy()
        self.policy_s += time.perf_counter() - start
        self.policy_runs += 1


class GcClock:
    """Time spent in the cyclic garbage collector, per generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._start
            self.count[generation] += 1

    def snapshot(self) -> tuple[list[float], list[int]]:
        return list(self.seconds), list(self.count)


async def host_main(args: argparse.Namespace) -> None:
    raise_nofile()
    gc_clock = GcClock()
    if args.gc == "off":
        gc.disable()
    elif args.gc == "default":
        tune_gc()  # as uballoon-host runs it
    else:
        gc.set_threshold(*(int(x) for x in args.gc.split(",")))
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    config = HostConfig(unknown_guests="account", heartbeat_s=args.heartbeat,
                        state_file=args.state_file)
    service = BenchService(config, 1 << 60)
    listeners, address = await listen(args.listen)
    profiler = None
    snapshot: dict[str, Any] = {}

    async def wait_connected(n: int, within_s: float) -> dict[str, Any]:
        with trio.fail_after(within_s):
            seen = service.changes()
            while len(service.sessions) < n:
                seen = await service.wait_change(seen)
        return {"connected": len(service.sessions)}

    async def push(keep_bytes: int, profile: bool = False) -> dict[str, Any]:
        nonlocal profiler
        names = list(service.sessions)
        records = [service.ledger.records[name] for name in names]
        expect = {r.num_pages_for(keep_bytes // PAGE_SIZE) for r in records}
        assert len(expect) == 1, "the guests differ in size"
        service.bench_round += 1
        service.bench_expect = expect.pop()
        service.bench_remaining = len(names)
        service.bench_done = trio.Event()
        policy_s, policy_runs = service.policy_s, service.policy_runs
        if profile:
            import cProfile

            profiler = profiler or cProfile.Profile()
            profiler.enable()
        gc0 = gc_clock.snapshot()
        cpu0, t0 = cpu_s(), time.perf_counter()
        for name in names:
            service.set_target(name, keep_bytes, clamp=True)
        t_set = time.perf_counter()
        with trio.move_on_after(PUSH_TIMEOUT_S):
            await service.bench_done.wait()
        t1, cpu1 = time.perf_counter(), cpu_s()
        gc1 = gc_clock.snapshot()
        if profile:
            profiler.disable()
        if service.bench_remaining:
            raise RuntimeError(
                f"{service.bench_remaining} of {len(names)} guests did not acknowledge "
                f"within {PUSH_TIMEOUT_S:g}s"
            )
        return {
            "push_s": t1 - t0,
            "set_target_s": t_set - t0,
            "cpu_s": cpu1 - cpu0,
            "policy_s": service.policy_s - policy_s,
            "policy_runs": service.policy_runs - policy_runs,
            "gc_s": [b - a for a, b in zip(gc0[0], gc1[0], strict=True)],
            "gc_count": [b - a for a, b in zip(gc0[1], gc1[1], strict=True)],
            "guests": len(names),
        }

    async def profile_dump(path: str) -> dict[str, Any]:
        if profiler is None:
            return {"written": None}
        profiler.dump_stats(path)
        return {"written": path}

    async def memory(label: str) -> dict[str, Any]:
        if not tracemalloc.is_tracing():
            return {"traced_bytes": None}
        snapshot[label] = tracemalloc.take_snapshot()
        return {"traced_bytes": tracemalloc.get_traced_memory()[0]}

    async def memory_diff(before: str, after: str, top: int) -> dict[str, Any]:
        stats = snapshot[after].compare_to(snapshot[before], "lineno")
        return {
            "top": [
                [str(s.traceback[0]), s.size_diff, s.count_diff] for s in stats[:top]
            ]
        }

    async def ping() -> dict[str, Any]:
        return {"pid": os.getpid(), "address": address, "cpu_s": cpu_s(),
                "gc_s": gc_clock.seconds, "gc_count": gc_clock.count}

    async def gc_probe(phase: str) -> dict[str, Any]:
        """Diagnosis: "freeze" hides every object alive now from the collector; "count"
        tells what the collector can see since (new survivors and cyclic garbage)."""
        import collections

        if phase == "freeze":
            gc.collect()
            gc.freeze()
            return {"frozen": gc.get_freeze_count()}
        counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        gc.unfreeze()
        return {"total": sum(counts.values()), "top": counts.most_common(25)}

    handlers = {
        "gc_probe": gc_probe,
        "ping": ping,
        "wait_connected": wait_connected,
        "push": push,
        "profile_dump": profile_dump,
        "memory": memory,
        "memory_diff": memory_diff,
    }
    async with trio.open_nursery() as nursery:

        async def serving(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(service, listeners, task_status=task_status)
            nursery.cancel_scope.cancel()  # SIGTERM/SIGINT stopped the service

        await nursery.start(serving)
        answer({"ready": True, "pid": os.getpid(), "address": address})
        await commands(handlers)
        nursery.cancel_scope.cancel()


# -- the bare trio servers ---------------------------------------------------------------


async def bare_main(args: argparse.Namespace) -> None:
    """``--clients guests``: the simulated guests connect here too; each gets a WELCOME
    (built once per connection by a ``HostConnection``, untimed) and is then pushed the
    same CONFIG frame every round, its ACTUAL read back as 24 bytes.  ``--clients raw``:
    the bare clients, bytes both ways."""
    raise_nofile()
    address = parse_address(args.listen, listen=True)
    if address.kind == "unix":
        if os.path.exists(address.path):
            os.unlink(address.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(address.path)
        sock.listen(4096)
        listener = trio.SocketListener(sock)
        text = args.listen
    else:
        (listener,) = await trio.open_tcp_listeners(address.port, host=address.host,
                                                    backlog=4096)
        text = f"tcp:{address.host}:{listener.socket.getsockname()[1]}"
    guests = args.clients == "guests"
    streams: list[trio.SocketStream] = []
    conns: list[HostConnection] = []  # for the "proto" mode, one per stream
    more = trio.Event()

    def add(stream: trio.SocketStream, conn: HostConnection | None = None) -> None:
        nonlocal more
        streams.append(stream)
        if conn is not None:
            conns.append(conn)
        more.set()
        more = trio.Event()

    async def welcome(stream: trio.SocketStream) -> None:
        """HELLO in, WELCOME out, the guest's first ACTUAL in: then it is ours."""
        conn = HostConnection()
        seen = []
        with trio.fail_after(60):
            while len(seen) < 2:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                seen.append(event)
                if isinstance(event, Hello):
                    await stream.send_all(conn.send(Welcome(
                        version=1, features=event.features & GUEST_FEATURES,
                        max_body=DEFAULT_MAX_BODY, config=Config(0, 0), heartbeat_ms=0,
                    )))
                elif not isinstance(event, Actual):
                    raise RuntimeError(f"unexpected {event!r}")
        add(stream, conn)

    async def accept(nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            if guests:
                nursery.start_soon(welcome, stream)  # a short task, gone once welcomed
            else:
                await stream.send_all(RAW_GREETING)
                add(stream)

    async def read_reply(stream: trio.SocketStream) -> None:
        got = 0
        while got < REPLY_BYTES:
            data = await stream.receive_some(REPLY_BYTES - got)
            if not data:
                raise trio.BrokenResourceError("a client went away")
            got += len(data)

    async def one(stream: trio.SocketStream) -> None:
        await stream.send_all(PUSH_MESSAGE)
        await read_reply(stream)

    async def wait_connected(n: int, within_s: float) -> dict[str, Any]:
        with trio.fail_after(within_s):
            while len(streams) < n:
                await more.wait()
        return {"connected": len(streams)}

    async def push(mode: str) -> dict[str, Any]:
        targets = list(streams)
        cpu0, t0 = cpu_s(), time.perf_counter()
        with trio.fail_after(PUSH_TIMEOUT_S):
            if mode == "loop":
                for stream in targets:
                    await stream.send_all(PUSH_MESSAGE)
                for stream in targets:
                    await read_reply(stream)
            elif mode == "tasks":
                async with trio.open_nursery() as nursery:
                    for stream in targets:
                        nursery.start_soon(one, stream)
            elif mode == "proto" and guests:
                # The same loop, but CONFIGs built and ACTUALs parsed by protocol/.
                pairs = list(zip(targets, conns, strict=True))
                for stream, conn in pairs:
                    await stream.send_all(conn.send(PUSH_EVENT))
                for stream, conn in pairs:
                    event = conn.next_event()
                    while event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        event = conn.next_event()
                    if type(event) is not Actual:
                        raise RuntimeError(f"expected an ACTUAL, got {event!r}")
            else:
                raise ValueError(f"unknown mode {mode!r}")
        t1, cpu1 = time.perf_counter(), cpu_s()
        return {"push_s": t1 - t0, "cpu_s": cpu1 - cpu0, "connections": len(targets)}

    async def ping() -> dict[str, Any]:
        return {"pid": os.getpid(), "address": text, "cpu_s": cpu_s()}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept, nursery)
        answer({"ready": True, "pid": os.getpid(), "address": text})
        await commands({"ping": ping, "wait_connected": wait_connected, "push": push})
        nursery.cancel_scope.cancel()


# -- the workers: simulated guests and bare clients --------------------------------------


async def connect(address: str) -> trio.SocketStream:
    if address.startswith("unix:"):
        return await trio.open_unix_socket(address[5:])
    host, port = address[4:].rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def run_guest(address: str, name: str, total_pages: int,
                    limiter: trio.CapacityLimiter, ready: Any) -> None:
    """One simulated guest: HELLO, then answer what the host sends, until it closes."""
    conn = GuestConnection()
    welcomed = False
    # Held until WELCOME: a Unix connect beyond the listener's backlog fails (trio sees
    # EAGAIN as "in progress"), and the host accepts only as fast as it handshakes.
    await limiter.acquire()
    try:
        stream = await connect(address)
        hello = conn.make_hello(name=name, features=GUEST_FEATURES, total_pages=total_pages)
        await stream.send_all(conn.send(hello))
        async with stream:
            while True:
                out = []
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    kind = type(event)
                    if kind is Config:
                        # A real agent inflates or deflates, then reports where it got
                        # to: virtio's "actual".  This one gets there at once.
                        out.append(conn.send(Actual(event.num_pages)))
                    elif kind is Ping:
                        out.append(conn.send(Pong(event.txid)))
                    elif kind is StatsRequest:
                        out.append(conn.send(Stats(((4, 1 << 30),), event.txid)))
                    elif kind is Welcome:
                        welcomed = True
                        limiter.release()
                        ready()
                        out.append(conn.send(Actual(event.config.num_pages)))
                    elif kind is ConnectionClosed or kind is Bye or kind is Error:
                        if not welcomed:
                            logging.error("guest %s refused: %s", name, event)
                        return
                if out:
                    await stream.send_all(b"".join(out))
                conn.receive_data(await stream.receive_some(65536))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        if not welcomed:
            logging.error("guest %s: %s", name, exc)
    finally:
        if not welcomed:
            limiter.release()
            ready(failed=True)


async def run_bare_client(address: str, limiter: trio.CapacityLimiter, ready: Any) -> None:
    try:
        # Held until the server's greeting: a connect beyond the backlog of a Unix
        # listener looks made to trio but is not (see run_guest).
        async with limiter:
            stream = await connect(address)
            if await stream.receive_some(len(RAW_GREETING)) != RAW_GREETING:
                raise OSError("no greeting from the server")
    except (OSError, trio.BrokenResourceError) as exc:
        logging.error("bare client: %s", exc)
        ready(failed=True)
        return
    ready()
    try:
        async with stream:
            pending = 0
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                pending += len(data)
                replies, pending = divmod(pending, PUSH_BYTES)
                if replies:
                    await stream.send_all(REPLY_MESSAGE * replies)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        logging.error("bare client: %s", exc)


async def worker_main(args: argparse.Namespace) -> None:
    raise_nofile()
    limiter = trio.CapacityLimiter(CONNECTS_IN_FLIGHT)
    async with trio.open_nursery() as nursery:

        async def start(kind: str, address: str, names: list[str], total_pages: int,
                        within_s: float) -> dict[str, Any]:
            done = trio.Event()
            counts = {"ok": 0, "failed": 0}

            def ready(failed: bool = False) -> None:
                counts["failed" if failed else "ok"] += 1
                if counts["ok"] + counts["failed"] == len(names):
                    done.set()

            for name in names:
                if kind == "guest":
                    nursery.start_soon(run_guest, address, name, total_pages, limiter, ready)
                else:
                    nursery.start_soon(run_bare_client, address, limiter, ready)
            with trio.fail_after(within_s):
                await done.wait()
            return counts

        async def ping() -> dict[str, Any]:
            return {"pid": os.getpid(), "cpu_s": cpu_s()}

        answer({"ready": True, "pid": os.getpid()})
        await commands({"ping": ping, "start": start})
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["host", "bare", "worker"])
    p.add_argument("--listen")
    p.add_argument("--clients", choices=["guests", "raw"], default="guests")
    p.add_argument("--heartbeat", type=float, default=HostConfig().heartbeat_s)
    p.add_argument("--state-file", help="the host's state file (manual targets)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    p.add_argument("--gc", default="default",
                   help='the host\'s collector: "default", "off", or thresholds "T0,T1,T2"')
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {args.role}[{os.getpid()}]: %(message)s")
    run = {"host": host_main, "bare": bare_main, "worker": worker_main}[args.role]
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
