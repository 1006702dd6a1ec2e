"""LeaseService: exclusive GPU leases, each one an etcd lease.

Grant: one Txn writes the lease record, the request key and one allocation key per GPU, all on
one etcd lease, comparing every allocation key absent, each node record unchanged and each node's
alive key present. Its revision is the fencing token. Renew is an etcd keep-alive; expiry is etcd
deleting the keys; release is one Txn that deletes the record and the allocations and keeps the
history. Grants and releases share commits (control_plane.adapters.commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from control_plane import auth, errors
from control_plane.adapters.commit import GroupCommit, LeasePool
from control_plane.domain import lease_rules, offers, pagination
from control_plane.domain.names import parse_lease_name
from control_plane.domain.placement import Pick, place
from control_plane.adapters.index import Change, Inventory
from control_plane.metrics import Metrics
from control_plane.adapters.store import EtcdStore, Keyspace, TxnBuilder, newest_read
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2, lease_pb2, lease_pb2_grpc

log = get_logger(__name__)
Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
MAX_ATTEMPTS = 8
# Lease ids are names, not secrets (access goes by tenant token); the grant Txn compares the
# record absent, so even a collision could not overwrite a lease.
_IDS = random.Random()
HISTORY_RETENTION_S = 24 * 3600
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
ENDED = lease_pb2.LEASE_STATE_ENDED


def now_ts() -> timestamp_pb2.Timestamp:
    # Set directly: Timestamp's FromNanoseconds and GetCurrentTime are Python code in protobuf.
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def grant_txn(
    keys: Keyspace, lease_id: str, record: bytes, req_key: bytes, etcd_lease: int, picks: list[Pick]
) -> TxnBuilder:
    """The grant: the record, the request key and one allocation per GPU on the etcd lease, if
    each allocation and the request are absent and each node is unchanged and alive. On failure
    it reads back the request key first, then each node and allocation (what made it fail)."""
    txn = TxnBuilder()
    lease_key = keys.lease(lease_id).encode()
    value = lease_id.encode()
    txn.absent(req_key)
    txn.absent(lease_key)
    txn.read_on_failure(req_key)
    txn.put(lease_key, record, etcd_lease)
    txn.put(req_key, value, etcd_lease)
    for p in picks:
        node = p.candidate.node
        node_key = keys.node(node.provider, node.node_id).encode()
        txn.mod_revision_is(node_key, p.candidate.mod_revision)
        txn.present(keys.alive(node.provider, node.node_id).encode())
        txn.read_on_failure(node_key)
        for u in p.gpu_uuids:
            key = keys.alloc(node.provider, node.node_id, u).encode()
            txn.absent(key)
            txn.put(key, value, etcd_lease)
            txn.read_on_failure(key)
    return txn


def release_txn(
    keys: Keyspace, lease: lease_pb2.Lease, revision: int, final: bytes, history_lease: int
) -> TxnBuilder:
    """The end of an active lease: if its record is unchanged, delete it and its allocations, and
    keep the final record and the spent request id as history."""
    lease_id = lease.name.split("/", 1)[1]
    key = keys.lease(lease_id).encode()
    txn = TxnBuilder()
    txn.mod_revision_is(key, revision)
    txn.delete(key)
    txn.put(keys.lease_history(lease_id).encode(), final, history_lease)
    txn.put(keys.request(lease.tenant, lease.request_id).encode(), lease_id.encode(), history_lease)
    for g in lease.gpus:
        txn.delete(keys.alloc(g.provider, g.node_id, g.uuid).encode())
    return txn


class HistoryLeases:
    """One etcd lease per hour for records kept 24 h (ended leases, spent request ids)."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self._hour = -1
        self._id = 0
        self._lock = asyncio.Lock()

    async def lease_id(self) -> int:
        hour = int(time.time() // 3600)
        if hour == self._hour:
            return self._id  # every release asks: skip the lock within the hour
        async with self._lock:
            if hour != self._hour:
                self._id = await self.store.grant(HISTORY_RETENTION_S + 3600)
                self._hour = hour
            return self._id


class Leases:
    """The lease operations shared by LeaseService, AdminService and the leader's sweeps."""

    def __init__(self, store: EtcdStore, inventory: Inventory, metrics: Metrics | None = None) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.metrics = metrics
        self.history = HistoryLeases(store)
        self.commits = GroupCommit(store, observe=metrics.txn_latency.observe if metrics else None)
        self.pool = LeasePool(store)
        # GPUs this replica is granting right now: its own grants should not race each other.
        self.pending: set[str] = set()

    def start(self) -> None:
        self.commits.start()

    async def stop(self) -> None:
        await self.commits.stop()

    # -- reads ----------------------------------------------------------------------------------

    async def load(self, lease_id: str) -> tuple[lease_pb2.Lease, int] | None:
        """The lease record and its mod revision (0 for history), from the index, else etcd."""
        lease = self.inv.leases.get(lease_id)
        if lease is not None:
            return lease, self.inv.lease_revision[lease_id]
        kv = await self.store.get(self.keys.lease(lease_id))
        if kv is not None:
            lease = lease_pb2.Lease.FromString(kv.value)
            if not lease.fencing_token:
                lease.fencing_token = kv.create_revision
            return lease, kv.mod_revision
        kv = await self.store.get(self.keys.lease_history(lease_id))
        if kv is not None:
            return lease_pb2.Lease.FromString(kv.value), 0
        return None

    async def owned(self, name: str, principal: auth.Principal) -> tuple[lease_pb2.Lease, int]:
        lease_id = parse_lease_name(name)
        found = await self.load(lease_id)
        # Another tenant's lease looks exactly like a missing one.
        if found is None or (principal.kind != auth.Kind.ADMIN and found[0].tenant != principal.name):
            raise errors.not_found("LEASE_NOT_FOUND", f"{name} does not exist", lease=name)
        return found

    async def with_expiry(self, lease: lease_pb2.Lease) -> lease_pb2.Lease:
        """The record with expire_time from etcd's remaining TTL (renewals do not rewrite it)."""
        if lease.state != ACTIVE:
            return lease
        ttl = await self.store.time_to_live(lease.etcd_lease_id)
        out = lease_pb2.Lease()
        out.CopyFrom(lease)
        if ttl >= 0:
            out.expire_time.FromNanoseconds(time.time_ns() + ttl * 1_000_000_000)
        return out

    # -- grant ----------------------------------------------------------------------------------

    async def by_request(self, tenant: str, request_id: str) -> lease_pb2.Lease | None:
        kv = await self.store.get(self.keys.request(tenant, request_id))
        if kv is None:
            return None
        found = await self.load(kv.value.decode())
        if found is None:
            raise errors.ApiError(
                grpc.StatusCode.ABORTED, "REQUEST_SETTLING", "the lease of this request_id is ending; retry"
            )
        return found[0]

    async def create(self, tenant: str, spec: lease_rules.CreateSpec) -> lease_pb2.Lease:
        etcd_lease, ttl_from = await self.pool.take(spec.ttl_s)
        lease_id = f"{_IDS.getrandbits(64):016x}"
        keep_etcd_lease = False
        avoid: set[str] = set()
        req_key = self.keys.request(tenant, spec.request_id).encode()
        try:
            for attempt in range(MAX_ATTEMPTS):
                cands = offers.candidates(self.inv, spec.filter, 1)
                picks = place(
                    cands, spec.gpu_count, spec.placement, avoid | self.pending if avoid else self.pending
                )
                if picks is None:
                    # A retry of a request that already holds a lease answers with that lease.
                    existing = await self.by_request(tenant, spec.request_id)
                    if existing is not None:
                        return existing
                    if attempt == 0 and not self.pending:
                        raise errors.failed_precondition(
                            "NO_MATCHING_CAPACITY", f"no {spec.gpu_count} free GPUs match the request"
                        )
                    raise errors.exhausted(
                        "CAPACITY_CONTENDED", "matching GPUs were taken by concurrent grants; retry"
                    )
                lease = lease_rules.build_lease(lease_id, tenant, spec, picks, now_ts())
                lease.etcd_lease_id = etcd_lease
                seconds, nanos = divmod(int((ttl_from + spec.ttl_s) * 1e9), 1_000_000_000)
                lease.expire_time.seconds = seconds
                lease.expire_time.nanos = nanos
                uuids = [u for p in picks for u in p.gpu_uuids]
                txn = grant_txn(self.keys, lease_id, lease.SerializeToString(), req_key, etcd_lease, picks)
                self.pending.update(uuids)
                # Until etcd answers the outcome is unknown (store unavailable, or this call
                # cancelled mid-commit): the Txn may have attached keys to the etcd lease, so it
                # must not serve another grant. A retry with the request_id settles the outcome.
                keep_etcd_lease = True
                try:
                    result = await self.commits.submit(txn)
                finally:
                    self.pending.difference_update(uuids)
                keep_etcd_lease = result.succeeded
                if result.succeeded:
                    lease.fencing_token = result.revision
                    if self.metrics is not None:
                        self.metrics.leases_granted.inc()
                    log.debug(
                        "lease granted",
                        lease=lease.name,
                        tenant=tenant,
                        gpus=len(uuids),
                        nodes=len(picks),
                        fencing_token=lease.fencing_token,
                        attempt=attempt,
                    )
                    return lease
                if result.response.responses and result.response.responses[0].response_range.kvs:
                    # This request_id already holds a lease (a retry): answer with that lease.
                    other = await self.by_request(tenant, spec.request_id)
                    if other is not None:
                        return other
                if self.metrics is not None:
                    self.metrics.txn_conflicts.inc()
                avoid.update(uuids)
                await self.inv.wait_for_revision(newest_read(result.response), timeout=1.0)
            raise errors.exhausted(
                "CAPACITY_CONTENDED", "matching GPUs were taken by concurrent grants; retry"
            )
        finally:
            if not keep_etcd_lease:
                self.pool.give_back(etcd_lease, spec.ttl_s)

    # -- renew ----------------------------------------------------------------------------------

    async def renew(self, lease: lease_pb2.Lease) -> lease_pb2.Lease:
        if lease.state != ACTIVE:
            raise errors.failed_precondition("LEASE_ENDED", f"{lease.name} has ended", lease=lease.name)
        ttl = await self.store.keepalive(lease.etcd_lease_id)
        self.pool.note_refresh(lease.etcd_lease_id, only_known=True)
        if ttl <= 0:
            raise errors.failed_precondition("LEASE_ENDED", f"{lease.name} has expired", lease=lease.name)
        out = lease_pb2.Lease()
        out.CopyFrom(lease)
        out.expire_time.FromNanoseconds(time.time_ns() + ttl * 1_000_000_000)
        return out

    # -- end ------------------------------------------------------------------------------------

    async def end(
        self, lease_id: str, reason: int, message: str = "", tenant: str | None = None
    ) -> lease_pb2.Lease:
        """End an active lease in one Txn: delete its record and allocations (the GPUs are free
        at once) and keep its history. Its etcd lease, now without keys, serves the next grant.
        Idempotent: an ended lease is returned as it ended."""
        key = self.keys.lease(lease_id).encode()
        found: tuple[lease_pb2.Lease, int] | None = None
        if lease_id in self.inv.leases:
            found = self.inv.leases[lease_id], self.inv.lease_revision[lease_id]
        for _ in range(MAX_ATTEMPTS):
            if found is None:
                kv = await self.store.get(key)
                if kv is not None:
                    lease = lease_pb2.Lease.FromString(kv.value)
                    lease.fencing_token = lease.fencing_token or kv.create_revision
                    found = lease, kv.mod_revision
            if found is None:
                hist = await self.store.get(self.keys.lease_history(lease_id))
                if hist is None:
                    raise errors.not_found("LEASE_NOT_FOUND", f"leases/{lease_id} does not exist")
                lease = lease_pb2.Lease.FromString(hist.value)
                if tenant is not None and lease.tenant != tenant:
                    raise errors.not_found("LEASE_NOT_FOUND", f"leases/{lease_id} does not exist")
                return lease
            lease, revision = found
            if tenant is not None and lease.tenant != tenant:
                raise errors.not_found("LEASE_NOT_FOUND", f"leases/{lease_id} does not exist")
            done = lease_rules.ended(lease, reason, now_ts(), message)
            raw = done.SerializeToString()
            txn = release_txn(self.keys, lease, revision, raw, await self.history.lease_id())
            result = await self.commits.submit(txn)
            if result.succeeded:
                self.pool.give_back(lease.etcd_lease_id, lease.ttl.seconds or lease_rules.DEFAULT_TTL_S)
                if self.metrics is not None:
                    self.metrics.leases_released.inc()
                log.debug("lease ended", lease=done.name, reason=done.end_reason)
                return done
            found = None  # changed or gone meanwhile: read it again
        raise errors.ApiError(grpc.StatusCode.ABORTED, "LEASE_CHANGING", "the lease kept changing; retry")

    async def list_history(self, tenant: str | None) -> list[lease_pb2.Lease]:
        kvs, _ = await self.store.get_prefix(self.keys.records_dir("history") + "leases/")
        out = []
        for kv in kvs:
            lease = lease_pb2.Lease.FromString(kv.value)
            if tenant is None or lease.tenant == tenant:
                out.append(lease)
        return out


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: Leases, shutdown: asyncio.Event) -> None:
        self.leases = leases
        self.inv = leases.inv
        self.shutdown = shutdown

    async def CreateLease(
        self, request: lease_pb2.CreateLeaseRequest, context: Ctx
    ) -> lease_pb2.CreateLeaseResponse:
        p = auth.require(auth.Kind.TENANT)
        spec = lease_rules.validate_create(request)
        lease = await self.leases.create(p.name, spec)
        return lease_pb2.CreateLeaseResponse(lease=lease)

    async def GetLease(self, request: lease_pb2.GetLeaseRequest, context: Ctx) -> lease_pb2.GetLeaseResponse:
        p = auth.require(auth.Kind.TENANT, auth.Kind.ADMIN)
        lease, _ = await self.leases.owned(request.name, p)
        return lease_pb2.GetLeaseResponse(lease=await self.leases.with_expiry(lease))

    async def ListLeases(
        self, request: lease_pb2.ListLeasesRequest, context: Ctx
    ) -> lease_pb2.ListLeasesResponse:
        p = auth.require(auth.Kind.TENANT, auth.Kind.ADMIN)
        if request.state not in lease_pb2.LeaseState.values():
            raise errors.invalid("INVALID_STATE", f"unknown state {request.state}")
        size = pagination.page_size(request.page_size)
        tenant = None if p.kind == auth.Kind.ADMIN else p.name
        found: dict[str, lease_pb2.Lease] = {}
        if request.state in (0, ENDED):
            for lease in await self.leases.list_history(tenant):
                found[lease.name] = lease
        if request.state in (0, ACTIVE):
            for lease in list(self.inv.leases.values()):
                if (tenant is None or lease.tenant == tenant) and lease.state == ACTIVE:
                    found[lease.name] = lease
        ordered = sorted(found.values(), key=lambda lease: (-lease.create_time.ToNanoseconds(), lease.name))
        query = pagination.query_hash("leases", p.name, str(request.state))
        start, end, token = pagination.paginate(len(ordered), request.page_token, size, query)
        return lease_pb2.ListLeasesResponse(leases=ordered[start:end], next_page_token=token)

    async def RenewLease(
        self, request: lease_pb2.RenewLeaseRequest, context: Ctx
    ) -> lease_pb2.RenewLeaseResponse:
        p = auth.require(auth.Kind.TENANT)
        lease, _ = await self.leases.owned(request.name, p)
        return lease_pb2.RenewLeaseResponse(lease=await self.leases.renew(lease))

    async def KeepAlive(
        self, request_iterator: AsyncIterator[lease_pb2.KeepAliveRequest], context: Ctx
    ) -> AsyncIterator[lease_pb2.KeepAliveResponse]:
        p = auth.require(auth.Kind.TENANT)
        async for req in request_iterator:
            try:
                lease, _ = await self.leases.owned(req.name, p)
                renewed = await self.leases.renew(lease)
                yield lease_pb2.KeepAliveResponse(name=req.name, expire_time=renewed.expire_time)
            except errors.ApiError as e:
                yield lease_pb2.KeepAliveResponse(name=req.name, error=e.reason)

    async def ReleaseLease(
        self, request: lease_pb2.ReleaseLeaseRequest, context: Ctx
    ) -> lease_pb2.ReleaseLeaseResponse:
        p = auth.require(auth.Kind.TENANT)
        lease_id = parse_lease_name(request.name)
        lease = await self.leases.end(lease_id, lease_pb2.LEASE_END_REASON_RELEASED, tenant=p.name)
        return lease_pb2.ReleaseLeaseResponse(lease=lease)

    async def WatchLease(
        self, request: lease_pb2.WatchLeaseRequest, context: Ctx
    ) -> AsyncIterator[lease_pb2.WatchLeaseResponse]:
        p = auth.require(auth.Kind.TENANT, auth.Kind.ADMIN)
        lease, _ = await self.leases.owned(request.name, p)
        Ev = lease_pb2.WatchLeaseResponse
        lease_id = lease.name.split("/", 1)[1]
        if lease.state != ACTIVE:
            yield Ev(type=Ev.EVENT_TYPE_ENDED, lease=lease, event_time=now_ts())
            return
        lease = await self.leases.with_expiry(lease)
        yield Ev(type=Ev.EVENT_TYPE_GRANTED, lease=lease, event_time=now_ts())
        nodes = {g.node for g in lease.gpus}
        uuids = {g.uuid for g in lease.gpus}
        queue: asyncio.Queue[lease_pb2.WatchLeaseResponse] = asyncio.Queue()
        ended = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind == "lease" and change.name == lease_id:
                if change.value is None or (change.lease is not None and change.lease.state == ENDED):
                    ended.set()
            elif change.kind == "node" and change.name in nodes and change.value is not None:
                node = common_pb2.Node.FromString(change.value)
                for g in node.gpus:
                    if (
                        g.uuid in uuids
                        and g.health == common_pb2.GPU_HEALTH_UNHEALTHY
                        and g.uuid not in reported
                    ):
                        reported.add(g.uuid)
                        reasons = ", ".join(r.code for r in g.health_reasons)
                        queue.put_nowait(
                            Ev(
                                type=Ev.EVENT_TYPE_GPU_UNHEALTHY,
                                gpu_uuid=g.uuid,
                                node=change.name,
                                message=reasons,
                                event_time=now_ts(),
                            )
                        )
            elif change.kind == "alive" and change.name in nodes and change.value is None:
                queue.put_nowait(
                    Ev(
                        type=Ev.EVENT_TYPE_NODE_LOST,
                        node=change.name,
                        event_time=now_ts(),
                        message="the node's daemon stopped streaming",
                    )
                )

        reported: set[str] = set()
        unsubscribe = self.inv.subscribe(on_change)
        ttl = lease.ttl.seconds or lease_rules.DEFAULT_TTL_S
        last_expiry = lease.expire_time.ToNanoseconds()
        warned = False
        try:
            while not ended.is_set() and not self.shutdown.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(ttl / 6, 2.0)):
                        await ended.wait()
                while not queue.empty():
                    yield queue.get_nowait()
                if ended.is_set():
                    break
                remaining = await self.leases.store.time_to_live(lease.etcd_lease_id)
                if remaining < 0:
                    await self.inv.wait_for_revision(self.inv.revision + 1, timeout=1.0)
                    ended.set()
                    break
                expiry = time.time_ns() + remaining * 1_000_000_000
                if expiry > last_expiry + 1_000_000_000:
                    last_expiry = expiry
                    warned = False
                    current = lease_pb2.Lease()
                    current.CopyFrom(lease)
                    current.expire_time.FromNanoseconds(expiry)
                    yield Ev(type=Ev.EVENT_TYPE_RENEWED, lease=current, event_time=now_ts())
                if remaining < ttl / 3 and not warned:
                    warned = True
                    yield Ev(
                        type=Ev.EVENT_TYPE_EXPIRING,
                        lease=lease,
                        event_time=now_ts(),
                        message=f"{remaining} s left",
                    )
            while not queue.empty():
                yield queue.get_nowait()
            if ended.is_set():
                final = None
                for _ in range(20):
                    found = await self.leases.load(lease_id)
                    if found is not None and found[0].state == ENDED:
                        final = found[0]
                        break
                    await asyncio.sleep(0.1)
                if final is None:
                    final = lease_rules.ended(lease, lease_pb2.LEASE_END_REASON_EXPIRED, now_ts())
                yield Ev(type=Ev.EVENT_TYPE_ENDED, lease=final, event_time=now_ts())
        finally:
            unsubscribe()
