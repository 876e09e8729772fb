"""Boot a throw-away Linux guest under QEMU and run commands in it.

Theory of operation
-------------------
``GuestVM`` is a context manager around one QEMU process::

    with GuestVM(memory="2G") as vm:
        rc, out, err = vm.run(["uname", "-r"])

What the guest is made of:

* the host's Debian kernel, booted uncompressed (``vmlinux`` extracted from
  ``/boot/vmlinuz-*``: under TCG the decompressor alone costs seconds) with a small
  busybox initramfs (``guest_init.sh`` as /init, the modules it needs, a few /etc files).
  Both are cached under ``/var/tmp/uballoon-vm/<kernel version>/`` and rebuilt when an
  input changes (``UBALLOON_VM_CACHE`` moves the cache);
* read-only 9p shares of what the guest needs to run the host's Python and the project —
  ``/usr``, the Python prefix, the venv and the checkout — each under a tmpfs overlay at
  the same path as on the host, so writes land in the guest.  /etc, /root, /tmp, /dev/shm,
  /var and the RAM files are never shared (a checkout below /tmp or /var is, alone);
* RAM from files on /dev/shm (``memory-backend-file,share=on``), one per NUMA node, so a
  host backend can punch holes in them; ``ram_map`` says which guest-physical range each
  file backs;
* a virtio-balloon device and a QMP socket, so benchmarks can drive the kernel balloon;
* fw_cfg items under ``opt/uballoon/<name>`` (keys for the guest), and the harness's own
  under ``opt/uballoon-harness/``;
* QEMU user networking: the guest is 10.0.2.15 and reaches the host's loopback at
  10.0.2.2.  Its init starts ``guest_server.py``, which connects OUT to a port the harness
  listens on (127.0.0.1, ephemeral) and proves itself with a token passed over fw_cfg;
  commands then travel as JSON lines (see ``guest_server.py``).

Invariants: every QEMU this module starts is killed by PID (SIGTERM, then SIGKILL) and
its RAM files and temporary directory are removed on every exit path — ``close()``,
``__exit__`` (also after an exception or KeyboardInterrupt), the garbage collector or
interpreter exit (``weakref.finalize``), and, where the harness runs on the main thread,
QEMU gets SIGKILL from the kernel if this process dies (``setpriv --pdeathsig``).  RAM
files and temporary directories left by a process that was SIGKILLed are swept by the
next ``GuestVM`` start.  Nothing here sleeps to wait: every wait is on a socket or a
process with a deadline.

One vCPU unless asked: under TCG a second one costs ~20% more QEMU CPU time to boot
and far more wall time when the host's cores are busy; it buys nothing for tests that
drive one agent.

Acceleration: KVM only where it really boots a guest (``/dev/kvm`` can exist and still
hang every real guest, as on the machine this was written on); the verdict of one probe
boot is cached per host boot.  Otherwise TCG (``-accel tcg,thread=multi``).
``UBALLOON_VM_ACCEL=tcg|kvm`` skips the probe.

Never connects over vsock: ``vsock_transport_present()`` only looks at /dev and /sys.

Errors::

    VMError
     ├── VMUnavailable        # QEMU, a kernel or busybox cannot be had; skip_reason() says why
     ├── BootError            # the guest did not come up in time; message has the console tail
     ├── GuestDied            # QEMU exited or the command channel closed while in use
     ├── GuestError           # the guest could not do what was asked (exec failed, no such file)
     │    └── CommandFailed   # run(check=True) saw a non-zero status; .result has the output
     ├── CommandTimeout       # a guest command, file op or QMP command outlived its deadline;
     │                        #   .partial has a command's output so far (else None)
     └── QMPError             # QEMU answered a QMP command with an error; .error_class

Not thread-safe: one thread drives a GuestVM (benchmarks under trio call it through
``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import lzma
import os
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
PROJECT_DIR = HERE.parent.parent
INIT_SCRIPT = HERE / "guest_init.sh"
GUEST_SERVER = HERE / "guest_server.py"

QEMU = "qemu-system-x86_64"
GUEST_IP = "10.0.2.15"
HOST_IP_FROM_GUEST = "10.0.2.2"
FW_CFG_GUEST_DIR = "/sys/firmware/qemu_fw_cfg/by_name/opt/uballoon"
DEFAULT_CACHE_DIR = Path("/var/tmp/uballoon-vm")
RAM_FILE_PREFIX = "uballoon-vm-"
TMP_PREFIX = "uballoon-vm-"

# Loaded by the guest's init with their dependencies: the first group before the
# shares are mounted, the second while the command server's Python starts up.
GUEST_MODULES_EARLY = ("virtio_pci", "qemu_fw_cfg", "9pnet_virtio", "9p", "overlay")
GUEST_MODULES_LATE = ("virtio_net", "virtio_balloon")

# The command line is fixed here and printed once per process.  quiet keeps the serial
# console (one emulated port write per character) from costing boot time; panic=-1 with
# QEMU's -no-reboot turns a guest panic into QEMU exiting, which the harness sees at once.
# The rest saves TCG time that buys nothing in a throw-away guest (QEMU CPU seconds to a
# running command server, 1 vCPU: 4.7 s without them, 3.5 s with): pci=noacpi routes
# PCI interrupts from SeaBIOS's $PIR table instead of running ACPI link methods (~0.15 s
# per virtio device), cryptomgr.notests skips the crypto self-tests (~0.3 s), and the
# blacklisted initcalls are a KDF self-test and kprobe-event setup (~0.2 s).
# pci=noacpi needs SeaBIOS: qboot has no $PIR, and the balloon (the one virtio device
# here without MSI-X) then gets no interrupt and never inflates.
BASE_CMDLINE = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "tsc=reliable",
    "no_timer_check",
    "random.trust_cpu=on",
    "pci=noacpi",
    "cryptomgr.notests",
    "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace",
)

# Paths never shared with a guest, nor any directory that contains one of them.
_NEVER_SHARE = (
    "/etc",
    "/root",
    "/home",
    "/tmp",
    "/var",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/boot",
    "/srv",
    "/mnt",
    "/media",
    "/opt",
)
# Nothing below these is shared either (their contents are secrets, state or RAM).
# Below /tmp and /var a checkout may be shared (CI clones into such places): the keys,
# state files and RAM files of the tests live in their own directories beside it, and
# ``_check_shareable`` refuses any share that would hold the temporary directory.
_NEVER_SHARE_BELOW = ("/etc", "/dev", "/proc", "/sys", "/run", "/boot")

_GIB = 1 << 30
_PC_MAX_RAM_BELOW_4G = 0xE0000000  # QEMU pc: 3.5 GiB
_PC_LOWMEM_WHEN_SPLIT = 0xC0000000  # with gigabyte_align (pc-i440fx ≥ 1.7): 3 GiB


# ---------------------------------------------------------------------------------------
# Errors


class VMError(Exception):
    """Base of every error the harness raises on purpose."""


class VMUnavailable(VMError):
    """QEMU, a kernel image or busybox cannot be had on this machine."""


class BootError(VMError):
    """The guest did not come up (in time); the message carries the console's tail."""


