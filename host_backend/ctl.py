"""``uballoonctl``: the operator's command for a running ``uballoon-host``.

It speaks the control socket's JSON lines (docs/control.md) over a plain blocking Unix
socket: a CLI makes one request and prints the answer, so it has no event loop and
imports no trio.  What it prints is for people; ``--json`` prints the raw results for
scripts.

Exit status: 0 done; 1 the host refused (unknown guest, a size above RAM, ...), could
not be reached, or ``set --wait`` timed out; 2 a malformed command line (a size such as
``12Q``); 130 interrupted (except ``watch``, for which Ctrl-C is the way out: 0).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from protocol.constants import BalloonState, StatTag
from protocol.errors import PolicyError
from protocol.units import PAGE_SIZE, format_size, parse_size

DEFAULT_CONTROL = "/run/uballoon/control.sock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_REPLY_BYTES = 64 * 1024 * 1024  # a status of 10,000 guests is a few MiB


class UsageError(Exception):
    """A malformed command line (exit 2)."""


class ControlClient:
    """One connection to the control socket.

    Raises OSError if the socket cannot be reached, PolicyError with the host's message
    when it refuses a request, ConnectionError if it closes the connection.
    """

    def __init__(self, path: str, timeout_s: float | None = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
        except BaseException:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def settimeout(self, timeout_s: float | None) -> None:
        self._sock.settimeout(timeout_s)

    def _send(self, cmd: str, args: dict[str, Any]) -> None:
        self._sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")

    def _receive(self) -> Any:
        line = self._reader.readline(MAX_REPLY_BYTES)
        if not line.endswith(b"\n"):
            raise ConnectionError("uballoon-host closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise PolicyError(reply.get("error") or "request refused")
        return reply["result"]

    def request(self, cmd: str, **args: Any) -> Any:
        self._send(cmd, args)
        return self._receive()

    def stream(self, cmd: str, **args: Any) -> Iterator[Any]:
        """Each result of a streaming request (``watch``), as it arrives."""
        self._send(cmd, args)
        while True:
            yield self._receive()


# --------------------------------------------------------------------------------------
# Rendering (pure: tests call these directly)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _size_or_dash(value: int | None) -> str:
    return "-" if value is None else format_size(value)


STATUS_HEADER = ("GUEST", "RAM", "TARGET", "ACTUAL", "RECLAIMED", "AVAILABLE", "PRESSURE",
                 "CONNECTED", "MODE", "REASON")


def format_status(guests: Sequence[dict[str, Any]], pool: dict[str, Any] | None = None) -> str:
    """The ``status`` table.  RECLAIMED is what the host verifiably got back (freed);
    a ``*`` after TARGET marks an operator's target."""
    if not guests:
        text = "no guests"
    else:
        rows = [
            (
                g["name"],
                format_size(g["ram_bytes"]),
                format_size(g["target_bytes"]) + ("*" if g["manual"] else ""),
                format_size(g["actual_bytes"]),
                format_size(g["freed_bytes"]),
                _size_or_dash(g["available_bytes"]),
                "-" if g["pressure"] is None else f"{g['pressure']:.1f}%",
                "yes" if g["connected"] else "no",
                g["reclaim"],
                g["reason"] or "-",
            )
            for g in guests
        ]
        text = _table(STATUS_HEADER, rows, right={1, 2, 3, 4, 5, 6})
        if any(g["manual"] for g in guests):
            text += "\n* set by an operator (uballoonctl set GUEST auto returns it to the policy)"
    if pool is not None:
        text += (f"\npool: capacity {format_size(pool['capacity_bytes'])}, "
                 f"free {format_size(pool['free_bytes'])}")
    return text


