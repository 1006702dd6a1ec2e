"""Lists read only their caller's range, a page at a time: ListLeases, ListUsageRecords and
ListTokens cost the keys they return (counted as etcd returns them), whatever other tenants
hold, and pages stay consistent while leases are created between them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import pytest

from control_plane.adapters.store import TxnBuilder
from control_plane.app.lease_txns import put_history, put_usage
from control_plane.replica import Replica
from gpufed.client import Client, GpufedError
from gpufed.v1 import admin_pb2, lease_pb2
from node_daemon.fake_nvml import FakeNvml
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration
T = TypeVar("T")
OTHERS = 600  # ended leases (and usage records) of other tenants
MINE = 12


@pytest.fixture(scope="module")
def world(etcd: EtcdCluster) -> Iterator[tuple[ReplicaThread, Client]]:
    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    admin = Client(r.address, ADMIN_TOKEN)
    provider = admin.create_token("provider", "neo").secret
    daemon = DaemonThread(daemon_config([r.address], provider, "neo", "n1"), FakeNvml("h100-sxm-8")).start()
    tenant = Client(r.address, admin.create_token("tenant", "dev").secret)
    try:
        wait_until(lambda: sum(o.free_gpus for o in tenant.search_offers()) == 8)
        _load_history(r)
        yield r, tenant
    finally:
        tenant.close()
        daemon.stop()
        admin.close()
        r.stop()


def _lease(i: int, tenant: str, created_s: int) -> lease_pb2.Lease:
    lease = lease_pb2.Lease(name=f"leases/{i:016x}", tenant=tenant, state=lease_pb2.LEASE_STATE_ENDED)
    lease.create_time.FromSeconds(created_s)
    lease.end_time.FromSeconds(created_s + 60)
    lease.gpus.add(node="providers/neo/nodes/n1", provider="neo", node_id="n1", uuid="GPU-x")
    return lease


def _usage(lease: lease_pb2.Lease) -> admin_pb2.UsageRecord:
    r = admin_pb2.UsageRecord(
        name=f"usageRecords/{lease.name[7:]}-neo", lease=lease.name, provider="neo", tenant=lease.tenant
    )
    r.end_time.CopyFrom(lease.end_time)
    return r


def _load_history(r: ReplicaThread) -> None:
    """Ended leases and usage records as the release Txn writes them: OTHERS of other tenants
    (interleaved in time with ours) and MINE of tenant dev."""
    replica: Replica = r.replica  # type: ignore[assignment]
    store = replica.store
    rng = random.Random(7)
    leases = [_lease(i, f"other{i % 40}", 1_700_000_000 + rng.randrange(10**6)) for i in range(OTHERS)]
    leases += [_lease(OTHERS + i, "dev", 1_700_000_000 + rng.randrange(10**6)) for i in range(MINE)]
    for i in range(0, len(leases), 20):
        txn = TxnBuilder()
        for lease in leases[i : i + 20]:
            put_history(txn, store.keys, lease, 0)
            put_usage(txn, store.keys, [_usage(lease)])
        r.call(store.send_txn(txn.req))


def _keys_read(r: ReplicaThread) -> int:
    return int(r.replica.store.keys_read)  # type: ignore[union-attr]


def _page(r: ReplicaThread, call: Callable[[], T]) -> tuple[T, int]:
    """A page and the keys the replica read for it. The counter is the whole replica's, and the
    leader's sweeps read now and then (the journal after a release): the fewest of three reads
    of the same page bounds the call's own cost, since background reads only ever add."""
    costs = []
    for _ in range(3):
        before = _keys_read(r)
        page = call()
        costs.append(_keys_read(r) - before)
        if costs[-1] <= 6:
            break
    return page, min(costs)


