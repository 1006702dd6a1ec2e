"""Prometheus metrics of one replica, in a registry of its own (tests run several replicas in one
process), served on an HTTP port by control_plane.main."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "gpufed_rpcs_total", "RPCs served, by method and status code", ["method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "gpufed_rpc_latency_seconds",
            "RPC latency by method",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.nodes = Gauge("gpufed_nodes", "Nodes by state", ["state"], registry=r)
        self.gpus = Gauge("gpufed_gpus", "GPUs by health and lease state", ["health", "leased"], registry=r)
        self.leases_granted = Counter(
            "gpufed_leases_granted_total", "Leases granted by this replica", registry=r
        )
        self.leases_released = Counter(
            "gpufed_leases_released_total", "Leases released or revoked", registry=r
        )
        self.leases_expired = Counter(
            "gpufed_leases_expired_total", "Leases that expired (leader's count)", registry=r
        )
        self.txn_conflicts = Counter(
            "gpufed_etcd_txn_conflicts_total", "Grant Txns that lost a race", registry=r
        )
        self.txn_latency = Histogram(
            "gpufed_etcd_txn_latency_seconds",
            "etcd Txn latency",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.streams = Gauge("gpufed_node_streams", "Node daemon streams held by this replica", registry=r)
        self.reports = Counter("gpufed_node_reports_total", "Node reports ingested", registry=r)
