"""Benchmark: one uballoon host process pushing a new target to 1,000 and 10,000 guests.

What runs
---------
For each N, fresh processes (``host_scale_procs.py``), every one raising its open-file
soft limit to the hard limit:

* *host*: the real ``HostService`` served by ``serve`` over ``open_listeners``
  (``unknown_guests="account"``, default timings), alone in its process;
* *bare*: a bare trio server, alone in its process;
* *raw*: the same bare server for bare clients, alone in its process;
* W *workers* (default 4), each running N/W simulated guests connected to the host,
  N/W more connected to *bare*, and N/W bare clients connected to *raw*.  A simulated
  guest is the real ``GuestConnection`` over its socket, one trio task each; it answers
  a CONFIG with an ACTUAL of its num_pages, a PING with a PONG.  The same worker
  processes serve every run.

Connections are Unix stream sockets by default (``--transport tcp`` for 127.0.0.1):
Unix is the host's transport for local guests (containers; vsock cannot be looped back
on this machine), and 3·N connections need neither ephemeral ports nor TIME_WAIT.

What is timed (each in the server's own process, from its first send to its last
reply handled)
--------------------------------------------------------------------------------------
* ``uballoon``: ``service.set_target(name, keep, clamp=True)`` for every connected
  guest, then until the service has handled every guest's ACTUAL carrying the new
  num_pages: the operator's call, the writer task waking, CONFIG built and sent, the
  session reading, checking and decoding the answer, and the policy run the new
  targets trigger.  The guests answer with ACTUAL because that is virtio's
  acknowledgement (the driver writes ``actual`` once it has reached the target) and it
  keeps the exchange one message each way, the shape of the baselines.  (An INFLATE
  answered by an ACK would add a third message and the ledger's page sets.)
* ``bare`` (the baseline of the ratio): the same exchange with the same simulated
  guests, from a bare trio server: one task sends the 36-byte CONFIG frame to every
  connection, then reads each 24-byte ACTUAL frame, parsing nothing.
* ``bare_tasks``: the same with a task per connection per push.
* ``bare_proto``: the ``bare`` loop with the CONFIG built and the ACTUAL parsed by
  ``protocol/`` (``HostConnection``): what the protocol code costs by itself.
* ``raw``: bare clients too (bytes both ways, no protocol anywhere): trio's floor, the
  exchange REFERENCE.md measured (33 ms for 1,000).

Each repeat runs all five, the order reversed every other repeat, after one untimed
warm-up of each; the figures are medians.  CPU time per push is the server's
(``time.process_time``) and the workers' (asked before and after), and the host
reports its policy runs and garbage-collector time.  Memory per guest is the host's
RSS growth while the N guests connect, divided by N (the bare server's per connection
beside it); ``--tracemalloc`` adds Python's own count and the top allocation sites
(and slows the host).  The host's idle CPU with N guests (heartbeats, periodic policy)
is sampled over two heartbeats.

    python bench/bench_host_scale.py [--quick] [--sizes 1000,10000] [--repeat R]
        [--workers W] [--transport unix|tcp] [--state-file] [--profile DIR]
        [--tracemalloc] [--host-gc off|T0,T1,T2] [--host-log-level LEVEL]

The last line printed is one JSON object; per N (``by_guests``): ``guests``,
``uballoon_push_s``, ``baseline_push_s`` (= ``bare_push_s``), ``ratio``,
``host_rss_per_guest_bytes``, and the other runs' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROCS = HERE / "host_scale_procs.py"
GOAL_RATIO = 2.0
GUEST_RAM_BYTES = 1 << 30
KEEPS = (768 << 20, 512 << 20)  # the targets pushed in turn (memory the guests keep)
REPLY_TIMEOUT_S = 300.0


class BenchError(Exception):
    pass


class Child:
    """One process of the benchmark, spoken to in JSON lines over its stdin/stdout."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCS), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            # Its own session: a Ctrl-C reaches only us, and we stop it in order.
            start_new_session=True,
        )
        self._buf = b""
        self.pid = self.proc.pid
        self.hello: dict[str, Any] = {}

    def send(self, cmd: str, **kwargs: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **kwargs}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise BenchError(f"{self.name} is gone (status {self.proc.poll()}): {exc}"
                             f"{self.log_tail()}") from None

    def read(self, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise BenchError(f"{self.name}: no answer within {timeout:g}s"
                                     f"{self.log_tail()}")
                data = os.read(fd, 65536)
                if not data:
                    raise BenchError(f"{self.name} exited (status {self.proc.poll()})"
                                     f"{self.log_tail()}")
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"{self.name}: {reply['error']}{self.log_tail()}")
        return reply

    def call(self, cmd: str, timeout: float = REPLY_TIMEOUT_S, **kwargs: Any) -> dict[str, Any]:
        self.send(cmd, **kwargs)
        return self.read(timeout)

    def log_tail(self, lines: int = 15) -> str:
        try:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  | {line}" for line in tail)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise BenchError(f"{self.name}: no VmRSS")

    def cpu_s(self) -> float:
        """User + system CPU time, read from /proc (no round trip to the process)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close_stdin(self) -> None:
        """Ask it to exit (it exits when its stdin closes)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """Close its stdin and wait; then SIGTERM, then SIGKILL, as needed."""
        proc = self.proc
        try:
            self.close_stdin()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._log.close()


