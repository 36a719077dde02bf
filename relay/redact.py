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

# "?token=…", "&token=…", ";token=…", the name percent-encoded in part or whole (the
# admin port decodes it: "tok%65n=" is "token="), or all of it percent-encoded inside
# another URL (a Referer). The value runs to the next separator; its percent-escapes
# (a base64 token's "%2F", "%2B", "%3D") are part of it, but for an encoded "&" or ";"
# (the end of the value inside an encoded URL).
_TOKEN_NAME: Final = r"(?:t|%74)(?:o|%6[Ff])(?:k|%6[Bb])(?:e|%65)(?:n|%6[Ee])"
_TOKEN_IN_URL: Final = re.compile(
    rf"((?:[?&;]|%3[Ff]|%26|%3[Bb]){_TOKEN_NAME}(?:=|%3[Dd]))"
    r"(?:%(?!26|3[Bb])[0-9A-Fa-f]{2}|[^&;\s\"%])*"
)
# A password in a Redis URL's query ("redis://host/0?password=…", which redis-py reads).
_PASSWORD_IN_QUERY: Final = re.compile(r"((?:[?&;]|^)password=)[^&;\s\"]*")
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
        return _PASSWORD_IN_QUERY.sub(rf"\1{REDACTED}", url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{REDACTED}@{host}" + (f":{port}" if port is not None else "")
    query = _PASSWORD_IN_QUERY.sub(rf"\1{REDACTED}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with URL credentials, ``token=`` and ``password=`` values replaced by
    ``REDACTED``."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    return _PASSWORD_IN_QUERY.sub(rf"\1{REDACTED}", _TOKEN_IN_URL.sub(rf"\1{REDACTED}", text))
