"""Bearer tokens: shown once, stored as a hash, resolved to principals."""

from __future__ import annotations

import asyncio

import pytest

from control_plane import auth
from control_plane.domain.errors import DomainError as ApiError


def test_tokens_are_shown_once_and_stored_as_a_hash() -> None:
    secret, record = auth.new_token(auth.Kind.TENANT, "acme")
    assert secret.startswith("gpf_") and secret.split("_", 2)[2] not in record.to_json().decode()
    assert auth.parse_token(secret) == (record.token_id, secret.split("_", 2)[2])
    assert auth.parse_token("nope") is None


def test_authenticator_resolves_cached_records_and_rejects_everything_else() -> None:
    a = auth.Authenticator(None, admin_token="boot")
    secret, record = auth.new_token(auth.Kind.PROVIDER, "neo")
    a.update(record.token_id, record.to_json())

    def run(authorization: str) -> auth.Principal:
        return asyncio.run(a.from_header(authorization))

    assert run(f"Bearer {secret}") == auth.Principal(auth.Kind.PROVIDER, "neo")
    assert run("bearer boot").kind == auth.Kind.ADMIN
    for header, reason in (
        ("", "MISSING_TOKEN"),
        ("Bearer x", "UNKNOWN_TOKEN"),
        (f"Bearer {secret}x", "UNKNOWN_TOKEN"),
    ):
        with pytest.raises(ApiError) as e:
            run(header)
        assert e.value.reason == reason
    a.update(record.token_id, None)
    with pytest.raises(ApiError):
        run(f"Bearer {secret}")
