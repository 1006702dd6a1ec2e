"""SearchOffers at 10,000 nodes x 8 GPUs, 16 concurrent clients, beside a grpc.health.v1 Check
baseline measured in the same run against the same replica. Also the replica's memory with the
10,000-node index. Targets: p99 < 20 ms, QPS >= 0.5 x baseline, RSS < 300 MB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import ADMIN_TOKEN, closed_loop, fresh_etcd, load_nodes, replica_process, rss_mb
from gpufed.client import Client, gpu_filter
from gpufed.v1 import discovery_pb2, discovery_pb2_grpc
from tests.harness import wait_until

QUERIES = [
    {},
    {"gpu_model": "H100", "countries": ["DE", "FR"]},
    {"gpu_model": "A100", "max_price": 2.5},
    {"gpu_model": "H200", "exclude_countries": ["US", "CA"]},
    {"near": (50.1, 8.7, 500.0)},
    {"labels": {"tier": "premium"}, "countries": ["JP", "SG"]},
    {"min_gpu_memory_gb": 100, "countries": ["SE", "FI"]},
]


def run(nodes: int = 10_000, clients: int = 16, duration: float = 10.0, cache: bool = True) -> dict[str, Any]:
    prefix = "/bench"
    with fresh_etcd() as etcd:
        load_nodes(etcd.endpoints[0], prefix, nodes)
        with replica_process(
            etcd.endpoints,
            prefix,
            env={"GPUFED_LOG_LEVEL": "WARNING", "GPUFED_SEARCH_CACHE": "1024" if cache else "0"},
        ) as (proc, address):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                wait_until(lambda: len(admin.list_nodes(state=1)) == nodes, timeout=120)
            md = (("authorization", f"Bearer {token}"),)
            requests = [
                discovery_pb2.SearchOffersRequest(filter=gpu_filter(**q), page_size=20)  # type: ignore[arg-type]
                for q in QUERIES
            ]

            def search_op(i: int) -> Callable[[], None]:
                stub = discovery_pb2_grpc.DiscoveryServiceStub(grpc.insecure_channel(address))
                n = [i]

                def op() -> None:
                    n[0] += 1
                    resp = stub.SearchOffers(requests[n[0] % len(requests)], metadata=md, timeout=5)
                    assert resp.offers or n[0] % len(requests) == 5

                return op

            def health_op(i: int) -> Callable[[], None]:
                stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))

                def op() -> None:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

                return op

            closed_loop(clients, 2.0, search_op)  # warm-up
            baseline = closed_loop(clients, duration, health_op)
            search = closed_loop(clients, duration, search_op)
            # The one order that must look at every matching node: by distance.
            far = discovery_pb2.SearchOffersRequest(
                filter=gpu_filter(near=(50.1, 8.7, 20000.0)),
                order_by=discovery_pb2.OFFER_ORDER_DISTANCE,
                page_size=20,
            )

            def distance_op(i: int) -> Callable[[], None]:
                stub = discovery_pb2_grpc.DiscoveryServiceStub(grpc.insecure_channel(address))
                return lambda: stub.SearchOffers(far, metadata=md, timeout=10) and None

            distance = closed_loop(4, duration / 2, distance_op)
            rss = rss_mb(proc.pid)
    return {
        "nodes": nodes,
        "search_cache": cache,
        "gpus": nodes * 8,
        "clients": clients,
        "health_check_baseline": baseline.row(),
        "search_offers": search.row(),
        "qps_ratio_to_baseline": round(search.rate / baseline.rate, 3),
        "search_errors": search.errors,
        "distance_order_full_scan_4_clients": distance.row(),
        "replica_rss_mb": round(rss, 1),
    }