class Cluster:
    """The processes for one N; ``close`` stops them all."""

    def __init__(self, args: argparse.Namespace, n: int, tmp: Path) -> None:
        self.args = args
        self.n = n
        self.children: list[Child] = []
        logdir = tmp / f"logs-{n}"
        logdir.mkdir()

        def where(name: str) -> str:
            return f"unix:{tmp}/{name}-{n}.sock" if args.transport == "unix" else (
                "tcp:127.0.0.1:0"
            )

        try:
            host_argv = ["host", "--listen", where("host"), "--log-level", args.host_log_level]
            if args.tracemalloc:
                host_argv += ["--tracemalloc", "1"]
            if args.state_file:
                host_argv += ["--state-file", str(tmp / f"state-{n}.json")]
            if args.host_gc != "default":
                host_argv += ["--gc", args.host_gc]
            self.host = self._start("host", host_argv, logdir)
            self.bare = self._start(
                "bare", ["bare", "--clients", "guests", "--listen", where("bare")], logdir
            )
            self.raw = self._start(
                "raw", ["bare", "--clients", "raw", "--listen", where("raw")], logdir
            )
            self.workers = [
                self._start(f"worker{i}", ["worker"], logdir) for i in range(args.workers)
            ]
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, argv: list[str], logdir: Path) -> Child:
        child = Child(name, argv, logdir)
        self.children.append(child)  # before anything else can fail: close() stops it
        child.hello = child.read(60.0)
        return child

    def close(self) -> None:
        """Stop every process: all are asked at once, then each is waited for (and
        killed if it will not go)."""
        errors = []
        for child in self.children:
            child.close_stdin()
        for child in reversed(self.children):
            try:
                child.stop()
            except BaseException as exc:  # keep stopping the others
                errors.append(exc)
        self.children.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workers_cpu_s(self) -> float:
        """The workers' CPU time, asked of each (finer than /proc's clock ticks)."""
        for worker in self.workers:
            worker.send("ping")
        return sum(worker.read()["cpu_s"] for worker in self.workers)

    def connect(self, kind: str, server: Child, timeout: float) -> float:
        """Start N clients of ``kind`` ("guest" or "raw") across the workers; wait until
        ``server`` holds all N.  Returns the seconds it took."""
        t0 = time.perf_counter()
        w = len(self.workers)
        for i, worker in enumerate(self.workers):
            count = self.n // w + (1 if i < self.n % w else 0)
            worker.send("start", kind=kind, address=server.hello["address"],
                        names=[f"{server.name}{i}-{j}" for j in range(count)],
                        total_pages=GUEST_RAM_BYTES // 4096, within_s=timeout)
        failed = sum(worker.read(timeout + 30)["failed"] for worker in self.workers)
        if failed:
            raise BenchError(f"{failed} {kind} connection(s) to {server.name} failed"
                             f"{self.workers[0].log_tail()}")
        server.call("wait_connected", timeout + 30, n=self.n, within_s=timeout)
        return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# What each timed run is: (label, server, push command arguments).
RUNS = {
    "uballoon": "the uballoon host: set_target for every guest, until every ACTUAL is handled",
    "bare": "bare trio server, same simulated guests: one task sends to all, then reads all",
    "bare_tasks": "the same with a task per connection per push",
    "bare_proto": "the bare loop, CONFIG built and ACTUAL parsed by protocol/ (HostConnection)",
    "raw": "bare trio server, bare clients (bytes only, no protocol on either side)",
}


def measure(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"guests": n}
    connect_timeout = 60 + n / 10
    with Cluster(args, n, tmp) as c:
        time.sleep(0.5)
        host_rss0, bare_rss0 = c.host.rss_bytes(), c.bare.rss_bytes()
        traced0 = c.host.call("memory", label="before")["traced_bytes"]
        out["connect_guests_s"] = c.connect("guest", c.host, connect_timeout)
        time.sleep(0.5)
        host_rss1 = c.host.rss_bytes()
        traced1 = c.host.call("memory", label="after")["traced_bytes"]
        out["connect_bare_s"] = c.connect("guest", c.bare, connect_timeout)
        out["connect_raw_s"] = c.connect("raw", c.raw, connect_timeout)
        time.sleep(0.5)
        bare_rss1 = c.bare.rss_bytes()

        out["host_rss_per_guest_bytes"] = round((host_rss1 - host_rss0) / n)
        out["bare_rss_per_connection_bytes"] = round((bare_rss1 - bare_rss0) / n)
        if traced0 is not None:
            out["host_traced_per_guest_bytes"] = round((traced1 - traced0) / n)
            out["host_traced_top"] = c.host.call(
                "memory_diff", before="before", after="after", top=12
            )["top"]

        # What N idle guests cost the host (heartbeats, the policy's periodic runs).
        h0, w0 = c.host.cpu_s(), c.workers_cpu_s()
        time.sleep(args.idle_s)
        out["host_idle_cpu_fraction"] = (c.host.cpu_s() - h0) / args.idle_s
        out["workers_idle_cpu_fraction"] = (c.workers_cpu_s() - w0) / args.idle_s

        keep_turn = 0
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNS}

        def run(which: str, profile: bool = False) -> dict[str, Any]:
            nonlocal keep_turn
            w0 = c.workers_cpu_s()
            if which == "uballoon":
                keep = KEEPS[keep_turn % len(KEEPS)]
                keep_turn += 1
                r = c.host.call("push", keep_bytes=keep, profile=profile)
            elif which == "raw":
                r = c.raw.call("push", mode="loop")
            else:
                r = c.bare.call("push", mode={"bare": "loop", "bare_tasks": "tasks",
                                              "bare_proto": "proto"}[which])
            r["workers_cpu_s"] = c.workers_cpu_s() - w0
            return r

        for which in RUNS:  # warm-up, untimed
            run(which)
        order = list(RUNS)
        for i in range(args.repeat):
            for which in order if i % 2 == 0 else order[::-1]:
                results[which].append(run(which))
                time.sleep(args.pause_s)
        out["host_rss_after_pushes_per_guest_bytes"] = round((c.host.rss_bytes() - host_rss0) / n)

        if args.profile:
            for _ in range(max(3, args.repeat // 2)):
                run("uballoon", profile=True)
            path = str(Path(args.profile).resolve() / f"host-push-{n}.pstats")
            c.host.call("profile_dump", path=path)
            out["profile"] = path

    for which, runs in results.items():
        prefix = "uballoon" if which == "uballoon" else f"{which}"
        out[f"{prefix}_push_s"] = median([r["push_s"] for r in runs])
        out[f"{prefix}_push_s_all"] = [r["push_s"] for r in runs]
        out[f"{prefix}_cpu_s"] = median([r["cpu_s"] for r in runs])
        out[f"{prefix}_workers_cpu_s"] = median([r["workers_cpu_s"] for r in runs])
    out["baseline_push_s"] = out["bare_push_s"]
    out["ratio"] = out["uballoon_push_s"] / out["baseline_push_s"]
    out["ratio_vs_raw"] = out["uballoon_push_s"] / out["raw_push_s"]
    out["ratio_cpu"] = out["uballoon_cpu_s"] / out["bare_cpu_s"]
    out["uballoon_set_target_s"] = median([r["set_target_s"] for r in results["uballoon"]])
    out["uballoon_policy_s"] = median([r["policy_s"] for r in results["uballoon"]])
    out["uballoon_policy_runs"] = median([r["policy_runs"] for r in results["uballoon"]])
    out["uballoon_gc_s"] = median([sum(r["gc_s"]) for r in results["uballoon"]])
    out["uballoon_gc_full_collections"] = median([r["gc_count"][2] for r in results["uballoon"]])
    return out


def ms(x: float) -> str:
    return f"{x * 1000:,.1f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"Push a new target to N guests and receive every ACTUAL: medians of {args.repeat} "
          f"(transport {args.transport}, {args.workers} worker processes, {os.cpu_count()} CPUs)")
    for name, what in RUNS.items():
        print(f"  {name:10s} {what}")
    print()
    head = ("N", "run", "wall ms", "server CPU ms", "workers' CPU ms", "uballoon ÷ this")
    rows = [head]
    for r in results:
        for k, name in enumerate(RUNS):
            rows.append((
                f"{r['guests']:,}" if k == 0 else "",
                name,
                ms(r[f"{name}_push_s"]),
                ms(r[f"{name}_cpu_s"]),
                ms(r[f"{name}_workers_cpu_s"]),
                "" if name == "uballoon" else
                f"{r['uballoon_push_s'] / r[f'{name}_push_s']:.2f}×",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for k, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if i != 1 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for r in results:
        n = r["guests"]
        print(f"N={n:,}")
        print(f"  uballoon runs (ms): {', '.join(ms(x) for x in r['uballoon_push_s_all'])}")
        print(f"  bare runs (ms):     {', '.join(ms(x) for x in r['bare_push_s_all'])}")
        print(f"  in the uballoon push: set_target loop {ms(r['uballoon_set_target_s'])} ms, "
              f"policy {ms(r['uballoon_policy_s'])} ms in {r['uballoon_policy_runs']:g} run(s), "
              f"garbage collector {ms(r['uballoon_gc_s'])} ms "
              f"({r['uballoon_gc_full_collections']:g} full collection(s))")
        print(f"  memory: host {r['host_rss_per_guest_bytes']:,} B RSS per guest "
              f"({r['host_rss_after_pushes_per_guest_bytes']:,} after the pushes); bare server "
              f"{r['bare_rss_per_connection_bytes']:,} B per connection"
              + (f"; tracemalloc {r['host_traced_per_guest_bytes']:,} B per guest"
                 if "host_traced_per_guest_bytes" in r else ""))
        for site, size, count in r.get("host_traced_top", []):
            print(f"    {size / n:8,.0f} B/guest {count / n:6.1f} blocks/guest  {site}")
        print(f"  idle with N guests: host {r['host_idle_cpu_fraction'] * 100:.1f}% of a CPU, "
              f"workers {r['workers_idle_cpu_fraction'] * 100:.1f}%; connecting took "
              f"{r['connect_guests_s']:.1f} s (to the bare server {r['connect_bare_s']:.1f} s)")
        verdict = "meets" if r["ratio"] <= GOAL_RATIO else "misses"
        print(f"  ratio {r['ratio']:.2f}× (wall; {r['ratio_cpu']:.2f}× by server CPU) {verdict} "
              f"the goal of ≤ {GOAL_RATIO:g}×; against bare clients {r['ratio_vs_raw']:.2f}×")
        print()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=1,000 only, 3 repeats")
    p.add_argument("--sizes", help="comma-separated guest counts (default 1000,10000)")
    p.add_argument("--repeat", type=int, help="timed repeats (default 9; --quick 3)")
    p.add_argument("--workers", type=int, default=4, help="guest processes (default 4)")
    p.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    p.add_argument("--idle-s", type=float,
                   help="idle CPU sample (default 10 s, two heartbeats; --quick 5 s)")
    p.add_argument("--pause-s", type=float, default=0.05, help="pause between pushes")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timed runs, profile a few uballoon pushes (cProfile)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="count the host's Python allocations per guest (slows the host)")
    p.add_argument("--state-file", action="store_true",
                   help="give the host a state file (it saves manual targets there)")
    p.add_argument("--host-gc", default="default", metavar="MODE",
                   help='diagnosis: the host\'s garbage collector, "off" or thresholds '
                   '"T0,T1,T2" (default: as uballoon-host runs it)')
    p.add_argument("--host-log-level", default="warning",
                   help="the host's log level (uballoon-host's default is info)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [1000] if args.quick else [1000, 10000]
    )
    args.repeat = args.repeat or (3 if args.quick else 9)
    args.idle_s = args.idle_s if args.idle_s is not None else (5.0 if args.quick else 10.0)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    tmp = Path(tempfile.mkdtemp(prefix="uballoon-scale-"))
    results = []
    try:
        for n in sizes:
            print(f"N={n:,}: starting host, bare server and {args.workers} workers ...",
                  file=sys.stderr, flush=True)
            results.append(measure(args, n, tmp))
            r = results[-1]
            print(f"N={n:,}: uballoon {ms(r['uballoon_push_s'])} ms, bare "
                  f"{ms(r['baseline_push_s'])} ms, ratio {r['ratio']:.2f}", file=sys.stderr,
                  flush=True)
    except BenchError as exc:
        print(f"bench_host_scale: {exc}\n(the processes' logs are kept in {tmp}/logs-*)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_host_scale: interrupted; processes stopped", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return 130
    except BaseException:
        print(f"(the processes' logs are kept in {tmp}/logs-*)", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    summary = {
        "benchmark": "host_scale",
        "transport": args.transport,
        "workers": args.workers,
        "repeats": args.repeat,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "goal_ratio": GOAL_RATIO,
        "host_gc": args.host_gc,
        "host_state_file": args.state_file,
        "host_log_level": args.host_log_level,
        "by_guests": {
            str(r["guests"]): {
                k: v for k, v in r.items() if not k.endswith("_all") and k != "host_traced_top"
            }
            for r in results
        },
    }
    print(json.dumps(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
