"""Secrets out of output: URL credentials and token= values."""

from __future__ import annotations

import pytest

from relay.redact import redact_text, url_without_credentials


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:pw@h:6379/0", "redis://REDACTED@h:6379/0"),
        ("rediss://:tok%23en@h.example:6380", "rediss://REDACTED@h.example:6380"),
        ("redis://user@h", "redis://REDACTED@h"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("redis://:pw@[::1]:6379/0", "redis://REDACTED@[::1]:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
    ],
)
def test_url_without_credentials(url: str, shown: str) -> None:
    assert url_without_credentials(url) == shown


def test_redact_text() -> None:
    line = (
        '127.0.0.1 - - [x] "GET /status?peers=1&token=s3cret HTTP/1.1" 200 5 '
        '"http://h/?token=s3cret" "ua" and redis://u:pw@h:1/0'
    )
    out = redact_text(line)
    assert "s3cret" not in out and "pw" not in out
    assert "?peers=1&token=REDACTED" in out and "redis://REDACTED@h:1/0" in out
    assert redact_text("/?next=%2F%3Ftoken%3Ds3cret") == "/?next=%2F%3Ftoken%3DREDACTED"
