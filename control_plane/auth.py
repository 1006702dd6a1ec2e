"""Who is calling: bearer tokens resolved to principals from hashed token records.

A token is `gpf_{id}_{secret}`. etcd holds, under tokens/{id}, the kind, the principal name and the
SHA-256 of the secret (secrets are 256-bit random, so a fast hash is enough; nothing to stretch).
The replica caches the records (fed by its etcd watch) and falls back to etcd on a miss, so a
token created on one replica works on every replica at once.

Revocation reaches what a token already opened: every streaming RPC registers its task under
the token id that authenticated it (`Authenticator.stream`), and the watch event that deletes
(or replaces) the token cancels those tasks; the RPC wrapper answers them UNAUTHENTICATED
TOKEN_REVOKED. So a deleted tenant's KeepAlive renews nothing more and a deleted provider's
daemon stream ends (its nodes go offline), on every replica, within one watch event.

Throttling (FailureThrottle) applies only to what the replica cannot check locally: a token
whose id is in the watched records is verified by its hash and, when valid, never throttled.
Lookups of ids the records lack go to etcd under one global budget per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from control_plane.adapters.store import EtcdStore
from control_plane.domain import errors, schema
from gpufed.clock import SYSTEM, Clock

TOKEN_PREFIX = "gpf"


class Kind(StrEnum):
    TENANT = "tenant"
    PROVIDER = "provider"
    ADMIN = "admin"
    PEER = "peer"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Kind
    name: str
    # A provider token's tenant: the nodes it registers are that tenant's private pool.
    private_to: str = ""
    # The token id that authenticated it ("" for the bootstrap and peer tokens, which are not
    # in etcd): what a revocation ends. Not part of who the principal is.
    token_id: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    token_id: str
    kind: Kind
    principal: str
    secret_sha256: str
    create_time: str
    private_to: str = ""

    def to_json(self, schema_version: int = schema.OLDEST_READ) -> bytes:
        """The record as schema `schema_version` writes it (control_plane.domain.schema)."""
        d: dict[str, Any] = {
            "kind": self.kind.value,
            "principal": self.principal,
            "secret_sha256": self.secret_sha256,
            "create_time": self.create_time,
        }
        if self.private_to:
            d["private_to"] = self.private_to
        return json.dumps(schema.stamped(d, schema_version)).encode()

    @classmethod
    def from_json(cls, token_id: str, raw: bytes) -> TokenRecord:
        d = json.loads(raw)
        return cls(
            token_id,
            Kind(d["kind"]),
            d["principal"],
            d["secret_sha256"],
            d["create_time"],
            d.get("private_to", ""),
        )


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("gpufed_principal", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by control_plane.rpc)."""
    p = _current.get()
    if p is None:
        raise errors.unauthenticated("UNAUTHENTICATED", "no authenticated principal")
    return p


