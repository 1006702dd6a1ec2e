"""Prometheus metrics of one replica, in a registry of its own (tests run several replicas in one
process), served on an HTTP port by control_plane.main."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from control_plane.domain import schema
from gpufed import __version__
from gpufed.v1 import common_pb2

if TYPE_CHECKING:
    from control_plane.adapters.index import Inventory


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # CPU, memory and file descriptors of the replica process: one replica is one event loop
        # on about one core, and its CPU says when to add another.
        ProcessCollector(registry=r)
        # gpufed_build_info{version, schema}: which release each replica runs and the newest
        # schema it understands, for a rolling upgrade's dashboards (docs/operations.md).
        self.build_info = Info("gpufed_build", "The release this replica runs", registry=r)
        self.build_info.info({"version": __version__, "schema": str(schema.SCHEMA)})
        self.etcd_schema = Gauge(
            "gpufed_etcd_schema", "The schema etcd's records are in (the schema key)", registry=r
        )
        self.writes_refused = Gauge(
            "gpufed_writes_refused",
            "1 while this replica writes nothing: etcd holds a schema newer than it understands",
            registry=r,
        )
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
            "Latency of the grant and release commits sent to etcd (one per shared commit)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.queue_grants = Counter(
            "gpufed_queue_grants_total", "Leases granted from the queue by this replica", registry=r
        )
        self.reservations_booked = Counter(
            "gpufed_reservations_booked_total", "Reservations booked through this replica", registry=r
        )
        self.reservations_started = Counter(
            "gpufed_reservations_started_total", "Reservations started as leases (leader's count)", registry=r
        )
        self.reservation_start_delay = Histogram(
            "gpufed_reservation_start_delay_seconds",
            "From a reservation's start_time to the commit of its lease (leader's)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.leases_preempted = Counter(
            "gpufed_leases_preempted_total",
            "Interruptible leases preempted after their notice (leader's)",
            registry=r,
        )
        self.streams = Gauge("gpufed_node_streams", "Node daemon streams held by this replica", registry=r)
        self.reports = Counter("gpufed_node_reports_total", "Node reports ingested", registry=r)
        self.bootstrap_token_risk = Gauge(
            "gpufed_bootstrap_token_with_admin_tokens",
            "1 while the bootstrap admin token is on although real admin tokens exist (turn it off)",
            registry=r,
        )
        self.revoked_streams = Counter(
            "gpufed_streams_revoked_total", "Streams ended because their token was deleted", registry=r
        )

    def watch_inventory(self, inventory: Inventory) -> None:
        """Nodes by state and GPUs by health and lease state, read from the index at scrape time."""
        self.registry.register(_InventoryCollector(inventory))


class _InventoryCollector(Collector):
    def __init__(self, inventory: Inventory) -> None:
        self.inv = inventory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("gpufed_nodes", "Nodes by state", labels=["state"])
        gpus = GaugeMetricFamily("gpufed_gpus", "GPUs by health and lease state", labels=["health", "leased"])
        states: Tally[str] = Tally()
        health: Tally[tuple[str, str]] = Tally()
        for name, entry in list(self.inv.nodes.items()):
            states[common_pb2.NodeState.Name(self.inv.state(name)).removeprefix("NODE_STATE_").lower()] += 1  # type: ignore[arg-type]
            held = self.inv.held(name)
            for g in entry.node.gpus:
                h = common_pb2.GpuHealth.Name(g.health).removeprefix("GPU_HEALTH_").lower()
                health[(h, "true" if g.uuid in held else "false")] += 1
        for state in ("ready", "offline", "cordoned", "draining"):
            nodes.add_metric([state], states.get(state, 0))
        for (h, leased), n in sorted(health.items()):
            gpus.add_metric([h, leased], n)
        yield nodes
        yield gpus
        queued = GaugeMetricFamily(
            "gpufed_queued_requests", "Requests waiting for capacity (the federation's queue)"
        )
        queued.add_metric([], len(self.inv.queued))
        yield queued
