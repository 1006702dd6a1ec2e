"""Leader-only background work, on one replica elected through etcd.

Election: put `leader` = replica id on the replica's session lease under `create_revision == 0`;
the others watch it (through the index) and try again when it goes. The leader runs:

- the usage ledger: it watches leases/ from the ledger cursor; each deleted lease record gets its
  history (for expiries, ended at their expire_time: the last grant or renewal plus the ttl)
  and one usage record per provider, in one Txn that compares the usage
  keys absent and moves the cursor, so each record is written exactly once even across leader
  changes;
- the drain sweep: leases on DRAINING nodes end at the drain deadline;
- compaction, never past the ledger cursor.

Fencing: the leader key's create revision is the leader's term. Every ledger write compares it
in the same Txn, so a replica that lost the key (its session expired in a partition, another
was elected) cannot write a usage record or move the cursor, whatever it still believes; it
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
    StoreUnavailable,
    TxnBuilder,
    WatchCompacted,
    absent,
    newest_read,
    put,
    value_is,
)
from control_plane.adapters.store import delete as delete_op
from control_plane.adapters.store import get as get_op
from control_plane.app.leases import Leases
from control_plane.domain import lease_rules
from control_plane.domain.usage import usage_records
from control_plane.metrics import Metrics
from gpufed.clock import SYSTEM, Clock, ts_ns
from gpufed.logs import get_logger
from gpufed.v1 import lease_pb2

log = get_logger(__name__)
audit = get_logger("gpufed.audit")
_WAKES = frozenset((ChangeKind.LEADER, ChangeKind.RESYNC))
COMPACT_EVERY_S = 300
# Leases per ledger Txn: each adds up to ~3 operations, and etcd allows 128 per branch.
LEDGER_CHUNK = 30
# How long ended leases are gathered before their usage records are written together.
LEDGER_FLUSH_S = 0.2
# Pause before writing a batch again after etcd failed to answer.
LEDGER_RETRY_S = 0.5
COMPACT_KEEP_REVISIONS = 10_000


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
    ) -> None:
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
        self._changed = asyncio.Event()
        inventory.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.kind in _WAKES:
            self._changed.set()

    async def run(self) -> None:
        while True:
            try:
                await self._campaign()
                if self.inv.leader != self.replica_id:
                    self.is_leader.clear()
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2.0):
                            await self._changed.wait()
                    continue
                self.is_leader.set()
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
            asyncio.create_task(self._ledger(), name="usage-ledger"),
            asyncio.create_task(self._drain_sweep(), name="drain-sweep"),
            asyncio.create_task(self._compaction(), name="compaction"),
        ]
        try:
            while self.term and self.inv.leader == self.replica_id and not any(t.done() for t in tasks):
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

    # -- usage ledger ---------------------------------------------------------------------------

    async def _cursor(self) -> int:
        kv = await self.store.get(self.keys.ledger_cursor)
        if kv is not None:
            return int(kv.value)
        return await self.store.revision()

    async def _ledger(self) -> None:
        """Ended leases are gathered for up to LEDGER_FLUSH_S and recorded together: under load one
        read and one write per batch instead of per lease. The stored cursor only moves with a
        recorded batch, so a new leader replays whatever an old one had gathered but not written."""
        cursor = await self._cursor()
        prefix = self.keys.dir("leases")
        pending: asyncio.Queue[tuple[lease_pb2.Lease, int]] = asyncio.Queue()
        flusher = asyncio.create_task(self._flush_ledger(pending), name="usage-ledger-flush")
        try:
            await self._watch_ended(prefix, cursor, pending)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    async def _flush_ledger(self, pending: asyncio.Queue[tuple[lease_pb2.Lease, int]]) -> None:
        while True:
            batch = [await pending.get()]
            if pending.qsize() < LEDGER_CHUNK - 1:
                # Wait for company only when there is room for it: a backlog (more ended leases
                # per flush than a chunk holds) is written back to back, or it would only grow.
                await asyncio.sleep(LEDGER_FLUSH_S)
            while not pending.empty() and len(batch) < LEDGER_CHUNK:
                batch.append(pending.get_nowait())
            while True:
                # The batch is kept until it is recorded: a task that died here would leave the
                # watch queuing ended leases for nobody. Writing again is safe: every record's
                # Txn compares its key absent, so what an unanswered attempt wrote is not doubled.
                try:
                    await self._record([lease for lease, _ in batch], batch[-1][1])
                    break
                except Deposed:
                    log.warning("usage ledger: no longer the leader; a newer one replays this batch")
                    self.term = 0
                    self._changed.set()
                    return
                except StoreUnavailable as e:
                    log.warning("usage ledger: etcd unavailable; writing again", error=str(e))
                    await asyncio.sleep(LEDGER_RETRY_S)

    async def _watch_ended(
        self, prefix: str, cursor: int, pending: asyncio.Queue[tuple[lease_pb2.Lease, int]]
    ) -> None:
        while True:
            try:
                async for revision, events in self.store.watch_prefix(prefix, cursor + 1, deletes_only=True):
                    for ev in events:
                        if ev.value is None and ev.prev_value is not None:
                            pending.put_nowait((lease_pb2.Lease.FromString(ev.prev_value), ev.mod_revision))
                    cursor = max(cursor, revision)
            except WatchCompacted as e:
                # Never compacted past the cursor by us; someone else did. Records in between are lost:
                # say so loudly and carry on from what is left.
                log.error("usage ledger cursor was compacted away", cursor=cursor, compact=e.compact_revision)
                cursor = e.compact_revision
            except StoreUnavailable as e:
                log.warning("usage ledger watch broke", error=str(e))
                await asyncio.sleep(0.5)

    async def _record(self, deleted: list[lease_pb2.Lease], revision: int) -> None:
        """Usage records for leases whose record was deleted, in one read and one write.

        A lease that was released, revoked or drained left its history in the same Txn that
        deleted it; one deleted without history expired, and its history is written here.
        """
        ids = [lease.name.split("/", 1)[1] for lease in deleted]
        lookup = TxnBuilder()
        for i in ids:
            lookup.read(self.keys.lease_history(i).encode())
        reads = await self.store.send_txn(lookup.req)
        hist_lease = await self.leases.history.lease_id()
        txn = self._fenced()
        expired: list[lease_pb2.Lease] = []
        for lease, lease_id, read in zip(deleted, ids, reads.responses, strict=True):
            kvs = read.response_range.kvs
            if kvs:
                final = lease_pb2.Lease.FromString(kvs[0].value)
            else:
                final = lease_rules.expired(lease)
                history = self.keys.lease_history(lease_id).encode()
                txn.absent(history)
                txn.put(history, final.SerializeToString(), hist_lease)
                if final.request_id:
                    spent = self.keys.request(final.tenant, final.request_id).encode()
                    txn.put(spent, lease_id.encode(), hist_lease)
                expired.append(final)
            for r in usage_records(final, final.end_time):
                key = self.keys.usage_record(lease_id, r.provider).encode()
                txn.absent(key)
                txn.put(key, r.SerializeToString())
        txn.put(self.keys.ledger_cursor.encode(), str(revision).encode())
        resp = await self.store.send_txn(txn.req)
        if resp.succeeded:
            log.info("usage recorded", leases=len(deleted), revision=revision)
            for final in expired:
                if self.metrics is not None:
                    self.metrics.leases_expired.inc()
                audit.info(
                    "lease expired",
                    principal=f"tenant:{final.tenant}",
                    target=final.name,
                    end_time=final.end_time.ToJsonString(),
                    code="OK",
                )
            return
        self._check_term(resp)
        if len(deleted) > 1:
            # Some were recorded before (a leader change mid-way): settle them one by one.
            for lease in deleted:
                await self._record([lease], revision)
        else:
            cursor = self._fenced()
            cursor.put(self.keys.ledger_cursor.encode(), str(revision).encode())
            self._check_term(await self.store.send_txn(cursor.req))

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

    # -- compaction -----------------------------------------------------------------------------

    async def _compaction(self) -> None:
        done = 0
        while True:
            await asyncio.sleep(COMPACT_EVERY_S)
            kv = await self.store.get(self.keys.ledger_cursor)
            if kv is None:
                continue
            target = min(int(kv.value), await self.store.revision() - COMPACT_KEEP_REVISIONS)
            if target > done:
                with contextlib.suppress(Exception):
                    await self.store.compact(target)
                    done = target
                    log.info("compacted etcd", revision=target)

    async def resign(self) -> None:
        with contextlib.suppress(Exception):
            await self.store.txn(
                [value_is(self.keys.leader, self.replica_id.encode())], [delete_op(self.keys.leader)]
            )
