"""Head to head in a real VM: the kernel's virtio-balloon against uballoon.

    .venv/bin/python bench/bench_vm_balloon.py            # 3 repetitions, ~11 min here
    .venv/bin/python bench/bench_vm_balloon.py --quick    # 1 repetition, ~5 min

One guest (tests/vm/harness.py: 2 GiB, QEMU ``pc``, TCG, one vCPU, RAM from a shared
file on /dev/shm, the Debian kernel) runs, at the same time:

* the kernel's virtio-balloon driver, driven through QEMU's own QMP ``balloon``
  command and timed by polling ``query-balloon`` every ``--poll-ms`` (QEMU sends
  ``BALLOON_CHANGE`` at most once a second, too coarse to time with);
* ``uballoon-guest`` (the agent, its pin holder and its tmpfs), connected over QEMU's
  user network to ``uballoon-host`` here, which has the guest's RAM map and key: the
  session is authenticated and has stable frames, so the host punches what it is told.
  Targets go through the host's control socket; the time is taken when its ``watch``
  stream shows the guest's ``actual`` at the target (what ``query-balloon`` shows for
  the kernel; the agent, like virtio's driver, counts deflated pages in ``actual``
  until they are the guest's again).

Each repetition inflates 1 GiB (the guest keeps 1 GiB) and deflates it with both,
alternating which goes first, then measures floors in the same guest: ``mmap`` +
``mlock`` of 1 GiB and nothing else, with 4 KiB pages (``guest_pin_floor_s``) and
with transparent huge pages, and the *design floor*: what uballoon's safety design
needs the guest kernel to do, in C with no agent (chunk files on a huge=within_size
tmpfs, sized, mapped, populated and mlocked, long-term pinned through a second
mapping as the holder does, frames read from pagemap).  Before every inflate and every
floor the guest touches 1.5 GiB and frees it, so the host backs its RAM.  A second
guest, booted with ``init_on_alloc=0``, repeats everything but the THP floor: it shows
how much of each figure is the guest kernel zeroing pages.

Freed host memory is the RAM file's allocated size (``st_blocks``) just before the
inflate minus just after it.  This machine is shared and noisy, so besides the wall
clock each figure comes as "uncontended" (wall minus the time QEMU's vCPU thread
waited, runnable, for a host CPU: /proc/.../schedstat sampled every 10 ms) and "vCPU"
(the CPU time that thread got).  The guest's clock is related to the host's by 50 TCP
pings over QEMU's user network (good to ~0.1 ms).

Where uballoon's time goes comes from both sides: the host's log (the bench starts
``uballoon-host`` through a small wrapper that stamps log lines and times every
``RamFiles.punch``), the agent's ``timings`` line (debug level; one line per
inflate or deflate: when each chunk was pinned, reported, answered, released, and
the pool's phase sums), and the guest's CPU per thread (agent, holder) from
/proc/.../schedstat inside the guest.

The last line is one JSON object (medians, plus every run's figures).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guest_agent.agent import DEFAULT_CHUNK_BYTES  # noqa: E402
from host_backend.ctl import ControlClient  # noqa: E402
from protocol.units import parse_size  # noqa: E402
from tests.vm.harness import GuestVM, skip_reason  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
GUEST = "bench"

# ---------------------------------------------------------------------------------------
# The guest-side C helper: the floor, the touch, the clock.

FLOOR_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

static double mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* A shared mapping of the file at a 2 MiB-aligned address (so tmpfs huge pages map). */
static char *map_file(int fd, size_t size)
{
    size_t align = 2UL << 20;
    char *raw = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    char *want = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
    char *p = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* What uballoon's design must do for SIZE bytes, in C and nothing else: per CHUNK, a
 * file on the tmpfs DIR (huge=within_size), sized, mapped, populated writable and
 * mlocked, long-term pinned through a second mapping (io_uring fixed buffer, as the
 * pin holder does), and its frames read from pagemap.  Prints
 * "pin_s release_s start end" like "pin". */
static int safe_floor(size_t size, size_t chunk, const char *dir)
{
    size_t n = size / chunk;
    int *rings = calloc(n, sizeof *rings);
    char **maps = calloc(n, sizeof *maps);
    uint64_t *entries = malloc(chunk / 4096 * 8);
    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (!rings || !maps || !entries || pagemap < 0)
        return 1;
    double w0 = wall(), t0 = mono();
    for (size_t i = 0; i < n; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/c%zu", dir, i);
        int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, chunk))
            return perror("chunk file"), 1;
        char *p = map_file(fd, chunk);
        if (!p)
            return perror("mmap"), 1;
        madvise(p, chunk, MADV_DONTDUMP);
        madvise(p, chunk, MADV_DONTFORK);
        if (mlock2(p, chunk, MLOCK_ONFAULT) || madvise(p, chunk, MADV_POPULATE_WRITE))
            return perror("lock"), 1;
        char *q = map_file(fd, chunk);
        struct io_uring_params params;
        memset(&params, 0, sizeof params);
        int ring = (int)syscall(__NR_io_uring_setup, 1, &params);
        struct iovec iov = {q, chunk};
        if (!q || ring < 0 || syscall(__NR_io_uring_register, ring, IORING_REGISTER_BUFFERS,
                                      &iov, 1))
            return perror("pin"), 1;
        munmap(q, chunk);
        if (pread(pagemap, entries, chunk / 4096 * 8, (off_t)((uintptr_t)p / 4096 * 8)) !=
            (ssize_t)(chunk / 4096 * 8))
            return perror("pagemap"), 1;
        close(fd);
        rings[i] = ring;
        maps[i] = p;
    }
    double t1 = mono(), w1 = wall();
    for (size_t i = n; i-- > 0;) {
        char path[512];
        snprintf(path, sizeof path, "%s/c%zu", dir, i);
        syscall(__NR_io_uring_register, rings[i], IORING_UNREGISTER_BUFFERS, NULL, 0);
        close(rings[i]);
        munmap(maps[i], chunk);
        unlink(path);
    }
    printf("%.6f %.6f %.6f %.6f\n", t1 - t0, mono() - t1, w0, w1);
    return 0;
}



/* floor now                 -> CLOCK_REALTIME
 * floor clock IP PORT N     -> N lines "guest_before host guest_after": the host answers
 *                              each 8-byte ping with its own clock (a double)
 * floor touch SIZE          -> write a byte per 4 KiB page of SIZE anonymous bytes, free
 * floor pin SIZE 4k|thp     -> "pin_s release_s start end": mmap + madvise + mlock,
 *                              munmap; start/end of the pin on CLOCK_REALTIME
 * floor safe SIZE CHUNK DIR -> the same for uballoon's design in C (safe_floor) */
int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "now")) {
        printf("%.6f\n", wall());
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "clock")) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &sa.sin_addr);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
            perror("connect");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (int i = 0; i < atoi(argv[4]); i++) {
            double before = wall(), host;
            if (write(fd, &before, 8) != 8 || read(fd, &host, 8) != 8)
                return 1;
            printf("%.6f %.6f %.6f\n", before, host, wall());
        }
        return 0;
    }
    if (argc < 3)
        return 2;
    size_t size = strtoull(argv[2], NULL, 10), align = 2UL << 20;
    if (!strcmp(argv[1], "safe") && argc == 5)
        return safe_floor(size, strtoull(argv[3], NULL, 10), argv[4]);
    if (!strcmp(argv[1], "touch")) {
        double t0 = mono();
        volatile char *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        for (size_t i = 0; i < size; i += 4096)
            p[i] = 1;
        munmap((void *)p, size);
        printf("%.6f\n", mono() - t0);
        return 0;
    }
    if (!strcmp(argv[1], "pin") && argc == 4) {
        int thp = !strcmp(argv[3], "thp");
        double w0 = wall(), t0 = mono();
        char *raw = mmap(NULL, size + align, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        char *p = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
        /* The Debian guest runs THP "always": 4 KiB pages must be asked for. */
        madvise(p, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        if (mlock(p, size)) {
            perror("mlock");
            return 1;
        }
        double t1 = mono(), w1 = wall();
        munmap(raw, size + align);
        printf("%.6f %.6f %.6f %.6f\n", t1 - t0, mono() - t1, w0, w1);
        return 0;
    }
    return 2;
}
"""