def set_current_principal(p: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(p)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(
    kind: Kind, principal: str, clock: Clock = SYSTEM, private_to: str = ""
) -> tuple[str, TokenRecord]:
    """A fresh token: the full secret string (shown once) and the record to store."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    created = datetime.fromtimestamp(clock.time_ns() // 1_000_000_000, UTC).isoformat(timespec="seconds")
    record = TokenRecord(token_id, kind, principal, hash_secret(secret), created, private_to)
    return f"{TOKEN_PREFIX}_{token_id}_{secret}", record


def parse_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class FailureThrottle:
    """Failed authentications per client address in a fixed window: past `limit`, the address
    gets AUTH_THROTTLED until the window ends. Tokens already resolved are never throttled, so a
    developer behind the same NAT as a guesser keeps working."""

    def __init__(
        self, limit: int = 30, window_s: float = 60.0, clock: Clock = SYSTEM, max_hosts: int = 10_000
    ):
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.max_hosts = max_hosts
        self._counts: dict[str, tuple[float, int]] = {}  # host -> (window start, failures)

    def blocked(self, host: str) -> bool:
        got = self._counts.get(host)
        if got is None:
            return False
        start, failures = got
        if self.clock.monotonic() - start >= self.window_s:
            del self._counts[host]
            return False
        return failures >= self.limit

    def retry_after(self, host: str) -> float:
        """Seconds until a blocked address may try again."""
        start, _ = self._counts.get(host, (self.clock.monotonic(), 0))
        return max(0.0, start + self.window_s - self.clock.monotonic())

    def failed(self, host: str) -> None:
        now = self.clock.monotonic()
        start, failures = self._counts.get(host, (now, 0))
        if now - start >= self.window_s:
            start, failures = now, 0
        if host not in self._counts and len(self._counts) >= self.max_hosts:
            self._counts.clear()  # a flood of addresses: start over rather than grow
        self._counts[host] = (start, failures + 1)


def client_host(peer: str) -> str:
    """Whom gRPC's peer string counts against: "ipv4:10.0.0.1:5000" -> "ipv4:10.0.0.1", an IPv6
    address by its /64 ("ipv6:[2001:db8::1]:5000" -> "ipv6:2001:db8::/64": one host holds a
    whole /64, so counting its addresses one by one would count nothing)."""
    if peer.startswith("ipv6:["):
        address = peer[len("ipv6:[") :].split("]", 1)[0].split("%", 1)[0]
        try:
            return f"ipv6:{ipaddress.IPv6Network((address, 64), strict=False)}"
        except ValueError:
            return peer
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class LookupBudget:
    """A token bucket over the etcd lookups of token ids the replica does not know, for the
    whole replica: a flood of made-up ids from many addresses costs etcd at most `rate` reads a
    second (beyond a burst)."""

    def __init__(self, rate: float = 50.0, burst: float = 100.0, clock: Clock = SYSTEM) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = burst
        self._at = clock.monotonic()

    def take(self) -> bool:
        now = self.clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class StreamHold:
    """One open stream of a token: revoked when the token is deleted while it runs."""

    __slots__ = ("revoked", "task")

    def __init__(self, task: asyncio.Task[object] | None) -> None:
        self.task = task
        self.revoked = False


# How long a token id etcd did not know is answered UNKNOWN_TOKEN without asking etcd again, and
# how many such ids are remembered.
UNKNOWN_TTL_S = 10.0
MAX_UNKNOWN = 10_000
# Resolved tokens kept (least recently used out first).
MAX_RESOLVED = 10_000


def bearer(authorization: str) -> str:
    """The token of an `authorization` value: "Bearer X", any case of the scheme, any spaces."""
    scheme, _, rest = authorization.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else ""


class Authenticator:
    """Resolves `authorization: Bearer ...` metadata to a Principal."""

    def __init__(
        self, store: EtcdStore | None, admin_token: str = "", peer_token: str = "", clock: Clock = SYSTEM
    ) -> None:
        self.store = store
        self.clock = clock
        self._admin_hash = hash_secret(admin_token) if admin_token else ""
        self._peer_hash = hash_secret(peer_token) if peer_token else ""
        self.records: dict[str, TokenRecord] = {}
        # Resolved tokens by token id: (the whole token, its principal). Per id, so that one
        # token's change evicts that token only, and any spelling of the header hits.
        self._resolved: OrderedDict[str, tuple[str, Principal]] = OrderedDict()
        # Token ids etcd did not know, until when (monotonic): a flood of bogus tokens costs no
        # etcd reads. A token created meanwhile is evicted from it by its watch event.
        self._unknown: dict[str, float] = {}
        self.throttle = FailureThrottle(clock=clock)
        self.lookups = LookupBudget(clock=clock)
        self._streams: dict[str, set[StreamHold]] = {}
        # Ids of tokens deleted while this replica ran (ids are random, never reused): an etcd
        # read that raced the deletion cannot bring one back.
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self.revoked_streams = 0  # streams ended by a revocation (metrics, tests)

    def forget(self) -> None:
        self._resolved.clear()
        self._unknown.clear()

    def update(self, token_id: str, raw: bytes | None) -> None:
        """Apply a token record change seen in etcd (None: deleted): that token is evicted, and
        a deleted or replaced one ends the streams it opened."""
        self._resolved.pop(token_id, None)
        self._unknown.pop(token_id, None)
        before = self.records.get(token_id)
        if raw is None:
            self.records.pop(token_id, None)
            self._deleted[token_id] = None
            while len(self._deleted) > MAX_UNKNOWN:
                self._deleted.popitem(last=False)
            self.revoke(token_id)
            return
        record = TokenRecord.from_json(token_id, raw)
        self.records[token_id] = record
        if before is not None and before != record:
            self.revoke(token_id)

    def revoke(self, token_id: str) -> None:
        """End every stream the token opened (the RPC wrapper answers TOKEN_REVOKED)."""
        for hold in self._streams.pop(token_id, ()):
            hold.revoked = True
            if hold.task is not None:
                hold.task.cancel()
            self.revoked_streams += 1

    @contextlib.contextmanager
    def stream(self, principal: Principal | None) -> Iterator[StreamHold]:
        """Register the running task as a stream of the principal's token while it runs."""
        hold = StreamHold(asyncio.current_task())
        token_id = principal.token_id if principal is not None else ""
        if token_id:
            self._streams.setdefault(token_id, set()).add(hold)
        try:
            yield hold
        finally:
            holds = self._streams.get(token_id)
            if holds is not None:
                holds.discard(hold)
                if not holds:
                    del self._streams[token_id]

    async def recheck_streams(self) -> None:
        """After the token watch missed events (a resync): end the streams of tokens etcd no
        longer has. The records are refilled lazily, so ask etcd for each token with streams."""
        if self.store is None:
            return
        for token_id in list(self._streams):
            if token_id in self.records:
                continue
            kv = await self.store.get(self.store.keys.token(token_id))
            if kv is None:
                self.revoke(token_id)
            else:
                self.records.setdefault(token_id, TokenRecord.from_json(token_id, kv.value))

    async def from_header(self, authorization: str, peer: Callable[[], str] | str = "") -> Principal:
        """The principal of an `authorization` header value ("Bearer <token>") sent from `peer`
        (gRPC's peer string, or how to get it: only a token not verified locally needs it;
        failures from one address are throttled)."""
        token = bearer(authorization)
        parsed = parse_token(token)
        if parsed is not None:
            token_id, secret = parsed
            hit = self._resolved.get(token_id)
            if hit is not None and hmac.compare_digest(hit[0], token):
                self._resolved.move_to_end(token_id)
                return hit[1]
            record = self.records.get(token_id)
            if record is not None and hmac.compare_digest(hash_secret(secret), record.secret_sha256):
                return self._remember(token_id, token, record)  # checked locally: never throttled
        elif token and (built_in := self._built_in(token)) is not None:
            return built_in
        host = client_host(peer if isinstance(peer, str) else (peer() or ""))
        if host and self.throttle.blocked(host):
            err = errors.exhausted(
                "AUTH_THROTTLED", "too many failed authentications from this address; retry in a minute"
            )
            err.retry_after_s = self.throttle.retry_after(host)
            raise err
        try:
            return await self._resolve(token, parsed)
        except errors.DomainError as e:
            if host and e.reason != "AUTH_THROTTLED":
                self.throttle.failed(host)
            raise

    def _built_in(self, token: str) -> Principal | None:
        """The bootstrap admin or the peer token (configured, not in etcd)."""
        digest = hash_secret(token)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Principal(Kind.ADMIN, "bootstrap-admin")
        if self._peer_hash and hmac.compare_digest(digest, self._peer_hash):
            return Principal(Kind.PEER, "replica")
        return None

    def _remember(self, token_id: str, token: str, record: TokenRecord) -> Principal:
        principal = Principal(record.kind, record.principal, record.private_to, token_id)
        self._resolved[token_id] = (token, principal)
        self._resolved.move_to_end(token_id)
        while len(self._resolved) > MAX_RESOLVED:
            self._resolved.popitem(last=False)
        return principal

    async def _resolve(self, token: str, parsed: tuple[str, str] | None) -> Principal:
        if not token:
            raise errors.unauthenticated(
                "MISSING_TOKEN", "no bearer token: send metadata 'authorization: Bearer <token>'"
            )
        built_in = self._built_in(token)
        if built_in is not None:
            return built_in
        if parsed is not None:
            token_id, secret = parsed
            record = self.records.get(token_id)
            if record is None and self.store is not None and not self._known_unknown(token_id):
                if not self.lookups.take():
                    err = errors.exhausted(
                        "AUTH_THROTTLED", "too many lookups of unknown tokens on this replica; retry shortly"
                    )
                    err.retry_after_s = 1.0
                    raise err
                kv = await self.store.get(self.store.keys.token(token_id))
                if kv is not None and token_id not in self._deleted:
                    record = TokenRecord.from_json(token_id, kv.value)
                    self.records[token_id] = record
                else:
                    if len(self._unknown) >= MAX_UNKNOWN:
                        self._unknown.clear()
                    self._unknown[token_id] = self.clock.monotonic() + UNKNOWN_TTL_S
            if record is not None and hmac.compare_digest(hash_secret(secret), record.secret_sha256):
                return self._remember(token_id, token, record)
        raise errors.unauthenticated("UNKNOWN_TOKEN", "the bearer token is not valid")

    def _known_unknown(self, token_id: str) -> bool:
        until = self._unknown.get(token_id)
        if until is None:
            return False
        if self.clock.monotonic() < until:
            return True
        del self._unknown[token_id]
        return False
