"""The leader's usage ledger: how ended leases are batched into ledger Txns."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import EtcdStore, StoreUnavailable
from control_plane.app import leader as leader_module
from control_plane.app.leader import LEDGER_CHUNK, Leader
from control_plane.app.leases import Leases
from gpufed.v1 import lease_pb2

Ended = asyncio.Queue[tuple[lease_pb2.Lease, int]]


class _Ledger:
    """A leader whose ledger Txns are recorded instead of sent to etcd."""

    def __init__(self) -> None:
        store = cast(EtcdStore, type("Store", (), {"keys": Keyspace("/g")})())
        self.leader = Leader(store, Inventory(store.keys), cast(Leases, None), "r1", lambda: 0)
        self.batches: list[list[str]] = []
        self.recorded = 0
        self.failures = 0  # etcd outages still to simulate
        self.progress = asyncio.Event()
        self.leader._record = self._record  # type: ignore[method-assign]

    async def _record(self, deleted: list[lease_pb2.Lease], revision: int) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("etcd: UNAVAILABLE")
        self.batches.append([lease.name for lease in deleted])
        self.recorded += len(deleted)
        self.progress.set()

    async def flush_until(self, queue: Ended, recorded: int) -> None:
        task = asyncio.create_task(self.leader._flush_ledger(queue))
        try:
            async with asyncio.timeout(2.0):
                while self.recorded < recorded:
                    self.progress.clear()
                    await self.progress.wait()
        finally:
            task.cancel()


def _ended(names: list[str]) -> Ended:
    queue: Ended = asyncio.Queue()
    for i, name in enumerate(names):
        queue.put_nowait((lease_pb2.Lease(name=name), 100 + i))
    return queue


def test_ledger_writes_a_backlog_back_to_back_in_full_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A flush interval far beyond the test's timeout: only a ledger that skips the wait while a
    # full chunk is queued can finish. Waiting per chunk, a backlog would grow without end
    # whenever more leases end per interval than one chunk holds.
    monkeypatch.setattr(leader_module, "LEDGER_FLUSH_S", 60.0)
    names = [f"leases/{i:04x}" for i in range(3 * LEDGER_CHUNK)]

    async def scenario() -> _Ledger:
        ledger = _Ledger()
        await ledger.flush_until(_ended(names), len(names))
        return ledger

    ledger = asyncio.run(scenario())
    assert [len(b) for b in ledger.batches] == [LEDGER_CHUNK] * 3
    assert [name for b in ledger.batches for name in b] == names


def test_ledger_waits_for_company_while_a_chunk_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader_module, "LEDGER_FLUSH_S", 0.05)

    async def scenario() -> _Ledger:
        ledger = _Ledger()
        queue = _ended(["leases/early"])
        flushing = asyncio.create_task(ledger.flush_until(queue, 2))
        await asyncio.sleep(0.01)
        queue.put_nowait((lease_pb2.Lease(name="leases/late"), 200))
        await flushing
        return ledger

    assert asyncio.run(scenario()).batches == [["leases/early", "leases/late"]]


def test_ledger_writes_a_batch_again_after_etcd_failed_to_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader_module, "LEDGER_FLUSH_S", 0.0)
    monkeypatch.setattr(leader_module, "LEDGER_RETRY_S", 0.01)

    async def scenario() -> _Ledger:
        ledger = _Ledger()
        ledger.failures = 2
        queue = _ended(["leases/a", "leases/b"])
        flushing = asyncio.create_task(ledger.flush_until(queue, 3))
        await asyncio.sleep(0.05)  # the outage is over; the flusher must still be there
        queue.put_nowait((lease_pb2.Lease(name="leases/c"), 300))
        await flushing
        return ledger

    ledger = asyncio.run(scenario())
    assert ledger.failures == 0
    assert [name for b in ledger.batches for name in b] == ["leases/a", "leases/b", "leases/c"]
