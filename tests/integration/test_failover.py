"""Failover clients: the SDK given several replicas spreads calls over them, skips one whose
health says NOT_SERVING, and keeps `with client.lease(...)` renewed while a replica goes away."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from gpufed.client import Client
from gpufed.v1 import admin_pb2, discovery_pb2, lease_pb2
from node_daemon.fake_nvml import FakeNvml
from tests.harness import ADMIN_TOKEN, DaemonThread, EtcdCluster, daemon_config, replica_process, wait_until

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def two_replicas(
    etcd: EtcdCluster, prefix: str, delay: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, str, str]]:
    """Replica A (the test SIGTERMs it) and B, a daemon with 4 GPUs streaming to B, seen by
    both: (A's process, A's address, B's address, a tenant token)."""
    grace = ("--shutdown-grace", "5", "--shutdown-delay", delay)
    with (
        replica_process(etcd.endpoints, prefix, *grace) as (going, addr_a),
        replica_process(etcd.endpoints, prefix, *grace) as (_, addr_b),
    ):
        with Client(addr_b, ADMIN_TOKEN) as admin:
            provider = admin.create_token("provider", "neo").secret
            tenant = admin.create_token("tenant", "dev").secret
        daemon = DaemonThread(
            daemon_config([addr_b], provider, "neo", "n1", report_interval=0.5), FakeNvml("l40s-4")
        ).start()
        try:
            for addr in (addr_a, addr_b):
                with Client(addr, tenant) as c:
                    wait_until(lambda c=c: sum(o.free_gpus for o in c.search_offers()) == 4, timeout=20)
            yield going, addr_a, addr_b, tenant
        finally:
            daemon.stop()


def test_a_held_lease_survives_its_replica_going_away(etcd: EtcdCluster, prefix: str) -> None:
    with (
        two_replicas(etcd, prefix, "1") as (going, addr_a, addr_b, tenant),
        Client([addr_a, addr_b], tenant) as c,
    ):
        with c.lease(1, ttl_s=6) as held:
            going.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            calls = 0
            while time.monotonic() - t0 < 7:  # past A's exit, and two renewals
                assert c.get_lease(held.name).state == lease_pb2.LEASE_STATE_ACTIVE
                calls += 1
                time.sleep(0.1)
            going.wait(5)
            assert going.returncode == 0
            assert held.error is None, held.error
            assert held.renewals >= 2
            assert calls > 30
        assert c.get_lease(held.name).state == lease_pb2.LEASE_STATE_ENDED  # released on B


def test_the_sdks_lease_watch_resumes_on_another_replica(etcd: EtcdCluster, prefix: str) -> None:
    W = lease_pb2.WatchLeaseResponse
    with two_replicas(etcd, prefix, "0.5") as (going, addr_a, addr_b, tenant):
        with Client(addr_b, tenant) as other:
            lease = other.create_lease(1, ttl_s=30)
        # Round robin starts the stream on A or B: either way it must reach ENDED.
        with Client([addr_a, addr_b], tenant) as c:
            events = c.watch_lease(lease.name)
            assert next(events).type == W.EVENT_TYPE_GRANTED
            going.send_signal(signal.SIGTERM)
            going.wait(10)
            with Client(addr_b, tenant) as other:
                other.release_lease(lease.name)
            kinds = [e.type for e in events]  # resumed if it was on A; ends with ENDED
            assert kinds[-1] == W.EVENT_TYPE_ENDED


def test_the_sdks_capacity_watch_resumes_with_a_fresh_snapshot(etcd: EtcdCluster, prefix: str) -> None:
    W = discovery_pb2.WatchCapacityResponse
    with (
        two_replicas(etcd, prefix, "0.5") as (going, addr_a, addr_b, tenant),
        Client([addr_a, addr_b], tenant) as c,
    ):
        events = c.watch_capacity()
        first = [next(events).type for _ in range(2)]
        assert first == [W.EVENT_TYPE_SNAPSHOT, W.EVENT_TYPE_SNAPSHOT_END]
        going.send_signal(signal.SIGTERM)
        going.wait(10)
        # Wherever the watch was, it goes on: on B a change of the node arrives, or (moved from
        # A) a fresh snapshot first.
        with Client(addr_b, ADMIN_TOKEN) as admin:
            admin.call(
                admin.admin.CordonNode,
                admin_pb2.CordonNodeRequest(name="providers/neo/nodes/n1", reason="test"),
            )
        seen = next(events)
        assert seen.type in (W.EVENT_TYPE_SNAPSHOT, W.EVENT_TYPE_NODE_CHANGED)
