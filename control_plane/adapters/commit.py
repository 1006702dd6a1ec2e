"""Sharing etcd's expensive operations between leases.

Group commit: every grant or release is one small, independent etcd transaction. Those that
arrive together are sent as nested transactions inside one outer Txn: one Raft commit and one
fsync for the lot, while each nested transaction keeps its own compares and its own outcome.
Members never write the same key (a member that would is held for the next batch), and the
outer Txn stays within etcd's per-branch operation limit. The batch's revision is every
member's fencing token: a GPU is granted at most once per revision, so tokens still grow per GPU.

The etcd lease pool: a gpufed lease needs an etcd lease with its ttl. LeaseGrant and
LeaseRevoke are Raft writes; a keep-alive is not. Released gpufed leases leave their etcd lease
without keys, so it goes back to a pool for its ttl and the next grant with that ttl takes it,
refreshed by one keep-alive. In steady state a lease cycle costs two commits (grant, release),
both shared by group commit, and no LeaseGrant or LeaseRevoke.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.store import MAX_TXN_OPS, EtcdStore, StoreUnavailable, TxnBuilder
from gpufed.clock import SYSTEM, Clock
from gpufed.logs import get_logger

log = get_logger(__name__)
# Under load (the last batch had company), before a commit the event loop runs up to
# GATHER_PASSES passes, until GATHER_IDLE_PASSES in a row bring no new member. The replica and
# etcd are then short of CPU, not of time; no timer, so a quiet replica never waits.
GATHER_PASSES = 64
GATHER_IDLE_PASSES = 4


@dataclass
class TxnResult:
    succeeded: bool
    response: rpc.TxnResponse  # the nested response
    revision: int

    @classmethod
    def alone(cls, resp: rpc.TxnResponse) -> TxnResult:
        """The result of a Txn committed by itself, not nested in a shared one."""
        return cls(resp.succeeded, resp, resp.header.revision)


@dataclass
class _Pending:
    txn: rpc.TxnRequest
    writes: AbstractSet[bytes]
    future: asyncio.Future[TxnResult]


@dataclass
class GroupCommit:
    store: EtcdStore
    max_members: int = MAX_TXN_OPS
    observe: Callable[[float], None] | None = None  # each commit's latency, in seconds
    _queue: deque[_Pending] = field(default_factory=deque)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _busy: bool = False  # a commit is in flight (ours or a caller's)
    _quiet: bool = True  # the last batch had one member

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(StoreUnavailable("replica shutting down"))

    async def submit(self, txn: TxnBuilder) -> TxnResult:
        """Commit txn, alone or nested in a shared Txn (never beside a member writing one of the
        same keys: etcd rejects a Txn that writes a key twice)."""
        if self._quiet and not self._busy and not self._queue:
            # Light load (the last batch was a lone member) and nothing in flight: commit from
            # the caller's task, without the hand-off to the loop below (two task switches less).
            # Under load, members arriving together queue and share one commit.
            self._busy = True
            try:
                resp = await self._send(txn.req)
            finally:
                self._busy = False
                if self._queue:
                    self._wakeup.set()
            return TxnResult.alone(resp)
        fut: asyncio.Future[TxnResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(txn.req, txn.writes, fut))
        self._wakeup.set()
        return await fut

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        written: set[bytes] = set()
        held: list[_Pending] = []
        while self._queue and len(batch) < self.max_members:
            p = self._queue.popleft()
            if p.future.done():
                continue  # the caller gave up (cancelled)
            if p.writes & written:
                held.append(p)  # would write a key another member writes: next batch
                continue
            written |= p.writes
            batch.append(p)
        self._queue.extendleft(reversed(held))
        return batch

    async def _gather(self) -> None:
        """Let the event loop run a few passes while they keep bringing new members: requests
        already received but not yet submitted join this commit instead of the next one."""
        idle = 0
        for _ in range(GATHER_PASSES):
            before = len(self._queue)
            await asyncio.sleep(0)
            idle = 0 if len(self._queue) > before else idle + 1
            if idle >= GATHER_IDLE_PASSES or len(self._queue) >= self.max_members:
                return

    async def _send(self, req: rpc.TxnRequest) -> rpc.TxnResponse:
        """One Txn to etcd, timed. Any failure is StoreUnavailable: its outcome is unknown."""
        started = time.perf_counter()
        try:
            resp = await self.store.send_txn(req)
        except StoreUnavailable:
            raise
        except Exception as e:
            raise StoreUnavailable(str(e)) from e
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        return resp

    async def _run(self) -> None:
        while True:
            if not self._queue or self._busy:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Whatever queued while the previous commit was in flight goes together, and under
            # load whatever the next few loop passes bring; a lone request never waits for company.
            if not self._quiet:
                await self._gather()
            batch = self._take_batch()
            if not batch:
                continue
            self._busy = True
            try:
                if len(batch) == 1:
                    resp = await self._send(batch[0].txn)
                    results = [TxnResult.alone(resp)]
                else:
                    req = rpc.TxnRequest()
                    for p in batch:
                        req.success.add().request_txn.CopyFrom(p.txn)  # one copy, not two
                    outer = await self._send(req)
                    results = [
                        TxnResult(r.response_txn.succeeded, r.response_txn, outer.header.revision)
                        for r in outer.responses
                    ]
                self._quiet = len(batch) == 1
                for p, res in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(res)
            except Exception as e:  # the loop must outlive any one batch
                failure = e if isinstance(e, StoreUnavailable) else StoreUnavailable(str(e))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(failure)
            finally:
                self._busy = False


MAX_TRACKED = 100_000


@dataclass
class LeasePool:
    """etcd leases without keys, by ttl, ready for the next grant.

    Each pooled lease remembers when this replica last refreshed it (grant or keep-alive). A
    lease refreshed less than FRESH_S ago is handed out without another keep-alive; the grant
    then reports its true expiry, refreshed_at + ttl, a moment short of a full ttl. Times are
    wall-clock nanoseconds: they become the lease's expire_time.
    """

    store: EtcdStore
    clock: Clock = SYSTEM
    per_ttl: int = 256
    granted: int = 0
    _pools: dict[int, deque[tuple[int, int]]] = field(default_factory=dict)
    refreshed: dict[int, int] = field(default_factory=dict)  # etcd lease -> time of last refresh

    FRESH_NS = 1_000_000_000

    async def take(self, ttl: int) -> tuple[int, int]:
        """An etcd lease with `ttl` and the time (ns) its ttl counts from."""
        pool = self._pools.get(ttl)
        while pool:
            lease_id, refreshed_at = pool.pop()
            now = self.clock.time_ns()
            if now - refreshed_at < self.FRESH_NS:
                self.refreshed[lease_id] = refreshed_at
                return lease_id, refreshed_at
            if now - refreshed_at > (ttl - 1) * 1_000_000_000:
                continue  # expired or about to: etcd drops it by itself
            # The ttl counts from before the keep-alive left: never later than etcd's own count.
            sent = now
            remaining = await self.store.keepalive(lease_id)
            if remaining > 0:
                return lease_id, self.note_refresh(lease_id, at=sent)
        self.granted += 1
        sent = self.clock.time_ns()
        lease_id = await self.store.grant(ttl)
        return lease_id, self.note_refresh(lease_id, at=sent)

    def note_refresh(self, lease_id: int, only_known: bool = False, at: int = 0) -> int:
        now = at or self.clock.time_ns()
        if not only_known or lease_id in self.refreshed:
            self.refreshed[lease_id] = now
        if len(self.refreshed) > MAX_TRACKED:
            # Leases that expired in use never come back: forget the oldest half.
            for old, _ in sorted(self.refreshed.items(), key=lambda kv: kv[1])[: MAX_TRACKED // 2]:
                del self.refreshed[old]
        return now

    def give_back(self, lease_id: int, ttl: int) -> None:
        """A lease whose keys are all gone (its gpufed lease was released) can serve again."""
        refreshed_at = self.refreshed.pop(lease_id, 0)
        pool = self._pools.setdefault(ttl, deque())
        if len(pool) < self.per_ttl:
            pool.append((lease_id, refreshed_at))
