"""Lease cycles (CreateLease + ReleaseLease) at 1, 8 and 32 clients over 1,000 nodes x 8 GPUs,
beside two baselines measured in the same run, at the same concurrency, straight against the
same etcd with python3-etcd3: (a) one compare-and-swap Txn; (b) the naive lease lifecycle,
LeaseGrant + CAS Txn + LeaseRevoke. Target: gpufed's cycle rate at least 0.5 x (b), then past (b)."""

from __future__ import annotations

import itertools
import resource
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import etcd3

from bench.common import (
    ADMIN_TOKEN,
    Run,
    closed_loop,
    cpu_seconds,
    fresh_etcd,
    load_nodes,
    replica_process,
)
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


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def with_cpu(measure: Callable[[], Run], pids: dict[str, int]) -> tuple[Run, dict[str, float]]:
    """The run, and the CPU milliseconds per operation of each process (clients: this one). On a
    small machine every process shares the same cores, so this says where the cycles go."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own = _own_cpu()
    r = measure()
    ops = max(1, len(r.latencies))
    cpu = {name: round((cpu_seconds(pid) - before[name]) / ops * 1000, 3) for name, pid in pids.items()}
    cpu["clients"] = round((_own_cpu() - own) / ops * 1000, 3)
    return r, cpu


def run(
    nodes: int = 1000, duration: float = 8.0, concurrency: tuple[int, ...] = (1, 8, 32)
) -> dict[str, Any]:
    prefix = "/bench-leases"
    results: dict[str, Any] = {"nodes": nodes, "gpus": nodes * 8, "gpus_per_lease": 1, "by_concurrency": {}}
    with fresh_etcd() as etcd:
        load_nodes(etcd.endpoints[0], prefix, nodes)
        with replica_process(etcd.endpoints, prefix, env={"GPUFED_LOG_LEVEL": "WARNING"}) as (proc, address):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                wait_until(lambda: len(admin.list_nodes(state=1)) == nodes, timeout=120)
            gpufed_cycles(address, token, 4, 2.0)  # warm-up: pools, connections
            assert etcd.members[0].proc is not None
            pids = {"etcd": etcd.members[0].proc.pid, "replica": proc.pid}
            endpoint = etcd.endpoints[0]
            for n in concurrency:
                a, a_cpu = with_cpu(partial(baseline_cas, endpoint, n, duration), pids)
                b, b_cpu = with_cpu(partial(baseline_lifecycle, endpoint, n, duration), pids)
                g, g_cpu = with_cpu(partial(gpufed_cycles, address, token, n, duration), pids)
                results["by_concurrency"][n] = {
                    "baseline_a_cas_txn": {**a.row(), "cpu_ms_per_op": a_cpu},
                    "baseline_b_grant_txn_revoke": {**b.row(), "cpu_ms_per_op": b_cpu},
                    "gpufed_create_release": {**g.row(), "errors": g.errors, "cpu_ms_per_op": g_cpu},
                    "ratio_to_b": round(g.rate / b.rate, 3),
                    "ratio_to_a": round(g.rate / a.rate, 3),
                }
    return results
