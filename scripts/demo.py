"""The main job, on one machine: a host backend and a guest, the balloon inflating and
deflating with progress, and a table of what the host got back.

Where QEMU and a kernel can be had, the guest is a real Linux VM (TCG) whose RAM is a
file on /dev/shm that uballoon-host punches holes in; otherwise the agent runs here,
as a local process, and the host only accounts (it cannot reach this machine's RAM).

Run it through ``bash scripts/demo.sh`` (which sets everything up first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.units import format_size, parse_size  # noqa: E402

BIN = Path(sys.executable).parent
GIB = 1 << 30


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """A uballoon-host process and uballoonctl against it."""

    def __init__(self, work: Path, config: str, listen: str) -> None:
        self.work = work
        self.control = work / "control.sock"
        (work / "host.toml").write_text(config)
        self.log = open(work / "host.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(BIN / "uballoon-host"), "--listen", listen,
                "--config", str(work / "host.toml"),
                "--control", str(self.control), "--qmp-dir", str(work / "qmp"),
                "--policy-interval", "1", "--stats-interval", "1",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait(lambda: self.control.exists(), "the host's control socket", 30)

    def wait(self, predicate, what: str, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None:
                raise SystemExit(f"uballoon-host exited; see {self.work / 'host.log'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.work / 'host.log'}")
            time.sleep(0.1)

    def ctl(self, *args: str, show: bool = False) -> str:
        cmd = [str(BIN / "uballoonctl"), "--control", str(self.control), *args]
        if show:
            subprocess.run(cmd, check=True)
            return ""
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def guest(self, name: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.ctl("--json", "guest", name))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(cell.rjust(w) if i else cell.ljust(w)
                              for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def vm_demo(work: Path, keep_bytes: int) -> None:
    from tests.vm.harness import GuestVM

    key = work / "demo.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    port = free_port()
    say("booting a 2 GiB Linux guest under QEMU (its RAM is a file on /dev/shm)")
    with GuestVM(memory="2G", fw_cfg={"demo-key": key}) as vm:
        print(f"  guest kernel command line: {vm.cmdline}")
        ram_file = vm.ram_files[0]
        regions = ", ".join(
            f'{{ start = {r.guest_phys_start}, length = {r.size_bytes}, file = "{r.path}", '
            f"offset = {r.file_offset} }}"
            for r in vm.ram_map
        )
        host = Host(work, f"""
[guest.demo]
max = "2G"
min = "256M"
key_file = "{key}"
ram = [ {regions} ]
""", f"tcp:127.0.0.1:{port}")
        try:
            host.ctl("set", "demo", "2G")  # the operator decides in this demo, not the policy
            say("the guest touches 1.5 GiB and frees it again, so the host backs its RAM")
            vm.python("b = bytearray(1536 << 20); b[::4096] = b'x' * len(b[::4096]); del b")
            allocated_before = os.stat(ram_file).st_blocks * 512
            print(f"  RAM file {ram_file}: {format_size(allocated_before)} allocated on the host")

            say("starting uballoon-guest inside the guest (authenticated with a key via fw_cfg)")
            agent = vm.spawn([
                str(BIN / "uballoon-guest"), "--connect", f"tcp:10.0.2.2:{port}",
                "--name", "demo", "--key-file", vm.fw_cfg_path("demo-key"),
            ])
            host.wait(lambda: host.guest("demo")["connected"], "the guest to connect", 60)
            g = host.guest("demo")
            print(f"  connected: authenticated={g['authenticated']} stable frames={g['stable']} "
                  f"reclaim={g['reclaim']}")
            rows = [("step", "guest keeps", "balloon", "host freed", "RAM file on host", "time")]
            rows.append(("start", format_size(g["actual_bytes"]), format_size(g["ballooned_bytes"]),
                         format_size(g["freed_bytes"]), format_size(allocated_before), "-"))

            say(f"inflate: uballoonctl set demo {format_size(keep_bytes)} --wait")
            t = time.monotonic()
            host.ctl("set", "demo", format_size(keep_bytes), "--wait", "--timeout", "300",
                     show=True)
            inflate_s = time.monotonic() - t
            g = host.guest("demo")
            allocated = os.stat(ram_file).st_blocks * 512
            rows.append(("inflated", format_size(g["actual_bytes"]),
                         format_size(g["ballooned_bytes"]), format_size(g["freed_bytes"]),
                         format_size(allocated), f"{inflate_s:.1f}s"))
            host.ctl("status", show=True)

            say("deflate: uballoonctl set demo 2G --wait")
            t = time.monotonic()
            host.ctl("set", "demo", "2G", "--wait", "--timeout", "300", show=True)
            deflate_s = time.monotonic() - t
            g = host.guest("demo")
            rows.append(("deflated", format_size(g["actual_bytes"]),
                         format_size(g["ballooned_bytes"]), format_size(g["freed_bytes"]),
                         format_size(os.stat(ram_file).st_blocks * 512), f"{deflate_s:.1f}s"))

            say("what the host got back")
            table(rows)
            dropped = allocated_before - allocated
            print(f"\n  the RAM file shrank by {format_size(dropped)} while the balloon held "
                  f"{format_size(2 * GIB - keep_bytes)} ({100 * dropped / (2 * GIB - keep_bytes):.0f}%)")
            agent.signal(signal.SIGTERM)
            agent.wait(60)
        finally:
            host.stop()


def local_demo(work: Path, balloon_bytes: int, why: str) -> None:
    say(f"no VM here ({why}): the agent runs on this machine; the host only accounts")
    sock = work / "guests.sock"
    host = Host(work, 'unknown_guests = "account"\n', f"unix:{sock}")
    state = Path(tempfile.mkdtemp(prefix="uballoon-demo-state-", dir="/dev/shm"))
    agent = subprocess.Popen(
        [str(BIN / "uballoon-guest"), "--connect", f"unix:{sock}", "--name", "demo",
         "--state-dir", str(state)],
        stdout=open(work / "agent.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        host.wait(lambda: "demo" in host.ctl("status"), "the agent to connect", 60)
        host.wait(lambda: host.guest("demo")["connected"], "the agent to connect", 60)
        ram = host.guest("demo")["ram_bytes"]
        keep = max(0, ram - balloon_bytes)
        say(f"inflate a {format_size(balloon_bytes)} balloon: uballoonctl set demo "
            f"{format_size(keep)} --wait")
        host.ctl("set", "demo", str(keep), "--wait", "--timeout", "300", show=True)
        host.ctl("status", show=True)
        say("deflate: uballoonctl set demo auto, then keep all of it")
        host.ctl("set", "demo", str(ram), "--wait", "--timeout", "300", show=True)
        host.ctl("status", show=True)
    finally:
        agent.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(60)
        if agent.poll() is None:
            agent.kill()
        host.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="1G", help="memory the VM guest keeps (default 1G)")
    parser.add_argument("--local", action="store_true", help="skip the VM; run the agent here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uballoon-demo-"))
    print(f"working directory (logs, sockets): {work}")
    from tests.vm.harness import skip_reason

    why = "asked with --local" if args.local else skip_reason()
    if why is None:
        vm_demo(work, parse_size(args.keep))
    else:
        local_demo(work, 512 << 20, why)
    print(f"\nlogs: {work}/host.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
