"""Secrets out of output: URL credentials and token= values."""

from __future__ import annotations

import pytest

from relay.redact import REDACTED, redact_text, url_without_credentials


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
        ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=REDACTED"),
        ("redis://u:pw@h/0?db=1&password=pw", "redis://REDACTED@h/0?db=1&password=REDACTED"),
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
    assert redact_text('got "redis://h:1/0?password=pw"') == 'got "redis://h:1/0?password=REDACTED"'


@pytest.mark.parametrize(
    "given",
    [
        "/demo?token=q7%2FZr%2BKp3x%3D",  # a base64 token, as a page encodes it
        "/?tok%65n=q7secret",  # the admin port decodes the name
        "/?%74%6F%6B%65%6E=q7secret",
        "/?x=1;token=q7secret",  # ";" separates parameters too
        "/?next=%2F%3Fx%3D1%26token%3Dq7%252Fsecret%26y%3D2",  # inside an encoded URL
    ],
)
def test_a_token_is_redacted_however_its_url_spells_it(given: str) -> None:
    out = redact_text(f'"GET {given} HTTP/1.1" 200 5 "http://h{given}"')
    assert not any(part in out for part in ("q7", "Zr", "Kp3x", "secret")), out
    assert out.count(REDACTED) == 2, out
