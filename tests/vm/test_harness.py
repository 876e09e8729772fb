"""The VM harness itself: a real guest under QEMU, and the pure pieces around it.

Tests marked ``vm`` boot guests (about 5-10 s each under TCG); they skip with
``skip_reason()`` where QEMU or a kernel image cannot be had.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.vm.harness import (
    PROJECT_DIR,
    BootError,
    CommandFailed,
    CommandTimeout,
    GuestDied,
    GuestError,
    GuestVM,
    RamRegion,
    VMUnavailable,
    _check_shareable,
    guest_vm_fixture,
    parse_size,
    pc_ram_map,
    prepare_assets,
    skip_reason,
    vsock_transport_present,
)

GIB = 1 << 30
KEY = os.urandom(48)

needs_vm = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

# Writes 32 random bytes into a fresh page (bound to NUMA node argv[1] if given), prints
# "PFN HEX" and keeps the page until killed, so the host can look for it in a RAM file.
FIND_PAGE = r"""
import ctypes, mmap, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
if len(sys.argv) > 1:
    mask = ctypes.c_ulong(1 << int(sys.argv[1]))
    if libc.syscall(238, 2, ctypes.byref(mask), 64) != 0:  # set_mempolicy(MPOL_BIND)
        raise OSError(ctypes.get_errno(), "set_mempolicy")
