"""``uballoon-guest``: the command line of the guest agent.

    uballoon-guest --connect ADDR [--name NAME] [--key-file F] [--min-free SIZE]
                   [--chunk SIZE] [--state-dir DIR] [--verify-interval S]
                   [--no-deflate-on-oom] [--log-level LEVEL] ...
    uballoon-guest --release [--name NAME] [--state-dir DIR]

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or release; 1 when the balloon
cannot be set up (the message says why); 2 for a bad command line (one line).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

from protocol.addresses import parse_address
from protocol.auth import key_from_file_bytes
from protocol.errors import BalloonError, PolicyError
from protocol.units import format_size, parse_size

PROG = "uballoon-guest"
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")


class _UsageError(Exception):
    pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return f"{PROG}: {message}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Memory ballooning for this Linux guest from user space: pins memory "
        "the host asks for, tells the host its page frames, gives it back on demand.",
    )
    p.add_argument("--connect", metavar="ADDR",
                   help="the host: tcp:HOST:PORT, unix:PATH or vsock:CID:PORT")
    p.add_argument("--name", help="this guest's name (default: the host name)")
    p.add_argument("--key-file", metavar="F", help="this guest's secret key (authentication)")
    p.add_argument("--min-free", metavar="SIZE",
                   help="never inflate below this much available memory (default: 5%% of "
                   "RAM, at least 64M)")
    p.add_argument("--chunk", metavar="SIZE", default="128M",
                   help="balloon chunk size, a multiple of 2M up to 1G (default 128M)")
    p.add_argument("--oom-step", metavar="SIZE",
                   help="most memory given back per pressure step (default: one chunk)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="private tmpfs for the balloon's pages (default /run/uballoon/NAME)")
    p.add_argument("--verify-interval", metavar="S", type=float, default=10.0,
                   help="re-read the balloon's frames this often (default 10)")
    p.add_argument("--guard-interval", metavar="S", type=float, default=0.5,
                   help="check available memory this often (default 0.5)")
    p.add_argument("--holdoff", metavar="S", type=float, default=30.0,
                   help="after memory pressure, wait this long before inflating again "
                   "(default 30)")
    p.add_argument("--shutdown-timeout", metavar="S", type=float, default=30.0,
                   help="on SIGTERM, deflate for at most this long (default 30)")
    p.add_argument("--no-deflate-on-oom", action="store_true",
                   help="never give memory back on pressure without the host")
    p.add_argument("--no-pin", action="store_true",
                   help="no long-term pins (frames may move; the host only accounts)")
    p.add_argument("--release", action="store_true",
                   help="drop a balloon whose host is gone for good, stop its pin holder")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def _size(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except PolicyError as exc:
        raise _UsageError(f"{what}: {exc}") from None


def _name(text: str | None) -> str:
    if text is not None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
            raise _UsageError(f"--name {text!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        return text
    name = _NAME_OK.sub("-", socket.gethostname())[:64]
    return name or "guest"


def _set_oom_score_adj() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")
    except OSError as exc:
        logging.getLogger("uballoon").warning(
            "cannot set oom_score_adj to -1000 (%s; needs CAP_SYS_RESOURCE): the OOM killer "
            "could pick the agent", exc.strerror,
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level.upper())
    try:
        return _main(args)
    except _UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except BalloonError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    name = _name(args.name)
    state_dir = Path(args.state_dir) if args.state_dir else Path("/run/uballoon") / name
    fallback = Path("/dev/shm") / f"uballoon-{name}"
    chunk = _size(args.chunk, "--chunk")
    min_free = _size(args.min_free, "--min-free")
    oom_step = _size(args.oom_step, "--oom-step")
    assert chunk is not None
    if args.release:
        return _release(state_dir, fallback)
    if not args.connect:
        raise _UsageError("--connect ADDR is required (or --release)")
    try:
        address = parse_address(args.connect)
    except PolicyError as exc:
        raise _UsageError(f"--connect: {exc}") from None
    if chunk % (2 << 20) or not (2 << 20) <= chunk <= (1 << 30):
        raise _UsageError(f"--chunk {args.chunk}: use a multiple of 2M from 2M to 1G")
    for flag, value in (("--verify-interval", args.verify_interval),
                        ("--guard-interval", args.guard_interval),
                        ("--shutdown-timeout", args.shutdown_timeout)):
        if not value > 0:
            raise _UsageError(f"{flag} must be positive")
    key = None
    if args.key_file:
        try:
            key = key_from_file_bytes(Path(args.key_file).read_bytes())
        except OSError as exc:
            raise _UsageError(f"--key-file {args.key_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise _UsageError(f"--key-file {args.key_file}: {exc}") from None

    from guest_agent.service import Options, run_blocking

    _set_oom_score_adj()
    options = Options(
        address=address,
        name=name,
        state_dir=state_dir,
        fallback_dir=fallback,
        key=key,
        min_free_bytes=min_free,
        chunk_bytes=chunk,
        oom_step_bytes=oom_step,
        deflate_on_oom=not args.no_deflate_on_oom,
        long_term_pin=not args.no_pin,
        verify_interval_s=args.verify_interval,
        guard_interval_s=args.guard_interval,
        holdoff_s=args.holdoff,
        shutdown_timeout_s=args.shutdown_timeout,
    )
    return run_blocking(options)


def _release(state_dir: Path, fallback: Path) -> int:
    from guest_agent.pool import StateDir, mounted_fs, release_state_dir

    log = logging.getLogger("uballoon")
    found = False
    for directory in (state_dir, fallback):
        if not directory.is_dir():
            continue
        found = True
        count, total, stopped = release_state_dir(directory)
        log.info(
            "released %d chunks (%s) from %s%s", count, format_size(total), directory,
            "; stopped its pin holder" if stopped else "",
        )
        if count:
            log.warning("the host may still count those pages as ballooned until this guest's "
                        "agent connects again")
        mount = mounted_fs(directory)
        if mount.point == Path(os.path.abspath(directory)) and mount.fstype == "tmpfs":
            if StateDir(directory, mounted_here=True).close(unmount=True):
                log.info("unmounted %s", directory)
        elif directory == fallback:
            try:
                directory.rmdir()
            except OSError:
                pass
    if not found:
        log.info("nothing to release: no %s", state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
