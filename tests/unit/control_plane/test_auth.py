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


class _CountingStore:
    """A token store that knows no token and counts how often it was asked."""

    def __init__(self) -> None:
        from control_plane.adapters.keyspace import Keyspace

        self.keys = Keyspace("/t")
        self.reads = 0

    async def get(self, key: str) -> None:
        self.reads += 1
        return None


def test_unknown_tokens_are_remembered_briefly_so_a_flood_costs_one_read() -> None:
    from typing import cast

    from control_plane.adapters.store import EtcdStore
    from gpufed.clock import FakeClock

    store, clock = _CountingStore(), FakeClock()
    a = auth.Authenticator(cast(EtcdStore, store), clock=clock)

    def bogus(i: int) -> None:
        with pytest.raises(ApiError) as e:
            asyncio.run(a.from_header(f"Bearer gpf_deadbeef0001_guess{i}"))
        assert e.value.reason == "UNKNOWN_TOKEN"

    for i in range(100):
        bogus(i)
    assert store.reads == 1
    clock.advance(auth.UNKNOWN_TTL_S + 1)
    bogus(100)
    assert store.reads == 2
    a.update("deadbeef0001", None)  # any token change: ask etcd again at once
    bogus(101)
    assert store.reads == 3


def test_a_short_bootstrap_token_or_a_peer_token_equal_to_it_is_refused() -> None:
    from control_plane.config import ConfigError, check_tokens

    with pytest.raises(ConfigError, match="at least 32"):
        check_tokens("short", "")
    with pytest.raises(ConfigError, match="must differ"):
        check_tokens("x" * 32, "x" * 32)
    check_tokens("x" * 32, "y" * 32)
    check_tokens("", "y")  # no bootstrap token at all


def test_failed_authentications_from_one_address_are_throttled_for_the_window() -> None:
    from gpufed.clock import FakeClock

    clock = FakeClock()
    a = auth.Authenticator(None, admin_token="boot" * 8, clock=clock)
    a.throttle.limit = 3
    good = asyncio.run(a.from_header("Bearer " + "boot" * 8, "ipv4:10.0.0.9:1111"))  # resolved before

    def reason(header: str, peer: str) -> str:
        with pytest.raises(ApiError) as e:
            asyncio.run(a.from_header(header, peer))
        return e.value.reason

    assert [reason(f"Bearer guess{i}", "ipv4:10.0.0.9:2222") for i in range(4)] == ["UNKNOWN_TOKEN"] * 3 + [
        "AUTH_THROTTLED"
    ]
    assert (
        asyncio.run(a.from_header("Bearer " + "boot" * 8, "ipv4:10.0.0.9:3333")) == good
    )  # cached: not throttled
    assert reason("Bearer guess", "ipv4:10.0.0.10:1") == "UNKNOWN_TOKEN"  # another address
    clock.advance(a.throttle.window_s)
    assert reason("Bearer guess", "ipv4:10.0.0.9:4444") == "UNKNOWN_TOKEN"  # a new window
