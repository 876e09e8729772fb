"""The host's configuration: a TOML file plus command-line overrides.

::

    capacity = "20G"            # memory the host lends to guests (default: MemTotal - reserve)
    reserve = "2G"              # kept for the host itself when capacity is not given
    unknown_guests = "refuse"   # or "account": serve unnamed guests for accounting only
    handshake_timeout_s = 10    # HELLO to WELCOME, or the guest is dropped
    heartbeat_s = 5             # PING interval; 3 missed intervals drop a guest
    stats_interval_s = 5        # how often guests push statistics
    policy_interval_s = 2       # how often the policy runs (it also runs on events)
    grace_s = 60                # a disconnected guest keeps its place this long
    max_naks = 16               # consecutive refused reports before a guest is dropped
    state_file = "/var/lib/uballoon/state.json"   # manual targets survive restarts

    [guest.vm1]
    max = "2G"                  # its RAM; a HELLO claiming more is refused
    min = "512M"                # guaranteed floor
    shares = 1000
    key_file = "/etc/uballoon/vm1.key"
    ram_file = "/dev/shm/vm1.ram"      # guest-physical address == file offset
    # or, where the map is not the identity (QEMU pc above 3.5G, q35 above 2.75G):
    # ram = [ { start = "0", length = "3G", file = "/dev/shm/vm1.ram", offset = "0" },
    #         { start = "4G", length = "1G", file = "/dev/shm/vm1.ram", offset = "3G" } ]

Parsing is pure (bytes in, ``HostConfig`` out); every mistake is a ``PolicyError``
naming the key and what is wrong.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocol.codec import NAME_RE
from protocol.errors import PolicyError
from protocol.units import PAGE_SIZE, parse_size

UNKNOWN_POLICIES = ("refuse", "account")


@dataclass(frozen=True)
class RamRegion:
    """One piece of a guest's RAM: guest-physical [start, start+length) lives in
    ``file`` at ``offset``.  Bytes, all multiples of 4 KiB."""

    start: int
    length: int
    file: str
    offset: int = 0


@dataclass(frozen=True)
class GuestConfig:
    name: str
    max_bytes: int
    min_bytes: int = 0
    shares: int = 1000
    key_file: str | None = None
    ram: tuple[RamRegion, ...] = ()

    @property
    def reclaimable(self) -> bool:
        """True when the host can reach this guest's RAM (and so free it)."""
        return bool(self.ram)


@dataclass(frozen=True)
class HostConfig:
    capacity_bytes: int | None = None
    reserve_bytes: int = 1 << 30
    unknown_guests: str = "refuse"
    handshake_timeout_s: float = 10.0
    heartbeat_s: float = 5.0
    stats_interval_s: float = 5.0
    policy_interval_s: float = 2.0
    grace_s: float = 60.0
    max_naks: int = 16
    state_file: str | None = None
    guests: dict[str, GuestConfig] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> HostConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_TOP_KEYS = {
    "capacity", "reserve", "unknown_guests", "handshake_timeout_s", "heartbeat_s",
    "stats_interval_s", "policy_interval_s", "grace_s", "max_naks", "state_file", "guest",
}
_GUEST_KEYS = {"min", "max", "shares", "key_file", "ram_file", "ram"}


