"""The etcd adapter: Txn helpers, ranged reads, watch from a revision, leases, and the one
compare-and-swap helper (`update`) every read-modify-write goes through.

It speaks etcd's v3 gRPC API through grpc.aio with the stubs that python3-etcd3 ships
(`etcd3.etcdrpc`), so the asyncio replica never parks a thread on etcd. python3-etcd3's own
synchronous client is not used on the server's hot paths (and its Lock is never used:
exclusivity is compare-and-swap). Where each record lives: control_plane.adapters.keyspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from control_plane.adapters.keyspace import Keyspace
from control_plane.config import ConfigError
from control_plane.domain import errors
from control_plane.domain.errors import DomainError
from gpufed.logs import get_logger
from gpufed.transport import address_target

log = get_logger(__name__)

T = TypeVar("T")

# etcd's default --max-txn-ops: the most operations in one branch (compares, success or failure).
MAX_TXN_OPS = 128
# Keys per page of a listing. Large, because etcd 3.4 counts the rest of the range on every
# request with a limit: at 100,000 nodes a list took 14 s in pages of 2,000 and 3 s in pages of
# 10,000 (BENCHMARKS.md, scale). A page too large for the gRPC message limit (records near their
# 128 KiB bound) is asked again a quarter the size.
_RANGE_PAGE = 10_000
_MIN_RANGE_PAGE = 50


# Attempts of a read-modify-write before it gives up (each one failed a compare because the
# record changed in between: under that much contention the caller should retry later).
CAS_ATTEMPTS = 8


# What a member without a quorum answers, with status UNKNOWN: an outage, not a bug.
_OUTAGE_MESSAGES = (
    "context deadline exceeded",
    "etcdserver: request timed out",
    "etcdserver: no leader",
    "etcdserver: leader changed",
    "etcdserver: too many requests",
)


class StoreRefused(ConfigError):
    """etcd refused the replica's credentials (a configuration error, not an outage)."""


class StoreUnavailable(Exception):
    """etcd could not be reached or did not answer in time; the outcome of a write is unknown."""


class WritesRefused(StoreUnavailable):
    """This replica refuses to write: etcd holds a schema newer than it understands (the reason
    says which). Nothing was sent."""


def _writes(req: rpc.TxnRequest) -> bool:
    """Whether a Txn would write anything (a read-only Txn is let through a refusal)."""
    for op in (*req.success, *req.failure):
        kind = op.WhichOneof("request")
        if kind in ("request_put", "request_delete_range"):
            return True
        if kind == "request_txn" and _writes(op.request_txn):
            return True
    return False


class StoreNoSpace(StoreUnavailable):
    """etcd's NOSPACE alarm is raised (its backend quota is full): it refuses every write until
    an operator compacts, defragments and disarms it. Reads still work."""


