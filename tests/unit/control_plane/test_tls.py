"""Listener options: plaintext only on loopback (or with --insecure), TLS options complete;
certificate files reloaded only when they change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control_plane.tls import (
    ReloadingCertificates,
    TlsConfigError,
    check_listeners,
    is_loopback,
    peer_spiffe_ids,
)
from scripts.dev_certs import make_ca, replica_cert, write


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("0.0.0.0:1", False),
        ("10.0.0.5:1", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"listen": "0.0.0.0:1"}, "refusing plaintext"),
        ({"tls_cert": "c.pem"}, "go together"),
        ({"client_ca": "ca.pem", "node_listen": "127.0.0.1:2"}, "need --tls-cert"),
        ({"tls_cert": "c", "tls_key": "k", "client_ca": "ca.pem"}, "go together"),
    ],
)
def test_unsafe_or_half_configured_listeners_are_refused(kw: dict[str, str], error: str) -> None:
    args = {"listen": "127.0.0.1:1", "tls_cert": "", "tls_key": "", "client_ca": "", "node_listen": ""} | kw
    with pytest.raises(TlsConfigError, match=error):
        check_listeners(**args, insecure=False)


def test_plaintext_elsewhere_needs_insecure_and_tls_needs_nothing_more() -> None:
    check_listeners("0.0.0.0:1", "", "", "", "", insecure=True)
    check_listeners("0.0.0.0:1", "c.pem", "k.pem", "", "", insecure=False)


def test_certificates_are_read_again_only_after_a_file_changed(tmp_path: Path) -> None:
    ca = make_ca()
    write(tmp_path, "replica", replica_cert(ca))
    certs = ReloadingCertificates(tmp_path / "replica.pem", tmp_path / "replica-key.pem")
    certs.load()
    assert certs.fetch() is None
    write(tmp_path, "replica", replica_cert(ca))
    stamp = os.stat(tmp_path / "replica.pem").st_mtime_ns + 1_000_000
    os.utime(tmp_path / "replica.pem", ns=(stamp, stamp))
    assert certs.fetch() is not None and certs.fetch() is None


def test_the_identity_of_a_client_certificate_is_its_uri_sans() -> None:
    ctx = {"peer_uri": [b"spiffe://gpufed.dev/provider/a"], "x509_common_name": [b"x"]}
    assert peer_spiffe_ids(ctx) == ["spiffe://gpufed.dev/provider/a"]
    assert peer_spiffe_ids({"transport_security_type": [b"ssl"]}) == []
