"""Prometheus exposition: a strict parser of format 0.0.4 checks what we serve."""

from __future__ import annotations

import re

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from host_backend.metrics import (
    CONTENT_TYPE,
    GUEST_GAUGES,
    parse_metrics_address,
    render_metrics,
    serve_metrics,
)
from protocol.errors import PolicyError
from tests.control.fake_host import GIB, MIB, FakeHost

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
HELP_RE = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE_RE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SAMPLE_RE = re.compile(rf"({NAME})(\{{.*\}})? (\S+)")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_labels(text: str) -> dict[str, str]:
    body = text[1:-1]
    labels, pos = {}, 0
    while pos < len(body):
        match = LABEL_RE.match(body, pos)
        assert match, f"bad labels {text!r}"
        value = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), match[2])
        assert match[1] not in labels
        labels[match[1]] = value
        pos = match.end()
    return labels


def parse_exposition(text: str) -> dict[str, dict]:
    """Text format 0.0.4, strictly: every sample's family has HELP then TYPE before its
    samples, families are not interleaved, values are floats, the text ends in '\\n'."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if match := HELP_RE.fullmatch(line):
            assert match[1] not in families, f"family {match[1]} twice"
            current = families[match[1]] = {"help": match[2], "type": None, "samples": []}
        elif match := TYPE_RE.fullmatch(line):
            assert current is families.get(match[1]) and current["type"] is None
            current["type"] = match[2]
        elif match := SAMPLE_RE.fullmatch(line):
            assert current is families.get(match[1]), f"sample outside its family: {line}"
            assert current["type"] == "gauge"
            labels = parse_labels(match[2]) if match[2] else {}
            current["samples"].append((labels, float(match[3])))
        else:
            raise AssertionError(f"not a 0.0.4 line: {line!r}")
    return families


def value(families, name, **labels) -> float:
    matches = [v for ls, v in families[name]["samples"] if ls == labels]
    assert len(matches) == 1, (name, labels, families[name])
    return matches[0]


@pytest.fixture
def host() -> FakeHost:
    h = FakeHost(capacity_bytes=8 * GIB)
    h.add("vm1", 2 * GIB, target_bytes=1536 * MIB, actual_bytes=1600 * MIB,
          freed_bytes=400 * MIB, available_bytes=GIB, pressure=12.5)
    h.add("vm2", 4 * GIB, connected=False, reclaim="accounting")
    return h


def test_every_status_figure_is_a_gauge_per_guest(host):
    families = parse_exposition(render_metrics(host.guests(), host.pool()))
    assert value(families, "uballoon_guest_ram_bytes", guest="vm1") == 2 * GIB
    assert value(families, "uballoon_guest_target_bytes", guest="vm1") == 1536 * MIB
    assert value(families, "uballoon_guest_actual_bytes", guest="vm1") == 1600 * MIB
    assert value(families, "uballoon_guest_ballooned_bytes", guest="vm1") == 448 * MIB
    assert value(families, "uballoon_guest_freed_bytes", guest="vm1") == 400 * MIB
    assert value(families, "uballoon_guest_available_bytes", guest="vm1") == GIB
    assert value(families, "uballoon_guest_pressure_some_avg10", guest="vm1") == 12.5
    assert value(families, "uballoon_guest_connected", guest="vm1") == 1
    assert value(families, "uballoon_guest_connected", guest="vm2") == 0
    assert value(families, "uballoon_guest_reclaim_punch", guest="vm2") == 0
    assert value(families, "uballoon_pool_capacity_bytes") == 8 * GIB
    assert value(families, "uballoon_pool_free_bytes") == 8 * GIB - (1648 + 4096) * MIB
    assert value(families, "uballoon_pool_committed_bytes", guest="vm1") == 1648 * MIB
    assert value(families, "uballoon_guests") == 2
    assert value(families, "uballoon_guests_connected") == 1
    # a figure a guest has not reported is absent, not a fake zero
    assert [ls for ls, _ in families["uballoon_guest_pressure_some_avg10"]["samples"]] == [
        {"guest": "vm1"}]
    assert {g.name for g in GUEST_GAUGES} <= set(families)


@given(st.text(min_size=1, max_size=20))
def test_any_guest_name_is_escaped_and_parses_back(name):
    host = FakeHost()
    host.add(name, GIB)
    families = parse_exposition(render_metrics(host.guests(), host.pool()))
    assert value(families, "uballoon_guest_ram_bytes", guest=name) == GIB


def test_no_guests_still_renders_valid_families():
    host = FakeHost()
    families = parse_exposition(render_metrics(host.guests(), host.pool()))
    assert families["uballoon_guest_ram_bytes"]["samples"] == []
    assert value(families, "uballoon_guests") == 0


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9750", ("127.0.0.1", 9750)),
    (":9100", ("127.0.0.1", 9100)),
    ("9100", ("127.0.0.1", 9100)),
    ("[::1]:9100", ("::1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
])
def test_metrics_addresses(text, expected):
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", "1.2.3.4:99999", "::1:9100", "host:"])
def test_bad_metrics_addresses(text):
    with pytest.raises(PolicyError, match="--metrics"):
        parse_metrics_address(text)


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status_line, headers, body


async def test_http_get_metrics_and_the_rest(host, nursery):
    _, port = await nursery.start(serve_metrics, host, "127.0.0.1:0")
    with trio.fail_after(10):
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["Content-Length"]) == len(body)
        families = parse_exposition(body.decode())
        assert value(families, "uballoon_guest_ram_bytes", guest="vm2") == 4 * GIB

        status, headers, body = await http(port, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b""
        assert int(headers["Content-Length"]) > 0

        status, _, _ = await http(port, b"GET / HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 404 Not Found"
        status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"
        status, _, _ = await http(port, b"garbage\r\n\r\n")
        assert status == "HTTP/1.1 400 Bad Request"
        status, _, _ = await http(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"


async def test_metrics_listen_on_loopback_by_default(host, nursery):
    bound_host, port = await nursery.start(serve_metrics, host, ":0")
    assert bound_host == "127.0.0.1" and port > 0
