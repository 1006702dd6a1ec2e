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


def test_a_short_bootstrap_or_peer_token_or_a_peer_token_equal_to_the_bootstrap_is_refused() -> None:
    from control_plane.config import ConfigError, check_tokens

    with pytest.raises(ConfigError, match="at least 32"):
        check_tokens("short", "")
    with pytest.raises(ConfigError, match="must differ"):
        check_tokens("x" * 32, "x" * 32)
    with pytest.raises(ConfigError, match="GPUFED_PEER_TOKEN must be at least 32"):
        check_tokens("", "y" * 31)
    check_tokens("x" * 32, "y" * 32)
    check_tokens("", "y" * 32)  # no bootstrap token at all


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


def tokens(a: auth.Authenticator, n: int) -> list[str]:
    out = []
    for i in range(n):
        secret, record = auth.new_token(auth.Kind.TENANT, f"t{i}")
        a.update(record.token_id, record.to_json())
        out.append(secret)
    return out


def test_a_token_change_evicts_that_token_only_and_any_spelling_of_the_header_is_one_entry() -> None:
    a = auth.Authenticator(None)
    mine, other = tokens(a, 2)
    for header in (f"Bearer {mine}", f"bearer {mine}", f"Bearer  {mine} ", f"BEARER {mine}"):
        assert asyncio.run(a.from_header(header)).name == "t0"
    asyncio.run(a.from_header(f"Bearer {other}"))
    assert len(a._resolved) == 2  # one entry per token, not per spelling
    other_id = auth.parse_token(other)
    assert other_id is not None
    a.update(other_id[0], None)
    assert list(a._resolved) == [auth.parse_token(mine)[0]]  # type: ignore[index]


def test_the_resolved_cache_is_a_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_RESOLVED", 3)
    a = auth.Authenticator(None)
    secrets_ = tokens(a, 5)
    for s in secrets_[:3]:
        asyncio.run(a.from_header(f"Bearer {s}"))
    asyncio.run(a.from_header(f"Bearer {secrets_[0]}"))  # used again: the most recent
    asyncio.run(a.from_header(f"Bearer {secrets_[3]}"))
    kept = {a._resolved[k][1].name for k in a._resolved}
    assert kept == {"t0", "t2", "t3"}  # t1, the least recently used, went


def test_a_known_valid_token_is_never_throttled_and_ipv6_counts_by_its_64() -> None:
    a = auth.Authenticator(None)
    a.throttle.limit = 2
    (mine,) = tokens(a, 1)
    for i in range(3):  # a guesser on the same /64, from other addresses in it
        with pytest.raises(ApiError):
            asyncio.run(a.from_header(f"Bearer gpf_{i:012x}_x", f"ipv6:[2001:db8:1:2::{i + 1}]:5000"))
    with pytest.raises(ApiError) as e:
        asyncio.run(a.from_header("Bearer gpf_aaaaaaaaaaaa_x", "ipv6:[2001:db8:1:2:ffff::9]:1"))
    assert e.value.reason == "AUTH_THROTTLED"
    assert asyncio.run(a.from_header(f"Bearer {mine}", "ipv6:[2001:db8:1:2::1]:5000")).name == "t0"
    assert auth.client_host("ipv6:[2001:db8:1:2::1]:5000") == "ipv6:2001:db8:1:2::/64"
    assert auth.client_host("ipv4:10.0.0.1:5000") == "ipv4:10.0.0.1"


def test_lookups_of_unknown_ids_share_one_budget_per_replica() -> None:
    from gpufed.clock import FakeClock

    clock = FakeClock()
    budget = auth.LookupBudget(rate=10, burst=5, clock=clock)
    assert [budget.take() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.1)
    assert budget.take() and not budget.take()


def test_deleting_a_token_ends_the_streams_it_opened_and_only_those() -> None:
    a = auth.Authenticator(None)
    mine, other = tokens(a, 2)

    async def go() -> tuple[list[str], list[str]]:
        ended: list[str] = []

        async def stream(secret: str) -> None:
            principal = await a.from_header(f"Bearer {secret}")
            with a.stream(principal) as hold:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    ended.append(principal.name if hold.revoked else "cancelled otherwise")
                    raise

        tasks = [asyncio.create_task(stream(s)) for s in (mine, mine, other)]
        await asyncio.sleep(0.01)
        mine_id = auth.parse_token(mine)
        assert mine_id is not None
        a.update(mine_id[0], None)
        await asyncio.sleep(0.01)
        alive = [t for t in tasks if not t.done()]
        assert len(alive) == 1
        alive[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return ended, list(a._streams)

    ended, left = asyncio.run(go())
    assert ended[:2] == ["t0", "t0"] and left == []
    assert a.revoked_streams == 2