def format_pool(pool: dict[str, Any]) -> str:
    """Capacity and where it went: capacity = free + Σ committed (RAM − host-freed)."""
    committed = pool["committed_bytes"]
    total = sum(committed.values())
    capacity = pool["capacity_bytes"]

    def share(value: int) -> str:
        return f"{100 * value / capacity:.1f}%" if capacity else "-"

    rows = [
        ("capacity", format_size(capacity), "", ""),
        ("free", format_size(pool["free_bytes"]), share(pool["free_bytes"]), ""),
        ("committed", format_size(total), share(total), "RAM minus host-freed, per guest:"),
        *[(f"  {name}", format_size(value), share(value), "")
          for name, value in sorted(committed.items())],
        ("host-freed", format_size(pool["freed_bytes"]), "", "got back from balloons"),
        ("ballooned", format_size(pool["ballooned_bytes"]), "", "held in balloons"),
    ]
    return _table(("", "", "", ""), rows, right={1, 2}).split("\n", 1)[1]


_BYTE_STATS = {StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MEMFREE, StatTag.MEMTOT,
               StatTag.AVAIL, StatTag.CACHES, StatTag.MIN_FREE}
_PERCENT_STATS = {StatTag.PSI_SOME_AVG10, StatTag.PSI_SOME_AVG60, StatTag.PSI_SOME_AVG300,
                  StatTag.PSI_FULL_AVG10, StatTag.PSI_FULL_AVG60, StatTag.PSI_FULL_AVG300}
_MICROSECOND_STATS = {StatTag.PSI_SOME_TOTAL, StatTag.PSI_FULL_TOTAL}
_PAGE_STATS = {StatTag.BALLOON_PAGES, StatTag.BALLOON_PENDING_PAGES}


def format_stat_value(tag: int, value: int) -> str:
    if tag in _BYTE_STATS:
        return format_size(value)
    if tag in _PERCENT_STATS:
        return f"{value / 100:.2f}%"
    if tag in _MICROSECOND_STATS:
        return f"{value / 1e6:.3f}s"
    if tag in _PAGE_STATS:
        return f"{format_size(value * PAGE_SIZE)} ({value} pages)"
    if tag == StatTag.BALLOON_STATE:
        names = [flag.name.lower() for flag in BalloonState if value & flag and flag.name]
        unknown = value & ~sum(BalloonState)
        if unknown:
            names.append(f"{unknown:#x}")
        return ", ".join(names) or "none"
    if tag == StatTag.CGROUP:
        return "yes" if value else "no"
    return str(value)


def format_stats(name: str, stats: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    age = max(0.0, now - stats["last_update"])
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats["last_update"]))
    interval = stats["polling_interval_s"]
    lines = [f"{name}: updated {updated} ({age:.0f}s ago), "
             + (f"polled every {interval}s" if interval else "polling off")]
    rows = [(s["name"], format_stat_value(s["tag"], s["value"])) for s in stats["stats"]]
    if rows:
        lines.append(_table(("STAT", "VALUE"), rows, right=set()))
    return "\n".join(lines)


