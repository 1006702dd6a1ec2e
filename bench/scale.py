"""How a replica's cost grows with the federation: 1k, 10k and 100k nodes x 8 GPUs loaded
straight into etcd, beside 100k ended leases of other tenants. For each size: cold start to
SERVING, RSS, SearchOffers uncached p50/p99 over the realistic searches and the filtered one
(model family + countries), SummarizeCapacity, ListLeases p99 of a tenant with 10 leases, and
the etcd keyspace. Targets at 100k nodes: RSS < 1.5 GB, cold start < 30 s, filtered search
p99 < 50 ms, ListLeases p99 < 20 ms.

    python -m bench.scale [--quick] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import etcd3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import ADMIN_TOKEN, fresh_etcd, load_nodes, machine, rss_mb
from bench.search import QUERIES
from control_plane.adapters.keyspace import Keyspace
from gpufed.client import gpu_filter
from gpufed.v1 import discovery_pb2, discovery_pb2_grpc, lease_pb2, lease_pb2_grpc
from tests.harness import PEER_TOKEN, ROOMY_ENV, free_port

PREFIX = "/scale"
FILTERED = {"gpu_model": "H100", "countries": ["DE", "FR"]}
ENDED_LEASES = 100_000
TENANT = "bench"
TENANT_LEASES = 10


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000, 2)


def _timed(n: int, op: Callable[[int], None]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        op(i)
        out.append(time.perf_counter() - t)
    return out


def load_ended_leases(endpoint: str, count: int, seed: int = 2) -> None:
    """Ended leases of 1,000 other tenants plus TENANT_LEASES of the measured tenant, as the
    release Txn writes them (the record by id and under its tenant)."""
    keys = Keyspace(PREFIX)
    host, port = endpoint.split(":")
    c = etcd3.client(host, int(port), timeout=60)
    rng = random.Random(seed)
    ops: list[Any] = []
    now = time.time_ns()
    for i in range(count + TENANT_LEASES):
        tenant = TENANT if i >= count else f"t{i % 1000:04d}"
        lease_id = f"{rng.getrandbits(64):016x}"
        created = now - rng.randrange(0, 86400) * 10**9
        lease = lease_pb2.Lease(name=f"leases/{lease_id}", tenant=tenant, state=lease_pb2.LEASE_STATE_ENDED)
        lease.create_time.FromNanoseconds(created)
        lease.end_time.FromNanoseconds(created + 600 * 10**9)
        lease.gpus.add(
            node="providers/p00/nodes/n00000", provider="p00", node_id="n00000", uuid="GPU-00000-0"
        )
        value = lease.SerializeToString()
        ops.append(c.transactions.put(keys.tenant_history(tenant, created, lease_id), value))
        ops.append(c.transactions.put(keys.lease_history(lease_id), value))
        if len(ops) >= 100:
            c.transaction(compare=[], success=ops, failure=[])
            ops = []
    if ops:
        c.transaction(compare=[], success=ops, failure=[])
    c.close()


def keyspace_bytes(endpoint: str) -> dict[str, int]:
    host, port = endpoint.split(":")
    c = etcd3.client(host, int(port), timeout=60)
    try:
        status = c.status()
        return {"etcd_db_bytes": int(status.db_size)}
    finally:
        c.close()


def measure(size: int, searches: int) -> dict[str, Any]:
    result: dict[str, Any] = {"nodes": size, "gpus": size * 8, "ended_leases": ENDED_LEASES}
    with fresh_etcd("--quota-backend-bytes=8589934592") as etcd:
        endpoint = etcd.endpoints[0]
        t = time.monotonic()
        load_nodes(endpoint, PREFIX, size)
        load_ended_leases(endpoint, ENDED_LEASES)
        result["load_s"] = round(time.monotonic() - t, 1)
        result.update(keyspace_bytes(endpoint))
        port = free_port()
        env = {
            **os.environ,
            **ROOMY_ENV,
            "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN,
            "GPUFED_PEER_TOKEN": PEER_TOKEN,
            "GPUFED_LOG_LEVEL": "WARNING",
            "GPUFED_SEARCH_CACHE": "0",
        }
        args = [sys.executable, "-m", "control_plane", "--listen", f"127.0.0.1:{port}"]
        args += ["--etcd-endpoints", endpoint, "--etcd-prefix", PREFIX]
        with tempfile.TemporaryFile() as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
            try:
                address = f"127.0.0.1:{port}"
                channel = grpc.insecure_channel(address)
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if proc.poll() is not None or time.monotonic() - t0 > 300:
                        log.seek(0)
                        raise RuntimeError(log.read()[-3000:].decode(errors="replace"))
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.1)
                result["cold_start_s"] = round(time.monotonic() - t0, 2)
                result.update(_serve(channel, address, searches))
                result["rss_mb"] = round(rss_mb(proc.pid), 1)
                result["rss_kb_per_node"] = round(result["rss_mb"] * 1024 / size, 2)
                channel.close()
            finally:
                proc.terminate()
                proc.wait(30)
    return result


def _serve(channel: grpc.Channel, address: str, searches: int) -> dict[str, Any]:
    from gpufed.client import Client

    with Client(address, ADMIN_TOKEN) as admin:
        token = admin.create_token("tenant", TENANT).secret
    md = (("authorization", f"Bearer {token}"),)
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    leases = lease_pb2_grpc.LeaseServiceStub(channel)
    every = [
        discovery_pb2.SearchOffersRequest(filter=gpu_filter(**q), page_size=20)  # type: ignore[arg-type]
        for q in QUERIES
    ]
    filtered = discovery_pb2.SearchOffersRequest(filter=gpu_filter(**FILTERED), page_size=20)  # type: ignore[arg-type]
    for r in every:  # warm the connection and the compiled filters
        disc.SearchOffers(r, metadata=md, timeout=30)
    mixed = _timed(searches, lambda i: disc.SearchOffers(every[i % len(every)], metadata=md, timeout=30))
    narrow = _timed(searches, lambda i: disc.SearchOffers(filtered, metadata=md, timeout=30))
    # The worst case: a model nobody has walks every node (searches stop once a page is full).
    nothing = discovery_pb2.SearchOffersRequest(filter=gpu_filter(gpu_model="B300"), page_size=20)
    none_found = _timed(max(5, searches // 20), lambda i: disc.SearchOffers(nothing, metadata=md, timeout=60))
    no_label = discovery_pb2.SearchOffersRequest(filter=gpu_filter(labels={"tier": "gold"}), page_size=20)
    label_missed = _timed(
        max(5, searches // 20), lambda i: disc.SearchOffers(no_label, metadata=md, timeout=60)
    )
    summary = _timed(
        max(5, searches // 20),
        lambda i: disc.SummarizeCapacity(discovery_pb2.SummarizeCapacityRequest(), metadata=md, timeout=60),
    )
    listed = leases.ListLeases(lease_pb2.ListLeasesRequest(), metadata=md, timeout=30)
    assert len(listed.leases) == TENANT_LEASES, len(listed.leases)
    lists = _timed(
        searches, lambda i: leases.ListLeases(lease_pb2.ListLeasesRequest(), metadata=md, timeout=30)
    )
    total = disc.SummarizeCapacity(discovery_pb2.SummarizeCapacityRequest(), metadata=md, timeout=60)
    return {
        "capacity_gpus": sum(b.total_gpus for b in total.buckets),
        "search_all_p50_ms": _pct(mixed, 50),
        "search_all_p99_ms": _pct(mixed, 99),
        "search_filtered_p50_ms": _pct(narrow, 50),
        "search_filtered_p99_ms": _pct(narrow, 99),
        "search_no_match_p50_ms": _pct(none_found, 50),
        "search_label_nobody_has_p50_ms": _pct(label_missed, 50),
        "summarize_p50_ms": _pct(summary, 50),
        "summarize_mean_ms": round(statistics.fmean(summary) * 1000, 2),
        "list_leases_p50_ms": _pct(lists, 50),
        "list_leases_p99_ms": _pct(lists, 99),
    }


def run(sizes: tuple[int, ...] = (1_000, 10_000, 100_000), searches: int = 300) -> dict[str, Any]:
    return {"machine": machine(), "sizes": [measure(n, searches) for n in sizes]}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale")
    p.add_argument("--quick", action="store_true", help="1k and 10k nodes, fewer searches")
    p.add_argument("--sizes", default="", help="comma-separated node counts")
    a = p.parse_args()
    default = (1_000, 10_000) if a.quick else (1_000, 10_000, 100_000)
    sizes = tuple(int(x) for x in a.sizes.split(",")) if a.sizes else default
    print(json.dumps(run(sizes, 100 if a.quick else 300), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
