"""Requests waiting for capacity: queueing one, ending one, and the leader's scheduler that
grants them (the order and backfill rule are control_plane.domain.queue's).

A queued request is one etcd record, queue/{lease_id}. Its grant is one Txn that compares that
record unchanged, deletes it and writes the lease as an immediate grant does (records,
allocations compared absent, the tenant's hold), so a request is granted at most once whoever
grants it; a replica that dies mid-grant either committed the whole grant or nothing. Ending
one (cancel, WAIT_EXPIRED) is one Txn too, comparing the same record: a grant and an end race
and exactly one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Set as AbstractSet

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.store import EtcdStore, StoreUnavailable, TxnBuilder
from control_plane.app.lease_txns import grant_txn, put_history
from control_plane.app.leases import HistoryLeases, Leases, cap_to_calendar
from control_plane.app.quotas import Quotas
from control_plane.domain import errors, lease_rules, offers, queue, schema
from control_plane.domain.lease_rules import CreateSpec
from control_plane.domain.placement import Pick
from control_plane.domain.queue import Plan, Waiter
from control_plane.domain.quotas import TenantLimits, check_lease
from control_plane.metrics import Metrics
from gpufed.clock import SYSTEM, Clock, now_ts, timestamp
from gpufed.logs import get_logger
from gpufed.v1 import lease_pb2

log = get_logger(__name__)
QUEUED = lease_pb2.LEASE_STATE_QUEUED
# A replica's immediate grants respect the queue's claims, planned again at most this often.
CLAIMS_MAX_AGE_S = 0.25
# The least time between two passes (each costs O(queue)): what a burst of changes coalesces in.
PASS_GAP_S = 0.02
# The scheduler looks at least this often (deadlines, a missed wake-up).
SCHEDULE_TICK_S = 1.0
# What frees or adds capacity, or changes the queue: each wakes the scheduler.
_WAKES = frozenset(
    {ChangeKind.LEASE, ChangeKind.ALLOC, ChangeKind.NODE, ChangeKind.ALIVE, ChangeKind.QUEUE}
    | {ChangeKind.QUOTA, ChangeKind.BURST, ChangeKind.RESYNC}
)
_NS = 1_000_000_000


class Queue:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        leases: Leases,
        quotas: Quotas,
        clock: Clock = SYSTEM,
        metrics: Metrics | None = None,
        max_queued: int = queue.MAX_QUEUED,
        share_s: float = queue.SHARE_S,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.leases = leases
        self.quotas = quotas
        self.clock = clock
        self.metrics = metrics
        self.max_queued = max_queued
        self.share_s = share_s
        self.history = HistoryLeases(store, clock)
        self._waiters: tuple[int, list[Waiter]] = (-1, [])
        self._deadline: tuple[int, int] = (-1, 0)
        self._parsed: dict[str, Waiter] = {}  # lease id -> its waiter at the record's revision
        self._positions: tuple[int, str, int] = (-1, "", 0)  # revision, lease id, its position
        self._claims: tuple[float, int, frozenset[str]] = (0.0, -1, frozenset())
        self.granted = 0  # grants made by this replica's scheduler (tests, logs)
        leases.queue = self

    # -- the queue as the index has it ----------------------------------------------------------

    def waiters(self) -> list[Waiter]:
        """Every queued request, parsed once per index revision."""
        revision, cached = self._waiters
        if revision == self.inv.revision:
            return cached
        out = []
        parsed = self._parsed
        for lease_id, (record, rev) in self.inv.queued.items():
            known = parsed.get(lease_id)
            if known is not None and known.revision == rev:
                out.append(known)  # unchanged since the last parse: most of a deep queue
                continue
            try:
                spec = lease_rules.validate_create(record.request)
            except errors.DomainError:
                continue  # validated when queued; a record no release of ours wrote
            lease = record.lease
            out.append(
                Waiter(
                    lease_id,
                    lease.tenant,
                    spec,
                    lease.create_time.ToNanoseconds(),
                    lease.wait_expire_time.ToNanoseconds(),
                    rev,
                )
            )
            parsed[lease_id] = out[-1]
        if len(parsed) > len(out):
            self._parsed = {w.lease_id: w for w in out}
        self._waiters = (self.inv.revision, out)
        return out

    def held(self) -> dict[str, int]:
        return {t: sum(held.values()) for t, held in self.inv.tenant_leases.items()}

    def position(self, lease_id: str) -> int:
        """1 + the waiters of its shape ahead of it: one count over the queue, not a sort (an
        enqueue's answer and each queued watch ask after every change)."""
        revision, at, cached = self._positions
        if revision == self.inv.revision and at == lease_id:
            return cached
        waiters = self.waiters()
        held = self.held()
        me = next((w for w in waiters if w.lease_id == lease_id), None)
        if me is None:
            return 0
        mine = queue.rank(me, held, self.share_s)
        ahead = sum(1 for w in waiters if w.shape == me.shape and queue.rank(w, held, self.share_s) < mine)
        self._positions = (self.inv.revision, lease_id, ahead + 1)
        return ahead + 1

    def shown(self, record: lease_pb2.QueuedLeaseRecord) -> lease_pb2.Lease:
        """The queued lease as the API shows it: with its position."""
        out = lease_pb2.Lease()
        out.CopyFrom(record.lease)
        out.queue_position = self.position(out.name.split("/", 1)[1])
        return out

    def plan(self) -> Plan:
        limits: dict[str, TenantLimits] = {}  # one pass parses each tenant's quota once

        def can_hold(w: Waiter, granted: int) -> bool:
            found = limits.get(w.tenant)
            if found is None:
                found = limits[w.tenant] = self.quotas.tenant(w.tenant)
            leases, gpus = self.inv.tenant_holds(w.tenant)
            try:
                check_lease(found, leases, gpus + granted, w.spec.gpu_count)
            except errors.DomainError:
                return False
            return True

        return queue.plan(
            self.waiters(),
            self.held(),
            self.clock.time_ns(),
            self._place,
            self._claim,
            self.share_s,
            can_hold,
        )

    def claims(self) -> AbstractSet[str]:
        """GPUs the queue is owed: those its next pass grants and those blocked waiters claim.
        Immediate grants on any replica avoid them; empty (and free) when nothing waits."""
        if not self.inv.queued:
            return frozenset()
        at, _, cached = self._claims
        now = time.monotonic()
        if now - at > CLAIMS_MAX_AGE_S:  # a plan costs O(queue): not one per CreateLease
            cached = self._owed(self.plan())
        return cached

    def _owed(self, p: Plan) -> frozenset[str]:
        owed = p.claimed | {u for _, picks in p.grants for pick in picks for u in pick.gpu_uuids}
        self._claims = (time.monotonic(), self.inv.revision, owed)
        return owed

    def _place(self, w: Waiter, avoid: AbstractSet[str]) -> list[Pick] | None:
        return self.leases.place(w.tenant, w.spec, avoid)

    def _claim(self, w: Waiter, avoid: AbstractSet[str]) -> set[str]:
        """The free GPUs a blocked waiter waits on (domain.queue, "Backfill")."""
        best: list[str] = []
        spread = w.spec.placement == lease_pb2.PLACEMENT_SPREAD
        for cands in self.leases.candidates(w.tenant, w.spec):
            for c in cands:
                free = [g.uuid for g in c.gpus if g.uuid not in avoid]
                if spread:
                    best += free[: w.spec.gpu_count - len(best)]
                    if len(best) >= w.spec.gpu_count:
                        return set(best)
                elif len(free) > len(best):
                    best = free
        return set(best)

    # -- queueing and ending --------------------------------------------------------------------

    async def enqueue(
        self, tenant: str, spec: CreateSpec, request: lease_pb2.CreateLeaseRequest, lease_id: str
    ) -> lease_pb2.Lease:
        """Queue a request that found no capacity now (CreateLease with max_wait)."""
        if not schema.queue_open(self.inv.schema):
            raise errors.failed_precondition(
                "UPGRADE_IN_PROGRESS",
                "a replica of a release without the queue still runs: waiting is not possible yet",
            )
        single = spec.placement == lease_pb2.PLACEMENT_SINGLE_NODE
        if not any(
            offers.could_fit(self.inv, f, spec.gpu_count, single) for f in self.leases.filters(tenant, spec)
        ):
            raise errors.failed_precondition(
                "NO_MATCHING_CAPACITY",
                f"no {'node' if single else 'set of nodes'} the tenant may lease has"
                f" {spec.gpu_count} matching GPUs, free or held: the request could never be granted",
            )
        mine = len(self.inv.tenant_queued.get(tenant, ()))
        limit = self.quotas.tenant(tenant).max_queued
        if mine >= limit:
            raise errors.exhausted(
                "QUOTA_QUEUED",
                f"the tenant has {mine} queued requests, its quota is {limit}",
                limit=str(limit),
            )
        if len(self.inv.queued) >= self.max_queued:
            raise errors.exhausted(
                "QUEUE_FULL", f"the federation's queue holds {len(self.inv.queued)} requests; retry later"
            )
        lease = lease_rules.queued(lease_id, tenant, spec, now_ts(self.clock))
        stored = lease_pb2.CreateLeaseRequest()
        stored.CopyFrom(request)
        record = lease_pb2.QueuedLeaseRecord(lease=lease, request=stored)
        txn = TxnBuilder()
        key = self.keys.queued(lease_id).encode()
        txn.absent(key)
        txn.absent(self.keys.lease(lease_id).encode())
        txn.put(key, record.SerializeToString())
        if spec.request_id:
            req_key = self.keys.request(tenant, spec.request_id).encode()
            txn.absent(req_key)
            txn.put(req_key, lease_id.encode())
        resp = await self.store.send_txn(txn.req)
        if not resp.succeeded:
            existing = await self.leases.by_request(tenant, spec.request_id)
            if existing is not None:
                return existing  # a retry of a request that is queued (or granted) already
            raise errors.aborted("LEASE_CHANGING", "the request collided with another; retry")
        await self.inv.wait_for_revision(int(resp.header.revision), timeout=1.0)
        log.info(
            "lease queued", lease=lease.name, tenant=tenant, gpus=spec.gpu_count, max_wait_s=spec.max_wait_s
        )
        return self.shown(record)

    async def end(
        self,
        lease_id: str,
        record: lease_pb2.QueuedLeaseRecord,
        revision: int,
        reason: int,
        message: str = "",
    ) -> lease_pb2.Lease | None:
        """End a queued request (cancelled, or its wait expired) in one Txn, if its record is
        unchanged; None if it changed (granted or ended meanwhile: read it again)."""
        lease = record.lease
        at = (
            lease.wait_expire_time
            if reason == lease_pb2.LEASE_END_REASON_WAIT_EXPIRED
            else now_ts(self.clock)
        )
        done = lease_rules.ended(lease, reason, at, message)
        history = await self.history.lease_id()
        key = self.keys.queued(lease_id).encode()
        txn = TxnBuilder()
        txn.mod_revision_is(key, revision)
        txn.delete(key)
        put_history(txn, self.keys, done, history)
        if lease.request_id:
            txn.put(self.keys.request(lease.tenant, lease.request_id).encode(), lease_id.encode(), history)
        resp = await self.store.send_txn(txn.req)
        if not resp.succeeded:
            return None
        await self.inv.wait_for_revision(int(resp.header.revision), timeout=1.0)
        log.info("queued lease ended", lease=lease.name, reason=reason)
        return done

    # -- granting -------------------------------------------------------------------------------

    async def grant(self, w: Waiter, picks: list[Pick]) -> lease_pb2.Lease | None:
        """Grant one waiter on `picks` in one Txn (see the module's docstring); None if the
        record, a GPU or the tenant's quota changed meanwhile (the next pass looks again)."""
        found = self.inv.queued.get(w.lease_id)
        if found is None or found[1] != w.revision:
            return None
        waiting = found[0].lease
        spec = w.spec
        try:
            reservation = await self.quotas.reserve_lease(w.tenant, w.lease_id, spec.gpu_count)
        except errors.DomainError:
            return None  # over its quota now: it waits
        committed = 0
        etcd_lease, ttl_from_ns = await self.leases.pool.take(spec.ttl_s)
        try:
            lease = lease_rules.build_lease(w.lease_id, w.tenant, spec, picks, now_ts(self.clock))
            lease = lease_rules.granted_from_queue(lease, waiting)
            lease.etcd_lease_id = etcd_lease
            lease.grant_replica = self.leases.replica_id
            lease.expire_time.CopyFrom(timestamp(ttl_from_ns + spec.ttl_s * _NS))
            cap_to_calendar(lease, self.leases.limit_ns(lease))
            txn = grant_txn(
                self.keys,
                w.lease_id,
                lease.SerializeToString(),
                None,
                etcd_lease,
                picks,
                w.tenant,
                self.leases.replica_id,
                reservation.revision,
                self.inv.calendar_revision,
            )
            key = self.keys.queued(w.lease_id).encode()
            txn.mod_revision_is(key, w.revision)
            txn.delete(key)
            if spec.request_id:  # from now on the request key lives and ends with the lease
                txn.put(
                    self.keys.request(w.tenant, spec.request_id).encode(), w.lease_id.encode(), etcd_lease
                )
            result = await self.leases.commits.submit(txn)
            if not result.succeeded:
                return None
            committed = result.revision
            lease.fencing_token = result.revision
            self.granted += 1
            if self.metrics is not None:
                self.metrics.leases_granted.inc()
                self.metrics.queue_grants.inc()
            waited = (lease.grant_time.ToNanoseconds() - waiting.create_time.ToNanoseconds()) / _NS
            log.info(
                "queued lease granted",
                lease=lease.name,
                tenant=w.tenant,
                gpus=spec.gpu_count,
                waited_s=round(waited, 3),
                fencing_token=lease.fencing_token,
            )
            return lease
        finally:
            reservation.done(committed)
            if not committed:
                self.leases.pool.give_back(etcd_lease, spec.ttl_s)

    async def expire_due(self) -> int:
        """End every waiter whose deadline passed: WAIT_EXPIRED at its deadline."""
        now = self.clock.time_ns()
        ended = 0
        if self._soonest() > now:
            return 0
        for lease_id, (record, revision) in list(self.inv.queued.items()):
            if record.lease.wait_expire_time.ToNanoseconds() <= now:
                done = await self.end(lease_id, record, revision, lease_pb2.LEASE_END_REASON_WAIT_EXPIRED)
                ended += done is not None
        return ended

    async def schedule_once(self) -> int:
        """One pass: expire what is due, then grant what the plan places. How many granted."""
        await self.expire_due()
        if not self.inv.queued:
            return 0
        p = self.plan()
        self._owed(p)  # this replica's immediate grants avoid what this pass saw owed
        results = await asyncio.gather(*(self.grant(w, picks) for w, picks in p.grants))
        return sum(r is not None for r in results)

    def _soonest(self) -> int:
        """The nearest deadline of the queue (0 if empty), once per index revision."""
        revision, soonest = self._deadline
        if revision != self.inv.revision:
            soonest = min((w.deadline_ns for w in self.waiters()), default=0)
            self._deadline = (self.inv.revision, soonest)
        return soonest

    def next_deadline_s(self) -> float:
        soonest = self._soonest()
        if not soonest:
            return SCHEDULE_TICK_S
        return max(0.0, min(SCHEDULE_TICK_S, (soonest - self.clock.time_ns()) / _NS))

    async def run(self) -> None:
        """The leader's scheduler: a pass at each change that may free capacity or move the
        queue, and at each deadline. Grants race safely with any other grant (module doc)."""
        wake = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind in _WAKES:
                wake.set()

        unsubscribe = self.inv.subscribe(on_change)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.next_deadline_s()):
                        await wake.wait()
                wake.clear()
                try:
                    await asyncio.sleep(PASS_GAP_S)  # a burst of changes is one pass
                    if await self.schedule_once():
                        wake.set()  # the grants moved the queue: look again at once
                except StoreUnavailable as e:
                    log.warning("scheduler: etcd unavailable; next round", error=str(e))
                    await asyncio.sleep(SCHEDULE_TICK_S)
        finally:
            unsubscribe()
