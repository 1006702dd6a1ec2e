"""Reservations: booking future windows of concrete GPUs, cancelling them, and the leader's
scheduler that turns each into a lease at its start and ends it at its end.

A booking is one Txn (control_plane.app.reservation_txns): the record, and the window on each
node's calendar by compare-and-swap, so two bookings of one GPU's overlapping windows cannot
both commit; grants and renewals on a node compare its calendar unchanged, so a lease never
runs past a window booked after it was read. The start is one Txn fenced by the leader's term
that compares the reservation unchanged (a cancellation and a start race, one wins), after the
leases still on its GPUs were ended (RESERVED, or PREEMPTED for interruptible ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterable

from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf import timestamp_pb2

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.keyspace import MAX_NS
from control_plane.adapters.store import (
    MAX_TXN_OPS,
    EtcdStore,
    TxnBuilder,
    newest_read,
    prefix_end,
    retry_cas,
)
from control_plane.app.leases import Leases
from control_plane.app.reservation_txns import book_txn, end_txn, start_txn
from control_plane.domain import calendar, errors, pagination, reservation_rules, schema
from control_plane.domain.inventory import Candidate
from control_plane.domain.names import parse_node_name, parse_reservation_name
from control_plane.domain.placement import Pick, place
from control_plane.domain.reservation_rules import ACTIVE, AT_RISK, ENDED, SCHEDULED, ReservationSpec
from control_plane.metrics import Metrics
from gpufed.clock import SYSTEM, Clock, now_ts, ts_ns
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2, lease_pb2, reservation_pb2

log = get_logger(__name__)
audit = get_logger("gpufed.audit")
_IDS = random.Random()
_NS = 1_000_000_000
# The scheduler looks at least this often; it wakes at the next start or end too.
SCHEDULE_TICK_S = 1.0
# A window's lease outlives the window in etcd by this much: the scheduler ends it on time with
# its reason (WINDOW_ENDED), and etcd frees its GPUs by itself if no leader is left to.
LEASE_TTL_SLACK_S = 30
_END = reservation_pb2.ReservationEndReason
_EVENT = reservation_pb2.WatchReservationResponse
Calendars = dict[str, tuple[reservation_pb2.NodeCalendar | None, int]]


class Reservations:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        leases: Leases,
        clock: Clock = SYSTEM,
        metrics: Metrics | None = None,
        shutdown: asyncio.Event | None = None,
        grace_s: float = 60.0,
    ) -> None:
        self.grace_s = grace_s
        # node name -> when (monotonic) the scheduler first saw it not READY
        self._unready: dict[str, float] = {}
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.leases = leases
        self.clock = clock
        self.metrics = metrics
        self.shutdown = shutdown or asyncio.Event()
        self.started = 0  # reservations this replica started as leader (tests, logs)

    # -- reads ----------------------------------------------------------------------------------

    async def _read(self, rid: str) -> tuple[reservation_pb2.Reservation, int] | None:
        """From etcd: the booked record and its mod revision, else the history (revision 0)."""
        kv = await self.store.get(self.keys.reservation(rid))
        if kv is not None:
            return reservation_pb2.Reservation.FromString(kv.value), kv.mod_revision
        kv = await self.store.get(self.keys.reservation_history(rid))
        if kv is not None:
            return reservation_pb2.Reservation.FromString(kv.value), 0
        return None

    async def get(self, name: str, tenant: str | None) -> tuple[reservation_pb2.Reservation, int]:
        """The reservation and its record's revision (0: ended); NOT_FOUND for another tenant's."""
        rid = parse_reservation_name(name)
        found = self.inv.reservations.get(rid) or await self._read(rid)
        if found is None or (tenant is not None and found[0].tenant != tenant):
            raise errors.not_found("RESERVATION_NOT_FOUND", f"{name} does not exist", reservation=name)
        return found

    async def list_reservations(
        self, tenant: str | None, state: int, page_size: int, page_token: str, caller: str, node: str
    ) -> tuple[list[reservation_pb2.Reservation], str]:
        """A tenant's reservations newest first (an operator's: by tenant, then newest first),
        optionally in one state or on one node: one AIP-158 page by key. Booked ones come from
        the index, ended ones from the tenant's own history range."""
        if state not in reservation_pb2.ReservationState.values():
            raise errors.invalid("INVALID_STATE", f"unknown state {state}", field="state")
        if node:
            parse_node_name(node)
        size = pagination.page_size(page_size)
        query = pagination.query_hash("reservations", caller, str(state), node)
        after = pagination.decode_cursor(page_token, query)
        if after and (after.count("/") != 2 or (tenant is not None and not after.startswith(tenant + "/"))):
            raise errors.invalid("INVALID_PAGE_TOKEN", "page_token is malformed", field="page_token")

        def wanted(r: reservation_pb2.Reservation) -> bool:
            return (not state or r.state == state) and (not node or any(g.node == node for g in r.gpus))

        found: dict[str, tuple[str, reservation_pb2.Reservation]] = {}
        if state != ENDED:
            ids: Iterable[str] = (
                self.inv.tenant_reservations.get(tenant, set())
                if tenant is not None
                else self.inv.reservations
            )
            for rid in list(ids):
                held = self.inv.reservations.get(rid)
                if held is not None and wanted(held[0]) and _sort_key(held[0]) > after:
                    found[held[0].name] = (_sort_key(held[0]), held[0])
        more = False
        if state in (0, ENDED):
            top = self.keys.tenant_reservations_dir(tenant)
            # The cursor is "{tenant}/{inverted time}/{id}"; a tenant's range already names it.
            cursor = after.split("/", 1)[1] if after and tenant is not None else after
            start = top + cursor + "\0" if after else top
            kvs, more = await self.store.get_range(start, prefix_end(top.encode()), size + 1)
            for kv in kvs:
                r = reservation_pb2.Reservation.FromString(kv.value)
                if wanted(r):
                    found[r.name] = (_sort_key(r), r)  # the history, over an index that lags behind
        ordered = sorted(found.values(), key=lambda kv: kv[0])
        page = ordered[:size]
        token = pagination.encode_cursor(query, page[-1][0]) if page and (more or len(ordered) > size) else ""
        return [r for _, r in page], token

    # -- booking --------------------------------------------------------------------------------

    async def _by_request(self, tenant: str, request_id: str) -> reservation_pb2.Reservation | None:
        if not request_id:
            return None
        kv = await self.store.get(self.keys.reservation_request(tenant, request_id))
        if kv is None:
            return None
        found = self.inv.reservations.get(kv.value.decode()) or await self._read(kv.value.decode())
        return found[0] if found is not None else None

    def _window_candidates(self, tenant: str, spec: ReservationSpec) -> Iterable[Iterable[Candidate]]:
        inv = self.inv
        for stage in self.leases.stages(tenant, spec.as_lease_spec()):
            yield itertools.chain.from_iterable(
                calendar.window_candidates(inv, f, spec.start_ns, spec.end_ns, inv.slots, inv.held_until)
                for f in stage
            )

    def place(self, tenant: str, spec: ReservationSpec, avoid: set[str]) -> list[Pick] | None:
        """GPUs free for all of the window, as CreateLease would pick among free ones."""
        for cands in self._window_candidates(tenant, spec):
            picks = place(cands, spec.gpu_count, spec.placement, avoid)
            if picks is not None:
                return picks
        return None

    def _holders(self, picks: list[Pick]) -> dict[str, int]:
        """lease id -> record revision of the on-demand leases on the picked GPUs now: a
        booking compares them unchanged (each ends before the window; a renewal since could
        pass its start). Interruptible ones do not count: they are preempted, not limited."""
        inv = self.inv
        return {
            lease_id: inv.lease_revision[lease_id]
            for p in picks
            for u in p.gpu_uuids
            for lease_id in inv.holders(p.candidate.name, u)
            if lease_id in inv.lease_revision and not inv.leases[lease_id].interruptible
        }

    async def create(
        self, tenant: str, req: reservation_pb2.CreateReservationRequest
    ) -> reservation_pb2.Reservation:
        spec = reservation_rules.validate_create(req, self.clock.time_ns())
        if not schema.queue_open(self.inv.schema):
            raise errors.failed_precondition(
                "UPGRADE_IN_PROGRESS",
                "a replica of a release without reservations still runs: booking is not possible yet",
            )
        existing = await self._by_request(tenant, spec.request_id)
        if existing is not None:
            return existing
        rid = f"{_IDS.getrandbits(64):016x}"
        req_key = self.keys.reservation_request(tenant, spec.request_id).encode() if spec.request_id else None
        avoid: set[str] = set()

        async def attempt(n: int) -> reservation_pb2.Reservation | None:
            counted, quota_revision = await self._reserved_hours(tenant)
            wanted = spec.gpu_count * (spec.end_ns - spec.start_ns) / 3.6e12
            limit = self.leases.quotas.tenant(tenant).max_reserved_gpu_hours
            if counted + wanted > limit + 1e-9:
                raise errors.exhausted(
                    "QUOTA_RESERVED_GPU_HOURS",
                    f"booking {wanted:g} GPU-hours would pass the tenant's {limit} reserved GPU-hours"
                    f" ({counted:g} booked)",
                )
            indexed = self.inv.revision
            picks = self.place(tenant, spec, avoid)
            if picks is None:
                existing = await self._by_request(tenant, spec.request_id)
                if existing is not None:
                    return existing
                if n == 0:
                    raise errors.failed_precondition(
                        "NO_MATCHING_CAPACITY",
                        f"no {spec.gpu_count} GPUs matching the request are free for all of the window",
                    )
                raise _contended()
            record = reservation_rules.build(rid, tenant, spec, req, picks, now_ts(self.clock))
            holders = self._holders(picks)
            cals = {p.candidate.name: self.inv.calendars.get(p.candidate.name, (None, 0)) for p in picks}
            txn = book_txn(
                self.keys,
                record,
                req_key,
                picks,
                cals,
                indexed,
                holders,
                quota_revision=quota_revision,
            )
            if len(txn.req.compare) > MAX_TXN_OPS:
                # Too many leases hold them now to compare in one Txn: pick GPUs held by fewer.
                avoid.update(u for p in picks for u in p.gpu_uuids if self.inv.holders(p.candidate.name, u))
                return None
            resp = await self.store.send_txn(txn.req)
            if resp.succeeded:
                await self.inv.wait_for_revision(resp.header.revision, timeout=1.0)
                audit.info(
                    "reservation booked",
                    principal=f"tenant:{tenant}",
                    target=record.name,
                    gpus=len(record.gpus),
                    start_time=record.start_time.ToJsonString(),
                    end_time=record.end_time.ToJsonString(),
                    code="OK",
                )
                if self.metrics is not None:
                    self.metrics.reservations_booked.inc()
                return record
            if req_key is not None and resp.responses and resp.responses[0].response_range.kvs:
                other = await self._by_request(tenant, spec.request_id)
                if other is not None:
                    return other
            avoid.update(u for p in picks for u in p.gpu_uuids)
            await self.inv.wait_for_revision(newest_read(resp), timeout=1.0)
            return None

        return await retry_cas(attempt, _contended)

    async def _reserved_hours(self, tenant: str) -> tuple[float, int]:
        """The tenant's booked GPU-hours and the revision they were read at (etcd, not the
        index: the booking's compare must see every replica's bookings)."""
        kvs, revision = await self.store.get_prefix(self.keys.reserved_dir(tenant))
        total = 0.0
        for kv in kvs:
            with contextlib.suppress(ValueError):
                total += float(kv.value)
        return total, revision

    # -- the end --------------------------------------------------------------------------------

    async def _calendars(self, reservation: reservation_pb2.Reservation) -> Calendars:
        """The calendars of the reservation's nodes as etcd has them now."""
        out: Calendars = {}
        for node in reservation_rules.by_node(reservation):
            provider, node_id = parse_node_name(node)
            kv = await self.store.get(self.keys.calendar(provider, node_id))
            out[node] = (
                (reservation_pb2.NodeCalendar.FromString(kv.value), kv.mod_revision) if kv else (None, 0)
            )
        return out

    async def finish(
        self,
        rid: str,
        reason: int,
        message: str,
        fenced: Callable[[], TxnBuilder] | None = None,
        check: Callable[[rpc.TxnResponse], None] | None = None,
    ) -> reservation_pb2.Reservation:
        """End a booked reservation in one Txn: its record to the history, its windows off the
        calendars. Idempotent: an ended one is returned as it ended."""
        name = f"reservations/{rid}"

        async def attempt(n: int) -> reservation_pb2.Reservation | None:
            found = (self.inv.reservations.get(rid) if n == 0 else None) or await self._read(rid)
            if found is None:
                raise errors.not_found("RESERVATION_NOT_FOUND", f"{name} does not exist")
            current, revision = found
            if revision == 0:
                return current
            final = reservation_rules.ended(current, reason, now_ts(self.clock), message)
            txn = fenced() if fenced is not None else TxnBuilder()
            history = await self.leases.history.lease_id()
            end_txn(txn, self.keys, current, revision, final, await self._calendars(current), history)
            resp = await self.store.send_txn(txn.req)
            if check is not None:
                check(resp)
            if not resp.succeeded:
                return None
            await self.inv.wait_for_revision(resp.header.revision, timeout=1.0)
            log.info("reservation ended", reservation=name, reason=_END.Name(reason))  # type: ignore[arg-type]
            return final

        return await retry_cas(
            attempt, lambda: errors.aborted("RESERVATION_CHANGING", f"{name} kept changing; retry")
        )

    async def cancel(self, name: str, tenant: str | None) -> reservation_pb2.Reservation:
        """Free a booked reservation's windows; an active one's lease ends as a release does."""
        current, revision = await self.get(name, tenant)
        if revision == 0:
            return current
        if current.state == ACTIVE and current.lease:
            await self.leases.end(
                current.lease.split("/", 1)[1], lease_pb2.LEASE_END_REASON_RELEASED, f"{name} was cancelled"
            )
        who = f"tenant:{tenant}" if tenant is not None else "admin"
        final = await self.finish(
            name.split("/", 1)[1], _END.RESERVATION_END_REASON_CANCELLED, f"cancelled by {who}"
        )
        audit.info("reservation cancelled", principal=who, target=name, code="OK")
        return final

    # -- the leader's scheduler -----------------------------------------------------------------

    async def run(self, fenced: Callable[[], TxnBuilder], check: Callable[[rpc.TxnResponse], None]) -> None:
        """Start each reservation at its start, end each at its end (leader only)."""
        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            kind = change.kind
            if kind is ChangeKind.LEASE:
                # Only a window's own lease (it may end early) or an interruptible one matters:
                # every other grant and release must not cost the leader a pass.
                lease = change.lease
                if lease is not None and (lease.reservation or lease.interruptible):
                    changed.set()
            elif kind in (ChangeKind.RESERVATION, ChangeKind.RESYNC):
                changed.set()

        unsubscribe = self.inv.subscribe(on_change)
        try:
            while True:
                changed.clear()
                wake = await self.pass_once(fenced, check)
                timeout = max(0.0, min(SCHEDULE_TICK_S, (wake - self.clock.time_ns()) / _NS))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await changed.wait()
        finally:
            unsubscribe()

    async def pass_once(
        self, fenced: Callable[[], TxnBuilder], check: Callable[[rpc.TxnResponse], None]
    ) -> int:
        """One look at every booked reservation; the time (ns) of the next start or end."""
        now = self.clock.time_ns()
        wake = now + int(SCHEDULE_TICK_S * _NS)
        notice = int(self.leases.preemption_notice_s * _NS)
        wake = min(wake, await self._preempt_due(now))
        for rid, (current, revision) in sorted(
            self.inv.reservations.items(), key=lambda kv: ts_ns(kv[1][0].start_time)
        ):
            start, end = ts_ns(current.start_time), ts_ns(current.end_time)
            try:
                if current.state in (SCHEDULED, AT_RISK) and start > now:
                    await self._guard(rid, current, revision)
                if current.state in (SCHEDULED, AT_RISK):
                    if start - notice > now:
                        wake = min(wake, start - notice)
                    elif start > now:
                        await self._notice_holders(current, start)
                        wake = min(wake, start)
                    elif end <= now:
                        await self.finish(
                            rid,
                            _END.RESERVATION_END_REASON_FAILED,
                            "its window passed before it could start",
                            fenced,
                            check,
                        )
                    else:
                        await self._start(rid, current, revision, fenced, check)
                elif current.state == ACTIVE:
                    lease_id = current.lease.split("/", 1)[1]
                    if end <= now or lease_id not in self.inv.leases:
                        await self._complete(rid, current, lease_id, end <= now, fenced, check)
                    else:
                        wake = min(wake, end)
            except errors.DomainError as e:
                log.warning(
                    "reservation scheduler: will look again", reservation=current.name, error=e.message
                )
        return wake

    async def _guard(self, rid: str, current: reservation_pb2.Reservation, revision: int) -> None:
        """A booked reservation whose node went away (offline past the grace, or draining) is
        moved to equivalent GPUs, else marked AT_RISK; back to SCHEDULED when its nodes return."""
        inv = self.inv
        mono = self.clock.monotonic()
        for node in list(self._unready):
            if inv.is_schedulable(node):
                del self._unready[node]
        bad = [n for n in reservation_rules.by_node(current) if not inv.is_schedulable(n)]
        if not bad:
            if current.state == AT_RISK:
                await self._rewrite(rid, revision, reservation_rules.back_on_schedule(current))
            return
        for node in bad:
            self._unready.setdefault(node, mono)
        draining = any(inv.state(n) == common_pb2.NODE_STATE_DRAINING for n in bad)
        if not draining and all(mono - self._unready[n] < self.grace_s for n in bad):
            return  # a daemon restarting: give it the grace first
        state = common_pb2.NodeState.Name(inv.state(bad[0])).removeprefix("NODE_STATE_").lower()  # type: ignore[arg-type]
        why = f"node {bad[0]} is {state}"
        if await self._move(rid, current, revision, why):
            return
        if current.state != AT_RISK:
            risky = reservation_rules.at_risk(current, f"{why}; no equivalent GPUs are free for the window")
            if await self._rewrite(rid, revision, risky):
                log.warning("reservation at risk", reservation=current.name, why=why)

    async def _rewrite(self, rid: str, revision: int, new: reservation_pb2.Reservation) -> bool:
        """The record replaced if unchanged since `revision` (else the next pass looks again)."""
        key = self.keys.reservation(rid).encode()
        txn = TxnBuilder()
        txn.mod_revision_is(key, revision)
        txn.put(key, new.SerializeToString())
        resp = await self.store.send_txn(txn.req)
        if resp.succeeded:
            await self.inv.wait_for_revision(resp.header.revision, timeout=1.0)
        return bool(resp.succeeded)

    async def _move(self, rid: str, current: reservation_pb2.Reservation, revision: int, why: str) -> bool:
        """Rebook the reservation on equivalent GPUs free for its window (its own windows do
        not count), in one Txn that compares it unchanged: True if it moved."""
        spec = reservation_rules.spec_of(current)
        inv = self.inv
        lowest = min((g.price_per_gpu_hour for g in current.gpus), default=0.0)
        indexed = inv.revision
        picks = None
        for stage in self.leases.stages(current.tenant, spec.as_lease_spec()):
            cands = itertools.chain.from_iterable(
                calendar.window_candidates(
                    inv, f, spec.start_ns, spec.end_ns, inv.slots, inv.held_until, ignore=current.name
                )
                for f in stage
            )
            picks = place(cands, spec.gpu_count, spec.placement)
            if picks is not None:
                break
        if picks is None or any(p.candidate.node.price_per_gpu_hour > lowest for p in picks):
            return False
        new = reservation_rules.moved(current, current.tenant, picks, f"moved: {why}")
        holders = self._holders(picks)
        nodes = set(reservation_rules.by_node(current)) | {p.candidate.name for p in picks}
        cals = {n: inv.calendars.get(n, (None, 0)) for n in nodes}
        txn = book_txn(self.keys, new, None, picks, cals, indexed, holders, previous=(current, revision))
        if len(txn.req.compare) > MAX_TXN_OPS:
            return False
        resp = await self.store.send_txn(txn.req)
        if not resp.succeeded:
            return False
        await inv.wait_for_revision(resp.header.revision, timeout=1.0)
        audit.info(
            "reservation moved",
            principal="leader",
            target=current.name,
            why=why,
            gpus=[g.uuid for g in new.gpus],
            code="OK",
        )
        return True

    async def _preempt_due(self, now: int) -> int:
        """End the interruptible leases whose notice ran out; the time of the next one."""
        wake = now + int(SCHEDULE_TICK_S * _NS)
        for lease_id in sorted(self.inv.preempting):
            lease = self.inv.leases.get(lease_id)
            if lease is None:
                continue
            at = ts_ns(lease.preempt_time)
            if at > now:
                wake = min(wake, at)
                continue
            await self.leases.end(
                lease_id, lease_pb2.LEASE_END_REASON_PREEMPTED, lease.end_message or "preempted"
            )
            if self.metrics is not None:
                self.metrics.leases_preempted.inc()
        return wake

    async def _notice_holders(self, current: reservation_pb2.Reservation, start: int) -> None:
        """The interruptible leases on a reservation's GPUs learn they end at its start."""
        for g in current.gpus:
            for lease_id in sorted(self.inv.holders(g.node, g.uuid)):
                await self.leases.notice(lease_id, start, f"{current.name} starts on its GPUs")

    async def _start(
        self,
        rid: str,
        current: reservation_pb2.Reservation,
        revision: int,
        fenced: Callable[[], TxnBuilder],
        check: Callable[[rpc.TxnResponse], None],
    ) -> None:
        nodes = reservation_rules.by_node(current)
        not_ready = [n for n in nodes if not self.inv.is_schedulable(n)]
        if not_ready:
            await self.finish(
                rid,
                _END.RESERVATION_END_REASON_FAILED,
                f"node {not_ready[0]} is not ready at the start",
                fenced,
                check,
            )
            return
        for g in current.gpus:  # whatever still runs on its GPUs ends now
            for lease_id in sorted(self.inv.holders(g.node, g.uuid)):
                lease = self.inv.leases.get(lease_id)
                reason = (
                    lease_pb2.LEASE_END_REASON_PREEMPTED
                    if lease is not None and lease.interruptible
                    else lease_pb2.LEASE_END_REASON_RESERVED
                )
                await self.leases.end(lease_id, reason, f"{current.name} starts on {g.uuid}")
        lease_id = f"{_IDS.getrandbits(64):016x}"
        hooked = {n for n in nodes if (e := self.inv.nodes.get(n)) is not None and e.node.lease_hook}
        now = now_ts(self.clock)
        lease = reservation_rules.as_lease(current, lease_id, hooked, now)
        ttl = max(1, (ts_ns(current.end_time) - ts_ns(now)) // _NS) + LEASE_TTL_SLACK_S
        etcd_lease = await self.store.grant(ttl)
        lease.etcd_lease_id = etcd_lease
        lease.grant_replica = self.leases.replica_id
        mig_enabled = {
            g.uuid
            for n in nodes
            if (e := self.inv.nodes.get(n)) is not None
            for g in e.node.gpus
            if g.mig_enabled
        }
        started = reservation_rules.started(current, lease)
        txn = start_txn(fenced(), self.keys, current, revision, started, lease, etcd_lease, mig_enabled)
        resp = await self.store.send_txn(txn.req)
        check(resp)
        if not resp.succeeded:
            await self.store.revoke(etcd_lease)
            return  # cancelled, or a lease still there: the next pass looks again
        self.started += 1
        late = (ts_ns(now) - ts_ns(current.start_time)) / _NS
        log.info("reservation started", reservation=current.name, lease=lease.name, late_s=round(late, 3))
        if self.metrics is not None:
            self.metrics.reservations_started.inc()
            self.metrics.reservation_start_delay.observe(late)
        await self.inv.wait_for_revision(resp.header.revision, timeout=1.0)

    async def _complete(
        self,
        rid: str,
        current: reservation_pb2.Reservation,
        lease_id: str,
        window_over: bool,
        fenced: Callable[[], TxnBuilder],
        check: Callable[[rpc.TxnResponse], None],
    ) -> None:
        message = "its window ended"
        if lease_id in self.inv.leases:
            await self.leases.end(
                lease_id, lease_pb2.LEASE_END_REASON_WINDOW_ENDED, f"{current.name}: window ended"
            )
        elif not window_over:
            message = f"its lease {current.lease} ended before the window's end"
        await self.finish(rid, _END.RESERVATION_END_REASON_COMPLETED, message, fenced, check)

    # -- watch ----------------------------------------------------------------------------------

    async def watch(
        self, name: str, tenant: str | None
    ) -> AsyncIterator[reservation_pb2.WatchReservationResponse]:
        """BOOKED (the record now), then MOVED, AT_RISK, STARTED, and ENDED, after which it ends."""
        current, revision = await self.get(name, tenant)
        rid = current.name.split("/", 1)[1]
        yield _EVENT(type=_EVENT.EVENT_TYPE_BOOKED, reservation=current, event_time=now_ts(self.clock))
        if revision == 0:
            yield _EVENT(type=_EVENT.EVENT_TYPE_ENDED, reservation=current, event_time=now_ts(self.clock))
            return
        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind is ChangeKind.RESYNC or (
                change.kind is ChangeKind.RESERVATION and change.name == rid
            ):
                changed.set()

        unsubscribe = self.inv.subscribe(on_change)
        last = current
        try:
            while not self.shutdown.is_set():
                held = self.inv.reservations.get(rid)
                if held is None:
                    final = await self._read(rid)
                    if final is not None and final[1] == 0:
                        yield _EVENT(
                            type=_EVENT.EVENT_TYPE_ENDED, reservation=final[0], event_time=now_ts(self.clock)
                        )
                        return
                else:
                    for ev in _events(last, held[0], now_ts(self.clock)):
                        yield ev
                    last = held[0]
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await changed.wait()
            raise errors.unavailable("REPLICA_SHUTTING_DOWN", "this replica is shutting down; watch again")
        finally:
            unsubscribe()


def _events(
    before: reservation_pb2.Reservation, after: reservation_pb2.Reservation, at: timestamp_pb2.Timestamp
) -> list[reservation_pb2.WatchReservationResponse]:
    out = []
    if [g.uuid for g in before.gpus] != [g.uuid for g in after.gpus]:
        out.append(
            _EVENT(type=_EVENT.EVENT_TYPE_MOVED, reservation=after, event_time=at, message=after.message)
        )
    if after.state != before.state and after.state == AT_RISK:
        out.append(
            _EVENT(type=_EVENT.EVENT_TYPE_AT_RISK, reservation=after, event_time=at, message=after.message)
        )
    if after.state != before.state and after.state == ACTIVE:
        out.append(_EVENT(type=_EVENT.EVENT_TYPE_STARTED, reservation=after, event_time=at))
    return out


def _sort_key(r: reservation_pb2.Reservation) -> str:
    """Tenant, then newest first (as the tenant history keys sort)."""
    return f"{r.tenant}/{MAX_NS - r.create_time.ToNanoseconds():020d}/{r.name.split('/', 1)[1]}"


def _contended() -> errors.DomainError:
    return errors.exhausted("CAPACITY_CONTENDED", "matching GPUs were booked by concurrent requests; retry")
