"""Health tells the truth: a replica cut off from etcd says NOT_SERVING within its session ttl,
and SERVING again once etcd answers; etcd's NOSPACE alarm takes the write services out."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import EtcdCluster, ReplicaThread, replica_config, unique_prefix, wait_until
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def test_a_replica_cut_off_from_etcd_reports_not_serving_then_recovers(etcd: EtcdCluster) -> None:
    host, port = etcd.endpoints[0].rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)))
    r = ReplicaThread(replica_config([proxy.endpoint], unique_prefix(), session_ttl=3)).start()
    channel = grpc.insecure_channel(r.address)
    try:
        assert _status(channel) == SERVING
        proxy.cut()
        t0 = time.monotonic()
        wait_until(lambda: _status(channel) == NOT_SERVING, timeout=10)
        took = time.monotonic() - t0
        assert took <= 3 + 1.5, f"NOT_SERVING after {took:.1f} s (session ttl 3 s)"
        for service in ("gpufed.v1.LeaseService", "gpufed.v1.DiscoveryService"):
            assert _status(channel, service) == NOT_SERVING
        proxy.restore()
        wait_until(lambda: _status(channel) == SERVING, timeout=20)
    finally:
        channel.close()
        r.stop()
        proxy.close()


def test_etcd_nospace_takes_the_write_services_out_and_writes_say_so() -> None:
    import etcd3

    from gpufed.client import Client, GpufedError
    from tests.harness import ADMIN_TOKEN

    cluster = EtcdCluster.start(1, extra_args=("--quota-backend-bytes=8388608",))
    r = ReplicaThread(replica_config(cluster.endpoints, unique_prefix())).start()
    channel = grpc.insecure_channel(r.address)
    host, port = cluster.endpoints[0].rsplit(":", 1)
    kv = etcd3.client(host=host, port=int(port))
    try:
        with Client(r.address, ADMIN_TOKEN, retries=0) as admin:
            tenant = admin.create_token("tenant", "dev").secret
            for i in range(100):  # fill etcd's 8 MiB until the NOSPACE alarm
                try:
                    kv.put(f"/fill/{i}", "x" * (1 << 20))
                except Exception:
                    break
            wait_until(lambda: _status(channel, "gpufed.v1.LeaseService") == NOT_SERVING, timeout=5)
            assert _status(channel) == SERVING  # reads still work
            assert _status(channel, "gpufed.v1.DiscoveryService") == SERVING
            with pytest.raises(GpufedError) as e:
                admin.create_token("tenant", "another")
            assert (e.value.code, e.value.reason) == (grpc.StatusCode.UNAVAILABLE, "ETCD_NO_SPACE")
            with Client(r.address, tenant) as c:
                assert c.list_leases() == []
            # The operator's way out: delete, compact, defragment, disarm.
            kv.delete_prefix("/fill/")
            kv.compact(kv.get_response("/").header.revision)
            kv.defragment()
            for alarm in kv.list_alarms():
                kv.disarm_alarm(alarm.member_id)
            wait_until(lambda: _status(channel, "gpufed.v1.LeaseService") == SERVING, timeout=5)
            admin.create_token("tenant", "another")
    finally:
        channel.close()
        r.stop()
        cluster.stop()


def test_a_replica_whose_etcd_member_lost_its_quorum_reports_not_serving(etcd_cluster: EtcdCluster) -> None:
    # The replica talks to member 0 only; the other two die, so member 0 has no leader: it still
    # accepts connections, but keep-alives (leader work) fail, so the session goes unconfirmed.
    only = etcd_cluster.endpoints[:1]
    r = ReplicaThread(replica_config(only, unique_prefix(), session_ttl=3)).start()
    channel = grpc.insecure_channel(r.address)
    try:
        assert _status(channel) == SERVING
        for m in etcd_cluster.members[1:]:
            m.kill()
        t0 = time.monotonic()
        wait_until(lambda: _status(channel) == NOT_SERVING, timeout=15)
        took = time.monotonic() - t0
        assert took <= 3 + 6, f"NOT_SERVING after {took:.1f} s"
        for m in etcd_cluster.members[1:]:
            etcd_cluster.restart(m)
        wait_until(lambda: _status(channel) == SERVING, timeout=30)
    finally:
        channel.close()
        r.stop()
