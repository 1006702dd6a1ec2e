"""The queue's scheduler is the leader's: SIGKILL the leader while it grants from the queue, and
the other replica, once leader, grants the rest; each waiting request becomes one lease, and no
GPU is ever in two (etcd's history of the allocation keys, replayed)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import etcd3
import pytest

from gpufed.client import Client, GpufedError
from gpufed.v1 import lease_pb2
from tests.harness import ADMIN_TOKEN, EtcdCluster, daemon_process, replica_process, wait_until
from tests.integration.test_contention import _replay_allocations, _revision

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WAITING = 8


def _leader_address(etcd: EtcdCluster, prefix: str) -> str:
    host, port = etcd.endpoints[0].rsplit(":", 1)
    kv = etcd3.client(host=host, port=int(port))
    leader, _ = kv.get(f"{prefix}/leader")
    address, _ = kv.get(f"{prefix}/replicas/{leader.decode()}")
    return str(address.decode())


def test_a_sigkilled_leader_mid_grant_loses_no_waiting_request_and_grants_none_twice(
    etcd: EtcdCluster, prefix: str
) -> None:
    with replica_process(etcd.endpoints, prefix) as (pa, addr_a):
        with Client(addr_a, ADMIN_TOKEN) as admin:
            wait_until(lambda: _leader_address(etcd, prefix) == addr_a, timeout=20)
            tenant = admin.create_token("tenant", "dev").secret
            provider = admin.create_token("provider", "neo").secret
        with (
            replica_process(etcd.endpoints, prefix) as (_, addr_b),
            daemon_process([addr_b], provider, "neo", "n1", "--report-interval", "0.5", profile="h100-sxm-8"),
            Client(addr_b, tenant) as c,
        ):
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
            blocker = c.create_lease(8)
            start_revision = asyncio.run(_revision(etcd, prefix))

            def queue_one() -> lease_pb2.Lease | None:
                try:
                    return c.create_lease(2, ttl_s=30, max_wait_s=120)
                except GpufedError as e:
                    if e.reason != "UPGRADE_IN_PROGRESS":
                        raise
                    return None

            waiting: list[str] = []
            while len(waiting) < WAITING:
                lease = queue_one()
                if lease is None:
                    time.sleep(0.1)
                    continue
                assert lease.state == lease_pb2.LEASE_STATE_QUEUED
                waiting.append(lease.name)

            granted: dict[str, lease_pb2.Lease] = {}
            stop = threading.Event()

            def holder() -> None:
                with Client(addr_b, tenant, retries=0) as h:
                    while not stop.is_set():
                        for lease in h.list_leases(lease_pb2.LEASE_STATE_ACTIVE):
                            if lease.name in granted:
                                continue
                            granted[lease.name] = lease
                            time.sleep(0.05)
                            h.release_lease(lease.name)
                        time.sleep(0.02)

            t = threading.Thread(target=holder)
            t.start()
            try:
                c.release_lease(blocker.name)  # the leader (A) starts granting...
                wait_until(lambda: len(granted) >= 1, timeout=10)
                pa.send_signal(signal.SIGKILL)  # ...and dies in the middle of it
                pa.wait()
                wait_until(lambda: set(waiting) <= set(granted), timeout=40)
            finally:
                stop.set()
                t.join(10)
            assert _leader_address(etcd, prefix) == addr_b
            for name in waiting:
                assert c.get_lease(name).end_reason == lease_pb2.LEASE_END_REASON_RELEASED

    writes, leftover = asyncio.run(_replay_allocations(etcd, prefix, start_revision))
    assert leftover == {} and writes >= 2 * 2 * WAITING
