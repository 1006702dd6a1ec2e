"""The Prometheus endpoint of a replica, scraped."""

from __future__ import annotations

import urllib.request

import pytest

from control_plane.config import Config
from control_plane.domain.schema import SCHEMA
from gpufed import __version__
from gpufed.client import Client
from tests.harness import (
    ADMIN_TOKEN,
    EtcdCluster,
    ReplicaThread,
    free_port,
    one_node,
)

pytestmark = pytest.mark.integration

NAMES = [
    "gpufed_rpcs_total",
    "gpufed_rpc_latency_seconds_bucket",
    "gpufed_nodes",
    "gpufed_gpus",
    "gpufed_leases_granted_total",
    "gpufed_leases_expired_total",
    "gpufed_leases_released_total",
    "gpufed_etcd_txn_conflicts_total",
    "gpufed_etcd_txn_latency_seconds_bucket",
    "gpufed_node_streams",
    "gpufed_node_reports_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "gpufed_etcd_schema",
    "gpufed_writes_refused",
    "gpufed_queued_requests",
    "gpufed_queue_grants_total",
]


def test_metrics_endpoint_has_rpc_node_gpu_lease_and_etcd_metrics(etcd: EtcdCluster, prefix: str) -> None:
    port = free_port()
    cfg = Config(
        listen="127.0.0.1:0",
        etcd_endpoints=etcd.endpoints,
        etcd_prefix=prefix,
        admin_token=ADMIN_TOKEN,
        metrics_listen=f"127.0.0.1:{port}",
        report_interval=0.5,
    )
    r = ReplicaThread(cfg).start()
    try:
        with one_node(r.address, "m") as tenant:
            with Client(r.address, tenant) as c:
                c.release_lease(c.create_lease(1).name)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
    finally:
        r.stop()
    for name in NAMES:
        assert name in text, name
    assert 'gpufed_rpcs_total{code="OK",method="LeaseService.CreateLease"} 1.0' in text
    assert 'gpufed_nodes{state="ready"} 1.0' in text
    assert 'gpufed_gpus{health="healthy",leased="false"}' in text
    assert "gpufed_leases_granted_total 1.0" in text
    assert f'gpufed_build_info{{schema="{SCHEMA}",version="{__version__}"}} 1.0' in text
    assert "gpufed_writes_refused 0.0" in text
