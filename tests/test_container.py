"""The agent in a container: a memory-limited cgroup with its own PID and network
namespaces, connected to the host backend over a ``unix:`` socket.

It runs inside a throw-away VM, host backend included, rather than on this machine:
the VM's kernel offers cgroup v2 with the memory controller (``memory.max``, a
per-cgroup ``memory.pressure`` the agent arms its PSI trigger on) — what container
runtimes use today — whereas this machine's memory controller is cgroup v1 only (which
tests/agent/ already covers); and a test that creates cgroups, namespaces and tmpfs
mounts leaves nothing behind on the machine running it.  A new network namespace cannot
reach the host's loopback, and a Unix socket cannot cross a VM's boundary, so the
container and ``uballoon-host`` share one kernel, as they would in production.

What it shows: the host sees the container's limit as the guest's memory (statistics:
total = the limit, available within it, the cgroup flag set), serves it for accounting
only, and the agent inflates to a target and deflates again, the balloon being charged
to the container's cgroup; then everything stops and the cgroup is removed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

from tests.vm.harness import GuestProcess, GuestVM, skip_reason
from tests.vm.helpers import MIB, Laps, fmt, wait_output

pytestmark = pytest.mark.vm

NAME = "ct1"
LIMIT = 512 * MIB
BALLOON = 256 * MIB
CGROUP = f"/sys/fs/cgroup/{NAME}"
RUN = "/run/ubh"
HOST_SOCKET = f"{RUN}/host.sock"
CONTROL = f"{RUN}/control.sock"

# argv: control socket, guest name, a Python condition over ``g`` (the GUEST).  Follows
# the guest on the control socket's watch stream until the condition holds, then prints
# {"guest": GUEST, "stats": {name: value}}.  Standard library only (fast to start).
WATCH_PY = r"""
import json, socket, sys
path, name, condition = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.settimeout(240)
s.connect(path)
f = s.makefile("rwb")
f.write(json.dumps({"cmd": "watch", "name": name, "min_interval_s": 0.05}).encode() + b"\n")
f.flush()
while True:
    reply = json.loads(f.readline())
    assert reply["ok"], reply
    g = reply["result"]
    if eval(condition):
        break
s2 = socket.socket(socket.AF_UNIX)
s2.connect(path)
s2.sendall(json.dumps({"cmd": "stats", "name": name}).encode() + b"\n")
stats = json.loads(s2.makefile("rb").readline())["result"]["stats"]
print(json.dumps({"guest": g, "stats": {e["name"]: e["value"] for e in stats["stats"]}}))
"""


@pytest.fixture(scope="module")
def vm() -> Iterator[GuestVM]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with GuestVM(memory="1G") as guest:
        yield guest


def watch(vm: GuestVM, condition: str) -> dict:
    out = vm.python(WATCH_PY, CONTROL, NAME, condition, timeout_s=300).stdout
    result: dict = json.loads(out)
    return result


def ctl(vm: GuestVM, *args: str) -> str:
    done = vm.run(["uballoonctl", "--control", CONTROL, *args], timeout_s=300)
    assert done.returncode == 0, done
    return done.stdout


def cgroup_bytes(vm: GuestVM, what: str) -> int:
    return int(vm.read_file(f"{CGROUP}/{what}").split()[0])


def test_agent_in_a_memory_limited_container(vm: GuestVM) -> None:
    lap = Laps()
    vm.run(
        f"echo +memory > /sys/fs/cgroup/cgroup.subtree_control && mkdir {CGROUP} && "
        f"echo {LIMIT} > {CGROUP}/memory.max && mkdir -m 0700 {RUN}", check=True,
    )
    vm.write_file(f"{RUN}/host.toml", f"[guest.{NAME}]\nmax = {LIMIT}\nmin = 0\n", mode=0o600)
    host: GuestProcess | None = None
    container: GuestProcess | None = None
    try:
        host = vm.spawn(
            f"exec uballoon-host --listen unix:{HOST_SOCKET} --control {CONTROL} "
            f"--config {RUN}/host.toml --capacity 1G --stats-interval 1 2>&1"
        )
        wait_output(host, r"listening on unix:", timeout_s=120)
        # The container: its own cgroup (joined before the namespaces are made, so all
        # of it is inside), PID namespace (the agent is its PID 1), network namespace
        # (nothing but a down loopback), and mount namespace with its own /proc.
        container = vm.spawn(
            f"echo $$ > {CGROUP}/cgroup.procs && exec unshare --pid --net --fork --mount-proc "
            f"uballoon-guest --connect unix:{HOST_SOCKET} --name {NAME} --log-level info 2>&1"
        )
        wait_output(container, r"host confirmed the balloon", timeout_s=180)
        log = container.stdout
        assert f"running in a container: its memory cgroup's limit of {LIMIT // MIB}M" in log, log
        lap("agent in the container connected")

        seen = watch(vm, "g['available_bytes'] is not None")
        guest, stats = seen["guest"], seen["stats"]
        print(f"host's view: {guest}\nstatistics: {stats}")
        assert guest["connected"] and guest["reclaim"] == "accounting"
        assert guest["ram_bytes"] == LIMIT
        assert stats["stat-total-memory"] == LIMIT
        assert 0 < stats["stat-available-memory"] < LIMIT
        assert stats["cgroup"] == 1
        assert "psi-some-avg10" in stats  # the cgroup's own memory.pressure

        before = cgroup_bytes(vm, "memory.current")
        ctl(vm, "set", NAME, f"{(LIMIT - BALLOON) // MIB}M", "--wait", "--timeout", "240")
        inflated = watch(vm, f"g['ballooned_bytes'] == {BALLOON}")["guest"]
        charged = cgroup_bytes(vm, "memory.current")
        lap(f"inflated {fmt(BALLOON)}: the container's memory.current {fmt(before)} -> "
            f"{fmt(charged)}")
        assert inflated["freed_bytes"] == 0 and inflated["actual_bytes"] == LIMIT - BALLOON
        assert charged - before >= BALLOON * 0.95

        ctl(vm, "set", NAME, f"{LIMIT // MIB}M", "--wait", "--timeout", "240")
        deflated = watch(vm, "g['ballooned_bytes'] == 0")["guest"]
        assert deflated["actual_bytes"] == LIMIT
        released = cgroup_bytes(vm, "memory.current")
        lap(f"deflated: memory.current {fmt(released)}")
        assert charged - released >= BALLOON * 0.95

        # Stop the agent (the PID namespace's init, unshare's child) with SIGTERM.
        unshare = container.pid
        agent_pid = int(vm.read_file(f"/proc/{unshare}/task/{unshare}/children").split()[0])
        vm.run(["kill", "-TERM", str(agent_pid)], check=True)
        assert container.wait(120).returncode == 0, container.stdout
        assert "stopped; the balloon is empty" in container.stdout
        assert vm.read_file(f"{CGROUP}/cgroup.procs").strip() == b""
        assert not watch(vm, "not g['connected']")["guest"]["connected"]
        lap("agent stopped; the container is empty")
    finally:
        for proc in (container, host):
            if proc is not None and proc.returncode is None:
                proc.signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except Exception:  # noqa: BLE001 - cleanup goes on
                    proc.kill()
        vm.run(f"[ -d {CGROUP} ] && {{ echo 1 > {CGROUP}/cgroup.kill; rmdir {CGROUP}; }}; "
               f"rm -rf {RUN}")
    assert vm.run(["test", "-e", CGROUP]).returncode != 0
