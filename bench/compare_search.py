"""Paired comparison of SearchOffers between two code trees on a noisy machine:
`python -m bench.compare_search OLD_TREE NEW_TREE [--rounds 6] [--cache 0|1]`.

One etcd with the 10,000 nodes of bench/search.py; a replica started from each tree, both on
the same keyspace; every round measures each replica's health Check baseline and then its
SearchOffers (the seven queries of bench/search.py), alternating which tree goes first. By
default the answer cache is off, so every search is evaluated. Prints the median of the
per-round QPS ratios to the same replica's baseline, the median p99 and replica CPU per search.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import ADMIN_TOKEN, closed_loop, cpu_seconds, fresh_etcd, load_nodes
from bench.compare_trees import start_replica
from bench.search import QUERIES
from gpufed.client import Client, gpu_filter
from gpufed.v1 import discovery_pb2, discovery_pb2_grpc
from tests.harness import wait_until

NODES = 10_000
CLIENTS = 16


def compare(trees: dict[str, str], rounds: int, seconds: float, cache: bool) -> dict[str, Any]:
    requests = [
        discovery_pb2.SearchOffersRequest(filter=gpu_filter(**q), page_size=20)  # type: ignore[arg-type]
        for q in QUERIES
    ]
    with fresh_etcd() as etcd:
        endpoint = etcd.endpoints[0]
        load_nodes(endpoint, "/s", NODES)
        procs = {}
        try:
            for tag, tree in trees.items():
                procs[tag] = start_replica(
                    tree, endpoint, "/s", {"GPUFED_SEARCH_CACHE": "1024" if cache else "0"}
                )
            with Client(procs["new"][1], ADMIN_TOKEN) as admin:
                md = (("authorization", f"Bearer {admin.create_token('tenant', 'bench').secret}"),)
            for _, address in procs.values():
                with Client(address, ADMIN_TOKEN) as c:
                    wait_until(lambda c=c: len(c.list_nodes(state=1)) == NODES, timeout=180)

            def search_op(address: str) -> Callable[[int], Callable[[], None]]:
                def make(i: int) -> Callable[[], None]:
                    stub = discovery_pb2_grpc.DiscoveryServiceStub(grpc.insecure_channel(address))
                    n = [i]

                    def op() -> None:
                        n[0] += 1
                        stub.SearchOffers(requests[n[0] % len(requests)], metadata=md, timeout=5)

                    return op

                return make

            def health_op(address: str) -> Callable[[int], Callable[[], None]]:
                def make(i: int) -> Callable[[], None]:
                    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
                    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5) and None

                return make

            for _, address in procs.values():
                closed_loop(CLIENTS, 2.0, search_op(address))  # warm-up
            figures: dict[str, dict[str, list[float]]] = {
                t: {"ratio": [], "p99": [], "cpu": []} for t in trees
            }
            for r in range(rounds):
                for tag in list(trees) if r % 2 == 0 else list(reversed(trees)):
                    proc, address = procs[tag]
                    base = closed_loop(CLIENTS, seconds, health_op(address))
                    before = cpu_seconds(proc.pid)
                    run = closed_loop(CLIENTS, seconds, search_op(address))
                    f = figures[tag]
                    f["cpu"].append((cpu_seconds(proc.pid) - before) / max(1, len(run.latencies)) * 1000)
                    f["ratio"].append(run.rate / base.rate)
                    f["p99"].append(run.row()["p99_ms"])
            return {
                tag: {
                    "qps_ratio_to_health_median": round(statistics.median(f["ratio"]), 3),
                    "p99_ms_median": round(statistics.median(f["p99"]), 1),
                    "replica_cpu_ms_per_search_median": round(statistics.median(f["cpu"]), 3),
                    "ratios": [round(x, 3) for x in f["ratio"]],
                }
                for tag, f in figures.items()
            }
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_search")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--cache", type=int, choices=(0, 1), default=0)
    a = p.parse_args()
    out = compare(
        {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}, a.rounds, a.seconds, bool(a.cache)
    )
    for tag, figures in out.items():
        print(tag, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