class WatchCompacted(Exception):
    """The watch start revision was compacted; the caller must list again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with prefix (etcd's convention)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _b(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


# -- Txn building blocks -------------------------------------------------------------------------


def absent(key: str | bytes) -> rpc.Compare:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=_b(key), create_revision=0)


def mod_revision_is(key: str | bytes, revision: int) -> rpc.Compare:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=_b(key), mod_revision=revision)


def none_created_since(start: str | bytes, end: str | bytes, revision: int) -> rpc.Compare:
    """No key in [start, end) was created after `revision` (a range compare: every key in it)."""
    return rpc.Compare(
        result=rpc.Compare.LESS,
        target=rpc.Compare.CREATE,
        key=_b(start),
        range_end=_b(end),
        create_revision=revision + 1,
    )


def value_is(key: str | bytes, value: bytes) -> rpc.Compare:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=_b(key), value=value)


def put(key: str | bytes, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=_b(key), value=value, lease=lease))


def delete(key: str | bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_b(key)))


def get(key: str | bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=_b(key)))


_EQUAL = rpc.Compare.EQUAL
_GREATER = rpc.Compare.GREATER
_LESS = rpc.Compare.LESS


class TxnBuilder:
    """A TxnRequest built in place, with the keys it writes.

    For the paths that build many operations (grants, releases, usage records): adding to the
    request's repeated fields costs a third of building each operation as its own message and
    copying it in, as the one-operation helpers above and `EtcdStore.txn` do.
    """

    __slots__ = ("req", "writes")

    def __init__(self) -> None:
        self.req = rpc.TxnRequest()
        self.writes: set[bytes] = set()

    def absent(self, key: bytes) -> None:
        self.req.compare.add(result=_EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0)

    def mod_revision_is(self, key: bytes, revision: int) -> None:
        self.req.compare.add(result=_EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=revision)

    def created_at(self, key: bytes, revision: int) -> None:
        """The key exists and was created at `revision` (a leader key's term: fencing)."""
        self.req.compare.add(result=_EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=revision)

    def present(self, key: bytes) -> None:
        self.req.compare.add(result=_GREATER, target=rpc.Compare.VERSION, key=key, version=0)

    def range_unchanged_since(self, prefix: bytes, revision: int, end: bytes | None = None) -> None:
        """No key under `prefix` (or in [prefix, end)) was put after `revision` (deletions do not
        count). A range compare: etcd checks it against every key in the range. Nested in a group commit, it
        reads the state before the batch: Txns of one batch do not see each other's puts (the
        tenant quota counts those in flight itself: control_plane.app.quotas)."""
        self.req.compare.add(
            result=_LESS,
            target=rpc.Compare.MOD,
            key=prefix,
            range_end=prefix_end(prefix) if end is None else end,
            mod_revision=revision + 1,
        )

    def range_absent(self, prefix: bytes) -> None:
        """No key under `prefix` exists (etcd compares every key in the range; none passes)."""
        self.req.compare.add(
            result=_EQUAL,
            target=rpc.Compare.CREATE,
            key=prefix,
            range_end=prefix_end(prefix),
            create_revision=0,
        )

    def guard(self, key: bytes) -> None:
        """Never share a group commit with another Txn guarding or writing `key`: the nested
        Txns of one batch all read the state before it, so two whose compares exclude each
        other (a MIG instance's grant and its parent's) must not commit together."""
        self.writes.add(key)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        op = self.req.success.add().request_put
        op.key = key
        op.value = value
        op.lease = lease
        self.writes.add(key)

    def delete(self, key: bytes) -> None:
        self.req.success.add().request_delete_range.key = key
        self.writes.add(key)

    def read(self, key: bytes) -> None:
        self.req.success.add().request_range.key = key

    def read_on_failure(self, key: bytes) -> None:
        self.req.failure.add().request_range.key = key

    def read_prefix_on_failure(self, prefix: bytes) -> None:
        r = self.req.failure.add().request_range
        r.key = prefix
        r.range_end = prefix_end(prefix)
        r.keys_only = True


def newest_read(resp: rpc.TxnResponse) -> int:
    """The newest mod revision among the keys a Txn branch read back. After a failed compare,
    waiting for the index to reach it (rather than the header revision, which writes outside
    our keys move) lets the index catch up with exactly what made the compare fail."""
    newest = 0
    for r in resp.responses:
        for kv in r.response_range.kvs:
            newest = max(newest, kv.mod_revision)
    return newest


async def retry_cas(
    attempt: Callable[[int], Awaitable[T | None]],
    give_up: Callable[[], DomainError],
    attempts: int = CAS_ATTEMPTS,
) -> T:
    """The one compare-and-swap retry loop: `attempt(n)` reads, decides and writes under a
    compare, returning its result, or None when the compare failed and it should run again.
    After `attempts` failures, `give_up()` is raised (ABORTED or RESOURCE_EXHAUSTED: retry later)."""
    for n in range(attempts):
        out = await attempt(n)
        if out is not None:
            return out
    raise give_up()


@dataclass(slots=True)
class Updated:
    """The outcome of `EtcdStore.update`: the value the key holds now and the write's revision
    (0 when the function left the value as it was)."""

    value: bytes | None
    revision: int
    created: bool = False


_UNKNOWN: Any = object()


@dataclass(slots=True)
class Event:
    """One key change from a watch. `value` is None for a delete; prev_value is set when known."""

    key: bytes
    value: bytes | None
    mod_revision: int
    create_revision: int
    lease: int
    prev_value: bytes | None = None


@dataclass(slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


def key_value(kv: Any) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)


@dataclass(frozen=True)
class EtcdTls:
    """PEM bytes for a TLS etcd: the CA that signed its members, and the client certificate
    and key when etcd checks them (--client-cert-auth)."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None


@dataclass(frozen=True)
class EtcdAuth:
    """etcd user authentication: the user and password exchanged for a token (Authenticate)."""

    user: str
    password: str


class _TokenMetadata(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds etcd's auth token to every call (installed only when a user is configured: an
    interceptor costs every call a coroutine)."""

    def __init__(self) -> None:
        self.token = ""

    def _details(self, details: Any) -> Any:
        if not self.token:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("token", self.token)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def parse_endpoints(endpoints: Sequence[str], tls: EtcdTls | None) -> tuple[list[tuple[str, str]], bool]:
    """(host, port) of each endpoint and whether to speak TLS. TLS when an endpoint says
    https:// or a CA is given; an https:// endpoint is never downgraded (no CA: refused), and
    http:// beside TLS is refused too."""
    hosts: list[tuple[str, str]] = []
    schemes = set()
    for ep in endpoints:
        ep = ep.strip()
        scheme, sep, rest = ep.partition("://")
        schemes.add(scheme if sep else "")
        host, _, port = (rest if sep else ep).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"etcd endpoint {ep!r} is not [http(s)://]HOST:PORT")
        hosts.append((host.strip("[]"), port))
    if "https" in schemes and tls is None:
        raise ConfigError("an https:// etcd endpoint needs --etcd-ca (it is never downgraded to plaintext)")
    if tls is not None and "http" in schemes:
        raise ConfigError("http:// etcd endpoints cannot be used with --etcd-ca: use https://")
    if schemes - {"", "http", "https"}:
        raise ConfigError(f"unknown etcd endpoint scheme in {sorted(schemes)}")
    return hosts, tls is not None