# The host backend, run through this wrapper: the same code, with log lines stamped
# with the wall clock and every punch timed (service.py is not ours to instrument).
HOST_WRAPPER = r"""
import logging, sys, time
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(created).6f %(name)s: %(message)s")
from host_backend import ramfile
_punch = ramfile.RamFiles.punch
_log = logging.getLogger("uballoon.bench")
def punch(self, pages):
    t0 = time.time()
    freed = _punch(self, pages)
    _log.debug("punch %d pages %d ranges %.6f %.6f", pages.num_pages, pages.num_ranges,
               t0, time.time())
    return freed
ramfile.RamFiles.punch = punch
from host_backend.cli import main
sys.exit(main(sys.argv[1:]))
"""

# The agent, with each log line stamped with the guest's wall clock.
AGENT_WRAPPER = r"""
import sys
from guest_agent import cli
class _Stamped(cli._Formatter):
    def format(self, record):
        return f"{record.created:.6f} " + super().format(record)
cli._Formatter = _Stamped
sys.exit(cli.main(sys.argv[1:]))
"""


def say(text: str) -> None:
    print(text, flush=True)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def gibps(size: int, seconds: float | None) -> str:
    return "-" if not seconds else f"{size / GiB / seconds:.2f} GiB/s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_floor_tool(work: Path) -> bytes:
    src = work / "floor.c"
    src.write_text(FLOOR_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench_vm_balloon: needs a C compiler (cc) for the guest's floor tool")
    subprocess.run([cc, "-O2", "-o", str(work / "floor"), str(src)], check=True)
    return (work / "floor").read_bytes()


def _vcpu_tids(qemu_pid: int) -> list[int]:
    """QEMU's vCPU threads (named "CPU n/TCG" with debug-threads=on)."""
    tids = []
    for tid in os.listdir(f"/proc/{qemu_pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{qemu_pid}/task/{tid}/comm").read_text().startswith("CPU "):
                tids.append(int(tid))
    return tids


class VcpuSampler:
    """Samples, every few milliseconds, how long the guest's vCPU thread has been on a
    host CPU and how long it has waited, runnable, for one (/proc/.../schedstat).
    ``between(a, b)`` interpolates both over any interval of the host's wall clock:
    a busy guest that waited W seconds of an interval of wall time T got T - W of
    work done; this shared machine took W away from it."""

    def __init__(self, qemu_pid: int, interval_s: float = 0.01) -> None:
        self._paths = [f"/proc/{qemu_pid}/task/{tid}/schedstat" for tid in _vcpu_tids(qemu_pid)]
        if not self._paths:
            raise SystemExit("bench_vm_balloon: no vCPU thread found in QEMU")
        self._interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vcpu-sampler", daemon=True)
        self._thread.start()

    def _read(self) -> tuple[float, float, float]:
        on_cpu = waited = 0.0
        for path in self._paths:
            with contextlib.suppress(OSError, ValueError):
                run_ns, wait_ns, _ = Path(path).read_text().split()
                on_cpu += int(run_ns) / 1e9
                waited += int(wait_ns) / 1e9
        return time.time(), on_cpu, waited

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())  # list.append is atomic under the GIL
            self._stop.wait(self._interval_s)

    def _at(self, t: float) -> tuple[float, float]:
        samples = self.samples
        times = [s[0] for s in samples]
        i = bisect.bisect_left(times, t)
        if i <= 0:
            return samples[0][1], samples[0][2]
        if i >= len(samples):
            return samples[-1][1], samples[-1][2]
        (ta, ca, wa), (tb, cb, wb) = samples[i - 1], samples[i]
        f = (t - ta) / (tb - ta) if tb > ta else 0.0
        return ca + f * (cb - ca), wa + f * (wb - wa)

    def between(self, start: float, end: float) -> tuple[float, float]:
        """(seconds on a CPU, seconds waiting) of the vCPU over [start, end] (host wall
        clock).  Waits for a sample after ``end`` first."""
        deadline = time.monotonic() + 1
        while self.samples[-1][0] < end and time.monotonic() < deadline:
            time.sleep(self._interval_s)
        c0, w0 = self._at(start)
        c1, w1 = self._at(end)
        return c1 - c0, w1 - w0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class Guest:
    """One booted VM, the floor tool inside it, its clock, and its vCPU sampled."""

    def __init__(self, vm: GuestVM, tool: bytes) -> None:
        self.vm = vm
        vm.write_file("/tmp/ub-floor", tool, mode=0o755)
        self.ram_file = vm.ram_files[0]
        self.offset_s, self.offset_error_s = self._clock_offset()
        self.cmdline = vm.run(["cat", "/proc/cmdline"], check=True).stdout.strip()
        self.sampler = VcpuSampler(vm.pid)

    def _clock_offset(self, pings: int = 50) -> tuple[float, float]:
        """(guest wall clock - host wall clock, its uncertainty): the guest pings a
        socket here over QEMU's user network; the round trip with the least delay
        brackets the host's answer."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            proc = self.vm.spawn(["/tmp/ub-floor", "clock", "10.0.2.2", str(port), str(pings)])
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(pings):
                    data = b""
                    while len(data) < 8:
                        more = conn.recv(8 - len(data))
                        if not more:
                            raise SystemExit("bench_vm_balloon: the guest's clock ping broke")
                        data += more
                    conn.sendall(struct.pack("d", time.time()))
            out = proc.wait(60)
        best = (float("inf"), 0.0)
        for line in out.stdout.split("\n"):
            if line.strip():
                before, host, after = map(float, line.split())
                best = min(best, (after - before, (before + after) / 2 - host))
        return best[1], best[0] / 2

    def to_host(self, guest_time: float) -> float:
        return guest_time - self.offset_s

    def touch(self, size: int = 1536 * MiB) -> float:
        """Touch ``size`` bytes of anonymous memory and free it (the host backs it)."""
        out = self.vm.run(["/tmp/ub-floor", "touch", str(size)], check=True, timeout_s=300)
        return float(out.stdout)

    def floor(self, size: int, huge: bool) -> dict[str, float]:
        out = self.vm.run(["/tmp/ub-floor", "pin", str(size), "thp" if huge else "4k"],
                          check=True, timeout_s=300).stdout.split()
        pin_s = float(out[0])
        cpu, waited = self.sampler.between(self.to_host(float(out[2])),
                                           self.to_host(float(out[3])))
        return {"pin_s": pin_s, "release_s": float(out[1]), "vcpu_s": cpu,
                "vcpu_waited_s": waited}

    def safe_floor(self, size: int, chunk: int) -> dict[str, float]:
        """The floor of uballoon's design (``safe`` in FLOOR_C): file-backed, long-term
        pinned, frames read; no agent, holder, protocol or host."""
        directory = "/run/ub-safe-floor"
        self.vm.run(
            f"mountpoint -q {directory} || {{ mkdir -p {directory} && mount -t tmpfs -o "
            f"mode=0700,huge=within_size,size={self.vm.memory_bytes} ub-floor {directory}; }}",
            check=True)
        out = self.vm.run(["/tmp/ub-floor", "safe", str(size), str(chunk), directory],
                          check=True, timeout_s=300).stdout.split()
        cpu, waited = self.sampler.between(self.to_host(float(out[2])),
                                           self.to_host(float(out[3])))
        return {"pin_s": float(out[0]), "release_s": float(out[1]), "vcpu_s": cpu,
                "vcpu_waited_s": waited}

    def close(self) -> None:
        self.sampler.stop()


# ---------------------------------------------------------------------------------------
# The kernel balloon


def kernel_cycle(guest: Guest, size: int, poll_s: float) -> dict[str, Any]:
    vm = guest.vm
    ram = vm.memory_bytes
    qmp = vm.qmp
    result: dict[str, Any] = {}
    for phase, value in (("inflate", ram - size), ("deflate", ram)):
        before = allocated(guest.ram_file)
        w0 = time.time()
        t0 = time.monotonic()
        qmp.execute("balloon", {"value": value})
        polls = 0
        while True:
            actual = qmp.execute("query-balloon")["actual"]
            polls += 1
            if actual == value:
                break
            if time.monotonic() - t0 > 300:
                raise SystemExit(f"kernel balloon: {phase} not done in 300 s (actual {actual})")
            time.sleep(poll_s)
        seconds = time.monotonic() - t0
        cpu, waited = guest.sampler.between(w0, w0 + seconds)
        qmp.events.clear()
        result[f"{phase}_s"] = seconds
        result[f"{phase}_vcpu_s"] = cpu
        result[f"{phase}_vcpu_waited_s"] = waited
        result[f"{phase}_polls"] = polls
        if phase == "inflate":
            result["freed_bytes"] = before - allocated(guest.ram_file)
    return result


# ---------------------------------------------------------------------------------------
# uballoon


class Host:
    """uballoon-host (through HOST_WRAPPER) with a control socket."""

    def __init__(self, work: Path, vm: GuestVM, key: Path) -> None:
        self.work = work
        self.port = free_port()
        self.control = work / "control.sock"
        regions = ", ".join(
            f'{{ start = {r.guest_phys_start}, length = {r.size_bytes}, file = "{r.path}", '
            f"offset = {r.file_offset} }}"
            for r in vm.ram_map
        )
        (work / "host.toml").write_text(
            f'[guest.{GUEST}]\nmax = "{vm.memory_bytes}"\nmin = "256M"\n'
            f'key_file = "{key}"\nram = [ {regions} ]\n'
        )
        self.log_path = work / "host.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.ctl: ControlClient | None = None
        self.watch: ControlClient | None = None
        self._snapshots: Any = None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOST_WRAPPER,
             "--listen", f"tcp:127.0.0.1:{self.port}", "--config", str(work / "host.toml"),
             "--control", str(self.control), "--capacity", "64G", "--log-level", "debug"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait(lambda: self.control.exists(), "the host's control socket", 30)
            self.ctl = ControlClient(str(self.control))
        except BaseException:
            self.stop()
            raise

    def _wait(self, predicate: Any, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None:
                raise SystemExit(f"uballoon-host exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.log_path}")
            time.sleep(0.05)

    def guest(self) -> dict[str, Any]:
        return self.ctl.request("guest", name=GUEST)  # type: ignore[no-any-return]

    def start_watch(self) -> None:
        self.watch = ControlClient(str(self.control), timeout_s=300)
        self._snapshots = self.watch.stream("watch", name=GUEST, min_interval_s=0)

    def set_and_wait(self, keep_bytes: int, timeout_s: float = 300) -> tuple[float, float, dict]:
        """Set the target; wait until the watch shows actual at it.  Returns (time the
        request was sent, time the watch showed it reached, the last snapshot)."""
        t0 = time.time()
        self.ctl.request("set", name=GUEST, size=keep_bytes)
        deadline = time.monotonic() + timeout_s
        while True:
            snap = next(self._snapshots)
            now = time.time()
            if snap["actual_bytes"] == keep_bytes and snap["target_bytes"] == keep_bytes:
                return t0, now, snap
            if time.monotonic() > deadline:
                raise SystemExit(f"uballoon: target {keep_bytes} not reached: {snap}")

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        for client in (self.watch, self.ctl):
            if client is not None:
                with contextlib.suppress(OSError):
                    client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bench dies, however it dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Agent:
    """uballoon-guest in the VM (through AGENT_WRAPPER), debug log captured."""

    def __init__(self, guest: Guest, host: Host, extra_args: list[str],
                 root: Path | None = None) -> None:
        vm = guest.vm
        self.guest = guest
        # ``root``: another copy of the project for the agent and its holder (the holder
        # imports the package the agent was imported from).
        env = {"PYTHONPATH": str(root)} if root is not None else None
        self.timings_seen = True  # until an inflate shows this agent writes none
        self.proc = vm.spawn([
            vm.python_executable, "-c", AGENT_WRAPPER,
            "--connect", f"tcp:10.0.2.2:{host.port}", "--name", GUEST,
            "--key-file", vm.fw_cfg_path("bench-key"), "--log-level", "debug", *extra_args,
        ], env=env, cwd="/")
        deadline = time.monotonic() + 120
        while True:
            self.proc.poll()
            g = host.guest()
            if g["connected"] and g["authenticated"] and g["stable"] and g["reclaim"] == "punch":
                break
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise SystemExit(f"the agent did not connect as wanted: {g}\n{self.proc.stderr}")
            time.sleep(0.1)

    def lines(self) -> list[tuple[float, str]]:
        """(host time, message) for every stamped log line so far."""
        self.proc.poll()
        out = []
        for line in self.proc.stderr.splitlines():
            stamp, _, message = line.partition(" ")
            try:
                out.append((self.guest.to_host(float(stamp)), message))
            except ValueError:
                continue
        return out

    def cpu(self) -> dict[str, float]:
        """Guest CPU seconds so far (guest clock: a host preemption counts as run time):
        the agent's trio thread, its worker threads, the pin holder, and the whole
        guest busy and idle (/proc/stat)."""
        script = (
            f"for f in /proc/{self.proc.pid}/task/*/schedstat; do echo \"$f $(cat $f)\"; done; "
            f"h=$(cat /run/uballoon/{GUEST}/holder.pid 2>/dev/null); "
            "[ -n \"$h\" ] && for f in /proc/$h/task/*/schedstat; do echo \"holder $(cat $f)\"; "
            "done; head -1 /proc/stat"
        )
        out = self.guest.vm.run(script, check=True).stdout
        result = {"agent_main_s": 0.0, "agent_workers_s": 0.0, "holder_s": 0.0}
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "cpu":
                ticks = [int(v) / os.sysconf("SC_CLK_TCK") for v in parts[1:]]
                result["guest_idle_s"] = ticks[3] + ticks[4]
                result["guest_busy_s"] = sum(ticks) - ticks[3] - ticks[4]
            elif parts and parts[0] == "holder":
                result["holder_s"] += int(parts[1]) / 1e9
            elif len(parts) == 4:
                tid = parts[0].split("/")[4]
                key = "agent_main_s" if tid == str(self.proc.pid) else "agent_workers_s"
                result[key] += int(parts[1]) / 1e9
        return result

    def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.signal(signal.SIGTERM)
                self.proc.wait(60)


_TIMINGS_RE = re.compile(r"timings (\{.*\})\s*$")
_PUNCH_RE = re.compile(r"punch (\d+) pages (\d+) ranges ([\d.]+) ([\d.]+)")


def uballoon_cycle(guest: Guest, host: Host, agent: Agent, size: int) -> dict[str, Any]:
    vm = guest.vm
    ram = vm.memory_bytes
    result: dict[str, Any] = {}
    for phase, keep in (("inflate", ram - size), ("deflate", ram)):
        before = allocated(guest.ram_file)
        host_lines_before = len(host.log_lines())
        agent_lines_before = len(agent.lines())
        cpu_before = agent.cpu()
        t0, t1, snap = host.set_and_wait(keep)
        cpu, waited = guest.sampler.between(t0, t1)
        result[f"{phase}_s"] = t1 - t0
        result[f"{phase}_vcpu_s"] = cpu
        result[f"{phase}_vcpu_waited_s"] = waited
        if phase == "inflate":
            result["freed_bytes"] = before - allocated(guest.ram_file)
            result["host_freed_bytes"] = snap["freed_bytes"]
        # The agent's timings line for this phase travels through the harness's
        # command channel: wait for it (a few seconds at most).
        deadline = time.monotonic() + (5 if agent.timings_seen else 1)
        while time.monotonic() < deadline:
            lines = agent.lines()[agent_lines_before:]
            if any(_TIMINGS_RE.search(m) for _, m in lines):
                break
            time.sleep(0.05)
        agent.timings_seen = any(_TIMINGS_RE.search(m) for _, m in lines)
        cpu_after = agent.cpu()
        phase_info = phases(phase, t0, t1, host.log_lines()[host_lines_before:], lines)
        # Guest CPU while the agent worked (from before the target was set until after
        # it was reached, so a little more than the interval itself).
        phase_info["guest_cpu_s"] = {
            k: round(cpu_after[k] - cpu_before.get(k, 0.0), 4) for k in cpu_after
        }
        result[f"{phase}_phases"] = phase_info
    return result


def phases(kind: str, t0: float, t1: float, host_lines: list[str],
           agent_lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Where one inflate's or deflate's time went, from both sides' logs.

    The agent logs, at debug level, one ``timings {...}`` line when the balloon
    reaches its target: seconds since the target arrived for every chunk pinned or
    released and every report sent or answered, and the pool's phase sums.  The
    line's own stamp (guest clock, aligned to the host's) anchors those offsets.
    """
    out: dict[str, Any] = {}
    timing = None
    for stamp, message in agent_lines:
        m = _TIMINGS_RE.search(message)
        if m:
            timing = (stamp, json.loads(m.group(1)))
    if timing is not None:
        stamp, tm = timing
        arrived = stamp - tm["took_s"]  # host clock
        out["target_delivery_s"] = arrived - t0
        out["guest_busy_s"] = tm["took_s"]
        if tm["chunks_pinned"]:
            out["chunks"] = tm["chunks_pinned"]
            out["first_pin_started_after_s"] = tm["first_pin_s"]
            out["guest_pin_s"] = sum(tm["pin_phases_s"].values())
            out["guest_pin_phases_s"] = tm["pin_phases_s"]
            out["guest_not_pinning_s"] = tm["took_s"] - out["guest_pin_s"] - tm["first_pin_s"]
            out["last_chunk_pinned_to_target_s"] = tm["took_s"] - tm["pinned_s"][-1]
        if tm["sent_s"]:
            out["reports"] = len(tm["sent_s"])
            out["last_report_sent_to_answered_s"] = (
                max(tm["answered_s"]) - max(tm["sent_s"]) if tm["answered_s"] else None)
        if tm["chunks_released"]:
            out["chunks_released"] = tm["chunks_released"]
            out["guest_release_s"] = sum(tm["release_phases_s"].values())
            out["guest_release_phases_s"] = tm["release_phases_s"]
            out["first_release_done_s"] = min(tm["released_s"])
        out["guest_at_target_to_host_saw_it_s"] = t1 - stamp
    punches = []
    for line in host_lines:
        m = _PUNCH_RE.search(line)
        if m:
            punches.append((int(m.group(1)), int(m.group(2)), float(m.group(3)),
                            float(m.group(4))))
    if punches:
        out["host_punches"] = len(punches)
        out["host_punch_s"] = sum(end - start for _, _, start, end in punches)
        out["host_punch_ranges"] = sum(r for _, r, _, _ in punches)
        out["last_punch_end_to_host_saw_target_s"] = t1 - max(end for *_, end in punches)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# The runs


