import pytest

from protocol.addresses import VMADDR_CID_ANY, Address, parse_address
from protocol.errors import PolicyError
from protocol.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, want",
    [
        ("tcp:127.0.0.1:7000", Address("tcp", host="127.0.0.1", port=7000)),
        ("tcp:[::1]:7000", Address("tcp", host="::1", port=7000)),
        ("tcp:host.example:1", Address("tcp", host="host.example", port=1)),
        ("unix:/run/uballoon.sock", Address("unix", path="/run/uballoon.sock")),
        ("vsock:2:7000", Address("vsock", cid=2, port=7000)),
    ],
)
def test_addresses_parse_and_print_back(text, want):
    assert parse_address(text) == want
    assert str(want) == text


def test_vsock_listen_on_any_cid():
    assert parse_address("vsock:7000", listen=True) == Address(
        "vsock", cid=VMADDR_CID_ANY, port=7000
    )
    with pytest.raises(PolicyError, match="vsock:CID:PORT"):
        parse_address("vsock:7000")


@pytest.mark.parametrize(
    "text", ["", "tcp", "tcp:1.2.3.4", "tcp:1.2.3.4:99999", "udp:x:1", "vsock:a:b", "unix:"]
)
def test_bad_addresses_are_named(text):
    with pytest.raises(PolicyError, match="invalid"):
        parse_address(text)


@pytest.mark.parametrize(
    "text, size",
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29), ("4096", 4096),
     ("64k", 64 << 10), ("1GiB", 1 << 30), (123, 123)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "G", "-5M", "1.2.3G", "five"])
def test_malformed_sizes_are_one_line_errors(text):
    with pytest.raises(PolicyError, match="invalid size") as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_format_size():
    assert format_size(3 << 29) == "1.5G"
    assert format_size(512 << 20) == "512M"
    assert format_size(100) == "100B"