def _channel_target(
    endpoints: Sequence[str], tls: EtcdTls | None = None, resolve: Callable[[str], list[str]] | None = None
) -> str:
    """One target for every member (gpufed.transport.address_target): an address list fails
    over between members, one name stays a re-resolved dns: target."""
    hosts, _ = parse_endpoints(endpoints, tls)
    try:
        return address_target(hosts, resolve)
    except ValueError as e:
        raise ConfigError(f"etcd endpoints {list(endpoints)}: {e}") from e


class EtcdStore:
    """An asyncio etcd client bound to one keyspace. Create and use it inside one event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = "/gpufed",
        timeout: float = 5.0,
        tls: EtcdTls | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.auth = auth
        self._token = _TokenMetadata() if auth is not None else None
        self._token_lock = asyncio.Lock()
        self.keys = Keyspace(prefix)
        self.timeout = timeout
        # Keys etcd returned to this replica's reads (not the watch): what a List costs.
        self.keys_read = 0
        # Set (to the reason) while etcd holds a schema newer than this release understands:
        # every write but the replica's own liveness keys raises WritesRefused, unsent.
        self.refuse_writes = ""
        hosts, secure = parse_endpoints(self.endpoints, tls)
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Retry connecting quickly after a member restarts.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        target = _channel_target(self.endpoints, tls)
        interceptors = [self._token] if self._token is not None else None
        if secure and tls is not None:
            # Every member's certificate names its own host; the target of an address list
            # has none, so the first member's host is the name checked against the certificate.
            options.append(("grpc.ssl_target_name_override", hosts[0][0]))
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        self._kv = rpc_grpc.KVStub(self._channel)
        self._lease = rpc_grpc.LeaseStub(self._channel)
        self._watch = rpc_grpc.WatchStub(self._channel)
        self._maintenance = rpc_grpc.MaintenanceStub(self._channel)
        self._auth_stub = rpc_grpc.AuthStub(self._channel)
        self._keepalive = _KeepAliveStream(self._lease, self.authenticate)

    async def close(self) -> None:
        await self._keepalive.close()
        await self._channel.close()

    async def authenticate(self, stale: str = "") -> None:
        """Get an auth token when a user is configured and there is none yet, or when the
        token the caller saw rejected (`stale`) is still the current one."""
        if self._token is None or self.auth is None:
            return
        if self._token.token and self._token.token != stale:
            return  # the common case: a token nobody saw rejected, no lock needed
        async with self._token_lock:
            if self._token.token and self._token.token != stale:
                return
            self._token.token = ""
            try:
                resp = await self._auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self.auth.user, password=self.auth.password),
                    timeout=self.timeout,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise StoreUnavailable(f"etcd: {e.code().name}: {e.details()}") from e
                raise StoreRefused(f"etcd refused user {self.auth.user!r}: {e.details()}") from e
            self._token.token = str(resp.token)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        token = ""
        if self._token is not None:
            await self.authenticate()
            token = self._token.token
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            if self._token is None or "auth token" not in (e.details() or ""):
                raise self._mapped(e) from e
        await self.authenticate(stale=token)  # the token expired: a new one, and once more
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            raise self._mapped(e) from e

    @staticmethod
    def _mapped(e: grpc.aio.AioRpcError) -> Exception:
        """An outage is StoreUnavailable (the outcome of a write is unknown); the rest as is."""
        details = e.details() or ""
        if "space exceeded" in details:  # etcdserver: mvcc: database space exceeded
            return StoreNoSpace(f"etcd: {details}")
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or any(
            m in details for m in _OUTAGE_MESSAGES
        ):
            return StoreUnavailable(f"etcd: {e.code().name}: {details}")
        if e.code() == grpc.StatusCode.PERMISSION_DENIED or "user name is empty" in details:
            return StoreRefused(
                f"etcd refused the request ({details}): check --etcd-user and GPUFED_ETCD_PASSWORD"
            )
        other: Exception = e
        return other

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> KeyValue | None:
        resp = await self._call(lambda: self._kv.Range(rpc.RangeRequest(key=_b(key)), timeout=self.timeout))
        self.keys_read += len(resp.kvs)
        return key_value(resp.kvs[0]) if resp.kvs else None

    async def get_range(
        self, start: str | bytes, end: str | bytes, limit: int, keys_only: bool = False
    ) -> tuple[list[KeyValue], bool]:
        """Up to `limit` keys in [start, end), in key order, and whether more follow: the read
        of every paginated List (a page reads its own keys, never the whole prefix)."""
        req = rpc.RangeRequest(
            key=_b(start),
            range_end=_b(end),
            limit=limit,
            keys_only=keys_only,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        resp = await self._call(lambda: self._kv.Range(req, timeout=self.timeout))
        self.keys_read += len(resp.kvs)
        return [key_value(kv) for kv in resp.kvs], bool(resp.more)

    async def get_prefix(self, prefix: str | bytes, revision: int = 0) -> tuple[list[KeyValue], int]:
        """Every key under prefix at one revision (the current one if 0), read in pages."""
        out: list[KeyValue] = []
        at = revision
        async for page, page_revision in self.prefix_pages(prefix, revision):
            out.extend(page)
            at = page_revision
        return out, at

    async def prefix_pages(
        self, prefix: str | bytes, revision: int = 0
    ) -> AsyncIterator[tuple[list[KeyValue], int]]:
        """Every key under prefix at one revision (the current one if 0), a page at a time with
        that revision (the first page always comes, empty or not), so a caller can work through
        a large keyspace without holding all of it or holding the event loop."""
        start = _b(prefix)
        end = prefix_end(start)
        limit = _RANGE_PAGE
        while True:
            req = rpc.RangeRequest(
                key=start,
                range_end=end,
                limit=limit,
                revision=revision,
                sort_order=rpc.RangeRequest.ASCEND,
                sort_target=rpc.RangeRequest.KEY,
            )
            try:
                resp = await self._call(lambda r=req: self._kv.Range(r, timeout=self.timeout))  # type: ignore[misc]
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or limit <= _MIN_RANGE_PAGE:
                    raise
                limit = max(_MIN_RANGE_PAGE, limit // 4)  # larger than the message limit
                continue
            if revision == 0:
                revision = resp.header.revision
            self.keys_read += len(resp.kvs)
            yield [key_value(kv) for kv in resp.kvs], revision
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    async def revision(self) -> int:
        resp = await self._call(
            lambda: self._kv.Range(
                rpc.RangeRequest(key=b"\0", limit=1, count_only=True), timeout=self.timeout
            )
        )
        return int(resp.header.revision)

    # -- writes ---------------------------------------------------------------------------------

    async def txn(
        self,
        compare: Sequence[rpc.Compare],
        success: Sequence[rpc.RequestOp],
        failure: Sequence[rpc.RequestOp] = (),
    ) -> rpc.TxnResponse:
        return await self.send_txn(
            rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        )

    async def send_txn(self, req: rpc.TxnRequest, liveness: bool = False) -> rpc.TxnResponse:
        """A Txn built by the caller (no copy of its operations). `liveness`: of the replica's
        own keys on its session lease (see put)."""
        if self.refuse_writes and not liveness and _writes(req):
            raise WritesRefused(self.refuse_writes)
        return await self._call(lambda: self._kv.Txn(req, timeout=self.timeout))

    async def update(
        self,
        key: str | bytes,
        fn: Callable[[KeyValue | None], bytes | None],
        *,
        known: KeyValue | None = _UNKNOWN,
        lease: int = 0,
        what: str = "the record",
        reason: str = "CONFLICT",
        attempts: int = CAS_ATTEMPTS,
        on_create: tuple[list[rpc.Compare], list[rpc.RequestOp]] = ([], []),
        with_ops: Callable[[bytes], Sequence[rpc.RequestOp]] | None = None,
        compares: Callable[[], Sequence[rpc.Compare]] | None = None,
    ) -> Updated:
        """Read-modify-write of one key: `fn(current)` returns the new value, or None to leave it
        as it is; it may raise to refuse. The write compares the key's mod revision (absence for
        a missing key, with `on_create`'s compares, and then its writes too); a failed compare
        reads the key back in the same Txn, so a retry costs one Txn. `known` is a current guess
        (from the index) that saves the first read. `with_ops(new)`: more writes of the same Txn;
        `compares()`: more conditions, taken again at each attempt (after `fn`)."""
        k = _b(key)
        kv: KeyValue | None = await self.get(k) if known is _UNKNOWN else known

        async def attempt(_: int) -> Updated | None:
            nonlocal kv
            new = fn(kv)
            if new is None:
                return Updated(kv.value if kv is not None else None, 0)
            if kv is not None:
                cmps, ops = [mod_revision_is(k, kv.mod_revision)], [put(k, new, lease)]
            else:
                cmps, ops = [absent(k), *on_create[0]], [put(k, new, lease), *on_create[1]]
            if with_ops is not None:
                ops.extend(with_ops(new))
            if compares is not None:
                cmps.extend(compares())
            resp = await self.txn(cmps, ops, [get(k)])
            if resp.succeeded:
                return Updated(new, int(resp.header.revision), created=kv is None)
            kvs = resp.responses[0].response_range.kvs
            kv = key_value(kvs[0]) if kvs else None
            return None

        return await retry_cas(
            attempt, lambda: errors.aborted(reason, f"{what} kept changing; retry"), attempts
        )

    async def put(self, key: str | bytes, value: bytes, lease: int = 0, liveness: bool = False) -> int:
        """One key. `liveness`: the replica's own keys on its session lease (replicas/, members/),
        written even while it refuses writes, so the federation sees it and why it refuses."""
        if self.refuse_writes and not liveness:
            raise WritesRefused(self.refuse_writes)
        resp = await self._call(
            lambda: self._kv.Put(rpc.PutRequest(key=_b(key), value=value, lease=lease), timeout=self.timeout)
        )
        return int(resp.header.revision)

    async def no_space(self) -> bool:
        """Whether etcd's NOSPACE alarm is raised on any member (writes refused until disarmed)."""
        resp = await self._call(
            lambda: self._maintenance.Alarm(
                rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self.timeout
            )
        )
        return any(a.alarm == rpc.NOSPACE for a in resp.alarms)

    async def compact(self, revision: int) -> None:
        await self._call(
            lambda: self._kv.Compact(rpc.CompactionRequest(revision=revision), timeout=self.timeout)
        )

    # -- leases ---------------------------------------------------------------------------------

    async def grant(self, ttl: int, lease_id: int = 0) -> int:
        resp = await self._call(
            lambda: self._lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl, ID=lease_id), timeout=self.timeout)
        )
        if resp.error:
            raise StoreUnavailable(f"etcd lease grant failed: {resp.error}")
        return int(resp.ID)

    async def revoke(self, lease_id: int) -> bool:
        """Revoke a lease and delete its keys; False if it had already expired."""
        try:
            await self._call(
                lambda: self._lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once (cheap: the leader answers without a Raft write). Returns the new
        TTL in seconds, or 0 when the lease no longer exists."""
        return await self._call(lambda: self._keepalive.refresh(lease_id, self.timeout))

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds left on a lease, -1 when it does not exist."""
        resp = await self._call(
            lambda: self._lease.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease_id), timeout=self.timeout)
        )
        return int(resp.TTL)

    # -- watch ----------------------------------------------------------------------------------

    async def watch_prefix(
        self,
        prefix: str | bytes,
        start_revision: int,
        prev_kv: bool = True,
        deletes_only: bool = False,
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        """Yield (revision, events) batches under prefix from start_revision on, forever.

        `revision` is one up to which every event under the prefix has been yielded: the last
        event's revision, not the response header's (while a watcher catches up, etcd sends the
        current revision in headers of batches that more events follow). Empty responses
        (periodic progress notifications) yield nothing: etcd 3.4 before 3.4.24 can send one
        ahead of events (etcd-io/etcd#15220).

        Raises WatchCompacted when start_revision is no longer available, StoreUnavailable when the
        stream breaks (the caller re-lists or resumes from the last revision it saw).
        """
        key = _b(prefix)
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=key,
                range_end=prefix_end(key),
                start_revision=start_revision,
                prev_kv=prev_kv,
                filters=[rpc.WatchCreateRequest.NOPUT] if deletes_only else [],
                progress_notify=True,
            )
        )
        requests: _Requests[rpc.WatchRequest] = _Requests()
        requests.send(create)
        await self.authenticate()
        # Require a leader: a member cut off from the quorum cancels the watch instead of
        # serving a stream that silently stopped moving (etcd's WithRequireLeader).
        call = self._watch.Watch(requests.stream(), metadata=(("hasleader", "true"),))
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise WatchCompacted(int(resp.compact_revision))
                if resp.canceled:
                    raise StoreUnavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    continue
                if not resp.events:
                    continue
                events = [
                    Event(
                        key=ev.kv.key,
                        value=None if ev.type == ev.DELETE else ev.kv.value,
                        mod_revision=ev.kv.mod_revision,
                        create_revision=ev.kv.create_revision,
                        lease=ev.kv.lease,
                        prev_value=ev.prev_kv.value if ev.HasField("prev_kv") else None,
                    )
                    for ev in resp.events
                ]
                yield max(e.mod_revision for e in events), events
        except grpc.aio.AioRpcError as e:
            task = asyncio.current_task()
            if e.code() == grpc.StatusCode.CANCELLED or (task is not None and task.cancelling()):
                raise asyncio.CancelledError() from e
            if self._token is not None and "auth token" in (e.details() or ""):
                self._token.token = ""  # expired: the next watch authenticates again
            raise StoreUnavailable(f"etcd watch broke: {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()
            requests.close()
        raise StoreUnavailable("etcd watch stream ended")


class _Requests(Generic[T]):
    """The request side of a bidi stream, fed by `send`. `close` ends it: gRPC's task that feeds
    the call finishes then, even when the call had ended first (etcd gone: cancelling the call
    afterwards no longer cancels that task, and it would wait here forever)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[T | None] = asyncio.Queue()

    def send(self, request: T) -> None:
        self._queue.put_nowait(request)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[T]:
        while (request := await self._queue.get()) is not None:
            yield request


@dataclass
class _KeepAliveStream:
    """One shared LeaseKeepAlive stream: refreshes are multiplexed onto it, answers matched by id."""

    stub: Any
    authenticate: Callable[[], Awaitable[None]] | None = None
    _call: Any = None
    _requests: _Requests[rpc.LeaseKeepAliveRequest] | None = None
    _waiters: dict[int, list[asyncio.Future[int]]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def _ensure(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        if self.authenticate is not None:
            await self.authenticate()
        requests: _Requests[rpc.LeaseKeepAliveRequest] = _Requests()
        self._requests = requests
        self._call = self.stub.LeaseKeepAlive(requests.stream())
        self._reader = asyncio.create_task(self._read(self._call, requests))

    async def _read(self, call: Any, requests: _Requests[rpc.LeaseKeepAliveRequest]) -> None:
        error: BaseException = StoreUnavailable("etcd keep-alive stream ended")
        try:
            async for resp in call:
                waiters = self._waiters.get(resp.ID)
                if waiters:
                    fut = waiters.pop(0)
                    if not waiters:
                        del self._waiters[resp.ID]
                    if not fut.done():
                        fut.set_result(int(resp.TTL))
        except grpc.aio.AioRpcError as e:
            error = StoreUnavailable(f"etcd keep-alive broke: {e.code().name}")
        except asyncio.CancelledError:
            error = StoreUnavailable("etcd keep-alive stream closed")
        finally:
            requests.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(error)
        self._waiters.clear()

    async def refresh(self, lease_id: int, timeout: float) -> int:
        async with self._lock:
            await self._ensure()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(fut)
        assert self._requests is not None
        self._requests.send(rpc.LeaseKeepAliveRequest(ID=lease_id))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError as e:
            # A stuck stream: drop it so the next refresh opens a fresh one.
            if self._call is not None:
                self._call.cancel()
            raise StoreUnavailable("etcd keep-alive timed out") from e

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class Session:
    """A replica's liveness: one short etcd lease kept alive in the background.

    Keys attached to it vanish when the replica dies. If the lease is lost (a long pause, an etcd
    outage longer than the ttl), a new one is granted and `on_new_lease` is called so the owner
    can put its keys again.
    """

    def __init__(
        self,
        store: EtcdStore,
        ttl: int = 5,
        on_new_lease: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.lease_id = 0
        self._on_new_lease = on_new_lease
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.last_ok = 0.0  # monotonic time of the last keep-alive etcd answered

    @property
    def healthy(self) -> bool:
        """Whether the lease is surely alive: etcd confirmed it less than a ttl ago. Past that,
        etcd may have expired it (keys on it gone, another replica took over its work)."""
        return self.lease_id != 0 and time.monotonic() - self.last_ok < self.ttl

    async def start(self) -> int:
        self.lease_id = await self.store.grant(self.ttl)
        self.last_ok = time.monotonic()
        self.ready.set()
        self._task = asyncio.create_task(self._run(), name="session-keepalive")
        return self.lease_id

    async def _run(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                asked = time.monotonic()
                ttl = await self.store.keepalive(self.lease_id)
                if ttl > 0:
                    self.last_ok = asked
                    continue
                log.warning("session lease lost, granting a new one", lease=self.lease_id)
                self.lease_id = await self.store.grant(self.ttl)
                if self._on_new_lease is not None:
                    await self._on_new_lease(self.lease_id)
                self.last_ok = asked  # healthy again once its keys are back
            except StoreUnavailable as e:
                log.warning("session keep-alive failed", error=str(e))
            except Exception:
                log.exception("session keep-alive crashed; retrying")

    async def close(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id:
            with contextlib.suppress(Exception):
                await self.store.revoke(self.lease_id)
