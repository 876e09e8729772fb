"""Sizes as operators write them (``512M``, ``2G``, ``1073741824``) and as we print them.

One place for this, used by every command line, config file and control socket.
Suffixes are binary (K = 1024), as in QEMU's ``-m 2G`` and ``balloon`` commands.
"""

from __future__ import annotations

import re

from protocol.errors import PolicyError

PAGE_SIZE = 4096  # virtio-balloon's page unit (VIRTIO_BALLOON_PFN_SHIFT = 12)
PAGE_SHIFT = 12

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size such as ``512M``, ``2G``, ``1.5G`` or a plain number of bytes.

    Raises PolicyError naming the text if it is not a size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise PolicyError(f"invalid size {text}: a size cannot be negative")
        return text
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise PolicyError(
            f"invalid size {text!r}: use bytes or a number with K, M, G or T (e.g. 512M, 2G)"
        )
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[
        unit.upper()
    ]
    return int(value)


def format_size(size_bytes: int | float) -> str:
    """``1610612736`` -> ``'1.5G'``; exact multiples print without a fraction."""
    size = int(size_bytes)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale:
            if size % scale == 0:
                return f"{sign}{size // scale}{unit}"
            return f"{sign}{size / scale:.1f}{unit}"
    return f"{sign}{size}B"


def bytes_to_pages(size_bytes: int) -> int:
    """Whole 4 KiB pages in ``size_bytes`` (rounded down)."""
    return size_bytes >> PAGE_SHIFT


def pages_to_bytes(pages: int) -> int:
    return pages << PAGE_SHIFT
