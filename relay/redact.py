"""Secrets kept out of logs and command output.

Two kinds of secret travel in text relay prints: a password in a URL's userinfo
(``redis://default:SECRET@host``) and an admin token in a query string
(``/?token=SECRET``, which browsers also repeat in the Referer). Pass anything that may
hold one through these before it is logged or printed.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

REDACTED: Final = "REDACTED"

# "?token=…", "&token=…", or the same percent-encoded inside another URL (a Referer).
_TOKEN_IN_URL: Final = re.compile(r"((?:[?&]|%3[Ff]|%26)token(?:=|%3[Dd]))[^&\s\"%]*")
# Userinfo of any URL inside free text (an error message naming a URL).
_USERINFO: Final = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def url_without_credentials(url: str) -> str:
    """``url`` with any user name and password replaced by ``REDACTED`` (the host, port,
    path and query stay, so the operator still sees which server is meant)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(rf"\1{REDACTED}@", url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{REDACTED}@{host}" + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with URL credentials and ``token=`` values replaced by ``REDACTED``."""
    return _TOKEN_IN_URL.sub(rf"\1{REDACTED}", _USERINFO.sub(rf"\1{REDACTED}@", text))