def boot(work: Path, key: Path | None, extra_cmdline: list[str]) -> GuestVM:
    fw_cfg = {"bench-key": key} if key is not None else {}
    return GuestVM(memory="2G", fw_cfg=fw_cfg, extra_cmdline=extra_cmdline)


def run_guest(args: argparse.Namespace, work: Path, tool: bytes, key: Path,
              extra_cmdline: list[str], floors: tuple[str, ...]) -> dict[str, Any]:
    """Boot one guest and measure: the kernel balloon and uballoon alternately (each
    inflates 1 GiB and deflates it), then the ``floors`` ("4k", "thp", "safe"), each
    after touching and freeing the guest's memory."""
    size = GiB
    reps = 1 if args.quick else args.reps
    runs: dict[str, list[dict[str, Any]]] = {"kernel": [], "uballoon": [], "floor_4k": [],
                                              "floor_thp": [], "floor_safe": []}
    chunk = parse_size(args.chunk) if args.chunk else DEFAULT_CHUNK_BYTES
    agent_args = [*args.agent_arg] + ([f"--chunk={args.chunk}"] if args.chunk else [])
    with contextlib.ExitStack() as stack:
        vm = stack.enter_context(boot(work, key, extra_cmdline))
        guest = Guest(vm, tool)
        stack.callback(guest.close)
        say(f"guest kernel command line: {guest.cmdline}")
        say(f"guest clock - host clock: {guest.offset_s:+.4f}s "
            f"(+-{guest.offset_error_s:.4f}s)")
        host = Host(work, vm, key)
        stack.callback(host.stop)
        host.ctl.request("set", name=GUEST, size=vm.memory_bytes)
        agent = Agent(guest, host, agent_args,
                      Path(args.agent_root).resolve() if args.agent_root else None)
        stack.callback(agent.stop)
        if args.keep_logs:
            label = "-".join(extra_cmdline) or "default"
            stack.callback(keep_logs, Path(args.keep_logs) / label, host, agent)
        host.start_watch()
        host.set_and_wait(vm.memory_bytes)
        for rep in range(reps):
            order = ["kernel", "uballoon"] if rep % 2 == 0 else ["uballoon", "kernel"]
            for who in order:
                touch_s = guest.touch()
                if who == "kernel":
                    r = kernel_cycle(guest, size, args.poll_ms / 1000)
                else:
                    r = uballoon_cycle(guest, host, agent, size)
                r["touch_s"] = touch_s
                r["rep"] = rep
                runs[who].append(r)
                say(f"rep {rep + 1}/{reps} {who:8s}: inflate {fmt_s(r['inflate_s'])} "
                    f"(vCPU ran {r['inflate_vcpu_s']:.2f}s, waited "
                    f"{r['inflate_vcpu_waited_s']:.2f}s), deflate {fmt_s(r['deflate_s'])}, "
                    f"freed {r['freed_bytes'] / MiB:.0f} MiB")
            for kind in floors:
                guest.touch()
                f = guest.safe_floor(size, chunk) if kind == "safe" else guest.floor(
                    size, kind == "thp")
                f["rep"] = rep
                runs[f"floor_{kind}"].append(f)
                say(f"rep {rep + 1}/{reps} floor {kind:4s}: {fmt_s(f['pin_s'])} (vCPU ran "
                    f"{f['vcpu_s']:.2f}s, waited {f['vcpu_waited_s']:.2f}s), release "
                    f"{fmt_s(f['release_s'])}")
        return {"runs": runs, "cmdline": guest.cmdline}


