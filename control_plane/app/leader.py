"""Leader-only background work, on one replica elected through etcd.

Election: put `leader` = replica id on the replica's session lease under `create_revision == 0`;
the others watch it (through the index) and try again when it goes. The leader runs:

- the journal sweep: usage records exactly once, by construction. The grant Txn writes a
  journal entry (the lease record, not on its etcd lease; renewals keep its expire_time), and a
  release writes the usage records and deletes the entry in its own Txn. An entry whose lease
  record is gone is an expiry: the leader writes its history (ended at its expire_time, the
  last grant or renewal plus the ttl) and usage records and deletes the entry in one Txn that
  compares the record absent and the entry unchanged. No watch event is needed, so a
  compaction or a watch gap loses nothing;
- the drain sweep: leases on DRAINING nodes end at the drain deadline;
- the provisioning sweep: a lease whose hooks did not all answer within the provision timeout
  (a daemon that died mid-hook) ends PROVISIONING_FAILED;
- the reservation scheduler (control_plane.app.reservations): each reservation becomes a lease
  at its start and ends at its end;
- the schema migration (control_plane.app.migration), once every replica runs a release that
  understands the next schema;
- compaction.

Fencing: the leader key's create revision is the leader's term. Every sweep write compares it
(and the key's value) in the same Txn, so a replica that lost the key (its session expired in a
partition, another was elected) cannot write a usage record, whatever it still believes; it
learns so from the failed compare (Deposed) and campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.store import (
    EtcdStore,
    KeyValue,
    StoreUnavailable,
    TxnBuilder,
    absent,
    key_value,
    newest_read,
    put,
    value_is,
)
from control_plane.adapters.store import delete as delete_op
from control_plane.adapters.store import get as get_op
from control_plane.app.lease_txns import put_history, put_usage
from control_plane.app.leases import Leases
from control_plane.app.migration import SchemaMigration
from control_plane.app.queue import Queue
from control_plane.app.reservations import Reservations
from control_plane.app.retention import DAY_S, UsageRetention
from control_plane.domain import lease_rules
from control_plane.domain.usage import usage_records
from control_plane.metrics import Metrics
from gpufed.clock import SYSTEM, Clock, ts_ns
from gpufed.logs import get_logger
from gpufed.v1 import lease_pb2

log = get_logger(__name__)
audit = get_logger("gpufed.audit")
_WAKES = frozenset((ChangeKind.LEADER, ChangeKind.RESYNC))
_LEASE = ChangeKind.LEASE
COMPACT_EVERY_S = 300
COMPACT_KEEP_REVISIONS = 10_000
# How often the leader looks for journal entries whose lease expired: expiries are billed
# within this (the record's end_time is the expiry itself, whenever it is written).
JOURNAL_SWEEP_S = 1.0
# And the whole journal is read this often (and on election and after a re-list), for what the
# candidates missed.
JOURNAL_SCAN_S = 60.0
# How often the leader exports and deletes usage records past the retention.
RETENTION_SWEEP_S = 3600.0
# How often the leader looks whether the schema can move on (three small reads).
SCHEMA_CHECK_S = 2.0


class Deposed(Exception):
    """The leader key is no longer this replica's term: its writes were refused."""