page = mmap.mmap(-1, 4096)
pattern = os.urandom(32)
page[:32] = pattern
addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
with open("/proc/self/pagemap", "rb") as f:
    f.seek(addr // 4096 * 8)
    entry, = struct.unpack("<Q", f.read(8))
assert entry >> 63, "page not present"
print(entry & ((1 << 55) - 1), pattern.hex(), flush=True)
__import__("time").sleep(600)  # keeps the page until the test kills us
"""


def qemu_processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (a RAM file name is unique)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def check_page_in_ram_file(vm: GuestVM, node: int | None = None) -> int:
    """Find a guest page's bytes in the RAM file at the offset ``ram_map`` gives."""
    argv = [vm.python_executable, "-c", FIND_PAGE] + ([] if node is None else [str(node)])
    proc = vm.spawn(argv)
    try:
        line = proc.read_until("\n", timeout_s=60)
        pfn_text, pattern_hex = line.split()
        path, offset = vm.locate(int(pfn_text) * 4096)
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(32) == bytes.fromhex(pattern_hex)
        return int(pfn_text)
    finally:
        proc.kill()
        proc.wait(30)


# -- pure pieces ----------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("2G") == 2 * GIB
    assert parse_size("512M") == 512 << 20
    assert parse_size("1536KiB") == 1536 << 10
    assert parse_size(4096) == 4096
    for bad in ("", "2X", "-1G", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_pc_ram_map_layouts() -> None:
    a, b = Path("/dev/shm/a"), Path("/dev/shm/b")
    assert pc_ram_map([2 * GIB], [a]) == [RamRegion(0, 2 * GIB, a, 0)]
    # Two NUMA nodes: concatenated in node order.
    assert pc_ram_map([GIB, GIB], [a, b]) == [RamRegion(0, GIB, a, 0), RamRegion(GIB, GIB, b, 0)]
    # From 3.5 GiB on, RAM over 3 GiB moves to 4 GiB.
    assert pc_ram_map([3 * GIB + GIB // 2], [a]) == [
        RamRegion(0, 3 * GIB, a, 0),
        RamRegion(4 * GIB, GIB // 2, a, 3 * GIB),
    ]
    assert pc_ram_map([3 * GIB + GIB // 2 - (2 << 20)], [a]) == [
        RamRegion(0, 3 * GIB + GIB // 2 - (2 << 20), a, 0)
    ]
    assert pc_ram_map([2 * GIB, 2 * GIB], [a, b]) == [
        RamRegion(0, 2 * GIB, a, 0),
        RamRegion(2 * GIB, GIB, b, 0),
        RamRegion(4 * GIB, GIB, b, GIB),
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc",
        "/root",
        "/tmp",
        "/dev/shm",
        "/var",
        "/home",
        "/etc/ssh",
        "/proc/1",
    ],
)
def test_refuses_to_share_secrets_and_state(path: str) -> None:
    with pytest.raises(VMUnavailable):
        _check_shareable(Path(path))


@pytest.mark.parametrize(
    "path",
    [
        "/usr", "/root/.pyenv/versions/3.11.7", "/work/main", "/home/me/venv",
        "/tmp/ci-clone", "/var/lib/ci/checkout",  # where a CI may clone the project
    ],
)
def test_shares_what_python_needs(path: str) -> None:
    _check_shareable(Path(path))


def test_refuses_a_share_that_holds_the_temporary_directory(monkeypatch) -> None:
    # Keys and host state are written under it: a checkout holding it is not shared.
    monkeypatch.setattr(tempfile, "tempdir", "/work/ci/tmp")
    with pytest.raises(VMUnavailable, match="temporary directory"):
        _check_shareable(Path("/work/ci"))
    _check_shareable(Path("/work/ci/checkout"))


def test_vsock_probe_never_connects() -> None:
    # Only /dev and /sys are consulted; the answer is a plain bool.
    assert vsock_transport_present() in (True, False)


# -- one guest for most checks --------------------------------------------------------


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory):
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    key_file = tmp_path_factory.mktemp("keys") / "key.bin"
    key_file.write_bytes(b"from a file\n")
    with GuestVM(memory="2G", fw_cfg={"key": KEY, "key-file": key_file}) as guest:
        yield guest


@pytest.mark.vm
def test_cached_kernel_is_uncompressed_elf() -> None:
    if skip_reason() is not None:
        pytest.skip(str(skip_reason()))
    assets = prepare_assets()
    with open(assets.kernel_file, "rb") as f:
        assert f.read(4) == b"\x7fELF"


@pytest.mark.vm
def test_runs_commands(vm: GuestVM) -> None:
    assert vm.run(["echo", "hello"]) == (0, "hello\n", "")
    assert vm.run("echo $((6 * 7)); echo oops >&2; exit 3") == (3, "42\n", "oops\n")
    assert vm.run(["cat"], input=b"fed to stdin").stdout == "fed to stdin"
    assert vm.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert vm.run("echo $GREETING", env={"GREETING": "hi"}).stdout == "hi\n"
    with pytest.raises(CommandFailed) as failed:
        vm.run("false", check=True)
    assert failed.value.result.returncode == 1
    with pytest.raises(GuestError):
        vm.run(["/no/such/program"])


@pytest.mark.vm
def test_runs_host_python_and_project(vm: GuestVM) -> None:
    out = vm.python("import sys, numpy, protocol.ranges; print(sys.prefix, sys.version)")
    prefix, version = out.stdout.split(" ", 1)
    assert prefix == os.path.realpath(sys.prefix)
    assert version.strip() == sys.version


@pytest.mark.vm
def test_kernel_command_line_is_the_harness_one(vm: GuestVM) -> None:
    assert vm.read_file("/proc/cmdline").decode().strip() == vm.cmdline


@pytest.mark.vm
def test_timeout_kills_the_command_and_raises(vm: GuestVM) -> None:
    with pytest.raises(CommandTimeout) as timed_out:
        vm.run("echo started; exec sleep 600", timeout_s=2)
    assert timed_out.value.partial.stdout == "started\n"
    assert vm.run("grep -lx sleep /proc/[0-9]*/comm || true").stdout == ""  # killed
    assert vm.run(["true"]).returncode == 0  # the channel still works


@pytest.mark.vm
def test_spawn_signal_wait(vm: GuestVM) -> None:
    proc = vm.spawn("echo ready; exec sleep 600")
    assert proc.read_until("ready\n", timeout_s=30) == "ready\n"
    assert proc.pid > 1
    assert proc.poll() is None
    with pytest.raises(CommandTimeout):
        proc.wait(timeout_s=0.5)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout_s=30).returncode == -signal.SIGTERM
    with pytest.raises(GuestError):
        proc.signal(signal.SIGTERM)


@pytest.mark.vm
def test_read_and_write_files(vm: GuestVM) -> None:
    data = bytes(range(256)) * 1000
    vm.write_file("/tmp/blob", data, mode=0o600)
    assert vm.read_file("/tmp/blob") == data
    assert vm.run("stat -c %a /tmp/blob").stdout == "600\n"
    with pytest.raises(GuestError):
        vm.read_file("/no/such/file")


@pytest.mark.vm
def test_fw_cfg_items_arrive(vm: GuestVM) -> None:
    assert vm.read_file(vm.fw_cfg_path("key")) == KEY
    assert vm.read_file(vm.fw_cfg_path("key-file")) == b"from a file\n"


@pytest.mark.vm
def test_shares_are_read_only_and_writes_land_in_the_overlay(vm: GuestVM) -> None:
    name = f".vm-overlay-probe-{os.getpid()}"
    for directory in (str(PROJECT_DIR), "/usr"):
        vm.run(f"echo guest > {directory}/{name}", check=True)
        assert vm.read_file(f"{directory}/{name}") == b"guest\n"
        assert not os.path.exists(f"{directory}/{name}")  # not on the host
    mounts = [line.split() for line in vm.read_file("/proc/mounts").decode().splitlines()]
    nine_p = [m for m in mounts if m[2] == "9p"]
    assert len(nine_p) == len(vm.shares)
    assert all("ro" in m[3].split(",") for m in nine_p)
    overlays = {m[1] for m in mounts if m[2] == "overlay"}
    assert overlays == {str(p) for p in vm.shares}
    lower = nine_p[0][1]
    rc, _, err = vm.run(f"touch {lower}/{name}")
    assert rc != 0 and "Read-only file system" in err


@pytest.mark.vm
def test_host_secrets_and_state_are_not_visible(vm: GuestVM, tmp_path: Path) -> None:
    guest_etc = set(vm.run("ls -A /etc").stdout.split())
    assert guest_etc <= {
        "passwd",
        "group",
        "hosts",
        "hostname",
        "nsswitch.conf",
        "ld.so.cache",
        "resolv.conf",
    }
    host_only = next(p.name for p in Path("/etc").iterdir() if p.name not in guest_etc)
    assert vm.run(["test", "-e", f"/etc/{host_only}"]).returncode == 1
    marker = tmp_path / "host-marker"
    marker.write_text("host")
    assert vm.run(["test", "-e", str(marker)]).returncode == 1
    assert vm.run("ls -A /dev/shm").stdout == ""
    assert vm.run("ls -A /var").stdout == ""
    root = vm.run("ls -A /root").stdout.split()
    assert set(root) <= {
        Path(p).relative_to("/root").parts[0] for p in map(str, vm.shares) if p.startswith("/root/")
    }


@pytest.mark.vm
def test_guest_mounts_tmp_and_cgroup2(vm: GuestVM) -> None:
    lines = vm.read_file("/proc/mounts").decode().splitlines()
    mounts = {line.split()[1]: line.split()[2] for line in lines}
    assert mounts["/tmp"] == "tmpfs"
    assert mounts["/sys/fs/cgroup"] == "cgroup2"
    assert "memory" in vm.read_file("/sys/fs/cgroup/cgroup.controllers").decode().split()


@pytest.mark.vm
def test_guest_reaches_host_loopback(vm: GuestVM) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        # The listen backlog completes the guest's connect before we accept it.
        vm.python(f"import socket; socket.create_connection(('10.0.2.2', {port})).sendall(b'ping')")
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(60)
            assert conn.recv(100) == b"ping"


@pytest.mark.vm
def test_qmp_drives_the_kernel_balloon(vm: GuestVM) -> None:
    assert vm.qmp.execute("query-status")["status"] == "running"
    assert vm.qmp.execute("query-balloon")["actual"] == 2 * GIB
    for target in (2 * GIB - (64 << 20), 2 * GIB):

        def reached(event: dict[str, Any], target: int = target) -> bool:
            return bool(event["data"]["actual"] == target)

        vm.qmp.execute("balloon", {"value": target})
        # QEMU sends BALLOON_CHANGE at most once a second, the last value included.
        vm.qmp.wait_event("BALLOON_CHANGE", reached, timeout_s=120)
        assert vm.qmp.execute("query-balloon")["actual"] == target


@pytest.mark.vm
def test_ram_file_backs_guest_physical_memory(vm: GuestVM) -> None:
    assert vm.ram_map == [RamRegion(0, 2 * GIB, vm.ram_files[0], 0)]
    st = os.stat(vm.ram_files[0])
    assert st.st_size == 2 * GIB
    assert st.st_mode & 0o777 == 0o600
    check_page_in_ram_file(vm)


# -- guests of their own ----------------------------------------------------------------

numa_vm = guest_vm_fixture(numa_nodes=("1G", "1G"), cpus=2)


@pytest.mark.vm
def test_two_numa_nodes_map_to_two_files(numa_vm: GuestVM) -> None:
    a, b = numa_vm.ram_files
    assert numa_vm.ram_map == [RamRegion(0, GIB, a, 0), RamRegion(GIB, GIB, b, 0)]
    # What the guest itself says: node 1's memory blocks start where node 0's file ends.
    out = numa_vm.run(
        "cat /sys/devices/system/memory/block_size_bytes; "
        "ls /sys/devices/system/node/node1 | grep '^memory[0-9]'"
    ).stdout.split()
    block = int(out[0], 16)
    blocks = sorted(int(name.removeprefix("memory")) for name in out[1:])
    assert blocks[0] * block == GIB
    assert (blocks[-1] + 1) * block == 2 * GIB
    assert check_page_in_ram_file(numa_vm, node=0) < GIB // 4096
    assert check_page_in_ram_file(numa_vm, node=1) >= GIB // 4096


@needs_vm
@pytest.mark.vm
def test_nothing_left_after_the_with_block() -> None:
    with GuestVM(memory="1G") as vm:
        pid, ram_files, tmpdir = vm.pid, list(vm.ram_files), vm.tmpdir
        assert vm.run(["true"]).returncode == 0
        assert all(f.exists() for f in ram_files) and tmpdir is not None and tmpdir.exists()
        assert qemu_processes_using(ram_files[0]) == [pid]
    assert not vm.alive
    assert not Path(f"/proc/{pid}").exists()
    assert qemu_processes_using(ram_files[0]) == []
    assert not any(f.exists() for f in ram_files)
    assert not tmpdir.exists()


@needs_vm
@pytest.mark.vm
def test_nothing_left_after_an_exception_in_the_with_block() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with GuestVM(memory="1G") as vm:
            pid, ram_files, tmpdir = vm.pid, list(vm.ram_files), vm.tmpdir
            vm.spawn("exec sleep 600")  # a guest that is busy does not delay the cleanup
            raise Boom
    assert not Path(f"/proc/{pid}").exists()
    assert qemu_processes_using(ram_files[0]) == []
    assert not any(f.exists() for f in ram_files)
    assert tmpdir is not None and not tmpdir.exists()


@needs_vm
@pytest.mark.vm
def test_qemu_dying_under_a_command_raises_guest_died() -> None:
    with GuestVM(memory="1G") as vm:
        ram_files = list(vm.ram_files)
        proc = vm.spawn("exec sleep 600")
        os.kill(vm.pid, signal.SIGKILL)
        with pytest.raises(GuestDied):
            proc.wait(timeout_s=60)
        with pytest.raises(GuestDied):
            vm.run(["true"])
    assert not any(f.exists() for f in ram_files)


@needs_vm
@pytest.mark.vm
def test_boot_failure_raises_with_the_console_tail() -> None:
    # No /init to run: the kernel panics, panic=-1 and -no-reboot make QEMU exit.
    with pytest.raises(BootError) as failed:
        with GuestVM(memory="512M", extra_cmdline=["rdinit=/no-such-init", "loglevel=4"]):
            pass
    assert "Kernel panic" in str(failed.value)
