"""Leases: grant, renew, end, history, idempotency and the WatchLease loop.

Grant: one Txn writes the lease record, the request key and one allocation key per GPU, all on
one etcd lease, comparing every allocation key absent, each node record unchanged and each node's
alive key present. Its revision is the fencing token. Renew is an etcd keep-alive plus a write of
the record's new expire_time (so every replica reports the same, exact expiry); expiry is etcd
deleting the keys; release is one Txn that deletes the record and the allocations and keeps the
history. Grants and releases share commits (control_plane.adapters.commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.commit import GroupCommit, LeasePool
from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.keyspace import MAX_NS
from control_plane.adapters.store import (
    EtcdStore,
    KeyValue,
    newest_read,
    prefix_end,
    put,
    retry_cas,
)
from control_plane.app.lease_txns import calendar_compare, grant_txn, release_txn
from control_plane.app.quotas import Quotas
from control_plane.domain import access, calendar, errors, lease_rules, offers, pagination, pools
from control_plane.domain.filters import Filter
from control_plane.domain.inventory import Candidate
from control_plane.domain.lease_watch import LeaseWatch
from control_plane.domain.names import parse_lease_name
from control_plane.domain.placement import Pick, place
from control_plane.domain.text import scrubbed
from control_plane.metrics import Metrics
from gpufed.clock import SYSTEM, Clock, now_ts, timestamp
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2, lease_pb2, node_pb2

if TYPE_CHECKING:
    from control_plane.app.queue import Queue

log = get_logger(__name__)
# Lease ids are names, not secrets (access goes by tenant token); the grant Txn compares the
# record absent, so even a collision could not overwrite a lease.
_IDS = random.Random()
HISTORY_RETENTION_S = 24 * 3600
# Index changes one WatchLease holds for its reader (its lease and nodes only: a few per second).
LEASE_WATCH_QUEUE_LIMIT = 1_000
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
PROVISIONING = lease_pb2.LEASE_STATE_PROVISIONING
ENDED = lease_pb2.LEASE_STATE_ENDED
QUEUED = lease_pb2.LEASE_STATE_QUEUED
# What a request with max_wait waits through instead of failing.
WAITABLE = frozenset(("NO_MATCHING_CAPACITY", "CAPACITY_CONTENDED", "QUOTA_GPUS", "QUOTA_LEASES"))
CAPACITY = frozenset(("NO_MATCHING_CAPACITY", "CAPACITY_CONTENDED"))
_NS = 1_000_000_000


class HistoryLeases:
    """One etcd lease per hour for records kept `retention_s` (ended leases, spent request ids):
    etcd deletes them by itself, so no sweep has to find them."""

    def __init__(
        self, store: EtcdStore, clock: Clock = SYSTEM, retention_s: float = HISTORY_RETENTION_S
    ) -> None:
        self.store = store
        self.clock = clock
        self.retention_s = int(retention_s)
        self._hour = -1
        self._id = 0
        self._lock = asyncio.Lock()

    async def lease_id(self) -> int:
        hour = self.clock.time_ns() // (3600 * _NS)
        if hour == self._hour:
            return self._id  # every release asks: skip the lock within the hour
        async with self._lock:
            if hour != self._hour:
                self._id = await self.store.grant(self.retention_s + 3600)
                self._hour = hour
            return self._id


class Leases:
    """The lease capability, used by LeaseService, AdminService and the leader's sweeps.

    `tenant` arguments scope a call to one tenant's leases (another tenant's lease answers
    NOT_FOUND, like a missing one); None is an operator's unscoped view.
    """

    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM,
        shutdown: asyncio.Event | None = None,
        quotas: Quotas | None = None,
        *,
        replica_id: str,
        history_retention_s: float = HISTORY_RETENTION_S,
        preemption_notice_s: float = 120.0,
    ) -> None:
        self.replica_id = replica_id
        self.preemption_notice_s = preemption_notice_s
        self.store = store
        self.quotas = quotas or Quotas(store, inventory, clock=clock)
        self.keys = store.keys
        self.inv = inventory
        self.metrics = metrics
        self.clock = clock
        self.shutdown = shutdown or asyncio.Event()
        self.history = HistoryLeases(store, clock, history_retention_s)
        self.commits = GroupCommit(store, observe=metrics.txn_latency.observe if metrics else None)
        self.pool = LeasePool(store, clock)
        # GPUs this replica is granting right now: its own grants should not race each other.
        self.pending: set[str] = set()
        self.queue: Queue | None = None  # set by control_plane.app.queue.Queue

    def start(self) -> None:
        self.commits.start()

    async def stop(self) -> None:
        await self.commits.stop()

    # -- reads ----------------------------------------------------------------------------------

    def _indexed(self, lease_id: str) -> tuple[lease_pb2.Lease, int] | None:
        lease = self.inv.leases.get(lease_id)
        if lease is not None:
            return lease, self.inv.lease_revision[lease_id]
        waiting = self.inv.queued.get(lease_id)
        if waiting is not None and self.queue is not None:
            return self.queue.shown(waiting[0]), waiting[1]
        return None

    async def _queued(self, lease_id: str, fresh: bool) -> tuple[lease_pb2.QueuedLeaseRecord, int] | None:
        """A queued request's record and its mod revision: from the index, or etcd if fresh."""
        if not fresh:
            return self.inv.queued.get(lease_id)
        kv = await self.store.get(self.keys.queued(lease_id))
        return None if kv is None else (lease_pb2.QueuedLeaseRecord.FromString(kv.value), kv.mod_revision)

    async def _read(self, lease_id: str) -> tuple[lease_pb2.Lease, int] | None:
        """From etcd: the active record and its mod revision, else the history (revision 0)."""
        kv = await self.store.get(self.keys.lease(lease_id))
        if kv is not None:
            lease = lease_pb2.Lease.FromString(kv.value)
            if not lease.fencing_token:
                lease.fencing_token = kv.create_revision
            return lease, kv.mod_revision
        waiting = await self._queued(lease_id, fresh=True)
        if waiting is not None:
            shown = self.queue.shown(waiting[0]) if self.queue is not None else waiting[0].lease
            return shown, waiting[1]
        kv = await self.store.get(self.keys.lease_history(lease_id))
        if kv is not None:
            return lease_pb2.Lease.FromString(kv.value), 0
        return None

    async def load(self, lease_id: str) -> tuple[lease_pb2.Lease, int] | None:
        """The lease record and its mod revision (0 for history), from the index, else etcd."""
        return self._indexed(lease_id) or await self._read(lease_id)

    def _vanished(self, lease_id: str) -> tuple[lease_pb2.Lease, int] | None:
        """A lease whose record etcd deleted (its etcd lease ran out) before the leader wrote its
        history: it expired, at its expire_time. Releases and revocations write the history in
        the Txn that deletes the record, so only an expiry leaves this gap."""
        last = self.inv.vanished.get(lease_id)
        if last is None:
            return None
        ended = lease_pb2.Lease()
        ended.CopyFrom(last)
        ended.state = ENDED
        ended.end_reason = lease_pb2.LEASE_END_REASON_EXPIRED
        ended.end_time.CopyFrom(last.expire_time)
        return ended, 0

    async def get(self, name: str, tenant: str | None) -> tuple[lease_pb2.Lease, int]:
        """The lease and its record's mod revision; NOT_FOUND for another tenant's lease."""
        lease_id = parse_lease_name(name)
        found = await self.load(lease_id) or self._vanished(lease_id)
        if found is None or (tenant is not None and found[0].tenant != tenant):
            raise errors.not_found("LEASE_NOT_FOUND", f"{name} does not exist", lease=name)
        return found

    async def list_leases(
        self, tenant: str | None, state: int, page_size: int, page_token: str, caller: str
    ) -> tuple[list[lease_pb2.Lease], str]:
        """Leases, a tenant's newest first (an operator's by tenant, then newest first),
        optionally in one state: one AIP-158 page by key. Active leases come from the index,
        ended ones from the tenant's own history range, read from the page's cursor with a
        limit: a page costs its own keys, whatever other tenants hold."""
        if state not in lease_pb2.LeaseState.values():
            raise errors.invalid("INVALID_STATE", f"unknown state {state}", field="state")
        size = pagination.page_size(page_size)
        query = pagination.query_hash("leases", caller, str(state))
        after = pagination.decode_cursor(page_token, query)
        if after and (after.count("/") != 2 or (tenant is not None and not after.startswith(tenant + "/"))):
            raise errors.invalid("INVALID_PAGE_TOKEN", "page_token is malformed", field="page_token")
        found: dict[str, tuple[str, lease_pb2.Lease]] = {}
        if state != ENDED:
            held = self.inv.tenant_leases.get(tenant, {}) if tenant is not None else self.inv.leases
            waiting = self.inv.tenant_queued.get(tenant, set()) if tenant is not None else self.inv.queued
            ids = [*held, *waiting]
            for lease_id in ids:
                indexed = self._indexed(lease_id)
                lease = indexed[0] if indexed is not None else None
                if lease is None or (state and lease.state != state):
                    continue
                key = _sort_key(lease)
                if key > after:
                    found[lease.name] = (key, lease)
        more = False
        if state in (0, ENDED):
            ended, more = await self._ended_page(tenant, after, size + 1)
            for key, lease in ended:
                found[lease.name] = (key, lease)  # the history, over an index that lags behind
        ordered = sorted(found.values(), key=lambda kl: kl[0])
        page = ordered[:size]
        token = pagination.encode_cursor(query, page[-1][0]) if page and (more or len(ordered) > size) else ""
        return [lease for _, lease in page], token

    async def _ended_page(
        self, tenant: str | None, after: str, limit: int
    ) -> tuple[list[tuple[str, lease_pb2.Lease]], bool]:
        """Up to `limit` ended leases of the tenant (None: every tenant) after the cursor."""
        top = self.keys.tenant_history_dir(tenant)
        start = self.keys.history_key_of(after) + "\0" if after else top
        kvs, more = await self.store.get_range(start, prefix_end(top.encode()), limit)
        out = []
        for kv in kvs:
            try:
                key = self.keys.history_sort_key(kv.key)
            except ValueError:
                continue  # not a history record (nothing else lives there)
            out.append((key, lease_pb2.Lease.FromString(kv.value)))
        return out, more

    # -- grant ----------------------------------------------------------------------------------

    async def by_request(self, tenant: str, request_id: str) -> lease_pb2.Lease | None:
        if not request_id:
            return None
        kv = await self.store.get(self.keys.request(tenant, request_id))
        if kv is None:
            return None
        found = await self.load(kv.value.decode())
        if found is None:
            raise errors.aborted("REQUEST_SETTLING", "the lease of this request_id is ending; retry")
        return found[0]

    def stages(self, tenant: str, spec: lease_rules.CreateSpec) -> list[list[Filter]]:
        """The filters of each pool stage in turn (pools.stages): the federation and the
        tenant's own pool as its choice and burst policy say."""
        visible_to = dataclasses.replace(spec.filter, viewer=tenant)  # the federation and its own pool
        burst = pools.from_json(self.inv.burst.get(tenant))[0]
        mixed = spec.allow_mixed and spec.placement == lease_pb2.PLACEMENT_SPREAD
        return [
            pools.scoped(visible_to, scope, burst)
            for scope in pools.stages(spec.pool, tenant in self.inv.pools, mixed)
        ]

    def filters(self, tenant: str, spec: lease_rules.CreateSpec) -> list[Filter]:
        return [f for stage in self.stages(tenant, spec) for f in stage]

    def candidates(self, tenant: str, spec: lease_rules.CreateSpec) -> Iterator[Iterable[Candidate]]:
        """Each stage's candidates, free GPUs only, cheapest first; GPUs reserved within the
        least ttl from now left out (such a lease could not run its shortest term)."""
        now = self.clock.time_ns()
        for stage in self.stages(tenant, spec):
            found = itertools.chain.from_iterable(offers.candidates(self.inv, f, 1) for f in stage)
            yield (
                self._unreserved(found, now, now + lease_rules.MIN_TTL_S * _NS)
                if self.inv.gpu_slots
                else found
            )

    def _unreserved(self, cands: Iterable[Candidate], start: int, end: int) -> Iterator[Candidate]:
        for c in cands:
            gpus = [
                g
                for g in c.gpus
                if not calendar.overlaps(self.inv.slots(g.parent_uuid or g.uuid), start, end)
            ]
            if len(gpus) == len(c.gpus):
                yield c
            elif gpus:
                yield dataclasses.replace(c, gpus=gpus)

    def limit_ns(self, lease: lease_pb2.Lease) -> int | None:
        """The latest a live lease may be renewed to (a reservation of one of its GPUs starts
        then); None when nothing limits it (a reservation's own lease is limited by its record)."""
        if lease.interruptible or lease.reservation or not self.inv.gpu_slots:
            return None
        gpus = [g.parent_uuid or g.uuid for g in lease.gpus]
        return calendar.limit(self.inv.slots, gpus, self.clock.time_ns())

    def limited(self, lease: lease_pb2.Lease) -> lease_pb2.Lease:
        """The lease as the API shows it: with max_expire_time from its GPUs' calendars now."""
        if not lease_rules.is_live(lease) or lease.reservation:
            return lease  # a window's lease carries its limit (the window's end) in its record
        lim = self.limit_ns(lease)
        if lim is None and not lease.HasField("max_expire_time"):
            return lease
        out = lease_pb2.Lease()
        out.CopyFrom(lease)
        if lim is None:
            out.ClearField("max_expire_time")
        else:
            out.max_expire_time.CopyFrom(timestamp(lim))
        return out

    def place(self, tenant: str, spec: lease_rules.CreateSpec, avoid: AbstractSet[str]) -> list[Pick] | None:
        """GPUs for the request on the index as it is, none of `avoid`; None if none fit."""
        for cands in self.candidates(tenant, spec):
            picks = place(cands, spec.gpu_count, spec.placement, avoid)
            if picks is not None:
                return picks
        return None

    def queue_claims(self) -> AbstractSet[str]:
        """GPUs owed to waiting requests (control_plane.app.queue): immediate grants avoid them."""
        return self.queue.claims() if self.queue is not None else frozenset()

    async def create(
        self,
        tenant: str,
        spec: lease_rules.CreateSpec,
        request: lease_pb2.CreateLeaseRequest | None = None,
    ) -> lease_pb2.Lease:
        """Grant now; or, with max_wait, queue a request that finds no capacity (or no room in
        the tenant's quota) now (control_plane.app.queue)."""
        self.quotas.take_create(tenant)
        etcd_lease, ttl_from_ns = await self.pool.take(spec.ttl_s)
        lease_id = f"{_IDS.getrandbits(64):016x}"
        keep_etcd_lease = False
        avoid: set[str] = set()
        req_key = self.keys.request(tenant, spec.request_id).encode() if spec.request_id else None

        async def attempt(n: int) -> lease_pb2.Lease | None:
            try:
                reservation = await self.quotas.reserve_lease(tenant, lease_id, spec.gpu_count)
            except errors.DomainError:
                # A retry of a request that already holds a lease answers with that lease.
                existing = await self.by_request(tenant, spec.request_id)
                if existing is not None:
                    return existing
                raise
            committed = 0
            try:
                out = await grant(n, reservation.revision)
                committed = out.fencing_token if out is not None else 0
                return out
            finally:
                reservation.done(committed)

        async def grant(n: int, holds_revision: int) -> lease_pb2.Lease | None:
            nonlocal keep_etcd_lease
            # The queue's claims first: an immediate request takes no GPU a waiter is owed.
            owed = self.queue_claims()
            picks = self.place(tenant, spec, avoid | self.pending | owed if avoid or owed else self.pending)
            if picks is None:
                # A retry of a request that already holds a lease answers with that lease.
                existing = await self.by_request(tenant, spec.request_id)
                if existing is not None:
                    return existing
                if n == 0 and not self.pending:
                    raise errors.failed_precondition(
                        "NO_MATCHING_CAPACITY", f"no {spec.gpu_count} free GPUs match the request"
                    )
                raise _contended()
            lease = lease_rules.build_lease(lease_id, tenant, spec, picks, now_ts(self.clock))
            lease.etcd_lease_id = etcd_lease
            lease.grant_replica = self.replica_id
            lease.expire_time.CopyFrom(timestamp(ttl_from_ns + spec.ttl_s * _NS))
            cap_to_calendar(lease, self.limit_ns(lease))
            uuids = [u for p in picks for u in p.gpu_uuids]
            txn = grant_txn(
                self.keys,
                lease_id,
                lease.SerializeToString(),
                req_key,
                etcd_lease,
                picks,
                tenant,
                self.replica_id,
                holds_revision,
                self.inv.calendar_revision,
            )
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
                    attempt=n,
                    holds_revision=holds_revision,
                    replica=self.replica_id,
                )
                return lease
            if req_key is not None and result.response.responses[0].response_range.kvs:
                # This request_id already holds a lease (a retry): answer with that lease.
                other = await self.by_request(tenant, spec.request_id)
                if other is not None:
                    return other
            if self.metrics is not None:
                self.metrics.txn_conflicts.inc()
            avoid.update(uuids)
            await self.inv.wait_for_revision(newest_read(result.response), timeout=1.0)
            return None

        try:
            return await retry_cas(attempt, _contended)
        except errors.DomainError as e:
            if not spec.max_wait_s or e.reason not in WAITABLE or self.queue is None or request is None:
                raise
            if e.reason in CAPACITY and spec.max_wait_s >= self.preemption_notice_s:
                # GPUs that interruptible leases hold: they get their notice, this request waits.
                await self.preempt_for(tenant, spec, lease_id)
            return await self.queue.enqueue(tenant, spec, request, lease_id)
        finally:
            if not keep_etcd_lease:
                self.pool.give_back(etcd_lease, spec.ttl_s)

    # -- preemption -----------------------------------------------------------------------------

    async def preempt_for(self, tenant: str, spec: lease_rules.CreateSpec, lease_id: str) -> int:
        """Notice the interruptible leases on GPUs an on-demand request could have (whole GPUs
        free, or held only by interruptible leases): each is preempted at now plus the notice.
        How many were told (0: preemption would not make room either)."""
        if spec.interruptible:
            return 0  # interruptible capacity never preempts its own kind
        now = self.clock.time_ns()
        inv = self.inv
        soon = now + lease_rules.MIN_TTL_S * _NS
        picks = None
        for stage in self.stages(tenant, spec):
            cands = itertools.chain.from_iterable(
                calendar.window_candidates(inv, f, now, soon, inv.slots, inv.held_until) for f in stage
            )
            picks = place(cands, spec.gpu_count, spec.placement, self.queue_claims())
            if picks is not None:
                break
        if picks is None:
            return 0
        victims = sorted(
            held
            for p in picks
            for u in p.gpu_uuids
            for held in inv.holders(p.candidate.name, u)
            if (lease := inv.leases.get(held)) is not None and lease.interruptible
        )
        at = now + int(self.preemption_notice_s * _NS)
        for victim in victims:
            await self.notice(victim, at, f"an on-demand request (leases/{lease_id}) needs its GPUs")
        return len(victims)

    async def notice(self, lease_id: str, at_ns: int, why: str) -> None:
        """Tell an interruptible lease it ends PREEMPTED at `at_ns` (an earlier notice stands)."""
        found = self._indexed(lease_id)
        if found is None or not found[0].interruptible:
            return
        lease, revision = found
        key = self.keys.lease(lease_id)
        known = KeyValue(key.encode(), lease.SerializeToString(), revision, 0, lease.etcd_lease_id)

        def record(kv: KeyValue | None) -> bytes | None:
            if kv is None:
                return None  # ended meanwhile
            current = lease_pb2.Lease.FromString(kv.value)
            if current.HasField("preempt_time") and current.preempt_time.ToNanoseconds() <= at_ns:
                return None
            current.preempt_time.CopyFrom(timestamp(at_ns))
            current.end_message = why
            return current.SerializeToString()

        journal = self.keys.journal(lease_id)
        updated = await self.store.update(
            key,
            record,
            known=known,
            lease=lease.etcd_lease_id,
            what=lease.name,
            reason="LEASE_CHANGING",
            with_ops=lambda new: [put(journal, new)],
        )
        if updated.revision:
            log.info("interruptible lease noticed", lease=lease.name, preempt_at_ns=at_ns, why=why)
            await self.inv.wait_for_revision(updated.revision, timeout=1.0)

    # -- renew ----------------------------------------------------------------------------------

    async def renew(self, name: str, tenant: str) -> lease_pb2.Lease:
        """Keep the etcd lease alive, then record the renewal: expire_time = the renewal's time
        plus the ttl, taken before the keep-alive left, so it never runs past etcd's expiry.
        Metered per tenant (RATE_LIMITED); one that moves expire_time less than a tenth of the
        ttl writes nothing (lease_rules.renewal_moves)."""
        self.quotas.take_renewal(tenant)
        lease, revision = await self.get(name, tenant)
        if lease.state == QUEUED:
            raise errors.failed_precondition(
                "LEASE_QUEUED", f"{lease.name} waits for capacity: renew it once granted", lease=lease.name
            )
        if not lease_rules.is_live(lease):
            raise _ended(lease.name, "has ended")
        if lease.reservation:
            return self.limited(lease)  # a window's lease runs to the window's end: nothing to renew
        at = now_ts(self.clock)
        ttl = await self.store.keepalive(lease.etcd_lease_id)
        self.pool.note_refresh(lease.etcd_lease_id, only_known=True)
        if ttl <= 0:
            raise _ended(lease.name, "has expired")
        key = self.keys.lease(name.split("/", 1)[1])
        known = KeyValue(key.encode(), lease.SerializeToString(), revision, 0, lease.etcd_lease_id)
        out = lease_pb2.Lease()

        def renew_record(kv: KeyValue | None) -> bytes | None:
            if kv is None:
                raise _ended(lease.name, "has ended")
            current = lease_pb2.Lease.FromString(kv.value)
            current.fencing_token = current.fencing_token or lease.fencing_token
            new = lease_rules.renewed(current, at)
            cap_to_calendar(new, self.limit_ns(current))  # a reservation of its GPUs starts then
            if not lease_rules.renewal_moves(current, new):
                out.CopyFrom(self.limited(current))
                return None  # a later renewal got there first, this one moves it too little, or the limit
            out.CopyFrom(new)
            return new.SerializeToString()

        def calendars_unchanged() -> list[rpc.Compare]:
            # A booking committed after the index was read could start before the new expiry.
            return [
                calendar_compare(self.keys, node, self.inv.calendar_revision(node))
                for node in sorted(lease_rules.nodes_of(lease))
            ]

        journal = self.keys.journal(name.split("/", 1)[1])
        updated = await self.store.update(
            key,
            renew_record,
            known=known if revision else None,
            lease=lease.etcd_lease_id,
            what=f"{lease.name}",
            reason="LEASE_CHANGING",
            # The journal keeps the newest expire_time: what an expiry is billed to.
            with_ops=lambda new: [put(journal, new)],
            compares=calendars_unchanged,
        )
        if updated.revision:
            await self.inv.wait_for_revision(updated.revision, timeout=1.0)
        return out

    # -- provisioning ---------------------------------------------------------------------------

    async def provisioned(self, node: str, result: node_pb2.ProvisionResult) -> str:
        """One node's hook answered for a PROVISIONING lease: record its access details (ACTIVE
        once every node answered), or end the lease PROVISIONING_FAILED. An answer for another
        node, an older grant (fencing token) or a lease no longer provisioning changes nothing.
        What happened, for the log: "recorded", "failed" or why it was ignored."""
        try:
            lease_id = parse_lease_name(result.lease)
        except errors.DomainError:
            return "not a lease name"
        found = await self.load(lease_id)
        if found is None or found[1] == 0:
            return "no such live lease"
        lease, revision = found
        if node not in lease_rules.nodes_of(lease):
            return "not a node of the lease"
        if result.fencing_token != lease.fencing_token:
            return "another grant's fencing token"
        if lease.state != PROVISIONING:
            return "not provisioning"
        details = lease_pb2.AccessDetails()
        details.CopyFrom(result.details)
        details.node = node
        # The hook's stderr reaches the tenant's terminal: cut, and its control characters out.
        problem = (
            None
            if result.ok
            else (scrubbed(result.error[: access.MAX_HOOK_ERROR_CHARS]) or "the hook failed")
        )
        problem = problem or access.details_problem(details)
        if problem is not None:
            await self.end(lease_id, lease_pb2.LEASE_END_REASON_PROVISIONING_FAILED, f"{node}: {problem}")
            return "failed"
        at = now_ts(self.clock)
        key = self.keys.lease(lease_id)
        known = KeyValue(key.encode(), lease.SerializeToString(), revision, 0, lease.etcd_lease_id)

        def record(kv: KeyValue | None) -> bytes | None:
            if kv is None:
                raise _ended(lease.name, "has ended")
            current = lease_pb2.Lease.FromString(kv.value)
            if current.state != PROVISIONING:
                return None
            return lease_rules.provisioned(current, details, at).SerializeToString()

        journal = self.keys.journal(lease_id)
        updated = await self.store.update(
            key,
            record,
            known=known,
            lease=lease.etcd_lease_id,
            what=lease.name,
            reason="LEASE_CHANGING",
            with_ops=lambda new: [put(journal, new)],  # billing starts at active_time
        )
        if updated.revision:
            await self.inv.wait_for_revision(updated.revision, timeout=1.0)
        return "recorded"

    # -- end ------------------------------------------------------------------------------------

    async def end(
        self, lease_id: str, reason: int, message: str = "", tenant: str | None = None
    ) -> lease_pb2.Lease:
        """End an active lease in one Txn: delete its record and allocations (the GPUs are free
        at once) and keep its history. Its etcd lease, now without keys, serves the next grant.
        Idempotent: an ended lease is returned as it ended."""
        name = f"leases/{lease_id}"

        async def attempt(n: int) -> lease_pb2.Lease | None:
            # First from the index; after a failed compare from etcd (the index may lag).
            found = self._indexed(lease_id) if n == 0 else None
            found = found or await self._read(lease_id)
            if found is None or (tenant is not None and found[0].tenant != tenant):
                raise errors.not_found("LEASE_NOT_FOUND", f"{name} does not exist")
            lease, revision = found
            if revision == 0:
                return lease  # history: already ended
            if lease.state == QUEUED:
                return await self._end_queued(lease_id, reason, message, fresh=n > 0)
            # The true end: now, or the expiry if etcd has not yet deleted an expired lease.
            now = now_ts(self.clock)
            if lease.HasField("expire_time") and lease.expire_time.ToNanoseconds() < now.ToNanoseconds():
                now = lease.expire_time
            done = lease_rules.ended(lease, reason, now, message)
            txn = release_txn(self.keys, lease, revision, done, await self.history.lease_id())
            result = await self.commits.submit(txn)
            if not result.succeeded:
                return None  # changed or gone meanwhile: read it again
            self.pool.give_back(lease.etcd_lease_id, lease.ttl.seconds or lease_rules.DEFAULT_TTL_S)
            if self.metrics is not None:
                self.metrics.leases_released.inc()
            log.debug("lease ended", lease=done.name, reason=done.end_reason)
            return done

        return await retry_cas(attempt, _changing)

    async def _end_queued(
        self, lease_id: str, reason: int, message: str, fresh: bool
    ) -> lease_pb2.Lease | None:
        waiting = await self._queued(lease_id, fresh)
        if waiting is None or self.queue is None:
            return None  # granted or ended meanwhile: read it again
        return await self.queue.end(lease_id, waiting[0], waiting[1], reason, message)

    # -- watch ----------------------------------------------------------------------------------

    async def watch(self, name: str, tenant: str | None) -> AsyncIterator[lease_pb2.WatchLeaseResponse]:
        """The events of one lease (control_plane.domain.lease_watch), until it ends or the
        replica shuts down. A thin loop: index changes and ticks in, the machine's events out."""
        lease, _ = await self.get(name, tenant)
        lease_id = lease.name.split("/", 1)[1]
        if lease.state == lease_rules.QUEUED:
            granted: list[lease_pb2.Lease] = []
            async for ev in self._watch_queued(lease_id, lease, granted):
                yield ev
            if not granted:
                return
            lease = granted[0]
        machine = LeaseWatch(lease, limit_ns=self.limit_ns(lease))
        for ev in machine.start(self.clock.time_ns()):
            if ev.HasField("lease"):
                ev.lease.CopyFrom(self.limited(ev.lease))
            yield ev
        if machine.done:
            return
        changes: asyncio.Queue[Change] = asyncio.Queue()
        nodes = machine.nodes
        overflow = False

        def on_change(change: Change) -> None:
            nonlocal overflow
            if changes.qsize() >= LEASE_WATCH_QUEUE_LIMIT:  # bounded where added, as WatchCapacity
                overflow = True
                return
            kind = change.kind
            if (
                (kind is ChangeKind.LEASE and change.name == lease_id)
                or (kind in (ChangeKind.NODE, ChangeKind.ALIVE, ChangeKind.CALENDAR) and change.name in nodes)
                or kind is ChangeKind.RESYNC
            ):
                changes.put_nowait(change)

        unsubscribe = self.inv.subscribe(on_change)
        # Changes between the read above and the subscription: look once at the index as it is.
        changes.put_nowait(Change(ChangeKind.RESYNC, "", None, self.inv.revision))
        try:
            while not machine.done and not self.shutdown.is_set():
                if overflow:
                    raise errors.exhausted(
                        "WATCH_TOO_SLOW", "the watcher fell too far behind; watch again (GRANTED first)"
                    )
                if machine.awaiting_final:
                    final = await self._final(lease_id, machine.lease)
                    for ev in machine.ended(final, self.clock.time_ns()):
                        yield ev
                    break
                deadline = machine.next_deadline()
                wait = (
                    2.0 if deadline is None else min(2.0, max(0.0, (deadline - self.clock.time_ns()) / _NS))
                )
                events: list[lease_pb2.WatchLeaseResponse] = []
                # Events are yielded outside the timeout: a slow reader must not be cancelled.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        events += self._feed(machine, await changes.get())
                while not changes.empty():
                    events += self._feed(machine, changes.get_nowait())
                now = self.clock.time_ns()
                events += machine.tick(now)
                events += machine.on_limit(self.limit_ns(machine.lease), now)
                for ev in events:
                    yield ev
            if not machine.done:
                # The replica is going away: UNAVAILABLE, so the client watches again elsewhere
                # (the SDK does), starting from the lease's current state.
                raise errors.unavailable(
                    "REPLICA_SHUTTING_DOWN", "this replica is shutting down; watch again"
                )
        finally:
            unsubscribe()

    async def _watch_queued(
        self, lease_id: str, lease: lease_pb2.Lease, granted: list[lease_pb2.Lease]
    ) -> AsyncIterator[lease_pb2.WatchLeaseResponse]:
        """A queued lease's watch until it leaves the queue: QUEUED now and at each move of its
        position; then ENDED (expired, cancelled), or the granted record put in `granted` for
        the live lease's watch to go on from (GRANTED)."""
        event = lease_pb2.WatchLeaseResponse
        changes = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind in (ChangeKind.QUEUE, ChangeKind.RESYNC) or (
                change.kind is ChangeKind.LEASE and change.name == lease_id
            ):
                changes.set()  # coalesced: one look at the index as it is, however many

        unsubscribe = self.inv.subscribe(on_change)
        shown = -1
        try:
            while not self.shutdown.is_set():
                record = self.inv.queued.get(lease_id)
                if record is None:
                    live = self.inv.leases.get(lease_id)
                    if live is not None:
                        granted.append(live)
                        return
                    final = await self.store.get(self.keys.lease_history(lease_id))
                    if final is not None:
                        ended = lease_pb2.Lease.FromString(final.value)
                        yield event(type=event.EVENT_TYPE_ENDED, lease=ended, event_time=now_ts(self.clock))
                        return
                else:
                    view = self.queue.shown(record[0]) if self.queue is not None else record[0].lease
                    if view.queue_position != shown:
                        shown = view.queue_position
                        yield event(type=event.EVENT_TYPE_QUEUED, lease=view, event_time=now_ts(self.clock))
                changes.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await changes.wait()
            raise errors.unavailable("REPLICA_SHUTTING_DOWN", "this replica is shutting down; watch again")
        finally:
            unsubscribe()

    def _feed(self, machine: LeaseWatch, change: Change) -> list[lease_pb2.WatchLeaseResponse]:
        if change.kind is ChangeKind.CALENDAR:
            return []  # the limit is looked at after each batch of changes
        now = self.clock.time_ns()
        lease_id = machine.lease.name.split("/", 1)[1]
        if change.kind is ChangeKind.LEASE:
            return machine.on_lease(self.inv.leases.get(lease_id), now)
        if change.kind is ChangeKind.NODE:
            entry = self.inv.nodes.get(change.name)
            return machine.on_node(change.name, entry.node if entry else None, now)
        if change.kind is ChangeKind.ALIVE:
            return machine.on_alive(change.name, change.name in self.inv.alive, now)
        nodes: list[tuple[str, common_pb2.Node | None, bool]] = []
        for n in sorted(machine.nodes):
            entry = self.inv.nodes.get(n)
            nodes.append((n, entry.node if entry else None, n in self.inv.alive))
        return machine.resync(self.inv.leases.get(lease_id), nodes, now)

    async def _final(self, lease_id: str, last: lease_pb2.Lease) -> lease_pb2.Lease:
        """The ended record: the history a release wrote in its own Txn, else (an expiry, whose
        history the leader writes later) the last record seen, ended at its expire_time."""
        kv = await self.store.get(self.keys.lease_history(lease_id))
        if kv is not None:
            return lease_pb2.Lease.FromString(kv.value)
        return lease_rules.expired(last)


def cap_to_calendar(lease: lease_pb2.Lease, limit_ns: int | None) -> None:
    """A new or renewed record whose GPUs are reserved from `limit_ns`: it expires no later."""
    if limit_ns is None:
        lease.ClearField("max_expire_time")
        return
    lease.max_expire_time.CopyFrom(timestamp(limit_ns))
    if lease.expire_time.ToNanoseconds() > limit_ns:
        lease.expire_time.CopyFrom(lease.max_expire_time)


def _sort_key(lease: lease_pb2.Lease) -> str:
    """The key ListLeases orders and pages by: the tenant, then newest first (as the tenant
    history keys sort)."""
    inverted = MAX_NS - lease.create_time.ToNanoseconds()
    return f"{lease.tenant}/{inverted:020d}/{lease.name.split('/', 1)[1]}"


def _contended() -> errors.DomainError:
    return errors.exhausted("CAPACITY_CONTENDED", "matching GPUs were taken by concurrent grants; retry")


def _changing() -> errors.DomainError:
    return errors.aborted("LEASE_CHANGING", "the lease kept changing; retry")


def _ended(name: str, what: str) -> errors.DomainError:
    return errors.failed_precondition("LEASE_ENDED", f"{name} {what}", lease=name)
