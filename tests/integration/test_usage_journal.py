"""Usage records exactly once, by construction: a release bills in its own Txn, an expiry is
billed by the leader from the journal entry that outlived the lease, to the true end (the last
renewal plus the ttl), and nothing depends on a watch event: a compaction gap loses nothing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from gpufed.client import Client
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


@pytest.fixture
def world(etcd: EtcdCluster) -> Iterator[tuple[ReplicaThread, Client, Client]]:
    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix(), report_interval=0.5)).start()
    admin = Client(r.address, ADMIN_TOKEN)
    tenant = Client(r.address, admin.create_token("tenant", "dev").secret)
    provider = admin.create_token("provider", "neo").secret
    d = DaemonThread(
        daemon_config([r.address], provider, "neo", "n1", report_interval=0.5), FakeNvml("l40s-4")
    )
    d.start()
    wait_until(lambda: sum(o.free_gpus for o in tenant.search_offers()) == 4, timeout=20)
    yield r, admin, tenant
    d.stop()
    tenant.close()
    admin.close()
    r.stop()


def _records(admin: Client, lease: str) -> list[admin_pb2.UsageRecord]:
    resp = admin.call(admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest())
    return [u for u in resp.usage_records if u.lease == lease]


def test_a_release_is_billed_in_its_own_txn(world: tuple[ReplicaThread, Client, Client]) -> None:
    r, admin, tenant = world
    lease = tenant.create_lease(2, ttl_s=30)
    ended = tenant.release_lease(lease.name)
    (record,) = _records(admin, lease.name)  # at once: no leader, no watch in between
    span = (ended.end_time.ToNanoseconds() - lease.create_time.ToNanoseconds()) / 1e9
    assert record.gpu_seconds == pytest.approx(2 * span, abs=1e-3)
    assert record.end_reason == lease_pb2.LEASE_END_REASON_RELEASED
    assert r.replica is not None
    assert r.call(r.replica.store.get(r.replica.store.keys.journal(lease.name[7:]))) is None


def test_an_expiry_is_billed_once_to_the_last_renewal_plus_the_ttl_even_across_a_compaction(
    world: tuple[ReplicaThread, Client, Client],
) -> None:
    r, admin, tenant = world
    assert r.replica is not None
    store = r.replica.store
    lease = tenant.create_lease(1, ttl_s=5)
    time.sleep(1.0)
    renewed = tenant.renew_lease(lease.name)
    # Compact etcd to its newest revision again and again while the lease expires: whatever
    # watch saw or missed the deletion, the journal entry is still there to bill from.
    deadline = time.monotonic() + 12
    while not _records(admin, lease.name) and time.monotonic() < deadline:
        revision = r.call(store.revision())
        with contextlib.suppress(Exception):  # nothing new to compact since the last round
            r.call(store.compact(revision))  # type: ignore[arg-type]
        time.sleep(0.3)
    (record,) = _records(admin, lease.name)
    assert record.end_reason == lease_pb2.LEASE_END_REASON_EXPIRED
    assert record.end_time == renewed.expire_time  # the true end, not when it was noticed
    span = (renewed.expire_time.ToNanoseconds() - lease.create_time.ToNanoseconds()) / 1e9
    assert record.gpu_seconds == pytest.approx(span, abs=1e-3)
    time.sleep(2.5)  # more sweeps: still one record
    assert len(_records(admin, lease.name)) == 1
    history = tenant.get_lease(lease.name)
    assert history.state == lease_pb2.LEASE_STATE_ENDED and history.end_time == renewed.expire_time
