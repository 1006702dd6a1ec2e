"""Reservations at 10,000 nodes: what a booking costs, and what a window costs a search.

10,000 nodes of 8 GPUs (bench.common.fake_node) straight into a fresh etcd, one replica with the
search cache off (every search is evaluated). In the same run, on the same replica:

- CreateReservation of 1-8 H100s somewhere in the next 30 days for 1-72 h, `bookings` times,
  as the calendars fill; beside it the baseline, CreateLease's own latency (an immediate grant);
- SearchOffers (H100, in DE, a page of 50) with a 72 h window next week and without one;
- SummarizeCapacity (H100) with the same window and without one (the index's tallies).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from bench.common import ADMIN_TOKEN, cpu_seconds, fresh_etcd, load_nodes, replica_process
from gpufed.client import Client, GpufedError, gpu_filter
from gpufed.v1 import discovery_pb2
from tests.harness import wait_until

DAY = 86_400


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _row(name: str, ms: list[float]) -> dict[str, float]:
    return {f"{name}_p50_ms": round(statistics.median(ms), 2), f"{name}_p99_ms": round(_pct(ms, 0.99), 2)}


def run(nodes: int = 10_000, bookings: int = 300, searches: int = 100, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    prefix = "/bench-reservations"
    with fresh_etcd() as etcd:
        load_nodes(etcd.endpoints[0], prefix, nodes)
        env = {"GPUFED_LOG_LEVEL": "WARNING"}
        with replica_process(etcd.endpoints, prefix, "--search-cache", "0", env=env) as (proc, address):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                admin.set_quota(
                    "quotas/tenants/bench",
                    max_leases=10_000,
                    max_gpus=10_000,
                    max_reserved_gpu_hours=10_000_000,
                    reads_per_second=10_000,
                    read_burst=100_000,
                )
                wait_until(lambda: len(admin.list_nodes(state=1)) >= nodes, timeout=120, interval=0.5)
            with Client(address, token, retries=0) as c:

                def opened() -> bool:
                    try:
                        c.cancel_reservation(c.create_reservation(1, time.time() + DAY, 60).name)
                    except GpufedError as e:
                        if e.reason == "UPGRADE_IN_PROGRESS":
                            return False
                        raise
                    return True

                wait_until(opened, timeout=60, interval=0.5)

                def lease_cycle() -> None:
                    c.release_lease(c.create_lease(1, ttl_s=60, gpu_model="H100").name)

                create_ms = _timed(lease_cycle, 200)
                now = time.time()
                book_ms: list[float] = []
                refused = 0
                cpu0 = cpu_seconds(proc.pid)
                for _ in range(bookings):
                    start = now + rng.uniform(DAY, 30 * DAY)
                    t0 = time.perf_counter()
                    try:
                        c.create_reservation(
                            rng.randint(1, 8), start, rng.randint(1, 72) * 3600, gpu_model="H100"
                        )
                    except GpufedError:
                        refused += 1
                    book_ms.append((time.perf_counter() - t0) * 1000)
                cpu_per_booking = (cpu_seconds(proc.pid) - cpu0) / bookings * 1000

                window_from = timestamp_pb2.Timestamp(seconds=int(now + 7 * DAY))
                window_for = duration_pb2.Duration(seconds=3 * DAY)
                flt = gpu_filter(gpu_model="H100", countries=["DE"])

                def search(windowed: bool) -> Callable[[], object]:
                    req = discovery_pb2.SearchOffersRequest(filter=flt, page_size=50)
                    if windowed:
                        req.available_from.CopyFrom(window_from)
                        req.available_for.CopyFrom(window_for)
                    return lambda: c.call(c.discovery.SearchOffers, req)

                def summary(windowed: bool) -> Callable[[], object]:
                    req = discovery_pb2.SummarizeCapacityRequest(filter=gpu_filter(gpu_model="H100"))
                    if windowed:
                        req.available_from.CopyFrom(window_from)
                        req.available_for.CopyFrom(window_for)
                    return lambda: c.call(c.discovery.SummarizeCapacity, req)

                out: dict[str, Any] = {"nodes": nodes, "bookings": bookings, "refused": refused}
                out |= _row("create_lease", create_ms)
                out |= _row("create_reservation", book_ms)
                out["replica_cpu_ms_per_booking"] = round(cpu_per_booking, 2)
                out |= _row("search_offers", _timed(search(False), searches))
                out |= _row("search_offers_window", _timed(search(True), searches))
                out |= _row("summarize", _timed(summary(False), searches))
                out |= _row("summarize_window", _timed(summary(True), max(10, searches // 5)))
                return out


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.reservations")
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--bookings", type=int, default=300)
    p.add_argument("--searches", type=int, default=100)
    a = p.parse_args()
    print(json.dumps(run(a.nodes, a.bookings, a.searches), indent=2))
