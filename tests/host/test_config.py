"""The host's TOML configuration: what operators write, and every mistake named."""

import pytest

from host_backend.config import RamRegion, parse_config
from protocol.errors import PolicyError

GOOD = b"""
capacity = "20G"
unknown_guests = "account"
heartbeat_s = 2

[guest.vm1]
max = "2G"
min = "512M"
shares = 2000
key_file = "/etc/uballoon/vm1.key"
ram_file = "/dev/shm/vm1.ram"

[guest.big]
max = "5G"
ram = [ { start = "0", length = "3G", file = "/dev/shm/big.ram", offset = "0" },
        { start = "4G", length = "2G", file = "/dev/shm/big.ram", offset = "3G" } ]
"""


def test_a_full_config_parses():
    config = parse_config(GOOD)
    assert config.capacity_bytes == 20 << 30
    assert config.unknown_guests == "account"
    assert config.heartbeat_s == 2
    vm1 = config.guests["vm1"]
    assert (vm1.max_bytes, vm1.min_bytes, vm1.shares) == (2 << 30, 512 << 20, 2000)
    assert vm1.ram == (RamRegion(0, 2 << 30, "/dev/shm/vm1.ram", 0),)
    assert config.guests["big"].ram[1] == RamRegion(4 << 30, 2 << 30, "/dev/shm/big.ram", 3 << 30)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"capacity = 'lots'", "capacity: invalid size"),
        (b"colour = 1", "unknown setting(s) colour"),
        (b"[guest.vm1]\nmin='1G'", "'max' (the guest's RAM size) is required"),
        (b"[guest.vm1]\nmax='1G'\nmin='2G'", "min (2G) is larger than max (1G)"),
        (b"[guest.vm1]\nmax='1G'\nshares=0", "shares must be a whole number"),
        (b"[guest.'bad name']\nmax='1G'", "guest name must match"),
        (b"[guest.vm1]\nmax='1G'\nram_file='a'\nram=[]", "either ram_file or ram"),
        (b"[guest.vm1]\nmax='1G'\nram=[{start='0',length='1G'}]", "needs start, length and file"),
        (b"[guest.vm1]\nmax='1G'\nram=[{start='0',length='4097',file='f'}]", "multiple of 4 KiB"),
        (b"[guest.vm1]\nmax='1G'\nram=[{start='0',length='2G',file='f'}]", "more than max"),
        (b"[guest.v]\nmax='2G'\nram=[{start='0',length='1G',file='f'},"
         b"{start='512M',length='1G',file='f'}]", "overlap"),
        (b"unknown_guests = 'maybe'", "must be one of refuse, account"),
        (b"heartbeat_s = -1", "must be a positive number"),
        (b"not toml [", "not valid TOML"),
    ],
)
def test_mistakes_are_named(text, message):
    with pytest.raises(PolicyError) as info:
        parse_config(text)
    assert message in str(info.value)
