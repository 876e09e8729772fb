"""``uballoon-host``: serve guests' balloons, free their memory, share it out by policy."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from host_backend.config import UNKNOWN_POLICIES, HostConfig, load_config
from host_backend.service import HostService, open_listeners, serve, tune_gc
from protocol.addresses import parse_address
from protocol.errors import PolicyError
from protocol.units import format_size, parse_size

log = logging.getLogger("uballoon.host")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uballoon-host",
        description="Serve uballoon guest agents: keep the ledger of their balloons, punch "
        "the memory they give back out of their RAM files, and share capacity by policy.",
    )
    p.add_argument("--listen", action="append", required=True, metavar="ADDR",
                   help="tcp:HOST:PORT, unix:PATH or vsock:PORT (repeatable)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (reloaded on SIGHUP)")
    p.add_argument("--capacity", metavar="SIZE",
                   help="memory lent to guests (default: this machine's memory minus --reserve)")
    p.add_argument("--reserve", metavar="SIZE", help="memory kept for the host (default 1G)")
    p.add_argument("--unknown-guests", choices=UNKNOWN_POLICIES,
                   help="guests not in the config: refuse them, or serve them for accounting")
    p.add_argument("--control", metavar="PATH", help="control socket for uballoonctl")
    p.add_argument("--qmp-dir", metavar="DIR", help="directory for per-guest QMP sockets")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--state-file", metavar="PATH", help="keeps manual targets across restarts")
    p.add_argument("--heartbeat", type=float, metavar="S", help="PING interval (default 5)")
    p.add_argument("--stats-interval", type=float, metavar="S",
                   help="how often guests push statistics (default 5)")
    p.add_argument("--policy-interval", type=float, metavar="S",
                   help="how often the policy runs (default 2)")
    p.add_argument("--grace", type=float, metavar="S",
                   help="how long a disconnected guest keeps its place (default 60)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def machine_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise PolicyError("cannot read MemTotal from /proc/meminfo")


def make_config(args: argparse.Namespace) -> HostConfig:
    config = load_config(args.config) if args.config else HostConfig()
    return config.with_overrides(
        capacity_bytes=parse_size(args.capacity) if args.capacity else None,
        reserve_bytes=parse_size(args.reserve) if args.reserve else None,
        unknown_guests=args.unknown_guests,
        state_file=args.state_file,
        heartbeat_s=args.heartbeat,
        stats_interval_s=args.stats_interval,
        policy_interval_s=args.policy_interval,
        grace_s=args.grace,
    )


def control_servers(service: HostService, args: argparse.Namespace) -> list[Callable[..., Awaitable[Any]]]:
    """The control-plane servers asked for on the command line."""
    servers: list[Callable[..., Awaitable[Any]]] = []
    if args.control:
        from host_backend.control import serve_control

        servers.append(functools.partial(serve_control, service, args.control))
    if args.qmp_dir:
        from host_backend.qmp import serve_qmp

        servers.append(functools.partial(serve_qmp, service, args.qmp_dir))
    if args.metrics:
        from host_backend.metrics import serve_metrics

        servers.append(functools.partial(serve_metrics, service, args.metrics))
    return servers


async def run(args: argparse.Namespace, config: HostConfig, capacity: int) -> None:
    service = HostService(config, capacity, args.config)
    listeners = []
    for text in args.listen:
        address = parse_address(text, listen=True)
        try:
            listeners += await open_listeners(address)
        except OSError as exc:
            raise PolicyError(f"cannot listen on {text}: {exc.strerror or exc}") from None
        log.info("listening on %s", address)
    log.info("capacity for guests: %s; %d guest(s) configured",
             format_size(capacity), len(config.guests))
    await serve(service, listeners, extra=control_servers(service, args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s uballoon-host: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        for text in args.listen:
            parse_address(text, listen=True)
        config = make_config(args)
        capacity = config.capacity_bytes or max(
            0, machine_memory_bytes() - config.reserve_bytes
        )
    except PolicyError as exc:
        print(f"uballoon-host: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    try:
        trio.run(run, args, config, capacity)
    except PolicyError as exc:
        print(f"uballoon-host: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