class Leader:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        leases: Leases,
        replica_id: str,
        session_lease: Callable[[], int],
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM,
        provision_timeout_s: float = 900.0,
        usage_retention_s: float = 90 * DAY_S,
        usage_export_dir: str = "",
        queue: Queue | None = None,
        reservations: Reservations | None = None,
    ) -> None:
        self.queue = queue
        self.reservations = reservations
        self.provision_timeout_s = provision_timeout_s
        self.retention = UsageRetention(
            store, clock, usage_retention_s, usage_export_dir, self._fenced, self._check_term
        )
        self.migration = SchemaMigration(store, inventory, self._fenced, self._check_term, clock)
        self.clock = clock
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.leases = leases
        self.replica_id = replica_id
        self.session_lease = session_lease
        self.metrics = metrics
        self.is_leader = asyncio.Event()
        self.term = 0  # create revision of the leader key while this replica holds it
        self._gone: set[str] = set()  # lease ids the index saw deleted: journal candidates
        self._rescan = True  # read the whole journal at the next sweep
        self._changed = asyncio.Event()
        inventory.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        kind = change.kind
        if kind is _LEASE:
            if change.value is None and self.is_leader.is_set():
                self._gone.add(change.name)  # released (billed already) or expired
            return
        if kind in _WAKES:
            self._changed.set()
            if kind is ChangeKind.RESYNC:
                self._rescan = True

    async def run(self) -> None:
        while True:
            try:
                if self.store.refuse_writes:  # etcd holds a newer schema: lead nothing
                    self.is_leader.clear()
                    await self.resign()
                    await asyncio.sleep(1.0)
                    continue
                await self._campaign()
                if self.inv.leader != self.replica_id:
                    self.is_leader.clear()
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2.0):
                            await self._changed.wait()
                    continue
                self.is_leader.set()
                self._rescan = True
                log.info("elected leader", replica=self.replica_id)
                await self._lead()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as e:
                log.warning("leader loop: etcd unavailable", error=str(e))
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("leader loop failed")
                await asyncio.sleep(1.0)
            finally:
                self.is_leader.clear()

    async def _campaign(self) -> None:
        me = self.replica_id.encode()
        resp = await self.store.txn(
            [absent(self.keys.leader)],
            [put(self.keys.leader, me, self.session_lease())],
            [get_op(self.keys.leader)],
        )
        if resp.succeeded:
            self.term = int(resp.header.revision)
        else:
            kvs = resp.responses[0].response_range.kvs
            self.term = int(kvs[0].create_revision) if kvs and kvs[0].value == me else 0
        target = resp.header.revision if resp.succeeded else newest_read(resp)
        await self.inv.wait_for_revision(target, timeout=1.0)

    async def _lead(self) -> None:
        tasks = [
            asyncio.create_task(self._journal_sweep(), name="journal-sweep"),
            asyncio.create_task(self._drain_sweep(), name="drain-sweep"),
            asyncio.create_task(self._provisioning_sweep(), name="provisioning-sweep"),
            asyncio.create_task(self._compaction(), name="compaction"),
            asyncio.create_task(self._retention(), name="usage-retention"),
            asyncio.create_task(self._schema(), name="schema-migration"),
            *([asyncio.create_task(self.queue.run(), name="queue-scheduler")] if self.queue else []),
            *(
                [asyncio.create_task(self._reservations(self.reservations), name="reservation-scheduler")]
                if self.reservations
                else []
            ),
        ]
        try:
            while (
                self.term
                and self.inv.leader == self.replica_id
                and not self.store.refuse_writes
                and not any(t.done() for t in tasks)
            ):
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._changed.wait()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    # -- usage of leases that ended without a release -------------------------------------------

    async def _journal_sweep(self) -> None:
        """Journal entries whose lease record is gone. A release deletes its entry in its own
        Txn, so an entry that outlived its lease is an expiry (or a release too wide to bill
        inline): its usage records are written and the entry deleted in one Txn.

        Candidates are the leases the index saw deleted, looked at every JOURNAL_SWEEP_S; the
        whole journal is read when this replica starts leading and every JOURNAL_SCAN_S, so
        what a watch gap, a compaction or an earlier leader left is found too (nothing here
        needs to have seen an event to be right)."""
        last_scan = -JOURNAL_SCAN_S
        while True:
            await asyncio.sleep(JOURNAL_SWEEP_S)
            try:
                if self._rescan or self.clock.monotonic() - last_scan >= JOURNAL_SCAN_S:
                    self._rescan = False
                    self._gone.clear()
                    last_scan = self.clock.monotonic()
                    kvs, _ = await self.store.get_prefix(self.keys.records_dir("journal"))
                else:
                    gone, self._gone = sorted(self._gone), set()
                    kvs = await self._journal_entries(gone)
                indexed = self.inv.revision
                for kv in kvs:
                    lease_id = kv.key.decode().rsplit("/", 1)[1]
                    # Written after the index's revision: the index may not know the lease yet.
                    if lease_id in self.inv.leases or kv.mod_revision > indexed:
                        continue
                    await self.settle(lease_id, kv)
            except Deposed:
                log.warning("journal sweep: no longer the leader; the new one settles the rest")
                self.term = 0
                self._changed.set()
                return
            except StoreUnavailable as e:
                log.warning("journal sweep: etcd unavailable; next round", error=str(e))
                self._rescan = True

    async def _journal_entries(self, lease_ids: list[str]) -> list[KeyValue]:
        """The journal entries left of these leases, read 100 to a Txn (most are gone already:
        a release deletes its own)."""
        out: list[KeyValue] = []
        for i in range(0, len(lease_ids), 100):
            reads = TxnBuilder()
            for lease_id in lease_ids[i : i + 100]:
                reads.read(self.keys.journal(lease_id).encode())
            resp = await self.store.send_txn(reads.req)
            for r in resp.responses:
                for kv in r.response_range.kvs:
                    out.append(key_value(kv))
        return out

    async def settle(self, lease_id: str, journal: KeyValue) -> bool:
        """Bill a lease whose journal entry outlived its record, once: the Txn compares the record
        absent, the entry unchanged and this replica's term. False if it did not apply."""
        last = lease_pb2.Lease.FromString(journal.value)
        kv = await self.store.get(self.keys.lease_history(lease_id))
        final = lease_pb2.Lease.FromString(kv.value) if kv is not None else lease_rules.expired(last)
        txn = self._fenced()
        txn.absent(self.keys.lease(lease_id).encode())
        txn.mod_revision_is(self.keys.journal(lease_id).encode(), journal.mod_revision)
        if kv is None:
            hist_lease = await self.leases.history.lease_id()
            put_history(txn, self.keys, final, hist_lease)
            if final.request_id:
                spent = self.keys.request(final.tenant, final.request_id).encode()
                txn.put(spent, lease_id.encode(), hist_lease)
        put_usage(txn, self.keys, usage_records(final, final.end_time))
        txn.delete(self.keys.journal(lease_id).encode())
        resp = await self.store.send_txn(txn.req)
        self._check_term(resp)
        if not resp.succeeded:
            return False  # renewed or settled meanwhile
        log.info("usage recorded", lease=final.name, reason=final.end_reason)
        if final.end_reason == lease_pb2.LEASE_END_REASON_EXPIRED:
            if self.metrics is not None:
                self.metrics.leases_expired.inc()
            audit.info(
                "lease expired",
                principal=f"tenant:{final.tenant}",
                target=final.name,
                end_time=final.end_time.ToJsonString(),
                code="OK",
            )
        return True

    def _fenced(self) -> TxnBuilder:
        """A Txn that holds only while this replica's term does: it compares the leader key's
        create revision and value first and reads the key back if the Txn fails."""
        txn = TxnBuilder()
        key = self.keys.leader.encode()
        txn.created_at(key, self.term)
        txn.req.compare.append(value_is(key, self.replica_id.encode()))
        txn.read_on_failure(key)
        return txn

    def _check_term(self, resp: rpc.TxnResponse) -> None:
        """Deposed if a fenced Txn failed on the term (its first read is the leader key)."""
        if resp.succeeded:
            return
        kvs = resp.responses[0].response_range.kvs
        if not kvs or kvs[0].create_revision != self.term or kvs[0].value != self.replica_id.encode():
            raise Deposed(f"leader key now {kvs[0].value.decode() if kvs else 'absent'}")

    # -- reservations ---------------------------------------------------------------------------

    async def _reservations(self, reservations: Reservations) -> None:
        """Starts and ends of reservations, each Txn fenced by this term."""
        while True:
            try:
                await reservations.run(self._fenced, self._check_term)
            except Deposed:
                log.warning("reservation scheduler: no longer the leader")
                self.term = 0
                self._changed.set()
                return
            except StoreUnavailable as e:
                log.warning("reservation scheduler: etcd unavailable; next round", error=str(e))
                await asyncio.sleep(0.5)

    # -- schema ---------------------------------------------------------------------------------

    async def _schema(self) -> None:
        while True:
            try:
                step = await self.migration.step()
            except Deposed:
                log.warning("schema migration: no longer the leader")
                self.term = 0
                self._changed.set()
                return
            except StoreUnavailable as e:
                log.warning("schema migration: etcd unavailable; next round", error=str(e))
                step = ""
            # A pass that met concurrent writes looks again at once; otherwise every few seconds.
            await asyncio.sleep(0.1 if step in ("started", "pass") else SCHEMA_CHECK_S)

    # -- retention ------------------------------------------------------------------------------

    async def _retention(self) -> None:
        while True:
            try:
                await self.retention.sweep_once()
            except StoreUnavailable as e:
                log.warning("usage retention: etcd unavailable; next round", error=str(e))
            except OSError as e:  # the export dir: nothing is deleted that was not exported
                log.error("usage retention: cannot export", error=str(e))
            await asyncio.sleep(RETENTION_SWEEP_S)

    # -- drains ---------------------------------------------------------------------------------

    async def _drain_sweep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = self.clock.time_ns()
            for name in list(self.inv.draining):
                entry = self.inv.nodes.get(name)
                if entry is None or not entry.node.HasField("drain_deadline"):
                    continue
                node = entry.node
                if ts_ns(node.drain_deadline) > now:
                    continue
                for lease_id in set(self.inv.held(name).values()):
                    try:
                        await self.leases.end(
                            lease_id,
                            lease_pb2.LEASE_END_REASON_DRAINED,
                            f"node {name} drained: {node.state_reason}",
                        )
                    except Exception as e:
                        log.warning("drain could not end a lease", lease=lease_id, error=str(e))

    # -- provisioning ---------------------------------------------------------------------------

    async def _provisioning_sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            deadline = self.clock.time_ns() - int(self.provision_timeout_s * 1e9)
            for lease_id in list(self.inv.provisioning):
                lease = self.inv.leases.get(lease_id)
                if lease is None or ts_ns(lease.create_time) > deadline:
                    continue
                try:
                    await self.leases.end(
                        lease_id,
                        lease_pb2.LEASE_END_REASON_PROVISIONING_FAILED,
                        f"no lease hook answered within {self.provision_timeout_s:.0f} s",
                    )
                except Exception as e:
                    log.warning("could not end a lease stuck provisioning", lease=lease_id, error=str(e))

    # -- compaction -----------------------------------------------------------------------------

    async def _compaction(self) -> None:
        done = 0
        while True:
            await asyncio.sleep(COMPACT_EVERY_S)
            # Nothing reads history from the watch any more but the index, which re-lists past a
            # compaction: keep enough for watches to catch up after a pause.
            target = await self.store.revision() - COMPACT_KEEP_REVISIONS
            if target > done:
                with contextlib.suppress(Exception):
                    await self.store.compact(target)
                    done = target
                    log.info("compacted etcd", revision=target)

    async def resign(self) -> None:
        """Give the leader key up, if this replica holds it (allowed while it refuses writes:
        the key is its own, on its session lease)."""
        me = self.replica_id.encode()
        if self.inv.leader and self.inv.leader != self.replica_id:
            return
        req = rpc.TxnRequest(compare=[value_is(self.keys.leader, me)], success=[delete_op(self.keys.leader)])
        with contextlib.suppress(Exception):
            await self.store.send_txn(req, liveness=True)
