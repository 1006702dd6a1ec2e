"""The queue under load: 50 waiting requests of 4 tenants on 16 GPUs, queued tenant after tenant
(FIFO would serve the first tenant's dozen first), each granted lease held briefly.

It shows: every request is granted in the end, the 8-GPU gang too (backfill never starves it);
the tenants share the GPUs from the start (start-time fair queuing); no GPU is in two leases at
once, by the server's own grant and end times and by etcd's history of the allocation keys; a
request that could not be served within its max_wait ends WAIT_EXPIRED at its deadline."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gpufed.client import Client, GpufedError
from gpufed.v1 import lease_pb2
from node_daemon.fake_nvml import FakeNvml
from tests.harness import ADMIN_TOKEN, DaemonThread, EtcdCluster, ReplicaThread, daemon_config, wait_until
from tests.integration.test_contention import _replay_allocations, _revision

pytestmark = pytest.mark.integration

TENANTS = 4
HOLD_S = 0.3
_NS = 1_000_000_000


@dataclass
class Held:
    lease: lease_pb2.Lease
    tenant: int
    seen_at: float
    ended: lease_pb2.Lease | None = None


@pytest.fixture
def federation(replica: ReplicaThread) -> Iterator[list[str]]:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenants = [admin.create_token("tenant", f"t{i}").secret for i in range(TENANTS)]
        provider = admin.create_token("provider", "neo").secret
    daemons = [
        DaemonThread(
            daemon_config([replica.address], provider, "neo", n, report_interval=0.5),
            FakeNvml("h100-sxm-8", host=n),
        ).start()
        for n in ("n1", "n2")
    ]
    try:
        with Client(replica.address, tenants[0]) as c:
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 16, timeout=20)
        yield tenants
    finally:
        for d in daemons:
            d.stop()


def _queued(c: Client, count: int, max_wait_s: int) -> lease_pb2.Lease:
    """A queued request, once the leader has opened the queue (it migrates a fresh prefix first)."""
    out: list[lease_pb2.Lease] = []

    def attempt() -> bool:
        try:
            out.append(c.create_lease(count, max_wait_s=max_wait_s))
        except GpufedError as e:
            if e.reason != "UPGRADE_IN_PROGRESS":
                raise
            return False
        return True

    wait_until(attempt, timeout=20)
    return out[0]


def _requests(tenant: int) -> list[tuple[int, bool]]:
    """(gpu_count, spread) of one tenant's requests: 12 of 1..4 GPUs; tenant 2 adds the gang
    and tenant 3 one more: 50 in all."""
    out = [(1 + (tenant + k) % 4, k % 3 == 0) for k in range(12)]
    if tenant == 2:
        out.insert(6, (8, False))
    if tenant == 3:
        out.append((2, True))
    return out


def test_fifty_waiting_requests_of_four_tenants_are_all_granted_fairly_and_never_twice(
    replica: ReplicaThread, etcd: EtcdCluster, prefix: str, federation: list[str]
) -> None:
    clients = [Client(replica.address, t) for t in federation]
    try:
        # Every GPU held for now: the schema gate open, then what arrives waits.
        blocker = clients[0].create_lease(16, spread=True)
        start_revision = asyncio.run(_revision(etcd, prefix))
        short = [_queued(clients[1], 1, max_wait_s=1), clients[3].create_lease(2, max_wait_s=1)]
        waiting: list[tuple[int, lease_pb2.Lease]] = []
        for i, c in enumerate(clients):
            for count, spread in _requests(i):
                lease = c.create_lease(count, spread=spread, ttl_s=30, max_wait_s=120)
                assert lease.state == lease_pb2.LEASE_STATE_QUEUED
                waiting.append((i, lease))
        assert len(waiting) == 50

        # The short ones end at their deadline while the blocker holds everything.
        for c, s in ((clients[1], short[0]), (clients[3], short[1])):
            wait_until(lambda c=c, s=s: c.get_lease(s.name).state == lease_pb2.LEASE_STATE_ENDED, timeout=5)
            ended = c.get_lease(s.name)
            assert ended.end_reason == lease_pb2.LEASE_END_REASON_WAIT_EXPIRED and not ended.gpus
            late_s = (ended.end_time.ToNanoseconds() - ended.wait_expire_time.ToNanoseconds()) / _NS
            assert 0 <= late_s < 1.0, f"ended {late_s:.2f} s after its deadline"
        clients[0].release_lease(blocker.name)

        held: dict[str, Held] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def holder(i: int) -> None:
            """Tenant i's client: each lease once granted is held HOLD_S, then released."""
            with Client(replica.address, federation[i], retries=0) as c:
                while not stop.is_set():
                    now = time.monotonic()
                    for lease in c.list_leases(lease_pb2.LEASE_STATE_ACTIVE):
                        with lock:
                            h = held.setdefault(lease.name, Held(lease, i, now))
                        if h.ended is None and now - h.seen_at >= HOLD_S:
                            h.ended = c.release_lease(lease.name)
                    time.sleep(0.05)

        threads = [threading.Thread(target=holder, args=(i,)) for i in range(TENANTS)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sum(h.ended is not None for h in held.values()) == 50, timeout=90)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    finally:
        for c in clients:
            c.close()

    names = {lease.name for _, lease in waiting}
    assert set(held) == names, "every waiting request was granted, the gang too"
    grants = sorted(held.values(), key=lambda h: h.lease.grant_time.ToNanoseconds())
    # Fair from the start: FIFO would have served tenant 0's 12 requests first.
    first = [h.tenant for h in grants[:20]]
    assert all(first.count(i) >= 3 for i in range(TENANTS)), first
    # No GPU in two leases at once, by the server's own times.
    by_gpu: dict[str, list[Held]] = {}
    for h in grants:
        assert h.ended is not None and h.lease.state == lease_pb2.LEASE_STATE_ACTIVE
        for g in h.lease.gpus:
            by_gpu.setdefault(g.uuid, []).append(h)
    for uuid, hs in by_gpu.items():
        for a, b in itertools.pairwise(hs):
            assert a.ended is not None
            assert a.ended.end_time.ToNanoseconds() <= b.lease.grant_time.ToNanoseconds(), (uuid, a, b)
            assert a.lease.fencing_token < b.lease.fencing_token
    writes, leftover = asyncio.run(_replay_allocations(etcd, prefix, start_revision))
    assert leftover == {} and writes >= 2 * sum(len(h.lease.gpus) for h in grants)
