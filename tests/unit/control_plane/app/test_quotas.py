"""The tenant quota's own-replica accounting: grants in flight and committed-but-not-indexed
count, so concurrent grants of one tenant on one replica can never pass its quota."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import EtcdStore, KeyValue
from control_plane.app.quotas import Quotas
from control_plane.domain.errors import DomainError
from control_plane.domain.quotas import TenantLimits
from gpufed.v1 import common_pb2, lease_pb2

K = Keyspace("/q")


class FakeStore:
    """Only what the quota's fresh count reads: the tenant's holds in etcd."""

    def __init__(self) -> None:
        self.keys = K
        self.holds: list[KeyValue] = []
        self.revision = 0

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        await asyncio.sleep(0)  # a real read yields to the loop: others run meanwhile
        return list(self.holds), self.revision


def _quotas(max_leases: int) -> tuple[Quotas, Inventory, FakeStore]:
    store = FakeStore()
    inv = Inventory(K)
    q = Quotas(cast(EtcdStore, store), inv, TenantLimits(max_leases=max_leases, max_gpus=1000))
    return q, inv, store


def _commit(store: FakeStore, reservation: Any, lease_id: str, revision: int) -> None:
    """What a successful grant Txn does: its hold is in etcd at `revision`, then done()."""
    store.holds.append(KeyValue(K.hold("t", "r", lease_id).encode(), b"1", revision, revision, 0))
    store.revision = revision
    reservation.done(revision)


def _index_lease(inv: Inventory, lease_id: str, revision: int) -> None:
    lease = lease_pb2.Lease(name=f"leases/{lease_id}", tenant="t")
    lease.gpus.add(uuid=f"g-{lease_id}")
    inv.apply(K.lease(lease_id).encode(), lease.SerializeToString(), revision, revision)
    inv.advance(revision)


def test_grants_in_flight_and_committed_but_not_indexed_count() -> None:
    async def run() -> None:
        q, inv, store = _quotas(max_leases=3)
        a = await q.reserve_lease("t", "a", 1)
        b = await q.reserve_lease("t", "b", 1)
        _commit(store, a, "a", 10)  # committed at revision 10, the index has not seen it
        c = await q.reserve_lease("t", "c", 1)
        with pytest.raises(DomainError) as e:
            await q.reserve_lease("t", "refused", 1)
        assert e.value.reason == "QUOTA_LEASES"
        _index_lease(inv, "a", 10)  # now the index counts it, the gate no longer does
        with pytest.raises(DomainError):
            await q.reserve_lease("t", "refused", 1)
        b.done(0)  # failed: its room comes back
        d = await q.reserve_lease("t", "d", 1)
        assert d.revision == 10
        c.done(0)
        d.done(0)

    asyncio.run(run())


def test_reservations_after_a_fresh_count_see_those_made_while_it_waited() -> None:
    async def run() -> None:
        q, inv, store = _quotas(max_leases=2)
        _index_lease(inv, "old", 5)  # the index lags: etcd no longer holds it (released)
        store.revision = 6
        x = await q.reserve_lease("t", "x", 1)  # index 1 + 0 in flight: room
        # Index 1 + 1 in flight: refused from the index, so these count again from etcd...
        waiting = [asyncio.create_task(q.reserve_lease("t", f"w{i}", 1)) for i in range(3)]
        await asyncio.sleep(0)
        x.done(0)  # ...while x fails, emptying this replica's accounting of the tenant,
        y = await q.reserve_lease("t", "y", 1)  # and one more is counted from the index meanwhile.
        results: list[Any] = await asyncio.gather(*waiting, return_exceptions=True)
        granted = [r for r in results if not isinstance(r, BaseException)]
        # etcd holds none: room for two in all, y and one of the three, never three.
        assert len(granted) == 1, results
        assert y.revision == 5

    asyncio.run(run())


def test_a_grant_the_index_applied_before_its_reservation_settled_counts_once() -> None:
    async def run() -> None:
        q, inv, _ = _quotas(max_leases=2)
        a = await q.reserve_lease("t", "a", 1)
        _index_lease(inv, "a", 10)  # the watch applied the grant; its Txn's answer is not in yet
        b = await q.reserve_lease("t", "b", 1)  # one lease held, not two: room for b
        a.done(10)
        b.done(0)

    asyncio.run(run())


def test_a_node_the_index_applied_before_its_registration_settled_counts_once() -> None:
    q, inv, _ = _quotas(max_leases=1)
    inv.apply(K.quota("providers", "neo").encode(), b'{"limits": {"max_nodes": 2}}', 3)
    inv.advance(3)
    first = q.reserve_node("neo", "providers/neo/nodes/n1", 8)
    assert first is not None
    node = common_pb2.Node(name="providers/neo/nodes/n1", provider="neo")
    inv.apply(K.node("neo", "n1").encode(), node.SerializeToString(), 4, 4)
    inv.advance(4)
    second = q.reserve_node("neo", "providers/neo/nodes/n2", 8)  # n1 counted once: room for n2
    assert second is not None
    with pytest.raises(DomainError) as e:
        q.reserve_node("neo", "providers/neo/nodes/n3", 8)
    assert e.value.reason == "QUOTA_NODES"
    first.done(4)
    second.done(0)


def test_a_providers_quota_is_read_from_its_overrides() -> None:
    q, inv, _ = _quotas(max_leases=2)
    inv.apply(K.quota("providers", "neo").encode(), b'{"limits": {"max_nodes": 3}}', 3)
    assert q.provider("neo").max_nodes == 3 and q.provider("other").max_nodes == 1000
