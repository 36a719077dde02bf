"""Client tokens (PROTOCOL.md, "Tokens"): verify a JWT, and the grants it carries.

A token is an HS256 (shared secret) or ES256 (P-256 public key) JWT with claims ``sub``
(required, becomes ``from``), ``exp`` (required) and the optional lists ``can_pub`` and
``can_sub`` of channel patterns. A pattern is a channel name, matched exactly, or a prefix
followed by ``*``, matching every channel that starts with the prefix (``*`` alone matches
every channel). A ``*`` anywhere but at the end is an ordinary character.

No clock is read here: :meth:`TokenVerifier.verify` takes the current Unix time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from relay.errors import RelayError

# A real token is a few hundred bytes; the bound keeps a hostile one from costing base64
# and JSON work proportional to a whole frame. It also bounds ``sub`` far below the
# sender limit of the store and codec (65535 bytes).
MAX_TOKEN_CHARS: Final = 8192
# A token's ``sub`` becomes every message's ``from``: printable and short, so it cannot
# break logs or a page that shows it.
MAX_SUB_CHARS: Final = 256
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_SECRET_BYTES: Final = 32


class TokenError(RelayError):
    """A token was refused; :attr:`reason` is short human text for the ``error`` reply.

    The caller answers ``unauthorized`` and closes the connection (PROTOCOL.md).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Grants:
    """What a client may do: publish to ``can_pub``, and sub/ack/unsub on ``can_sub``.

    Ask :meth:`may_pub` before a ``pub`` and :meth:`may_sub` before a ``sub``, ``ack`` or
    ``unsub``; answer ``forbidden`` when they say no.
    """

    subject: str
    can_pub: tuple[str, ...]
    can_sub: tuple[str, ...]
    # Wall-clock Unix time the token expires at, its exp plus the verifier's leeway (None:
    # never, for anonymous clients); a session refuses ops from then on.
    expires_s: float | None = None
    # Patterns split once into exact names and prefixes: a check is then one set lookup
    # and one str.startswith over a tuple, on every pub.
    _pub: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _sub: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pub", _compile(self.can_pub))
        object.__setattr__(self, "_sub", _compile(self.can_sub))

    @classmethod
    def anonymous(cls) -> Grants:
        """The grants of a client without a token, where the node allows anonymous ones."""
        return cls("anon", ("*",), ("*",))

    def may_pub(self, ch: str) -> bool:
        """Whether this client may publish to ``ch``."""
        exact, prefixes = self._pub
        return ch in exact or ch.startswith(prefixes)

    def may_sub(self, ch: str) -> bool:
        """Whether this client may subscribe to ``ch``, and ack or unsub on it."""
        exact, prefixes = self._sub
        return ch in exact or ch.startswith(prefixes)


def _compile(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact = frozenset(p for p in patterns if not p.endswith("*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
    return exact, prefixes


def key_problems(hs256_secret: str | None, es256_public_key_pem: bytes | None) -> list[str]:
    """Every reason these keys cannot configure a :class:`TokenVerifier` (empty if fine).

    For ``Config.validate()``, which reports all problems at once.
    """
    problems = []
    if hs256_secret is not None and len(hs256_secret.encode()) < MIN_HS256_SECRET_BYTES:
        problems.append(
            f"auth.hs256_secret must be at least {MIN_HS256_SECRET_BYTES} bytes (RFC 7518 §3.2)"
        )
    if es256_public_key_pem is not None:
        try:
            _load_es256_key(es256_public_key_pem)
        except ValueError as exc:
            problems.append(f"auth.es256_public_key: {exc}")
    return problems


def _load_es256_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 (secp256r1) public key, as ES256 needs")
    return key


class TokenVerifier:
    """Verifies client tokens against the keys the node is configured with.

    Each configured key allows exactly one algorithm (a secret: HS256; a public key:
    ES256), and a token's key is chosen by its algorithm from that fixed table, so a
    token cannot pick its own verification (``alg: none``, or HS256 "signed" with the
    public key). With neither key, every token is refused.

    Raises ``ValueError`` for unusable keys (see :func:`key_problems`).
    """

    __slots__ = ("_keys", "_leeway_s")

    def __init__(
        self,
        *,
        hs256_secret: str | None,
        es256_public_key_pem: bytes | None,
        leeway_s: float = 0,
    ) -> None:
        problems = key_problems(hs256_secret, es256_public_key_pem)
        if problems:
            raise ValueError("; ".join(problems))
        if not (math.isfinite(leeway_s) and leeway_s >= 0):
            raise ValueError("leeway_s must be a finite, non-negative number of seconds")
        self._keys: dict[str, Any] = {}
        if hs256_secret is not None:
            self._keys["HS256"] = hs256_secret
        if es256_public_key_pem is not None:
            # Parsed once here, not by pyjwt on every token.
            self._keys["ES256"] = _load_es256_key(es256_public_key_pem)
        self._leeway_s = float(leeway_s)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this verifier accepts."""
        return tuple(self._keys)

    def verify(self, token: str, now_s: float) -> Grants:
        """Check ``token`` at Unix time ``now_s`` (wall clock: ``exp`` is wall-clock time).

        Returns the token's grants, or raises :class:`TokenError` whose reason says what
        was wrong; the caller answers ``unauthorized`` with it.
        """
        if not isinstance(token, str) or not token:
            raise TokenError("malformed")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError):
            # ValueError: a str that is not encodable (lone surrogates).
            raise TokenError("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._keys:
            raise TokenError("algorithm not allowed")
        key = self._keys[alg]
        claims = self._decode(token, key, alg)
        self._check_times(claims, now_s)
        sub = claims["sub"]
        if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_CHARS or not sub.isprintable():
            raise TokenError("bad sub")
        exp = claims["exp"]
        return Grants(
            sub,
            _patterns(claims, "can_pub"),
            _patterns(claims, "can_sub"),
            # The session's end is exp plus the leeway: a token accepted within the
            # leeway is not closed as expired the moment it is accepted.
            float(exp) + self._leeway_s if exp < 2**53 else None,
        )

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "require": ["exp", "sub"],
                    # pyjwt would read the system clock for these; _check_times uses now_s.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # Type checked by verify(), with the reason given there.
                    "verify_sub": False,
                    # No audience is configured, so a token meant for one is refused.
                    "verify_aud": True,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("algorithm not allowed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"missing {exc.claim}") from None
        except jwt.InvalidAudienceError:
            raise TokenError("audience not accepted") from None
        except jwt.DecodeError:
            raise TokenError("malformed") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token ({type(exc).__name__})") from None

    def _check_times(self, claims: dict[str, Any], now_s: float) -> None:
        # The leeway moves now_s rather than the claim: a huge integer claim compares
        # exactly with a float, but cannot be converted to one.
        exp = _timestamp(claims["exp"], "exp")
        if now_s - self._leeway_s >= exp:
            raise TokenError("expired")
        if "nbf" in claims and now_s + self._leeway_s < _timestamp(claims["nbf"], "nbf"):
            raise TokenError("not yet valid")


def _timestamp(value: Any, name: str) -> int | float:
    # bool is an int in Python, and json.loads accepts NaN and Infinity: a NaN exp would
    # compare false against every time and never expire.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenError(f"bad {name}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenError(f"bad {name}")
    return value


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise TokenError(f"bad {name}")
    return tuple(value)
