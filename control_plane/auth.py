"""Who is calling: bearer tokens resolved to principals from hashed token records.

A token is `gpf_{id}_{secret}`. etcd holds, under tokens/{id}, the kind, the principal name and the
SHA-256 of the secret (secrets are 256-bit random, so a fast hash is enough; nothing to stretch).
The replica caches the records (fed by its etcd watch) and falls back to etcd on a miss, so a
token created on one replica works on every replica at once.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from control_plane.adapters.store import EtcdStore
from control_plane.domain import errors
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

    def to_json(self) -> bytes:
        d = {
            "kind": self.kind.value,
            "principal": self.principal,
            "secret_sha256": self.secret_sha256,
            "create_time": self.create_time,
        }
        if self.private_to:
            d["private_to"] = self.private_to
        return json.dumps(d).encode()

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
    """The address part of gRPC's peer string ("ipv4:10.0.0.1:5000" -> "ipv4:10.0.0.1")."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


# How long a token id etcd did not know is answered UNKNOWN_TOKEN without asking etcd again, and
# how many such ids are remembered.
UNKNOWN_TTL_S = 10.0
MAX_UNKNOWN = 10_000


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
        # Resolved bearer tokens; emptied on any token change, so a deleted token stops at once.
        self._resolved: dict[str, Principal] = {}
        # Token ids etcd did not know, until when (monotonic): a flood of bogus tokens costs no
        # etcd reads. Emptied on any token change too, so a token created meanwhile works at once.
        self._unknown: dict[str, float] = {}
        self.throttle = FailureThrottle(clock=clock)

    def forget(self) -> None:
        self._resolved.clear()
        self._unknown.clear()

    def update(self, token_id: str, raw: bytes | None) -> None:
        """Apply a token record change seen in etcd (None: deleted)."""
        self._resolved.clear()
        self._unknown.clear()
        if raw is None:
            self.records.pop(token_id, None)
        else:
            self.records[token_id] = TokenRecord.from_json(token_id, raw)

    async def from_header(self, authorization: str, peer: Callable[[], str] | str = "") -> Principal:
        """The principal of an `authorization` header value ("Bearer <token>") sent from `peer`
        (gRPC's peer string, or how to get it: only a token not resolved before needs it;
        failures from one address are throttled)."""
        found = self._resolved.get(authorization)
        if found is not None:
            return found
        host = client_host(peer if isinstance(peer, str) else (peer() or ""))
        if host and self.throttle.blocked(host):
            err = errors.exhausted(
                "AUTH_THROTTLED", "too many failed authentications from this address; retry in a minute"
            )
            err.retry_after_s = self.throttle.retry_after(host)
            raise err
        try:
            principal = await self._resolve(authorization)
        except errors.DomainError:
            if host:
                self.throttle.failed(host)
            raise
        if len(self._resolved) > 10_000:
            self._resolved.clear()
        self._resolved[authorization] = principal
        return principal

    async def _resolve(self, authorization: str) -> Principal:
        token = ""
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = rest.strip()
        if not token:
            raise errors.unauthenticated(
                "MISSING_TOKEN", "no bearer token: send metadata 'authorization: Bearer <token>'"
            )
        digest = hash_secret(token)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Principal(Kind.ADMIN, "bootstrap-admin")
        if self._peer_hash and hmac.compare_digest(digest, self._peer_hash):
            return Principal(Kind.PEER, "replica")
        parsed = parse_token(token)
        if parsed is not None:
            token_id, secret = parsed
            record = self.records.get(token_id)
            if record is None and self.store is not None and not self._known_unknown(token_id):
                kv = await self.store.get(self.store.keys.token(token_id))
                if kv is not None:
                    record = TokenRecord.from_json(token_id, kv.value)
                    self.records[token_id] = record
                else:
                    if len(self._unknown) >= MAX_UNKNOWN:
                        self._unknown.clear()
                    self._unknown[token_id] = self.clock.monotonic() + UNKNOWN_TTL_S
            if record is not None and hmac.compare_digest(hash_secret(secret), record.secret_sha256):
                return Principal(record.kind, record.principal, record.private_to)
        raise errors.unauthenticated("UNKNOWN_TOKEN", "the bearer token is not valid")

    def _known_unknown(self, token_id: str) -> bool:
        until = self._unknown.get(token_id)
        if until is None:
            return False
        if self.clock.monotonic() < until:
            return True
        del self._unknown[token_id]
        return False
