"""A development CA and certificates for gpufed's TLS hops (never for production keys).

    python scripts/dev_certs.py OUT_DIR [--trust-domain gpufed.dev] [--provider NAME ...]

writes OUT_DIR/ca.pem (+ ca-key.pem), replica.pem/replica-key.pem (server and client auth, SANs
localhost, 127.0.0.1, ::1) and, for each --provider, provider-NAME.pem/-key.pem whose identity is
the SAN URI spiffe://TRUST_DOMAIN/provider/NAME (the rule the replica checks against the
provider of the daemon's token). Tests call the same functions with certificates they make.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "gpufed.dev"


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(name: str = "gpufed dev CA", days: int = 30) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    ca: Authority,
    common_name: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    server: bool = True,
    client: bool = True,
    days: int = 30,
) -> Issued:
    """A certificate signed by `ca` with the given SANs and extended key usages."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def replica_cert(ca: Authority) -> Issued:
    """A replica's certificate: serves loopback names, and can be a client (of etcd, of peers)."""
    return issue(ca, "gpufed replica", dns=("localhost",), ips=("127.0.0.1", "::1"))


def provider_uri(provider: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/provider/{provider}"


def provider_cert(ca: Authority, provider: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Issued:
    """A daemon's client certificate naming its provider."""
    return issue(ca, f"provider {provider}", uris=(provider_uri(provider, trust_domain),), server=False)


def write(out: Path, name: str, issued: Issued) -> None:
    (out / f"{name}.pem").write_bytes(issued.cert_pem)
    key = out / f"{name}-key.pem"
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/dev_certs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    p.add_argument("--provider", action="append", default=[], help="issue a daemon certificate for it")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    write(a.out, "ca", Issued(ca.pem, ca.key_pem))
    write(a.out, "replica", replica_cert(ca))
    for provider in a.provider:
        write(a.out, f"provider-{provider}", provider_cert(ca, provider, a.trust_domain))
    print(f"wrote a development CA and certificates to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