class GuestDied(VMError):
    """QEMU exited, or the command channel closed, while the harness was using it."""


class GuestError(VMError):
    """The guest could not do what was asked (a command that cannot start, a file op)."""


class CommandFailed(GuestError):
    """``run(check=True)`` saw a non-zero status."""

    def __init__(self, message: str, result: CompletedRun) -> None:
        super().__init__(message)
        self.result = result


class CommandTimeout(VMError):
    """A guest command, file op or QMP command outlived its deadline.

    ``partial`` holds a command's output so far (None for other requests).
    """

    def __init__(self, message: str, partial: CompletedRun | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class QMPError(VMError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


# ---------------------------------------------------------------------------------------
# Small values


class CompletedRun(NamedTuple):
    """A finished guest command; unpacks as ``rc, out, err``."""

    returncode: int
    stdout: str
    stderr: str


class RamRegion(NamedTuple):
    """One piece of guest RAM: guest-physical range → range of a RAM file."""

    guest_phys_start: int
    size_bytes: int
    path: Path
    file_offset: int


class KernelImage(NamedTuple):
    """A host kernel usable for guests."""

    version: str
    vmlinuz: Path
    modules_dir: Path


class BootAssets(NamedTuple):
    """What QEMU boots: the uncompressed kernel (or the bzImage) and the initramfs."""

    kernel: KernelImage
    kernel_file: Path
    initramfs: Path


def parse_size(size: int | str) -> int:
    """``"2G"``, ``"512M"``, ``"1536k"`` or an int → bytes (binary units).

    Raises ValueError for anything else.
    """
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", size)
    if not m:
        raise ValueError(f"not a size: {size!r}")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return parse_size(int(m.group(1)) << shift)


def pc_ram_map(node_sizes: Sequence[int], paths: Sequence[Path]) -> list[RamRegion]:
    """Guest-physical layout of RAM on QEMU's ``pc`` machine, one file per NUMA node.

    QEMU concatenates the nodes' backends in node order into one RAM region; below
    3.5 GiB in total all of it sits at guest-physical 0 (address == offset), from
    3.5 GiB on the first 3 GiB stay low and the rest starts at 4 GiB.
    """
    if len(node_sizes) != len(paths) or not node_sizes:
        raise ValueError("one RAM file per node, at least one node")
    total = sum(node_sizes)
    below_4g = _PC_LOWMEM_WHEN_SPLIT if total >= _PC_MAX_RAM_BELOW_4G else total
    # (guest-physical start, offset into the concatenated RAM, length)
    pieces = [(0, 0, below_4g)]
    if total > below_4g:
        pieces.append((4 * _GIB, below_4g, total - below_4g))
    regions = []
    node_start = 0
    for size, path in zip(node_sizes, paths, strict=True):
        node_end = node_start + size
        for gpa, ram_off, length in pieces:
            lo, hi = max(node_start, ram_off), min(node_end, ram_off + length)
            if lo < hi:
                regions.append(RamRegion(gpa + lo - ram_off, hi - lo, path, lo - node_start))
        node_start = node_end
    return regions


# ---------------------------------------------------------------------------------------
# Host facts


def vsock_transport_present() -> bool:
    """True if a vsock loopback or vhost-vsock transport exists here (never connects).

    Without one, a vsock connection — even to this machine's own CID — leaves the
    machine through the hypervisor's transport, so tests must not use vsock.
    """
    if os.path.exists("/dev/vhost-vsock"):
        return True
    for mod in ("vsock_loopback", "vhost_vsock"):
        if os.path.isdir(f"/sys/module/{mod}"):
            return True
    with contextlib.suppress(OSError):
        with open("/proc/modules") as f:
            for line in f:
                if line.split(" ", 1)[0] in ("vsock_loopback", "vhost_vsock"):
                    return True
    return False


def _version_key(version: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel() -> KernelImage:
    """The newest /boot/vmlinuz-* that is readable and has its modules installed.

    ``UBALLOON_VM_KERNEL`` names a vmlinuz explicitly.  Raises VMUnavailable.
    """
    override = os.environ.get("UBALLOON_VM_KERNEL")
    candidates = (
        [Path(override)]
        if override
        else sorted(
            Path("/boot").glob("vmlinuz-*"),
            key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")),
            reverse=True,
        )
    )
    problems = []
    for vmlinuz in candidates:
        version = vmlinuz.name.removeprefix("vmlinuz-")
        modules_dir = Path("/lib/modules") / version
        if not os.access(vmlinuz, os.R_OK):
            problems.append(f"{vmlinuz} is not readable")
        elif not (modules_dir / "modules.dep").is_file():
            problems.append(f"{modules_dir}/modules.dep is missing")
        else:
            return KernelImage(version, vmlinuz, modules_dir)
    if not candidates:
        problems.append("no /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    raise VMUnavailable("no usable kernel: " + "; ".join(problems))


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit ELF without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox() -> Path:
    """A statically linked busybox (Debian's busybox-static).  Raises VMUnavailable."""
    for cand in (shutil.which("busybox"), "/usr/bin/busybox", "/bin/busybox"):
        if cand and os.access(cand, os.X_OK) and _is_static_elf(Path(cand)):
            return Path(cand).resolve()
    raise VMUnavailable("no statically linked busybox (apt-get install busybox-static)")


def skip_reason() -> str | None:
    """Why guests cannot be booted here, or None if they can.  Cheap; never boots."""
    if sys.platform != "linux":
        return f"the VM harness needs Linux, not {sys.platform}"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    if shutil.which("modprobe") is None and not os.path.exists("/usr/sbin/modprobe"):
        return "modprobe not found (kmod), needed to list the guest's modules"
    try:
        find_kernel()
        find_busybox()
    except VMUnavailable as e:
        return str(e)
    if not os.access("/dev/shm", os.W_OK):
        return "/dev/shm is not writable (guest RAM files live there)"
    try:
        _python_shares()
    except VMUnavailable as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------
# Kernel and initramfs


_COMPRESSION_MAGIC = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


def _decompress_with_tool(data: bytes, tool: str) -> bytes:
    exe = shutil.which(tool)
    if exe is None:
        raise VMUnavailable(f"needs the {tool} tool to decompress")
    return subprocess.run([exe, "-dc"], input=data, capture_output=True, check=True).stdout


def _decompress(data: bytes, kind: str) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return _gunzip(data)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2Decompressor().decompress(data)
    return _decompress_with_tool(data, {"zstd": "zstd", "lz4": "lz4", "lzo": "lzop"}[kind])


def _gunzip(data: bytes) -> bytes:
    """Decompress one gzip member, ignoring whatever follows it."""
    import zlib

    return zlib.decompressobj(wbits=31).decompress(data)


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The uncompressed ELF kernel inside a bzImage.

    Uses the boot protocol header (payload_offset/payload_length, protocol ≥ 2.08) and
    recognises the compression by its magic.  Raises VMUnavailable if it cannot.
    """
    image = vmlinuz.read_bytes()
    if image[0x202:0x206] != b"HdrS":
        raise VMUnavailable(f"{vmlinuz} is not a bzImage")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise VMUnavailable(f"{vmlinuz}: boot protocol {version:#x} has no payload field")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start : start + payload_length]
    kind = next((k for magic, k in _COMPRESSION_MAGIC if payload.startswith(magic)), None)
    if kind is None:
        raise VMUnavailable(f"{vmlinuz}: unknown payload compression {payload[:6].hex()}")
    elf = _decompress(payload, kind)
    if elf[:4] != b"\x7fELF":
        raise VMUnavailable(f"{vmlinuz}: {kind} payload is not an ELF kernel")
    return elf


def _stat_key(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def _cached(path: Path, key: str, build: Callable[[], bytes]) -> Path:
    """``path``, rebuilt by ``build()`` unless its stamp file already says ``key``."""
    stamp = path.with_name(path.name + ".stamp")
    with contextlib.suppress(OSError):
        if path.is_file() and stamp.read_text() == key:
            return path
    _write_atomically(path, build())
    _write_atomically(stamp, key.encode())
    return path


def module_files(kernel: KernelImage, names: Sequence[str]) -> list[Path]:
    """The .ko files for ``names`` and their dependencies, in load order, no repeats.

    Raises VMUnavailable if modprobe cannot resolve one (a built-in module is skipped).
    """
    modprobe = shutil.which("modprobe") or "/usr/sbin/modprobe"
    files: list[Path] = []
    for name in names:
        proc = subprocess.run(
            [modprobe, "-S", kernel.version, "--show-depends", name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise VMUnavailable(f"modprobe --show-depends {name}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in files:
                    files.append(path)
    return files


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return _decompress_with_tool(data, "zstd")
    return data


class CpioWriter:
    """An uncompressed ``newc`` cpio archive, which is what the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(self._pad(header + name.encode() + b"\0"))
        self._parts.append(self._pad(data))

    @staticmethod
    def _pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = b"".join(self._parts)
        return out + b"\0" * (-len(out) % 512)


# Top-level names that merged-/usr systems make symlinks into /usr.
_USR_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")

_ETC_FILES = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:"
    "/usr/sbin/nologin\n",
    "group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n10.0.2.2\thost\n",
    "hostname": "uballoon-guest\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
}


def _root_layout() -> tuple[dict[str, str], list[Path]]:
    """Top-level /usr links to recreate in the guest, and real dirs that must be shared."""
    links, dirs = {}, []
    for name in _USR_LINKS:
        p = Path("/") / name
        if p.is_symlink():
            links[name] = os.readlink(p)
        elif p.is_dir():
            dirs.append(p)
    return links, dirs


def build_initramfs(kernel: KernelImage, busybox: Path, modules: Sequence[Sequence[Path]]) -> bytes:
    """The guest's initramfs: /init, static busybox, modules, a few /etc files.

    ``modules`` holds groups of .ko files in load order; init loads group N from
    ``/.uballoon/modules/order<N>``.
    """
    cpio = CpioWriter()
    for d in (
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "usr",
        "etc",
        "var",
        "mnt",
        ".uballoon",
        ".uballoon/modules",
    ):
        cpio.dir(d, 0o1777 if d == "tmp" else 0o755)
    cpio.dir("root", 0o700)
    cpio.chardev("dev/console", 5, 1)
    links, _ = _root_layout()
    for name, target in links.items():
        cpio.symlink(name, target)
    for name, text in _ETC_FILES.items():
        cpio.file(f"etc/{name}", text.encode())
    # The host's ld.so.cache is an index of /usr's libraries (no secrets); without it
    # the guest's loader would miss libraries outside its built-in directories.
    if os.path.isfile("/etc/ld.so.cache"):
        cpio.file("etc/ld.so.cache", Path("/etc/ld.so.cache").read_bytes())
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    cpio.file(".uballoon/busybox", busybox.read_bytes(), 0o755)
    cpio.file(".uballoon/guest_server.py", GUEST_SERVER.read_bytes())
    seen: set[str] = set()
    for group_no, group in enumerate(modules, 1):
        order = []
        for path in group:
            name = path.name.removesuffix(".xz").removesuffix(".gz").removesuffix(".zst")
            if name in seen:
                raise VMUnavailable(f"two modules named {name}")
            seen.add(name)
            order.append(name)
            cpio.file(f".uballoon/modules/{name}", _module_bytes(path))
        cpio.file(f".uballoon/modules/order{group_no}", "".join(f"{n}\n" for n in order).encode())
    return cpio.finish()


def cache_dir() -> Path:
    """Where built kernels and initramfs images are kept: ``UBALLOON_VM_CACHE``, else
    /var/tmp/uballoon-vm, else ~/.cache/uballoon-vm for a user who cannot write there."""
    if "UBALLOON_VM_CACHE" in os.environ:
        return Path(os.environ["UBALLOON_VM_CACHE"])
    try:
        DEFAULT_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        return Path.home() / ".cache" / "uballoon-vm"
    if not os.access(DEFAULT_CACHE_DIR, os.W_OK):
        return Path.home() / ".cache" / "uballoon-vm"
    return DEFAULT_CACHE_DIR


def prepare_assets(kernel: KernelImage | None = None) -> BootAssets:
    """The cached vmlinux and initramfs for ``kernel``, (re)built as needed.

    Falls back to booting the compressed bzImage if its payload cannot be unpacked here.
    Raises VMUnavailable.
    """
    kernel = kernel or find_kernel()
    busybox = find_busybox()
    directory = cache_dir() / kernel.version
    directory.mkdir(parents=True, exist_ok=True)
    try:
        vmlinux = _cached(
            directory / "vmlinux",
            _digest(["vmlinux", 1, _stat_key(kernel.vmlinuz)]),
            lambda: extract_vmlinux(kernel.vmlinuz),
        )
    except (VMUnavailable, lzma.LZMAError, OSError, subprocess.CalledProcessError):
        vmlinux = kernel.vmlinuz
    early = module_files(kernel, GUEST_MODULES_EARLY)
    late = [m for m in module_files(kernel, GUEST_MODULES_LATE) if m not in early]
    modules = [early, late]
    key = _digest(
        [
            "initramfs",
            kernel.version,
            _stat_key(busybox),
            [_stat_key(m) for m in early + late],
            hashlib.sha256(
                Path(__file__).read_bytes() + INIT_SCRIPT.read_bytes() + GUEST_SERVER.read_bytes()
            ).hexdigest(),
            _stat_key(Path("/etc/ld.so.cache")) if os.path.isfile("/etc/ld.so.cache") else None,
            _root_layout()[0],
        ]
    )
    initramfs = _cached(
        directory / "initramfs.cpio", key, lambda: build_initramfs(kernel, busybox, modules)
    )
    return BootAssets(kernel, vmlinux, initramfs)


# ---------------------------------------------------------------------------------------
# Shares


def _check_shareable(path: Path) -> None:
    s = str(path)
    for bad in _NEVER_SHARE:
        if s == bad or s == "/" or bad.startswith(s.rstrip("/") + "/"):
            raise VMUnavailable(f"refusing to share {s} with a guest (it is or holds {bad})")
    for bad in _NEVER_SHARE_BELOW:
        if s.startswith(bad + "/"):
            raise VMUnavailable(f"refusing to share {s} with a guest (it is under {bad})")
    # Keys, host state and wiretaps are written under the temporary directory.
    temp = os.path.realpath(tempfile.gettempdir())
    if temp == s or temp.startswith(s.rstrip("/") + "/"):
        raise VMUnavailable(
            f"refusing to share {s} with a guest (it holds the temporary directory {temp}, "
            "where keys and host state are written)"
        )


def _python_shares() -> list[Path]:
    """What the guest needs to run this Python and the project, nested paths removed."""
    wanted = [
        Path("/usr"),
        *_root_layout()[1],
        Path(sys.base_prefix),
        Path(sys.prefix),
        PROJECT_DIR,
    ]
    return _normalise_shares(wanted)


def _normalise_shares(paths: Sequence[Path]) -> list[Path]:
    real = []
    for p in paths:
        r = Path(os.path.realpath(p))
        _check_shareable(r)
        if not r.is_dir():
            raise VMUnavailable(f"cannot share {r}: not a directory")
        real.append(r)
    out: list[Path] = []
    for r in sorted(set(real), key=lambda p: len(p.parts)):
        if not any(r == o or o in r.parents for o in out):
            out.append(r)
    return out


def _guest_python() -> str:
    """This interpreter's path as the guest sees it (the directory resolved, not the
    file: a venv's python is a symlink whose own path makes it the venv's)."""
    exe = Path(sys.executable)
    return str(Path(os.path.realpath(exe.parent)) / exe.name)


# ---------------------------------------------------------------------------------------
# Acceleration


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel(assets: BootAssets) -> str:
    """ "kvm" if KVM really boots our guest here, else "tcg".

    A probe boot (KVM, at most 15 s) decides; its verdict is cached per host boot,
    QEMU binary and kernel.  ``UBALLOON_VM_ACCEL`` overrides.
    """
    forced = os.environ.get("UBALLOON_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not _kvm_openable():
        return "tcg"
    qemu = Path(shutil.which(QEMU) or QEMU)
    key = _digest([_boot_id(), _stat_key(qemu), _stat_key(assets.kernel_file)])
    cache_dir().mkdir(parents=True, exist_ok=True)
    verdict_file = cache_dir() / "kvm-verdict.json"
    with contextlib.suppress(OSError, ValueError):
        verdict = json.loads(verdict_file.read_text())
        if verdict.get("key") == key:
            return "kvm" if verdict["works"] else "tcg"
    works = _probe_kvm(assets)
    _write_atomically(verdict_file, json.dumps({"key": key, "works": works}).encode())
    return "kvm" if works else "tcg"


def _probe_kvm(assets: BootAssets, timeout_s: float = 15.0) -> bool:
    """Boot the guest's kernel under KVM until its init speaks, then stop it."""
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + f"{os.getpid()}-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
            "-kernel",
            str(assets.kernel_file),
            "-initrd",
            str(assets.initramfs),
            "-append",
            " ".join((*BASE_CMDLINE, "uballoon.probe")),
            "-serial",
            f"file:{log}",
        ]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            # init answers the probe by rebooting at once; -no-reboot makes QEMU exit.
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill(proc)
        try:
            return "uballoon-init: probe ok" in log.read_text(errors="replace")
        except OSError:
            return False


# ---------------------------------------------------------------------------------------
# Processes and stale files


def _kill(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(ram_dir: Path) -> None:
    """Remove RAM files and temp dirs whose creating process no longer exists."""
    pattern = re.compile(re.escape(RAM_FILE_PREFIX) + r"(\d+)-")
    for directory in (ram_dir, Path(tempfile.gettempdir())):
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                m = pattern.match(entry.name)
                if not m or _pid_alive(int(m.group(1))):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)


def _cleanup(
    procs: list[subprocess.Popen[bytes]],
    files: list[Path],
    tmpdir: Path | None,
    socks: list[socket.socket],
) -> None:
    """Kill QEMU, close sockets, remove RAM files and the temp dir.  Idempotent."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    for proc in procs:
        _kill(proc)
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _tail(path: Path, max_lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    lines = text.replace("\r", "").splitlines()[-max_lines:]
    return "\n".join(lines) if lines else "(empty)"


_PRINTED_CMDLINES: set[str] = set()


# ---------------------------------------------------------------------------------------
# QMP


class QMPClient:
    """A minimal blocking QMP client: greeting, ``qmp_capabilities``, ``execute``.

    Events that arrive while waiting for a reply are kept in ``events``.
    QEMU serves one QMP client at a time: ``close()`` this one before another connects.
    """

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        """Connect and negotiate.  Raises OSError, QMPError, CommandTimeout."""
        self.events: list[dict[str, Any]] = []
        self._buf = bytearray()
        self._next_id = 1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(str(path))
            greeting = self._read_message(time.monotonic() + timeout_s)
            if "QMP" not in greeting:
                raise QMPError("(greeting)", "Unexpected", repr(greeting))
            self.execute("qmp_capabilities", timeout_s=timeout_s)
        except BaseException:
            self._sock.close()
            raise

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if line.strip():
                    msg: dict[str, Any] = json.loads(line)
                    return msg
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout("QMP: no reply before the deadline")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise CommandTimeout("QMP: no reply before the deadline") from None
            if not data:
                raise GuestDied("QMP socket closed (QEMU exited?)")
            self._buf += data

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout_s: float = 30.0
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises QMPError (QEMU refused), GuestDied (socket closed), CommandTimeout.
        """
        msg_id = self._next_id
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPError(command, err.get("class", "?"), err.get("desc", ""))
            return reply.get("return")

    def wait_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout_s: float = 60.0,
    ) -> dict[str, Any]:
        """The first event ``name`` (kept or new) for which ``predicate`` holds; events
        before it are dropped.  Raises CommandTimeout, GuestDied.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            while self.events:
                event = self.events.pop(0)
                if event.get("event") == name and (predicate is None or predicate(event)):
                    return event
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self._sock.close()


# ---------------------------------------------------------------------------------------
# The command channel


class _Channel:
    """Host end of the JSON-lines channel to ``guest_server.py``.

    Blocking and single-threaded: whoever waits for a reply pumps the socket and
    hands every message to the request it belongs to.
    """

    def __init__(self, sock: socket.socket, describe_death: Callable[[], str]) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._next_id = 1
        self._handlers: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._describe_death = describe_death
        self.dead = False

    def request(self, msg: dict[str, Any], handler: Callable[[dict[str, Any]], None]) -> int:
        if self.dead:
            raise GuestDied("the guest's command channel is closed\n" + self._describe_death())
        req_id = self._next_id
        self._next_id += 1
        self._handlers[req_id] = handler
        self.sock.settimeout(None)
        try:
            self.sock.sendall(json.dumps({"id": req_id, **msg}).encode() + b"\n")
        except OSError as e:
            self.dead = True
            raise GuestDied(f"sending to the guest failed: {e}\n" + self._describe_death()) from e
        return req_id

    def forget(self, req_id: int) -> None:
        self._handlers.pop(req_id, None)

    def pump(self, deadline: float | None) -> bool:
        """Read what arrives before ``deadline`` (None: wait as long as it takes) and
        dispatch it.  Returns False if the deadline passed with nothing read.

        Raises GuestDied if the channel closed.
        """
        if self.dead:
            raise GuestDied("the guest's command channel is closed\n" + self._describe_death())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError as e:
            data = b""
            reason = str(e)
        else:
            reason = "EOF"
        if not data:
            self.dead = True
            raise GuestDied(
                f"the guest's command channel closed ({reason})\n" + self._describe_death()
            )
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                return True
            msg = json.loads(bytes(self._buf[:end]))
            del self._buf[: end + 1]
            handler = self._handlers.get(msg.get("id"))
            if handler is not None:
                handler(msg)

    def call(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request, one reply ("ok" or "error").  Raises GuestError, CommandTimeout."""
        replies: list[dict[str, Any]] = []
        req_id = self.request(msg, replies.append)
        deadline = time.monotonic() + timeout_s
        try:
            while not replies:
                if not self.pump(deadline) and time.monotonic() >= deadline:
                    raise CommandTimeout(f"guest did not answer {msg['op']} in {timeout_s} s")
        finally:
            self.forget(req_id)
        reply = replies[0]
        if reply["ev"] == "error":
            raise GuestError(f"{msg['op']} {msg.get('path', '')}: {reply['error']}")
        return reply


class GuestProcess:
    """A command running in the guest (from ``GuestVM.spawn``); output is captured."""

    def __init__(self, channel: _Channel, argv: list[str]) -> None:
        self._channel = channel
        self.argv = argv
        self.pid: int = -1
        self.returncode: int | None = None
        self.stdout_bytes = bytearray()
        self.stderr_bytes = bytearray()
        self._error: str | None = None
        self._req_id = -1

    def _start(self, msg: dict[str, Any], timeout_s: float) -> None:
        self._req_id = self._channel.request(msg, self._on_message)
        deadline = time.monotonic() + timeout_s
        while self.pid < 0 and self._error is None:
            if not self._channel.pump(deadline) and time.monotonic() >= deadline:
                raise CommandTimeout(f"guest did not start {self.argv!r} in {timeout_s} s")
        if self._error is not None:
            self._channel.forget(self._req_id)
            raise GuestError(f"cannot run {self.argv!r} in the guest: {self._error}")

    def _on_message(self, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        if ev == "started":
            self.pid = msg["pid"]
        elif ev == "out":
            (self.stdout_bytes if msg["fd"] == 1 else self.stderr_bytes).extend(
                base64.b64decode(msg["data"])
            )
        elif ev == "exit":
            self.returncode = msg["rc"]
            self._channel.forget(self._req_id)
        elif ev == "error":
            self._error = msg["error"]

    @property
    def stdout(self) -> str:
        """Output so far, decoded (undecodable bytes kept as surrogate escapes)."""
        return self.stdout_bytes.decode("utf-8", "surrogateescape")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "surrogateescape")

    def result(self) -> CompletedRun:
        """What the command produced so far (returncode -1 while it runs)."""
        rc = -1 if self.returncode is None else self.returncode
        return CompletedRun(rc, self.stdout, self.stderr)

    def poll(self) -> int | None:
        """Take in whatever has arrived, without blocking; the exit status or None."""
        while self.returncode is None and self._channel.pump(time.monotonic()):
            pass
        return self.returncode

    def wait(self, timeout_s: float | None = 60.0) -> CompletedRun:
        """Wait for the command to exit.  Raises CommandTimeout (it keeps running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.returncode is None:
            if (
                not self._channel.pump(deadline)
                and deadline is not None
                and time.monotonic() >= deadline
            ):
                raise CommandTimeout(
                    f"{self.argv!r} still running after {timeout_s} s", self.result()
                )
        return self.result()

    def read_until(self, marker: str, timeout_s: float = 60.0) -> str:
        """Wait until stdout contains ``marker``; stdout up to and including it.

        Raises CommandTimeout, GuestError if the command exits without printing it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            end = self.stdout.find(marker)
            if end >= 0:
                return self.stdout[: end + len(marker)]
            if self.returncode is not None:
                raise GuestError(
                    f"{self.argv!r} exited {self.returncode} before printing "
                    f"{marker!r}; stderr: {self.stderr[-2000:]}"
                )
            if not self._channel.pump(deadline) and time.monotonic() >= deadline:
                raise CommandTimeout(
                    f"{self.argv!r} did not print {marker!r} in {timeout_s} s", self.result()
                )

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the process (or to its whole process group).

        Raises GuestError if it has already exited.
        """
        if self.returncode is not None:
            raise GuestError(f"{self.argv!r} already exited ({self.returncode})")
        self._channel.call(
            {"op": "signal", "target": self._req_id, "sig": int(sig), "group": group},
            timeout_s=30.0,
        )

    def kill(self) -> None:
        """SIGKILL its whole process group, if it still runs."""
        with contextlib.suppress(GuestError):
            self.signal(signal.SIGKILL, group=True)


# ---------------------------------------------------------------------------------------
# The VM


class GuestVM:
    """One throw-away guest.  Use as a context manager; see the module docstring."""

    def __init__(
        self,
        memory: int | str | None = "2G",
        *,
        numa_nodes: Sequence[int | str] | None = None,
        cpus: int = 1,
        fw_cfg: Mapping[str, bytes | os.PathLike[str] | str] | None = None,
        extra_cmdline: Sequence[str] = (),
        balloon: bool = True,
        deflate_on_oom: bool = False,
        free_page_reporting: bool = False,
        extra_shares: Sequence[os.PathLike[str] | str] = (),
        extra_qemu_args: Sequence[str] = (),
        accel: str = "auto",
        cpu_model: str | None = None,
        boot_timeout_s: float = 120.0,
        ram_dir: os.PathLike[str] | str = "/dev/shm",
    ) -> None:
        """Describe the guest; nothing starts before ``start()``/``__enter__``.

        memory: total RAM (``"2G"`` or bytes); with ``numa_nodes`` (one size per node,
        one RAM file each) it may be None or must equal their sum.  fw_cfg: name → bytes
        or a host file, readable in the guest at ``fw_cfg_path(name)``.
        Raises ValueError for an inconsistent description.
        """
        if numa_nodes:
            self.node_sizes = [parse_size(s) for s in numa_nodes]
            if memory is not None and parse_size(memory) != sum(self.node_sizes):
                raise ValueError("memory must equal the sum of numa_nodes")
        else:
            if memory is None:
                raise ValueError("give memory or numa_nodes")
            self.node_sizes = [parse_size(memory)]
        for size in self.node_sizes:
            if size % (2 << 20):
                raise ValueError("RAM sizes must be multiples of 2 MiB")
        self.memory_bytes = sum(self.node_sizes)
        self.numa = bool(numa_nodes)
        self.cpus = cpus
        self._fw_cfg = dict(fw_cfg or {})
        for name in self._fw_cfg:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or len(f"opt/uballoon/{name}") > 55:
                raise ValueError(f"bad fw_cfg name {name!r} (letters, digits, ._-; short)")
        self.balloon = balloon
        self.deflate_on_oom = deflate_on_oom
        self.free_page_reporting = free_page_reporting
        self._extra_shares = [Path(p) for p in extra_shares]
        self._extra_qemu_args = list(extra_qemu_args)
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self._accel_wanted = accel
        self._cpu_model = cpu_model
        self.boot_timeout_s = boot_timeout_s
        self.ram_dir = Path(ram_dir)
        self.cmdline = " ".join((*BASE_CMDLINE, *extra_cmdline))
        self._python_exe = _guest_python()

        # Set by start().
        self.accel = ""
        self.shares: list[Path] = []
        self.ram_files: list[Path] = []
        self.ram_map: list[RamRegion] = []
        self.tmpdir: Path | None = None
        self.serial_log = Path()
        self.qmp_path = Path()
        self.boot_s = 0.0
        self.guest_uptime_at_hello_s = 0.0
        self.qemu_argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []  # what the finalizer kills
        self._channel: _Channel | None = None
        self._qmp: QMPClient | None = None
        self._socks: list[socket.socket] = []
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Boot the guest and wait for its command server.

        Raises VMUnavailable, BootError (with the console's tail).  On any failure
        everything started so far is cleaned up.
        """
        if self._finalizer is not None:
            raise RuntimeError("a GuestVM starts once")
        _sweep_stale(self.ram_dir)
        assets = prepare_assets()
        self.accel = choose_accel(assets) if self._accel_wanted == "auto" else self._accel_wanted
        self.shares = _normalise_shares([*_python_shares(), *self._extra_shares])
        ram_dir = Path(os.path.realpath(self.ram_dir))
        for share in self.shares:
            if share == ram_dir or share in ram_dir.parents:
                raise VMUnavailable(f"refusing to share {share} with a guest: it holds "
                                    f"the RAM files' directory {ram_dir}")

        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
        # From here on, the finalizer owns cleanup; it sees the lists as they grow.
        self._finalizer = weakref.finalize(
            self, _cleanup, self._procs, self.ram_files, self.tmpdir, self._socks
        )
        try:
            self._start(assets)
        except BaseException:
            self.close()
            raise

    def _start(self, assets: BootAssets) -> None:
        assert self.tmpdir is not None
        tmp = self.tmpdir
        self.serial_log = tmp / "serial.log"
        self.qmp_path = tmp / "qmp.sock"
        stderr_path = tmp / "qemu.stderr"
        token = secrets.token_hex(16)

        listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        self._socks.append(listener)
        port = listener.getsockname()[1]

        config = [f"share s{i} {path}" for i, path in enumerate(self.shares)]
        config += [f"server {self._python_exe}", f"connect {HOST_IP_FROM_GUEST} {port}"]
        _write_private(tmp / "token", token.encode())
        _write_private(tmp / "config", ("\n".join(config) + "\n").encode())
        fw_cfg_args = [
            "-fw_cfg",
            f"name=opt/uballoon-harness/config,file={tmp / 'config'}",
            "-fw_cfg",
            f"name=opt/uballoon-harness/token,file={tmp / 'token'}",
        ]
        for i, (name, value) in enumerate(self._fw_cfg.items()):
            if isinstance(value, bytes):
                path = tmp / f"fw_cfg.{i}"
                _write_private(path, value)
            else:
                path = Path(value)
                if not path.is_file():
                    raise ValueError(f"fw_cfg {name}: {path} is not a file")
            fw_cfg_args += ["-fw_cfg", f"name=opt/uballoon/{name},file={path}"]

        # RAM files: created here (O_EXCL, 0600) so the name is ours; QEMU sizes them.
        mem_args: list[str] = []
        tag = f"{RAM_FILE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        for i, size in enumerate(self.node_sizes):
            path = self.ram_dir / f"{tag}-m{i}"
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.ram_files.append(path)
            mem_args += [
                "-object",
                f"memory-backend-file,id=m{i},size={size},mem-path={path},share=on",
            ]
        self.ram_map = pc_ram_map(self.node_sizes, self.ram_files)
        machine = "pc"
        if self.numa:
            for i, cpu_range in enumerate(_split_cpus(self.cpus, len(self.node_sizes))):
                node = f"node,nodeid={i},memdev=m{i}"
                mem_args += ["-numa", node + (f",cpus={cpu_range}" if cpu_range else "")]
        else:
            machine += ",memory-backend=m0"

        if self.accel == "kvm":
            accel_args = ["-accel", "kvm", "-cpu", self._cpu_model or "host"]
        else:
            accel_args = ["-accel", "tcg,thread=multi", "-cpu", self._cpu_model or "max"]
        devices = []
        for i, path in enumerate(self.shares):
            devices += [
                "-fsdev",
                f"local,id=fs{i},path={path},security_model=none,readonly=on,multidevs=remap",
                "-device",
                f"virtio-9p-pci,fsdev=fs{i},mount_tag=s{i}",
            ]
        devices += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
        if self.balloon:
            onoff = {True: "on", False: "off"}
            devices += [
                "-device",
                "virtio-balloon-pci,id=balloon0,"
                f"deflate-on-oom={onoff[self.deflate_on_oom]},"
                f"free-page-reporting={onoff[self.free_page_reporting]}",
            ]

        qemu = shutil.which(QEMU)
        if qemu is None:
            raise VMUnavailable(f"{QEMU} not found")
        self.qemu_argv = [
            qemu,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            machine,
            *accel_args,
            "-smp",
            str(self.cpus),
            "-name",
            "uballoon-guest,debug-threads=on",  # per-thread CPU for benchmarks
            "-m",
            f"{self.memory_bytes // (1 << 20)}M",
            *mem_args,
            "-kernel",
            str(assets.kernel_file),
            "-initrd",
            str(assets.initramfs),
            "-append",
            self.cmdline,
            "-serial",
            f"file:{self.serial_log}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *fw_cfg_args,
            *devices,
            *self._extra_qemu_args,
        ]
        if self.cmdline not in _PRINTED_CMDLINES:
            _PRINTED_CMDLINES.add(self.cmdline)
            print(
                f"uballoon-vm: guest kernel {assets.kernel.version} ({self.accel}), "
                f"cmdline: {self.cmdline}",
                file=sys.stderr,
            )

        argv = self.qemu_argv
        # If this process dies without cleaning up, the kernel kills QEMU.  PDEATHSIG
        # follows the thread that forked, so only from the main thread (a worker
        # thread's exit would kill a guest still in use).
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        t0 = time.monotonic()
        with open(stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        self._procs.append(self._proc)
        conn, hello = self._accept_guest(listener, token, t0 + self.boot_timeout_s)
        self.boot_s = time.monotonic() - t0
        self.guest_uptime_at_hello_s = float(hello.get("uptime_s", 0.0))
        listener.close()
        self._socks.append(conn)
        self._channel = _Channel(conn, self._death_report)

    def _accept_guest(
        self, listener: socket.socket, token: str, deadline: float
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Wait for the guest's server to connect with the right token, or QEMU to die."""
        assert self._proc is not None
        try:
            pidfd = os.pidfd_open(self._proc.pid)  # readable once QEMU exits
        except (AttributeError, OSError):  # Linux < 5.3: look at QEMU every 0.25 s instead
            pidfd = -1
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BootError(
                        f"the guest did not come up in {self.boot_timeout_s} s\n"
                        + self._death_report()
                    )
                waitables: list[Any] = [listener] + ([pidfd] if pidfd >= 0 else [])
                timeout = remaining if pidfd >= 0 else min(remaining, 0.25)
                ready, _, _ = select.select(waitables, [], [], timeout)
                if pidfd in ready or (pidfd < 0 and self._proc.poll() is not None):
                    self._proc.wait()
                    raise BootError(
                        f"QEMU exited ({self._proc.returncode}) before the guest "
                        "came up\n" + self._death_report()
                    )
                if listener in ready:
                    conn, _ = listener.accept()
                    hello = self._read_hello(conn, deadline)
                    if hello is not None and hmac.compare_digest(
                        str(hello.get("hello", "")), token
                    ):
                        return conn, hello
                    conn.close()  # not our guest
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    @staticmethod
    def _read_hello(conn: socket.socket, deadline: float) -> dict[str, Any] | None:
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(buf) > 4096:
                return None
            conn.settimeout(remaining)
            try:
                data = conn.recv(4096)
            except OSError:
                return None
            if not data:
                return None
            buf += data
        try:
            msg = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None

    def _death_report(self) -> str:
        parts = []
        if self._proc is not None and self._proc.poll() is not None:
            parts.append(f"QEMU exit status {self._proc.returncode}")
        if self.tmpdir is not None:
            err = _tail(self.tmpdir / "qemu.stderr", 10)
            if err not in ("(empty)", "(no output)"):
                parts.append("QEMU stderr:\n" + err)
            parts.append("serial console (tail):\n" + _tail(self.serial_log))
        return "\n".join(parts)

    def close(self) -> None:
        """Kill QEMU (SIGTERM, then SIGKILL), remove the RAM files and temp dir.

        Safe to call more than once, and after a failed start.
        """
        if self._qmp is not None:
            with contextlib.suppress(OSError):
                self._qmp.close()
            self._qmp = None
        if self._channel is not None:
            self._channel.dead = True
        if self._finalizer is not None:
            self._finalizer()

    @property
    def pid(self) -> int:
        """QEMU's PID (of ``setpriv``'s exec, i.e. QEMU itself)."""
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """True while QEMU runs."""
        return self._proc is not None and self._proc.poll() is None

    def serial_tail(self, max_lines: int = 40) -> str:
        """The last lines of the guest's serial console."""
        return _tail(self.serial_log, max_lines)

    def locate(self, guest_phys: int) -> tuple[Path, int]:
        """The RAM file and offset that hold guest-physical address ``guest_phys``.

        Raises ValueError if no RAM file backs that address.
        """
        for region in self.ram_map:
            if region.guest_phys_start <= guest_phys < region.guest_phys_start + region.size_bytes:
                return region.path, region.file_offset + guest_phys - region.guest_phys_start
        raise ValueError(f"guest-physical {guest_phys:#x} is not RAM of this guest")

    # -- QMP ----------------------------------------------------------------------

    @property
    def qmp(self) -> QMPClient:
        """The harness's QMP connection (opened on first use).  Raises OSError."""
        if self._qmp is None:
            self._qmp = QMPClient(self.qmp_path)
        return self._qmp

    def close_qmp(self) -> None:
        """Drop the harness's QMP connection so that another client can connect."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    # -- commands -----------------------------------------------------------------

    def default_env(self) -> dict[str, str]:
        """The environment guest commands get (``env=`` adds to it)."""
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env = {"HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = os.path.realpath(sys.prefix)
            path = f"{env['VIRTUAL_ENV']}/bin:{path}"
        env["PATH"] = path
        return env

    def _chan(self) -> _Channel:
        if self._channel is None:
            raise RuntimeError("the guest is not running (use `with GuestVM(...) as vm`)")
        return self._channel

    def spawn(
        self,
        cmd: str | Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        start_timeout_s: float = 30.0,
    ) -> GuestProcess:
        """Start ``cmd`` in the guest (a string runs under ``/bin/sh -c``) in its own
        session; returns once it runs.  ``input`` is fed to its stdin (else /dev/null).

        Raises GuestError if it cannot start, GuestDied.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        full_env = self.default_env()
        full_env.update(env or {})
        msg = {
            "op": "spawn",
            "argv": argv,
            "env": full_env,
            "cwd": cwd,
            "stdin": None if input is None else base64.b64encode(input).decode(),
        }
        proc = GuestProcess(self._chan(), argv)
        proc._start(msg, start_timeout_s)
        return proc

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout_s: float = 120.0,
        check: bool = False,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CompletedRun:
        """Run ``cmd`` to completion: ``(returncode, stdout, stderr)``.

        Raises CommandTimeout after ``timeout_s`` (the command's process group is
        killed first), CommandFailed if ``check`` and the status is not 0, GuestError
        if it cannot start, GuestDied.
        """
        proc = self.spawn(cmd, input=input, env=env, cwd=cwd)
        try:
            result = proc.wait(timeout_s)
        except CommandTimeout:
            proc.kill()
            with contextlib.suppress(CommandTimeout):
                proc.wait(30.0)
            raise
        if check and result.returncode != 0:
            raise CommandFailed(
                f"{proc.argv!r} exited {result.returncode}\n"
                f"stdout: {result.stdout[-2000:]}\nstderr: "
                f"{result.stderr[-2000:]}",
                result,
            )
        return result

    def python(
        self,
        code: str,
        *args: str,
        timeout_s: float = 120.0,
        check: bool = True,
        input: bytes | None = None,
    ) -> CompletedRun:
        """Run ``code`` with the host's interpreter in the guest (``python -c``).

        Raises as ``run`` (check=True by default).
        """
        return self.run(
            [self.python_executable, "-c", code, *args],
            timeout_s=timeout_s,
            check=check,
            input=input,
        )

    @property
    def python_executable(self) -> str:
        """The guest path of the interpreter running this harness (venv included)."""
        return self._python_exe

    def write_file(
        self, path: str, data: bytes | str, mode: int = 0o644, timeout_s: float = 60.0
    ) -> None:
        """Create or replace a guest file.  Raises GuestError, GuestDied, CommandTimeout."""
        if isinstance(data, str):
            data = data.encode()
        self._chan().call(
            {"op": "write", "path": path, "mode": mode, "data": base64.b64encode(data).decode()},
            timeout_s,
        )

    def read_file(self, path: str, timeout_s: float = 60.0) -> bytes:
        """A guest file's bytes.  Raises GuestError, GuestDied, CommandTimeout."""
        reply = self._chan().call({"op": "read", "path": path}, timeout_s)
        return base64.b64decode(reply["data"])

    @staticmethod
    def fw_cfg_path(name: str) -> str:
        """Where the guest reads the fw_cfg item given as ``fw_cfg={name: ...}``."""
        return f"{FW_CFG_GUEST_DIR}/{name}/raw"


def _split_cpus(cpus: int, nodes: int) -> list[str]:
    """CPU ranges for ``-numa node,cpus=``: contiguous blocks, "" for memory-only nodes."""
    out = []
    per, extra = divmod(cpus, nodes)
    first = 0
    for i in range(nodes):
        n = per + (1 if i < extra else 0)
        out.append(f"{first}-{first + n - 1}" if n > 1 else (str(first) if n == 1 else ""))
        first += n
    return out


def guest_vm_fixture(scope: str = "module", **vm_kwargs: Any) -> Any:
    """A pytest fixture yielding a running ``GuestVM(**vm_kwargs)``; skips with
    ``skip_reason()`` where guests cannot be booted.

        vm = guest_vm_fixture(memory="2G")      # in a test module
    """
    import pytest

    @pytest.fixture(scope=scope)
    def _vm() -> Iterator[GuestVM]:
        reason = skip_reason()
        if reason is not None:
            pytest.skip(reason)
        with GuestVM(**vm_kwargs) as vm:
            yield vm

    return _vm


__all__ = [
    "BootError",
    "CommandFailed",
    "CommandTimeout",
    "CompletedRun",
    "GuestDied",
    "GuestError",
    "GuestProcess",
    "GuestVM",
    "KernelImage",
    "QMPClient",
    "QMPError",
    "RamRegion",
    "VMError",
    "VMUnavailable",
    "extract_vmlinux",
    "find_kernel",
    "guest_vm_fixture",
    "pc_ram_map",
    "prepare_assets",
    "skip_reason",
    "vsock_transport_present",
]