def test_a_tenants_list_leases_reads_only_its_own_keys(world: tuple[ReplicaThread, Client]) -> None:
    r, dev = world
    req = lease_pb2.ListLeasesRequest(state=lease_pb2.LEASE_STATE_ENDED, page_size=5)
    page, cost = _page(r, lambda: dev.call(dev.leases.ListLeases, req))
    assert len(page.leases) == 5 and all(x.tenant == "dev" for x in page.leases)
    assert cost <= 6, "a page of 5 reads at most 6 keys (one to know there are more)"
    seen = [x.name for x in page.leases]
    while page.next_page_token:
        req.page_token = page.next_page_token
        page, cost = _page(r, lambda: dev.call(dev.leases.ListLeases, req))
        assert cost <= 6
        seen += [x.name for x in page.leases]
    assert len(seen) == len(set(seen)) == MINE


def test_pages_stay_consistent_while_leases_are_created_between_them(
    world: tuple[ReplicaThread, Client],
) -> None:
    _, dev = world
    req = lease_pb2.ListLeasesRequest(page_size=4)
    page = dev.call(dev.leases.ListLeases, req)
    first = [x.name for x in page.leases]
    created = []
    seen = list(first)
    try:
        while page.next_page_token:
            created.append(dev.create_lease(1, ttl_s=30).name)  # newer than every page so far
            req.page_token = page.next_page_token
            page = dev.call(dev.leases.ListLeases, req)
            seen += [x.name for x in page.leases]
        # Every lease that existed at the first page exactly once, newest first; the ones
        # created meanwhile sort before the cursor, so they neither repeat nor push others out.
        assert len(seen) == len(set(seen))
        everything = {x.name for x in dev.list_leases()}
        assert set(seen) == everything - set(created)
        times = {x.name: x.create_time.ToNanoseconds() for x in dev.list_leases()}
        assert [times[n] for n in seen] == sorted((times[n] for n in seen), reverse=True)
    finally:
        for name in created:
            dev.release_lease(name)


def test_a_tenants_usage_records_read_only_its_own_keys(world: tuple[ReplicaThread, Client]) -> None:
    r, dev = world
    req = admin_pb2.ListUsageRecordsRequest(page_size=5)
    seen: list[str] = []
    while True:
        page, cost = _page(r, lambda: dev.call(dev.admin.ListUsageRecords, req))
        assert cost <= 6
        seen += [u.name for u in page.usage_records]
        assert all(u.tenant == "dev" for u in page.usage_records)
        if not page.next_page_token:
            break
        req.page_token = page.next_page_token
    mine = [u for u in seen if u.startswith("usageRecords/")]
    assert len(mine) == len(set(mine)) >= MINE


def test_tokens_page_by_key(world: tuple[ReplicaThread, Client]) -> None:
    r, _ = world
    with Client(r.address, ADMIN_TOKEN) as admin:
        for i in range(7):
            admin.create_token("tenant", f"paged{i}")
        req = admin_pb2.ListTokensRequest(page_size=3)
        names: list[str] = []
        while True:
            page = admin.call(admin.admin.ListTokens, req)
            assert len(page.tokens) <= 3
            names += [t.name for t in page.tokens]
            if not page.next_page_token:
                break
            req.page_token = page.next_page_token
        assert len(names) == len(set(names)) == len(admin.list_tokens()) >= 9


def test_a_token_of_another_query_or_a_forged_one_is_invalid_argument(
    world: tuple[ReplicaThread, Client],
) -> None:
    _, dev = world
    page = dev.call(dev.leases.ListLeases, lease_pb2.ListLeasesRequest(page_size=2))
    for req in (
        lease_pb2.ListLeasesRequest(
            page_size=2, state=lease_pb2.LEASE_STATE_ACTIVE, page_token=page.next_page_token
        ),
        lease_pb2.ListLeasesRequest(page_token="eyJxIjoieCIsImsiOiJhIn0"),
        lease_pb2.ListLeasesRequest(page_token="!!!"),
    ):
        with pytest.raises(GpufedError) as e:
            dev.call(dev.leases.ListLeases, req)
        assert (e.value.code, e.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
