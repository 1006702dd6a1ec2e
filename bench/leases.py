"""Lease cycles (CreateLease + ReleaseLease) at 1, 8 and 32 clients over 1,000 nodes x 8 GPUs,
beside two baselines measured in the same run, at the same concurrency, straight against the
same etcd with python3-etcd3: (a) one compare-and-swap Txn; (b) the naive lease lifecycle,
LeaseGrant + CAS Txn + LeaseRevoke. Target: gpufed's cycle rate at least 0.5 x (b), then past (b)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import etcd3

from bench.common import ADMIN_TOKEN, Run, closed_loop, fresh_etcd, load_nodes, replica_process
from gpufed.client import Client
from tests.harness import wait_until

_counter = itertools.count()
_lock = threading.Lock()


def _key(prefix: str) -> str:
    with _lock:
        return f"{prefix}/{next(_counter)}"


def baseline_cas(endpoint: str, workers: int, duration: float) -> Run:
    host, port = endpoint.split(":")

    def make(i: int) -> Callable[[], None]:
        c = etcd3.client(host, int(port))

        def op() -> None:
            k = _key("/baseline-a")
            c.transaction(
                compare=[c.transactions.create(k) == 0], success=[c.transactions.put(k, "x")], failure=[]
            )

        return op

    return closed_loop(workers, duration, make)


def baseline_lifecycle(endpoint: str, workers: int, duration: float) -> Run:
    host, port = endpoint.split(":")

    def make(i: int) -> Callable[[], None]:
        c = etcd3.client(host, int(port))

        def op() -> None:
            k = _key("/baseline-b")
            lease = c.lease(60)
            c.transaction(
                compare=[c.transactions.create(k) == 0],
                success=[c.transactions.put(k, "x", lease=lease)],
                failure=[],
            )
            lease.revoke()

        return op

    return closed_loop(workers, duration, make)


def gpufed_cycles(address: str, token: str, workers: int, duration: float) -> Run:
    def make(i: int) -> Callable[[], None]:
        c = Client(address, token, retries=0)

        def op() -> None:
            lease = c.create_lease(1, ttl_s=60)
            c.release_lease(lease.name)

        return op

    return closed_loop(workers, duration, make)


def run(
    nodes: int = 1000, duration: float = 8.0, concurrency: tuple[int, ...] = (1, 8, 32)
) -> dict[str, Any]:
    prefix = "/bench-leases"
    results: dict[str, Any] = {"nodes": nodes, "gpus": nodes * 8, "gpus_per_lease": 1, "by_concurrency": {}}
    with fresh_etcd() as etcd:
        load_nodes(etcd.endpoints[0], prefix, nodes)
        with replica_process(etcd.endpoints, prefix, env={"GPUFED_LOG_LEVEL": "WARNING"}) as (_, address):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                wait_until(lambda: len(admin.list_nodes(state=1)) == nodes, timeout=120)
            gpufed_cycles(address, token, 4, 2.0)  # warm-up: pools, connections
            for n in concurrency:
                a = baseline_cas(etcd.endpoints[0], n, duration)
                b = baseline_lifecycle(etcd.endpoints[0], n, duration)
                g = gpufed_cycles(address, token, n, duration)
                results["by_concurrency"][n] = {
                    "baseline_a_cas_txn": a.row(),
                    "baseline_b_grant_txn_revoke": b.row(),
                    "gpufed_create_release": {**g.row(), "errors": g.errors},
                    "ratio_to_b": round(g.rate / b.rate, 3),
                    "ratio_to_a": round(g.rate / a.rate, 3),
                }
    return results
