"""A 3-member etcd cluster loses a member, its leader even: replicas keep granting and
releasing leases, and nothing is left allocated to a dead lease."""

from __future__ import annotations

import time

import etcd3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufed.client import Client, GpufedError
from gpufed.v1 import discovery_pb2
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

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def test_replicas_keep_serving_when_the_etcd_leader_is_killed(etcd_cluster: EtcdCluster) -> None:
    prefix = unique_prefix()
    replica = ReplicaThread(replica_config(etcd_cluster.endpoints, prefix, report_interval=0.5)).start()
    daemon = None
    try:
        with Client(replica.address, ADMIN_TOKEN) as admin:
            tenant = admin.create_token("tenant", "t").secret
            provider = admin.create_token("provider", "neo").secret
        daemon = DaemonThread(
            daemon_config([replica.address], provider, "neo", "n1"), FakeNvml("h100-sxm-8")
        ).start()
        with Client(replica.address, tenant, retries=5) as c:
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
            held = c.create_lease(2, ttl_s=30)

            etcd_cluster.leader().kill()
            killed = time.monotonic()

            unreleased: list[str] = []

            def cycle() -> bool:
                # A call that fails during the election has an unknown outcome: release again later.
                try:
                    while unreleased:
                        c.release_lease(unreleased[-1])
                        unreleased.pop()
                    lease = c.create_lease(1, ttl_s=30, request_id=f"fault-{len(done)}")
                    unreleased.append(lease.name)
                    c.release_lease(lease.name)
                    unreleased.pop()
                    done.append(lease.name)
                    return True
                except GpufedError as e:
                    assert e.code in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.ABORTED,
                    ), e
                    return False

            done: list[str] = []

            took = wait_until(cycle, timeout=30)
            assert time.monotonic() - killed < 30 and took >= 0
            for _ in range(10):
                assert cycle()
            c.release_lease(held.name)
            # The replica's session lease may have lapsed during the election: its nodes come back
            # when it re-grants and re-attaches their alive keys.
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
            stub = health_pb2_grpc.HealthStub(c.channel)
            assert (
                stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
            resp = c.call(c.discovery.SearchOffers, discovery_pb2.SearchOffersRequest())
            assert resp.revision > 0
        # Nothing is left allocated: every allocation key belongs to a live lease record.
        live = next(m for m in etcd_cluster.members if m.proc is not None and m.proc.poll() is None)
        raw = etcd3.client("127.0.0.1", live.client_port)
        try:
            allocs = list(raw.get_prefix(prefix + "/alloc/"))
            leases = {meta.key.decode().rsplit("/", 1)[1] for _, meta in raw.get_prefix(prefix + "/leases/")}
        finally:
            raw.close()
        assert [v for v, _ in allocs if v.decode() not in leases] == []
    finally:
        if daemon is not None:
            daemon.stop()
        replica.stop()
