"""Lease cycles (CreateLease + ReleaseLease) at 1, 8 and 32 clients over 1,000 nodes x 8 GPUs,
beside two baselines measured in the same run, at the same concurrency, straight against the
same etcd with python3-etcd3: (a) one compare-and-swap Txn; (b) the naive lease lifecycle,
LeaseGrant + CAS Txn + LeaseRevoke. Target: gpufed's cycle rate at least 0.5 x (b), then past (b).
Each concurrency runs in rounds (a, b, gpufed; then reversed) and reports the median per-round ratio.

gpufed is measured twice, against two replicas on the same etcd: one pinned to one core
(`--cpus`, as we deploy replicas: one per core) and one left free. The baselines have no replica:
etcd and the clients use every core in all runs."""

from __future__ import annotations

import contextlib
import itertools
import resource
import statistics
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
    pinned_replica_args,
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
    nodes: int = 1000,
    duration: float = 12.0,
    concurrency: tuple[int, ...] = (1, 8, 32),
    rounds: int = 3,
) -> dict[str, Any]:
    """At each concurrency, `rounds` rounds of (a), (b) and gpufed, `duration` seconds each in
    all: this machine's speed drifts within seconds, so each round's gpufed/(b) is a paired
    ratio, and the median over rounds is the figure (rates and latencies pool every round)."""
    prefix = "/bench-leases"
    results: dict[str, Any] = {
        "nodes": nodes,
        "gpus": nodes * 8,
        "gpus_per_lease": 1,
        "rounds": rounds,
        "by_concurrency": {},
    }
    step = duration / rounds
    quiet = {"GPUFED_LOG_LEVEL": "WARNING"}
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(fresh_etcd())
        endpoint = etcd.endpoints[0]
        replicas: dict[str, tuple[int, str, str]] = {}  # measure -> (pid, address, tenant token)
        pinned = pinned_replica_args()
        results["replica_cpus"] = {"g": pinned[1:], "f": "any"}
        for key, extra in (("g", pinned), ("f", ())):
            load_nodes(endpoint, f"{prefix}-{key}", nodes)
            proc, address = stack.enter_context(
                replica_process(etcd.endpoints, f"{prefix}-{key}", *extra, env=quiet)
            )
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                wait_until(lambda a=admin: len(a.list_nodes(state=1)) == nodes, timeout=120)
            gpufed_cycles(address, token, 4, 2.0)  # warm-up: pools, connections
            replicas[key] = (proc.pid, address, token)
        assert etcd.members[0].proc is not None
        etcd_pid = etcd.members[0].proc.pid
        for n in concurrency:
            measures: dict[str, tuple[Callable[[], Run], dict[str, int]]] = {
                "a": (partial(baseline_cas, endpoint, n, step), {"etcd": etcd_pid}),
                "b": (partial(baseline_lifecycle, endpoint, n, step), {"etcd": etcd_pid}),
            }
            for key, (pid, address, token) in replicas.items():
                measures[key] = (
                    partial(gpufed_cycles, address, token, n, step),
                    {"etcd": etcd_pid, "replica": pid},
                )
            order = list(measures)
            runs: dict[str, list[tuple[Run, dict[str, float]]]] = {k: [] for k in measures}
            for r in range(rounds):
                # Alternate the order so that drift within a round favours no side.
                for k in order if r % 2 == 0 else reversed(order):
                    measure, pids = measures[k]
                    runs[k].append(with_cpu(measure, pids))
            row: dict[str, Any] = {
                "baseline_a_cas_txn": _pooled(runs["a"]),
                "baseline_b_grant_txn_revoke": _pooled(runs["b"]),
                "gpufed_create_release": _pooled(runs["g"]),
                "gpufed_create_release_unpinned": _pooled(runs["f"]),
            }
            for key, suffix in (("g", ""), ("f", "_unpinned")):
                by_b = [gr.rate / br.rate for (gr, _), (br, _) in zip(runs[key], runs["b"], strict=True)]
                by_a = [gr.rate / ar.rate for (gr, _), (ar, _) in zip(runs[key], runs["a"], strict=True)]
                row[f"ratio_to_b{suffix}"] = round(statistics.median(by_b), 3)
                row[f"ratio_to_b{suffix}_by_round"] = [round(x, 3) for x in by_b]
                row[f"ratio_to_a{suffix}"] = round(statistics.median(by_a), 3)
            results["by_concurrency"][n] = row
    return results


def _pooled(runs: list[tuple[Run, dict[str, float]]]) -> dict[str, Any]:
    """One row for several runs: rates over their summed time, latencies pooled, CPU per op
    weighted by each run's operations."""
    pooled = Run()
    cpu: dict[str, float] = {}
    for r, c in runs:
        pooled.latencies.extend(r.latencies)
        pooled.elapsed += r.elapsed
        for reason, count in r.errors.items():
            pooled.errors[reason] = pooled.errors.get(reason, 0) + count
        for name, ms in c.items():
            cpu[name] = cpu.get(name, 0.0) + ms * len(r.latencies)
    ops = max(1, len(pooled.latencies))
    return {
        **pooled.row(),
        "errors": pooled.errors,
        "cpu_ms_per_op": {k: round(v / ops, 3) for k, v in cpu.items()},
    }
