"""A real QMP client library (qemu.qmp) works against uballoon's sockets unchanged."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import trio

from host_backend.qmp import serve_qmp
from protocol.constants import StatTag
from tests.control.fake_host import GIB, MIB, FakeHost

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qemu.qmp") is None,
                                reason="qemu.qmp is not installed (pip install qemu.qmp)")

DRIVER = Path(__file__).with_name("qemu_qmp_driver.py")
REPO = Path(__file__).resolve().parents[2]


async def test_qemu_qmp_drives_our_sockets_unchanged(tmp_path):
    host = FakeHost(follow=True)  # the guest reaches a new target at once
    host.add("vm1", 2 * GIB)
    host.add("vm2", 4 * GIB)
    host.set_stats("vm2", {StatTag.MEMFREE: 700 * MIB, StatTag.MEMTOT: 4 * GIB},
                   when=1_700_000_123.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_qmp, host, tmp_path)
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, str(DRIVER), str(tmp_path / "vm1.qmp"),
                 str(tmp_path / "vm2.qmp")],
                capture_stdout=True, capture_stderr=True, check=False,
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            )
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)

    assert seen["greeting"]["capabilities"] == ["oob"]
    assert seen["greeting"]["version"]["qemu"]["major"] == 8
    assert "uballoon" in seen["version"]["package"]
    assert {"balloon", "query-balloon", "qom-get", "qom-set"} <= set(seen["commands"])
    assert seen["balloon"] == {}
    assert seen["event"]["event"] == "BALLOON_CHANGE"
    assert seen["event"]["data"] == {"actual": GIB}
    assert seen["query-balloon"] == {"actual": GIB}
    assert seen["no-stats"] == {"class": "GenericError",
                                "desc": "guest hasn't updated any stats yet"}
    assert seen["balloon-0"] == {"class": "GenericError",
                                 "desc": "Parameter 'value' expects a size"}
    assert seen["qom-set"] == {}
    assert host.record("vm2").interval_s == 5
    assert seen["guest-stats"]["last-update"] == 1_700_000_123
    assert seen["guest-stats"]["stats"]["stat-free-memory"] == 700 * MIB
    assert seen["guest-stats"]["stats"]["stat-major-faults"] == 2**64 - 1
    assert seen["legacy"]["query-balloon"] == {"actual": 4 * GIB}
    assert seen["legacy"]["unknown"]["error"] == {
        "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}