def load_config(path: str | Path) -> HostConfig:
    """Read and check a config file.  Raises PolicyError naming the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(data, source=str(path))


def parse_config(data: bytes, source: str = "config") -> HostConfig:
    """Parse TOML bytes.  Raises PolicyError naming the key and the problem."""
    try:
        raw = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise PolicyError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
    config = HostConfig(
        capacity_bytes=_size(raw, "capacity", source) if "capacity" in raw else None,
        reserve_bytes=_size(raw, "reserve", source) if "reserve" in raw else 1 << 30,
        unknown_guests=_choice(raw, "unknown_guests", UNKNOWN_POLICIES, source),
        handshake_timeout_s=_seconds(raw, "handshake_timeout_s", 10.0, source),
        heartbeat_s=_seconds(raw, "heartbeat_s", 5.0, source),
        stats_interval_s=_seconds(raw, "stats_interval_s", 5.0, source),
        policy_interval_s=_seconds(raw, "policy_interval_s", 2.0, source),
        grace_s=_seconds(raw, "grace_s", 60.0, source),
        max_naks=int(_seconds(raw, "max_naks", 16, source)),
        state_file=str(raw["state_file"]) if "state_file" in raw else None,
    )
    guests = raw.get("guest", {})
    if not isinstance(guests, dict):
        raise PolicyError(f"{source}: [guest.NAME] must be tables")
    parsed = {name: _guest(name, table, source) for name, table in guests.items()}
    return replace(config, guests=parsed)


def _guest(name: str, table: Any, source: str) -> GuestConfig:
    where = f"{source}: [guest.{name}]"
    if not NAME_RE.match(name):
        raise PolicyError(f"{where}: a guest name must match [A-Za-z0-9_.-]{{1,64}}")
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table")
    unknown = set(table) - _GUEST_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    if "max" not in table:
        raise PolicyError(f"{where}: 'max' (the guest's RAM size) is required")
    max_bytes = _size(table, "max", where)
    min_bytes = _size(table, "min", where) if "min" in table else 0
    if min_bytes > max_bytes:
        raise PolicyError(f"{where}: min ({table['min']}) is larger than max ({table['max']})")
    shares = table.get("shares", 1000)
    if not isinstance(shares, int) or shares < 1:
        raise PolicyError(f"{where}: shares must be a whole number of at least 1")
    if "ram_file" in table and "ram" in table:
        raise PolicyError(f"{where}: give either ram_file or ram, not both")
    regions: tuple[RamRegion, ...] = ()
    if "ram_file" in table:
        regions = (RamRegion(0, max_bytes, str(table["ram_file"]), 0),)
    elif "ram" in table:
        items = table["ram"]
        if not isinstance(items, list) or not items:
            raise PolicyError(f"{where}: ram must be a list of {{start, length, file, offset}}")
        regions = tuple(_region(item, i, where) for i, item in enumerate(items))
    _check_regions(regions, max_bytes, where)
    key_file = str(table["key_file"]) if "key_file" in table else None
    return GuestConfig(name, max_bytes, min_bytes, shares, key_file, regions)


def _region(item: Any, index: int, where: str) -> RamRegion:
    here = f"{where} ram[{index}]"
    if not isinstance(item, dict) or not {"start", "length", "file"} <= set(item):
        raise PolicyError(f"{here}: needs start, length and file (and optionally offset)")
    extra = set(item) - {"start", "length", "file", "offset"}
    if extra:
        raise PolicyError(f"{here}: unknown key(s) {', '.join(sorted(extra))}")
    return RamRegion(
        start=_size(item, "start", here),
        length=_size(item, "length", here),
        file=str(item["file"]),
        offset=_size(item, "offset", here) if "offset" in item else 0,
    )


def _check_regions(regions: tuple[RamRegion, ...], max_bytes: int, where: str) -> None:
    for i, r in enumerate(regions):
        for name in ("start", "length", "offset"):
            if getattr(r, name) % PAGE_SIZE:
                raise PolicyError(f"{where} ram[{i}]: {name} must be a multiple of 4 KiB")
        if r.length == 0:
            raise PolicyError(f"{where} ram[{i}]: length must not be 0")
    ordered = sorted(regions, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.start + a.length > b.start:
            raise PolicyError(f"{where}: RAM regions at {a.start:#x} and {b.start:#x} overlap")
    total = sum(r.length for r in regions)
    if total > max_bytes:
        raise PolicyError(f"{where}: the RAM map covers {total} bytes, more than max")


def _size(table: dict[str, Any], key: str, where: str) -> int:
    value = table[key]
    try:
        size = parse_size(value if isinstance(value, int) else str(value))
    except PolicyError as exc:
        raise PolicyError(f"{where}: {key}: {exc}") from None
    return size


def _seconds(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PolicyError(f"{where}: {key} must be a positive number")
    return float(value)


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise PolicyError(f"{where}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)
