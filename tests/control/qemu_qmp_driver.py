"""Drives uballoon's QMP sockets with the real ``qemu.qmp`` library, unchanged.

Run by test_qemu_qmp.py as a subprocess (qemu.qmp is asyncio; the server under test
runs in the test's trio loop).  Usage: ``qemu_qmp_driver.py VM1_SOCKET VM2_SOCKET``,
where vm1 has sent no statistics and vm2 has.  Prints one JSON object of what it saw.
"""

from __future__ import annotations

import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

BALLOON = "/machine/peripheral/balloon0"


async def drive(no_stats_socket: str, stats_socket: str) -> dict:
    seen: dict = {}
    qmp = QMPClient("uballoon-test")
    await qmp.connect(no_stats_socket)  # greeting + qmp_capabilities, as the library does
    seen["greeting"] = dict(qmp.greeting._raw["QMP"])
    seen["version"] = await qmp.execute("query-version")
    seen["commands"] = sorted(c["name"] for c in await qmp.execute("query-commands"))
    with qmp.listener("BALLOON_CHANGE") as listener:
        seen["balloon"] = await qmp.execute("balloon", {"value": 1 << 30})
        seen["event"] = dict(await asyncio.wait_for(listener.get(), 20))
    seen["query-balloon"] = await qmp.execute("query-balloon")
    try:
        await qmp.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
    except ExecuteError as exc:
        seen["no-stats"] = {"class": exc.error_class, "desc": exc.error.error.desc}
    try:
        await qmp.execute("balloon", {"value": 0})
    except ExecuteError as exc:
        seen["balloon-0"] = {"class": exc.error_class, "desc": exc.error.error.desc}
    await qmp.disconnect()

    qmp = QMPClient("uballoon-test-2")
    await qmp.connect(stats_socket)
    seen["qom-set"] = await qmp.execute("qom-set", {
        "path": BALLOON, "property": "guest-stats-polling-interval", "value": 5})
    seen["guest-stats"] = await qmp.execute("qom-get", {"path": BALLOON,
                                                        "property": "guest-stats"})
    await qmp.disconnect()
    return seen


def legacy(stats_socket: str) -> dict:
    """The synchronous wrapper qmp-shell and many scripts use."""
    monitor = QEMUMonitorProtocol(stats_socket)
    try:
        monitor.connect()
        return {"query-balloon": monitor.cmd("query-balloon"),
                "unknown": monitor.cmd_raw("no-such-command")}
    finally:
        monitor.close()


def main() -> None:
    no_stats_socket, stats_socket = sys.argv[1:3]
    seen = asyncio.run(drive(no_stats_socket, stats_socket))
    seen["legacy"] = legacy(stats_socket)
    json.dump(seen, sys.stdout)


if __name__ == "__main__":
    main()
