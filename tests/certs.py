"""Throwaway TLS certificates for tests, written as PEM files into a directory.

`write_cert_files(tmp_path)` gives a self-signed server certificate for `localhost` and
127.0.0.1; a client trusts `ca_path` (the same file). With `intermediate=True` the leaf is
issued by an intermediate CA under a self-signed root: `cert_path` holds leaf then
intermediate (a "fullchain.pem"), and `ca_path` holds only the root, so a client that
verifies proves the server sent the whole chain.

Keys are P-256: generating them takes microseconds, unlike RSA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=1)
# Clocks of test machines and containers drift; backdate so a fresh cert is already valid.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert_path: Path  # PEM: leaf first, then any intermediate
    key_path: Path  # PEM, PKCS#8, unencrypted
    ca_path: Path  # PEM: the certificate a client should trust


@dataclass(frozen=True, slots=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def write_cert_files(
    directory: Path,
    *,
    name: str = "server",
    hostname: str = "localhost",
    intermediate: bool = False,
) -> CertFiles:
    """Write `<name>.crt`, `<name>.key` (and `<name>-ca.crt` with an intermediate)."""
    if intermediate:
        root = _issue(f"{name} test root CA", issuer=None, ca=True)
        middle = _issue(f"{name} test intermediate CA", issuer=root, ca=True)
        leaf = _issue(hostname, issuer=middle, ca=False)
        chain = [leaf.cert, middle.cert]
        ca_path = directory / f"{name}-ca.crt"
        ca_path.write_bytes(_pem(root.cert))
    else:
        leaf = _issue(hostname, issuer=None, ca=False)
        chain = [leaf.cert]
        ca_path = directory / f"{name}.crt"
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(b"".join(_pem(cert) for cert in chain))
    key_path.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return CertFiles(cert_path=cert_path, key_path=key_path, ca_path=ca_path)


def _issue(common_name: str, *, issuer: _Issued | None, ca: bool) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    # A self-signed certificate is its own issuer.
    signing_key = issuer.key if issuer is not None else key
    issuer_name = issuer.cert.subject if issuer is not None else subject
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(common_name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        ).add_extension(
            # Client auth too: Redis Cluster nodes present it to each other on the bus.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    return _Issued(cert=cert, key=key)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