def main_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tool = build_floor_tool(work)
    key = work / "bench.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    say("== the guest: 2 GiB, pc, TCG, one vCPU, RAM from a shared file on /dev/shm")
    main = run_guest(args, work, tool, key, [], ("4k", "thp", "safe"))
    ioa0: dict[str, Any] = {"runs": {"kernel": [], "uballoon": [], "floor_4k": [],
                                     "floor_safe": []}, "cmdline": None}
    if not args.no_init_on_alloc_0:
        say("== the same guest booted with init_on_alloc=0")
        ioa0 = run_guest(args, work, tool, key, ["init_on_alloc=0"], ("4k", "safe"))
    return {"runs": main["runs"], "ioa0": ioa0["runs"], "cmdline": main["cmdline"],
            "ioa0_cmdline": ioa0["cmdline"], "size": GiB}


def keep_logs(directory: Path, host: Host, agent: Agent | None) -> None:
    """Copy the host's log (and the agent's, stamped with host time) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.copy(host.log_path, directory / "host.log")
    if agent is not None:
        with contextlib.suppress(Exception):
            (directory / "agent.log").write_text(
                "".join(f"{t:.6f} {m}\n" for t, m in agent.lines()))


def _derive(rows: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> None:
    """Add ``<key>_uncontended_s``: wall time minus the time the vCPU waited for a host
    CPU (the share of the wall clock this shared machine took away from the guest)."""
    for row in rows:
        for key, waited in pairs:
            if row.get(key) is not None and row.get(waited) is not None:
                row[key.removesuffix("_s") + "_uncontended_s"] = row[key] - row[waited]


def report(data: dict[str, Any]) -> dict[str, Any]:
    runs, ioa0, size = data["runs"], data["ioa0"], data["size"]

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        return median([r.get(key) for r in rows])

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    k, u = runs["kernel"], runs["uballoon"]
    f4, fh, fs = runs["floor_4k"], runs["floor_thp"], runs["floor_safe"]
    for rows in (k, u, ioa0["kernel"], ioa0["uballoon"]):
        _derive(rows, [("inflate_s", "inflate_vcpu_waited_s"),
                       ("deflate_s", "deflate_vcpu_waited_s")])
    for rows in (f4, fh, fs, ioa0["floor_4k"], ioa0["floor_safe"]):
        _derive(rows, [("pin_s", "vcpu_waited_s")])
    summary: dict[str, Any] = {
        "kernel_inflate_s": med(k, "inflate_s"),
        "uballoon_inflate_s": med(u, "inflate_s"),
        "inflate_ratio": None,
        "guest_pin_floor_s": med(f4, "pin_s"),
        "guest_pin_floor_thp_s": med(fh, "pin_s"),
        "kernel_deflate_s": med(k, "deflate_s"),
        "uballoon_deflate_s": med(u, "deflate_s"),
        "kernel_freed_bytes": med(k, "freed_bytes"),
        "uballoon_freed_bytes": med(u, "freed_bytes"),
        "design_floor_s": med(fs, "pin_s"),
    }
    # The same figures by the two contention-proof measures.
    for measure, inflate_key, floor_key, deflate_key in (
        ("uncontended", "inflate_uncontended_s", "pin_uncontended_s", "deflate_uncontended_s"),
        ("vcpu", "inflate_vcpu_s", "vcpu_s", "deflate_vcpu_s"),
    ):
        summary[f"kernel_inflate_{measure}_s"] = med(k, inflate_key)
        summary[f"uballoon_inflate_{measure}_s"] = med(u, inflate_key)
        summary[f"guest_pin_floor_{measure}_s"] = med(f4, floor_key)
        summary[f"guest_pin_floor_thp_{measure}_s"] = med(fh, floor_key)
        summary[f"design_floor_{measure}_s"] = med(fs, floor_key)
        summary[f"kernel_deflate_{measure}_s"] = med(k, deflate_key)
        summary[f"uballoon_deflate_{measure}_s"] = med(u, deflate_key)
    for measure in ("", "_uncontended", "_vcpu"):
        ki = summary[f"kernel_inflate{measure}_s"]
        ui = summary[f"uballoon_inflate{measure}_s"]
        summary[f"inflate_ratio{measure}"] = div(ki, ui)
        summary[f"uballoon_over_floor{measure}"] = div(ui, summary[f"guest_pin_floor{measure}_s"])
        summary[f"uballoon_over_floor_thp{measure}"] = div(
            ui, summary[f"guest_pin_floor_thp{measure}_s"])
        summary[f"uballoon_over_design_floor{measure}"] = div(
            ui, summary[f"design_floor{measure}_s"])
        summary[f"design_floor_over_floor{measure}"] = div(
            summary[f"design_floor{measure}_s"], summary[f"guest_pin_floor{measure}_s"])
        summary[f"deflate_ratio{measure}"] = div(summary[f"kernel_deflate{measure}_s"],
                                                 summary[f"uballoon_deflate{measure}_s"])
    summary["uballoon_freed_of_kernel"] = div(summary["uballoon_freed_bytes"],
                                              summary["kernel_freed_bytes"])
    if ioa0["kernel"]:
        summary["kernel_init_on_alloc_0_inflate_s"] = med(ioa0["kernel"], "inflate_s")
        summary["kernel_init_on_alloc_0_inflate_uncontended_s"] = med(
            ioa0["kernel"], "inflate_uncontended_s")
        summary["kernel_init_on_alloc_0_inflate_vcpu_s"] = med(ioa0["kernel"], "inflate_vcpu_s")
        summary["kernel_init_on_alloc_0_deflate_s"] = med(ioa0["kernel"], "deflate_s")
        summary["kernel_init_on_alloc_0_freed_bytes"] = med(ioa0["kernel"], "freed_bytes")
        summary["guest_pin_floor_init_on_alloc_0_s"] = med(ioa0["floor_4k"], "pin_s")
        summary["guest_pin_floor_init_on_alloc_0_uncontended_s"] = med(
            ioa0["floor_4k"], "pin_uncontended_s")
        summary["guest_pin_floor_init_on_alloc_0_vcpu_s"] = med(ioa0["floor_4k"], "vcpu_s")
        summary["design_floor_init_on_alloc_0_s"] = med(ioa0["floor_safe"], "pin_s")
        summary["design_floor_init_on_alloc_0_vcpu_s"] = med(ioa0["floor_safe"], "vcpu_s")
        summary["uballoon_init_on_alloc_0_inflate_s"] = med(ioa0["uballoon"], "inflate_s")
        summary["uballoon_init_on_alloc_0_inflate_vcpu_s"] = med(ioa0["uballoon"],
                                                                 "inflate_vcpu_s")
        summary["uballoon_init_on_alloc_0_deflate_s"] = med(ioa0["uballoon"], "deflate_s")
        summary["uballoon_init_on_alloc_0_freed_bytes"] = med(ioa0["uballoon"], "freed_bytes")

    say("")
    say(f"guest kernel command line: {data['cmdline']}")
    if data["ioa0_cmdline"]:
        say(f"second guest:              {data['ioa0_cmdline']}")
    say("")
    say("medians; 'uncontended' = wall minus the time the guest's vCPU thread waited for a "
        "host CPU; 'vCPU' = CPU time the vCPU thread got")
    rows = [("1 GiB", "inflate", "GiB/s", "uncontended", "vCPU", "deflate", "GiB/s",
             "uncontended", "host freed")]

    def row(name: str, rs: list[dict[str, Any]]) -> tuple[str, ...]:
        return (
            name, fmt_s(med(rs, "inflate_s")), gibps(size, med(rs, "inflate_s")),
            fmt_s(med(rs, "inflate_uncontended_s")), fmt_s(med(rs, "inflate_vcpu_s")),
            fmt_s(med(rs, "deflate_s")), gibps(size, med(rs, "deflate_s")),
            fmt_s(med(rs, "deflate_uncontended_s")),
            f"{(med(rs, 'freed_bytes') or 0) / MiB:.0f} MiB",
        )

    def floor_row(name: str, rs: list[dict[str, Any]]) -> tuple[str, ...]:
        return (name, fmt_s(med(rs, "pin_s")), gibps(size, med(rs, "pin_s")),
                fmt_s(med(rs, "pin_uncontended_s")), fmt_s(med(rs, "vcpu_s")), "", "", "", "")

    rows.append(row("kernel virtio-balloon", k))
    rows.append(row("uballoon", u))
    rows.append(floor_row("floor: mmap+mlock, 4 KiB", f4))
    rows.append(floor_row("floor: mmap+mlock, THP", fh))
    rows.append(floor_row("design floor (C, no agent)", fs))
    if ioa0["kernel"]:
        rows.append(row("kernel, init_on_alloc=0", ioa0["kernel"]))
        rows.append(row("uballoon, init_on_alloc=0", ioa0["uballoon"]))
        rows.append(floor_row("floor 4 KiB, init_on_alloc=0", ioa0["floor_4k"]))
        rows.append(floor_row("design floor, init_on_alloc=0", ioa0["floor_safe"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, cells in enumerate(rows):
        say("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
        if n == 0:
            say("  " + "  ".join("-" * w for w in widths))
    say("")

    def ratio(text: str, key: str) -> None:
        cells = []
        for measure in ("", "_uncontended", "_vcpu"):
            value = summary[f"{key}{measure}"]
            cells.append("-" if value is None else f"{value:.2f}x")
        say(f"  {text:52s} {cells[0]:>7s} {cells[1]:>12s} {cells[2]:>7s}")

    say(f"  {'':52s} {'wall':>7s} {'uncontended':>12s} {'vCPU':>7s}")
    ratio("inflate: kernel time / uballoon time (goal >= 1.4)", "inflate_ratio")
    ratio("inflate: uballoon / 4 KiB floor (goal <= 1.15)", "uballoon_over_floor")
    ratio("inflate: uballoon / THP floor", "uballoon_over_floor_thp")
    ratio("inflate: design floor / 4 KiB floor", "design_floor_over_floor")
    ratio("inflate: uballoon / design floor", "uballoon_over_design_floor")
    ratio("deflate: kernel time / uballoon time (goal >= 1.0)", "deflate_ratio")
    freed = summary["uballoon_freed_of_kernel"]
    say(f"  host memory freed, uballoon / kernel (goal 1.0): "
        f"{'-' if freed is None else f'{freed:.3f}'}")

    # Where uballoon's time goes: medians of each phase over the runs.
    for label, rows_u, prefix in (("", u, "uballoon"),
                                  (", init_on_alloc=0", ioa0["uballoon"],
                                   "uballoon_init_on_alloc_0")):
        if not rows_u:
            continue
        say("")
        say(f"where uballoon's time goes{label} (medians over runs; phases in the guest's "
            "wall time, which also runs while the host preempts the vCPU)")
        for kind in ("inflate", "deflate"):
            ph = [r[f"{kind}_phases"] for r in rows_u if r.get(f"{kind}_phases")]
            if not ph:
                continue
            say(f"  {kind} {fmt_s(med(rows_u, f'{kind}_s'))} (vCPU ran "
                f"{fmt_s(med(rows_u, f'{kind}_vcpu_s'))}):")
            keys: list[str] = []
            for p in ph:
                keys += [key for key in p if key not in keys]
            breakdown: dict[str, Any] = {}
            for key in keys:
                values = [p[key] for p in ph if p.get(key) is not None]
                if not values:
                    continue
                if isinstance(values[0], dict):
                    sub = {name: median([v.get(name) for v in values]) for name in values[0]}
                    breakdown[key] = sub
                    say(f"    {key:36s} " + ", ".join(
                        f"{n} {v:.3f}s" for n, v in sub.items() if v is not None))
                else:
                    breakdown[key] = median(values)
                    if key.endswith("_s"):
                        say(f"    {key:36s} {breakdown[key]:.3f}s")
                    else:
                        say(f"    {key:36s} {breakdown[key]:g}")
            summary[f"{prefix}_{kind}_phases"] = breakdown
    summary["runs"] = data["runs"]
    summary["init_on_alloc_0_runs"] = data["ioa0"]
    summary["guest_cmdline"] = data["cmdline"]
    summary["guest_cmdline_init_on_alloc_0"] = data["ioa0_cmdline"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--poll-ms", type=float, default=10.0,
                        help="query-balloon polling interval for the kernel (default 10)")
    parser.add_argument("--no-init-on-alloc-0", action="store_true",
                        help="skip the second guest booted with init_on_alloc=0")
    parser.add_argument("--chunk", metavar="SIZE",
                        help="the agent's --chunk (default: the agent's own default); the "
                        "design floor uses the same size")
    parser.add_argument("--agent-root", metavar="DIR",
                        help="run the agent from this copy of the project instead (to compare "
                        "versions; it must be inside the project directory, which the guest "
                        "sees, and hold a built native/_native*.so)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy the host's and the agent's logs into DIR")
    parser.add_argument("--agent-arg", action="append", default=[],
                        help="extra argument for uballoon-guest (repeatable), e.g. "
                        "--agent-arg=--chunk=128M")
    args = parser.parse_args()
    why = skip_reason()
    if why is not None:
        print(f"bench_vm_balloon: cannot boot a guest here: {why}", file=sys.stderr)
        return 1

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every with/finally below

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    work = Path(tempfile.mkdtemp(prefix="uballoon-bench-"))
    try:
        data = main_run(args, work)
        summary = report(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, sort_keys=False, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
