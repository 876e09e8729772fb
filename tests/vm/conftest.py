"""Fixtures for the VM tests: a booted guest and a ``uballoon-host`` process serving it.

A test module describes its guest with module-level constants, read here:

    GUEST = "vm1"                     # the agent's --name and the host's [guest.NAME]
    VM = {"memory": "2G"}             # GuestVM(**VM) (fw_cfg gets the guest's key)
    HOST = {"stats_interval_s": 1}    # Host(**HOST)
    MIN = 0                           # the guest's floor in the host's config

One VM and one host per module (booting costs ~5 s under TCG); each test starts and
stops its own agents, so tests do not depend on one another.  Everything is stopped on
every exit path: the host and the wiretap by PID (``Host.close``), QEMU by the
harness.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.vm.harness import GuestVM, skip_reason
from tests.vm.helpers import KEY_ITEM, GuestSpec, Host, new_key


def _module_setting(request: pytest.FixtureRequest, name: str, default: Any) -> Any:
    return getattr(request.module, name, default)


@pytest.fixture(scope="module")
def guest_name(request: pytest.FixtureRequest) -> str:
    return str(_module_setting(request, "GUEST", "vm1"))


@pytest.fixture(scope="module")
def guest_key() -> bytes:
    return new_key()


@pytest.fixture(scope="module")
def vm(request: pytest.FixtureRequest, guest_key: bytes) -> Iterator[GuestVM]:
    """The module's guest, booted once, with its key readable over fw_cfg."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    kwargs = dict(_module_setting(request, "VM", {"memory": "2G"}))
    with GuestVM(fw_cfg={KEY_ITEM: guest_key}, **kwargs) as guest:
        yield guest


@pytest.fixture(scope="module")
def host(
    request: pytest.FixtureRequest, vm: GuestVM, guest_key: bytes, guest_name: str
) -> Iterator[Host]:
    """``uballoon-host`` with the guest configured: its RAM map (the harness's
    ``ram_map``), its key, ``max`` = its RAM."""
    spec = GuestSpec(
        guest_name, vm.memory_bytes, min_bytes=int(_module_setting(request, "MIN", 0)),
        key=guest_key, ram_map=vm.ram_map,
    )
    with Host([spec], **dict(_module_setting(request, "HOST", {}))) as running:
        yield running
