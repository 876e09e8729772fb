"""``python -m protocol dump [FILE|-]``: decode a captured uballoon byte stream."""

from __future__ import annotations

import argparse
import sys

from protocol.dissect import dump


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol", description="Tools for the uballoon wire protocol."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dump_cmd = sub.add_parser(
        "dump", help="decode a captured byte stream (one direction), one JSON object per frame"
    )
    dump_cmd.add_argument("file", nargs="?", default="-", help="capture file, or - for stdin")
    args = parser.parse_args(argv)
    if args.file == "-":
        return dump(sys.stdin.buffer, sys.stdout)
    try:
        with open(args.file, "rb") as stream:
            return dump(stream, sys.stdout)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