def format_guest(g: dict[str, Any]) -> str:
    rows = [
        ("RAM", format_size(g["ram_bytes"])),
        ("floor", format_size(g["min_bytes"])),
        ("shares", str(g["shares"])),
        ("target", format_size(g["target_bytes"])
         + (" (set by an operator)" if g["manual"] else " (policy)")),
        ("actual", format_size(g["actual_bytes"])),
        ("ballooned", format_size(g["ballooned_bytes"])),
        ("reclaimed", format_size(g["freed_bytes"]) + f" ({g['reclaim']})"),
        ("available", _size_or_dash(g["available_bytes"])),
        ("pressure", "-" if g["pressure"] is None else f"{g['pressure']:.1f}%"),
        ("connected", "yes" if g["connected"] else "no"),
        ("authenticated", "yes" if g.get("authenticated") else "no"),
        ("stable frames", "yes" if g.get("stable") else "no"),
        ("floor reached", "yes" if g.get("floor_reached") else "no"),
        ("reason", g["reason"] or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([g["name"]] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def progress(start: int, actual: int, target: int) -> float:
    """How far ``actual`` has come from ``start`` towards ``target``, 0.0-1.0."""
    total = abs(target - start)
    if total == 0 or abs(target - actual) < PAGE_SIZE:
        return 1.0
    return min(1.0, max(0.0, (total - abs(target - actual)) / total))


def progress_line(name: str, fraction: float, guest: dict[str, Any], *, bar: bool,
                  width: int = 30) -> str:
    state = "" if guest["connected"] else "  (disconnected)"
    figures = (f"actual {format_size(guest['actual_bytes'])} -> "
               f"target {format_size(guest['target_bytes'])}{state}")
    if bar:
        filled = int(round(fraction * width))
        return f"{name} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}  {figures}"
    return f"{name}: {fraction:.0%} ({figures})"


# --------------------------------------------------------------------------------------
# Commands


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, sort_keys=True), file=out)


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with ControlClient(args.control, args.timeout) as client:
        result = client.request("status")
    if args.json:
        _print_json(result, out)
    else:
        print(format_status(result["guests"], result["pool"]), file=out)
    return EXIT_OK


def cmd_guest(args: argparse.Namespace, out: TextIO) -> int:
    with ControlClient(args.control, args.timeout) as client:
        result = client.request("guest", name=args.guest)
    if args.json:
        _print_json(result, out)
    else:
        print(format_guest(result), file=out)
    return EXIT_OK


def _parse_target(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return parse_size(text)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None


def cmd_set(args: argparse.Namespace, out: TextIO) -> int:
    keep_bytes = _parse_target(args.size)  # before connecting: a typo is exit 2
    if args.wait_timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    with ControlClient(args.control, args.timeout) as client:
        result = client.request("set", name=args.guest,
                                size="auto" if keep_bytes is None else keep_bytes)
    guest = result["guest"]
    if args.json:
        _print_json(result, out)
    else:
        who = "the policy's" if keep_bytes is None else "target"
        print(f"{args.guest}: {who} {format_size(result['target_bytes'])} "
              f"(of {format_size(guest['ram_bytes'])} RAM; actual "
              f"{format_size(guest['actual_bytes'])})", file=out)
    if not args.wait:
        return EXIT_OK
    return wait_for_target(args.control, args.guest, args.wait_timeout, out)


def wait_for_target(path: str, name: str, timeout_s: float, out: TextIO) -> int:
    """Follow ``name`` until its actual is within a page of its target: a progress bar
    on a terminal, a line per change otherwise.  Exit 1 on timeout."""
    bar = out.isatty()
    deadline = time.monotonic() + timeout_s
    start: int | None = None
    last_text = ""
    guest: dict[str, Any] | None = None
    with ControlClient(path, timeout_s) as client:
        try:
            for guest in client.stream("watch", name=name, min_interval_s=0.1):
                if start is None:
                    start = guest["actual_bytes"]
                fraction = progress(start, guest["actual_bytes"], guest["target_bytes"])
                text = progress_line(name, fraction, guest, bar=bar)
                if text != last_text:
                    print(("\r\x1b[K" + text) if bar else text, end="" if bar else "\n",
                          file=out, flush=True)
                    last_text = text
                if abs(guest["actual_bytes"] - guest["target_bytes"]) < PAGE_SIZE:
                    if bar:
                        print(file=out)
                    print(f"{name}: reached {format_size(guest['target_bytes'])}", file=out)
                    return EXIT_OK
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                client.settimeout(remaining)
        except TimeoutError:
            if bar:
                print(file=out)
            where = ("" if guest is None else f": actual {format_size(guest['actual_bytes'])}, "
                     f"target {format_size(guest['target_bytes'])}")
            print(f"uballoonctl: {name} did not reach its target within {timeout_s:g}s{where}",
                  file=sys.stderr)
            return EXIT_FAILED
    raise ConnectionError("uballoon-host closed the connection")  # pragma: no cover


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    with ControlClient(args.control, args.timeout) as client:
        result = client.request("stats", name=args.guest)
    if args.json:
        _print_json(result, out)
        return EXIT_OK
    if result["stats"] is None:
        raise PolicyError(f"{args.guest} has not sent statistics yet")
    print(format_stats(args.guest, result["stats"]), file=out)
    return EXIT_OK


def cmd_pool(args: argparse.Namespace, out: TextIO) -> int:
    with ControlClient(args.control, args.timeout) as client:
        result = client.request("pool")
    if args.json:
        _print_json(result, out)
    else:
        print(format_pool(result), file=out)
    return EXIT_OK


def cmd_release(args: argparse.Namespace, out: TextIO) -> int:
    with ControlClient(args.control, args.timeout) as client:
        client.request("release", name=args.guest)
    print(f"released {args.guest}: its balloon is forgotten and its capacity returned",
          file=out)
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    tty = out.isatty()
    try:
        with ControlClient(args.control, None) as client:  # no timeout: waits for changes
            for result in client.stream("watch", min_interval_s=args.interval):
                if args.json:
                    print(json.dumps(result, sort_keys=True), file=out, flush=True)
                    continue
                stamp = time.strftime("%H:%M:%S")
                table = format_status(result["guests"], result["pool"])
                if tty:  # redraw in place
                    out.write(f"\x1b[H\x1b[2Juballoon status at {stamp} (Ctrl-C to quit)\n"
                              f"\n{table}\n")
                else:
                    out.write(f"--- {stamp}\n{table}\n\n")
                out.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    raise ConnectionError("uballoon-host closed the connection")  # pragma: no cover


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uballoonctl",
        description="Inspect and steer a running uballoon-host.  Sizes are the memory a "
                    "guest keeps, as with QMP's balloon: 512M, 2G, 1.5G or bytes.",
    )
    parser.add_argument("--control", metavar="PATH",
                        default=os.environ.get("UBALLOON_CONTROL", DEFAULT_CONTROL),
                        help="the host's control socket (default: $UBALLOON_CONTROL or "
                             f"{DEFAULT_CONTROL})")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--request-timeout", dest="timeout", type=float, default=10.0,
                        metavar="SECONDS", help="give up on an answer after this long")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="a table of every guest")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("guest", help="everything about one guest")
    p.add_argument("guest", metavar="GUEST")
    p.set_defaults(func=cmd_guest)

    p = sub.add_parser("set", help="set the memory a guest keeps (or 'auto')")
    p.add_argument("guest", metavar="GUEST")
    p.add_argument("size", metavar="SIZE|auto",
                   help="what the guest keeps, at most its RAM; 'auto' hands it back to "
                        "the policy")
    p.add_argument("--wait", action="store_true",
                   help="follow the guest until it gets there (a progress bar on a terminal)")
    p.add_argument("--timeout", dest="wait_timeout", type=float, default=300.0,
                   metavar="SECONDS", help="with --wait: give up after this long (default 300)")
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("stats", help="a guest's latest statistics")
    p.add_argument("guest", metavar="GUEST")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("watch", help="a live status view (Ctrl-C to quit)")
    p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                   help="redraw at most this often (default 0.5)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("pool", help="host capacity and where it went")
    p.set_defaults(func=cmd_pool)

    p = sub.add_parser("release", help="forget a disconnected guest's balloon for good")
    p.add_argument("guest", metavar="GUEST")
    p.set_defaults(func=cmd_release)
    return parser


def _connection_problem(path: str, exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such socket (is uballoon-host running with --control?)",
        errno.EACCES: "permission denied (the control socket is owner-only: run as its owner)",
        errno.EPERM: "permission denied (the control socket is owner-only: run as its owner)",
        errno.ECONNREFUSED: "connection refused (no uballoon-host is serving it)",
        errno.ENOTSOCK: "not a socket",
    }
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, out)
    except UsageError as exc:
        print(f"uballoonctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PolicyError as exc:
        print(f"uballoonctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConnectionError as exc:
        if isinstance(exc, ConnectionRefusedError | BrokenPipeError | ConnectionResetError):
            print(f"uballoonctl: {args.control}: {_connection_problem(args.control, exc)}",
                  file=sys.stderr)
        else:
            print(f"uballoonctl: {args.control}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"uballoonctl: {args.control}: {_connection_problem(args.control, exc)}",
              file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # a reply that is not JSON: not a uballoon control socket
        print(f"uballoonctl: {args.control}: unexpected answer ({exc})", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
