"""Waiting for capacity: from a release to the grant of the queue's head, and what a deep queue
costs the leader.

Every GPU of a small federation is held by 1-GPU leases; `waiters` 1-GPU requests of one tenant
wait behind them. Each sample watches the head (WatchLease, QUEUED first), releases one held
lease and times until the head's GRANTED event arrives: what a developer at the front of the
queue sees. The granted head is held in turn, so the queue only shortens by one a sample.
Beside it, in the same run on the same replica: CreateLease's own latency (an immediate grant,
nothing queued), the baseline the grant from the queue is compared with. The replica's CPU
seconds over the samples give its cost per freed GPU; its RSS before and after queuing, the
memory of the queue.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from bench.common import ADMIN_TOKEN, cpu_seconds, fresh_etcd, load_nodes, replica_process, rss_mb
from gpufed.client import Client, GpufedError
from gpufed.v1 import lease_pb2
from tests.harness import wait_until

W = lease_pb2.WatchLeaseResponse


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def _fill(c: Client) -> list[str]:
    held = []
    while True:
        try:
            held.append(c.create_lease(1, ttl_s=3600, include_degraded=True).name)
        except GpufedError as e:
            if e.reason in ("NO_MATCHING_CAPACITY", "CAPACITY_CONTENDED"):
                return held
            raise


def _grant_ms(c: Client, head: str, release: str) -> float:
    """Release `release`; ms until `head`'s GRANTED arrives on its watch."""
    queued, granted = threading.Event(), threading.Event()
    t0 = [0.0]
    took = [0.0]

    def watch() -> None:
        for ev in c.watch_lease(head):
            if ev.type == W.EVENT_TYPE_QUEUED:
                queued.set()
            elif ev.type == W.EVENT_TYPE_GRANTED:
                took[0] = time.perf_counter() - t0[0]
                granted.set()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    queued.wait(10)
    t0[0] = time.perf_counter()
    c.release_lease(release)
    if not granted.wait(10):
        raise RuntimeError(f"{head} not granted within 10 s of a release")
    t.join(5)
    return took[0] * 1000


def run_one(waiters: int, samples: int, nodes: int = 4) -> dict[str, Any]:
    prefix = f"/bench-queue-{waiters}"
    with fresh_etcd() as etcd:
        load_nodes(etcd.endpoints[0], prefix, nodes)
        env = {"GPUFED_LOG_LEVEL": "WARNING"}
        with replica_process(etcd.endpoints, prefix, "--max-queued", str(waiters + 100), env=env) as (
            proc,
            address,
        ):
            with Client(address, ADMIN_TOKEN) as admin:
                token = admin.create_token("tenant", "bench").secret
                admin.set_quota(
                    "quotas/tenants/bench", max_queued=waiters + 10, max_leases=10_000, max_gpus=10_000
                )
                wait_until(lambda: len(admin.list_nodes(state=1)) == nodes, timeout=60)
            with Client(address, token, retries=0) as c:
                create_ms = []
                for _ in range(200):  # the baseline: an immediate grant
                    t0 = time.perf_counter()
                    lease = c.create_lease(1, ttl_s=60, include_degraded=True)
                    create_ms.append((time.perf_counter() - t0) * 1000)
                    c.release_lease(lease.name)
                held = _fill(c)
                rss_before = rss_mb(proc.pid)
                queued: list[str] = []
                t0 = time.perf_counter()
                while len(queued) < waiters:
                    try:
                        queued.append(
                            c.create_lease(1, ttl_s=3600, max_wait_s=3600, include_degraded=True).name
                        )
                    except GpufedError as e:
                        if e.reason != "UPGRADE_IN_PROGRESS":
                            raise
                        time.sleep(0.2)
                enqueue_s = time.perf_counter() - t0
                time.sleep(1.0)  # the scheduler's passes over the new queue settle
                rss_after = rss_mb(proc.pid)
                cpu0 = cpu_seconds(proc.pid)
                grant_ms = []
                holding = list(held)  # oldest first: the next to release; each granted head joins it
                for i in range(samples):
                    grant_ms.append(_grant_ms(c, queued[i], holding.pop(0)))
                    holding.append(queued[i])
                cpu_per_gpu_ms = (cpu_seconds(proc.pid) - cpu0) / samples * 1000
    return {
        "waiters": waiters,
        "gpus": len(held),
        "samples": samples,
        "grant_from_queue_p50_ms": round(statistics.median(grant_ms), 2),
        "grant_from_queue_p99_ms": round(_pct(grant_ms, 0.99), 2),
        "create_lease_p50_ms": round(statistics.median(create_ms), 2),
        "create_lease_p99_ms": round(_pct(create_ms, 0.99), 2),
        "enqueue_ms_each": round(enqueue_s / waiters * 1000, 2),
        "replica_cpu_ms_per_freed_gpu": round(cpu_per_gpu_ms, 2),
        "replica_rss_mb": round(rss_after, 1),
        "queue_rss_mb": round(rss_after - rss_before, 1),
    }


def run(sizes: tuple[int, ...] = (10, 10_000), samples: int = 100) -> list[dict[str, Any]]:
    return [run_one(n, min(samples, n)) for n in sizes]


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.queue")
    p.add_argument("--sizes", default="10,10000")
    p.add_argument("--samples", type=int, default=100)
    a = p.parse_args()
    print(json.dumps(run(tuple(int(s) for s in a.sizes.split(",")), a.samples), indent=2))
