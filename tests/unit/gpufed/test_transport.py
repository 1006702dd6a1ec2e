"""Clients speak TLS unless told otherwise: plaintext only when asked for, with one warning."""

from __future__ import annotations

import grpc
import pytest

from gpufed import transport
from gpufed.transport import channel_credentials


def test_tls_by_default_and_whenever_a_ca_tls_or_a_client_certificate_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GPUFED_INSECURE", raising=False)
    assert isinstance(channel_credentials(), grpc.ChannelCredentials)
    for kw in ({"tls": True}, {"ca_cert": b"x"}, {"client_cert": b"c", "client_key": b"k"}):
        assert isinstance(channel_credentials(insecure=True, **kw), grpc.ChannelCredentials)


def test_plaintext_only_when_asked_and_it_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(transport, "_warned", False)
    monkeypatch.setattr(transport.log, "warning", lambda msg, *a: warnings.append(msg))
    monkeypatch.setenv("GPUFED_INSECURE", "1")
    assert channel_credentials() is None and channel_credentials(insecure=True) is None
    assert isinstance(channel_credentials(insecure=False), grpc.ChannelCredentials)
    assert len(warnings) == 1 and "--insecure" in warnings[0]


def test_plaintext_to_loopback_does_not_warn_and_anywhere_else_does(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(transport.log, "warning", lambda msg, *a: warnings.append(msg))
    for endpoints in ("127.0.0.1:50051", "localhost:1,[::1]:2", ["127.0.0.2:5", "[::1]:6"]):
        monkeypatch.setattr(transport, "_warned", False)
        assert channel_credentials(insecure=True, endpoints=endpoints) is None
    assert warnings == []
    for endpoints in ("10.0.0.5:50051", "cp.example.com:443", "127.0.0.1:1,192.168.1.2:2", "", "bad"):
        monkeypatch.setattr(transport, "_warned", False)
        assert channel_credentials(insecure=True, endpoints=endpoints) is None
    assert len(warnings) == 5
