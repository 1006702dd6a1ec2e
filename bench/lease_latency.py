"""Where one lease cycle's time goes at one client, from both ends of each hop.

A client runs CreateLease + ReleaseLease back to back and times each call; the replica's own
/metrics give, over the same calls, its handling time per RPC and the time of its etcd Txns.
Beside them, measured in the same rounds: a health check round trip to the replica (the floor
of any client -> replica RPC) and one compare-and-swap Txn straight to etcd with python3-etcd3
(the floor of any etcd write). The differences say what each hop adds:

  transport  = client-observed call - replica handling   (both gRPC stacks, both directions)
  handler    = replica handling - its Txn                 (auth, validation, placement, records)
  txn        = the replica's Txn                          (etcd's commit plus the replica's
                                                          asyncio client, and whatever the event
                                                          loop ran before the Txn's answer)

etcd runs with `--metrics extensive`, so its own handling time of each Txn (from the moment its
gRPC server has the request to its answer) splits both Txns further: what is etcd's, and what the
caller's gRPC client and, for the replica, its event loop add.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from typing import Any

import etcd3
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ADMIN_TOKEN, fresh_etcd, load_nodes, pinned_replica_args, replica_process
from gpufed.client import Client
from tests.harness import free_port, wait_until

_CREATE = "LeaseService.CreateLease"
_RELEASE = "LeaseService.ReleaseLease"


def _sums(metrics_address: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the replica's RPC latency by method, and of its etcd Txn latency."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("gpufed_rpc_latency_seconds", "gpufed_etcd_txn_latency_seconds"):
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                key = s.labels.get("method", "txn")
                pair = out.setdefault(key, [0.0, 0.0])
                pair[0 if s.name.endswith("_sum") else 1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _etcd_txn(endpoint: str) -> tuple[float, float]:
    """(sum, count) of etcd's own handling time of Txn calls (needs --metrics extensive)."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "grpc_server_handling_seconds":
            continue
        for s in family.samples:
            if s.labels.get("grpc_method") == "Txn":
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
    return total, count


def _delta_ms(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1000


def _mean_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], key: str
) -> float:
    s0, c0 = before.get(key, (0.0, 0.0))
    s1, c1 = after[key]
    return (s1 - s0) / max(1.0, c1 - c0) * 1000


def _timed_ms(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def run(nodes: int = 1000, cycles: int = 500, rounds: int = 3) -> dict[str, Any]:
    prefix = "/bench-latency"
    metrics_address = f"127.0.0.1:{free_port()}"
    rows: list[dict[str, float]] = []
    with fresh_etcd("--metrics", "extensive") as etcd:
        endpoint = etcd.endpoints[0]
        load_nodes(endpoint, prefix, nodes)
        extra = ("--metrics-listen", metrics_address, *pinned_replica_args())
        with replica_process(etcd.endpoints, prefix, *extra, env={"GPUFED_LOG_LEVEL": "WARNING"}) as (
            _,
            address,
        ):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                wait_until(lambda: len(admin.list_nodes(state=1)) == nodes, timeout=120)
            host, port = endpoint.split(":")
            etcd_client = etcd3.client(host, int(port))
            client = Client(address, token, retries=0)
            health = health_pb2_grpc.HealthStub(client.channel)
            serial = iter(range(10**9))

            def raw_txn() -> None:
                k = f"/bench-latency-raw/{next(serial)}"
                tx = etcd_client.transactions
                etcd_client.transaction(compare=[tx.create(k) == 0], success=[tx.put(k, "x")], failure=[])

            def health_check() -> None:
                health.Check(health_pb2.HealthCheckRequest())

            create_ms: list[float] = []
            release_ms: list[float] = []

            def cycle() -> None:
                t0 = time.perf_counter()
                lease = client.create_lease(1, ttl_s=60)
                t1 = time.perf_counter()
                client.release_lease(lease.name)
                create_ms.append((t1 - t0) * 1000)
                release_ms.append((time.perf_counter() - t1) * 1000)

            _timed_ms(cycle, 100)  # warm-up: pools, connections, code paths
            for _ in range(rounds):
                create_ms.clear()
                release_ms.clear()
                etcd_before_raw = _etcd_txn(endpoint)
                raw = _timed_ms(raw_txn, cycles)
                etcd_raw = _delta_ms(etcd_before_raw, _etcd_txn(endpoint))
                check = _timed_ms(health_check, cycles)
                before = _sums(metrics_address)
                etcd_before = _etcd_txn(endpoint)
                _timed_ms(cycle, cycles)
                etcd_replica = _delta_ms(etcd_before, _etcd_txn(endpoint))
                after = _sums(metrics_address)
                replica_create = _mean_ms(before, after, _CREATE)
                replica_release = _mean_ms(before, after, _RELEASE)
                txn = _mean_ms(before, after, "txn")
                create, release = statistics.fmean(create_ms), statistics.fmean(release_ms)
                rows.append(
                    {
                        "etcd_raw_txn_ms": raw,
                        "etcd_handling_of_raw_txn_ms": etcd_raw,
                        "raw_txn_client_ms": raw - etcd_raw,
                        "health_check_rtt_ms": check,
                        "cycle_ms": create + release,
                        "create_ms": create,
                        "release_ms": release,
                        "replica_create_ms": replica_create,
                        "replica_release_ms": replica_release,
                        "replica_txn_ms": txn,
                        "etcd_handling_of_replica_txn_ms": etcd_replica,
                        "replica_txn_client_ms": txn - etcd_replica,
                        "transport_per_rpc_ms": (create + release - replica_create - replica_release) / 2,
                        "handler_per_rpc_ms": (replica_create + replica_release) / 2 - txn,
                    }
                )
            client.close()
    # The median round of each figure: the machine's speed drifts between rounds.
    return {
        "nodes": nodes,
        "cycles_per_round": cycles,
        "rounds": rounds,
        **{k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]},
    }
