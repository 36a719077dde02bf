"""Loopback means loopback: address checks for config rules and ``Host`` checks for the
services that listen on loopback only.

A service bound to 127.0.0.1 is still reachable from a browser through DNS rebinding (a
name the attacker controls, resolved to 127.0.0.1) or a cross-site request; both carry a
``Host`` that is not a loopback address, which :func:`host_header_is_loopback` refuses.
Pure: no resolving, only parsing.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """An address literal in 127.0.0.0/8 or ::1, or ``localhost``; never a name that
    merely starts with "127." (that resolves wherever its owner likes)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_header_is_loopback(value: bytes | str | None) -> bool:
    """Whether an HTTP ``Host`` header (``name[:port]``, ``[v6][:port]``) names loopback."""
    if value is None:
        return False
    host = value.decode("latin-1") if isinstance(value, bytes) else value
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return end > 0 and is_loopback(host[1:end])
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return False
    return is_loopback(name)
