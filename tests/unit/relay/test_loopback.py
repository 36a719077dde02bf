"""Loopback means loopback: addresses and Host headers."""

from __future__ import annotations

import pytest

from relay.loopback import host_header_is_loopback, is_loopback


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"]
)
def test_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["127.evil.example", "127.0.0.1.nip.io", "0.0.0.0", "::", "10.0.0.1", "", "localhost.evil"],
)
def test_not_loopback(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"127.0.0.1:7401", True),
        (b"localhost", True),
        (b"[::1]:7401", True),
        ("127.0.0.1", True),
        (b"attacker.example:7401", False),
        (b"127.0.0.1:x", False),
        (b"[::1", False),
        (b"127.evil.example", False),
        (None, False),
    ],
)
def test_host_header(header: bytes | str | None, ok: bool) -> None:
    assert host_header_is_loopback(header) is ok
