"""Shared benchmark plumbing: a fresh etcd, nodes loaded straight into it, replica processes,
closed-loop clients, latency statistics, CPU and memory of a process."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import etcd3

from control_plane.domain.names import node_name
from gpufed import __version__
from gpufed.v1 import common_pb2
from node_daemon.fake_nvml import PROFILES
from tests.harness import ADMIN_TOKEN, EtcdCluster, replica_process

__all__ = ["ADMIN_TOKEN", "EtcdCluster", "replica_process"]


def pinned_replica_args() -> tuple[str, ...]:
    """`--cpus` for a benchmark replica: the last CPU this process may use, so that the replica
    runs pinned as we deploy it (one replica per core) while etcd and the clients keep every
    core, the replica's included. Nothing on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    return ("--cpus", str(cpus[-1])) if len(cpus) > 1 else ()


COUNTRIES = {
    "DE": (50.1, 8.7),
    "FR": (48.9, 2.4),
    "NL": (52.4, 4.9),
    "FI": (60.2, 24.9),
    "SE": (59.3, 18.1),
    "GB": (51.5, -0.1),
    "IE": (53.3, -6.3),
    "ES": (40.4, -3.7),
    "IT": (45.5, 9.2),
    "PL": (52.2, 21.0),
    "US": (39.0, -77.5),
    "CA": (45.5, -73.6),
    "JP": (35.7, 139.7),
    "SG": (1.35, 103.8),
    "IN": (19.1, 72.9),
}
PROFILE_CHOICES = ["h100-sxm-8", "a100-80g-8", "h200-8", "h100-sxm-8"]


def fake_node(i: int, rng: random.Random) -> common_pb2.Node:
    country = rng.choice(sorted(COUNTRIES))
    lat, lon = COUNTRIES[country]
    provider = f"p{i % 20:02d}"
    node_id = f"n{i:05d}"
    profile = PROFILES[rng.choice(PROFILE_CHOICES)]
    node = common_pb2.Node(
        name=node_name(provider, node_id),
        provider=provider,
        node_id=node_id,
        location=common_pb2.Location(
            region=f"{country.lower()}-1",
            country_code=country,
            latitude=lat + rng.uniform(-1, 1),
            longitude=lon + rng.uniform(-1, 1),
        ),
        price_per_gpu_hour=round(rng.uniform(0.8, 4.0), 2),
        currency_code="USD",
        labels={"tier": rng.choice(["standard", "premium"])},
        daemon_version=__version__,
    )
    for g, spec in enumerate(profile):
        node.gpus.add(
            uuid=f"GPU-{i:05d}-{g}",
            index=g,
            model=spec.name,
            memory_total_bytes=spec.memory_bytes,
            health=common_pb2.GPU_HEALTH_HEALTHY,
        )
    return node


def load_nodes(endpoint: str, prefix: str, count: int, seed: int = 1) -> None:
    """Node records and alive keys straight into etcd (alive keys on one 1-hour lease)."""
    host, port = endpoint.split(":")
    c = etcd3.client(host, int(port), timeout=30)
    lease = c.lease(3600)
    rng = random.Random(seed)
    ops = []
    for i in range(count):
        node = fake_node(i, rng)
        ops.append(
            c.transactions.put(f"{prefix}/nodes/{node.provider}/{node.node_id}", node.SerializeToString())
        )
        ops.append(
            c.transactions.put(f"{prefix}/alive/{node.provider}/{node.node_id}", "bench/static", lease=lease)
        )
        if len(ops) >= 100:
            c.transaction(compare=[], success=ops, failure=[])
            ops = []
    if ops:
        c.transaction(compare=[], success=ops, failure=[])
    c.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Run:
    """Closed-loop results: every latency in seconds, and the wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000

    def row(self) -> dict[str, float]:
        return {
            "ops": len(self.latencies),
            "rate": round(self.rate, 1),
            "p50_ms": round(self.pct(50), 2),
            "p99_ms": round(self.pct(99), 2),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2) if self.latencies else float("nan"),
        }


def closed_loop(workers: int, duration: float, make_op: Callable[[int], Callable[[], None]]) -> Run:
    """`workers` threads each run their op back to back for `duration` seconds."""
    run = Run()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(i: int) -> None:
        op = make_op(i)
        local: list[float] = []
        errors: dict[str, int] = {}
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                op()
            except Exception as e:  # counted, not fatal: contention is part of the load
                name = getattr(e, "reason", "") or type(e).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            local.append(time.perf_counter() - t)
        with lock:
            run.latencies.extend(local)
            for k, v in errors.items():
                run.errors[k] = run.errors.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.elapsed = time.monotonic() - t0
    return run


@contextmanager
def fresh_etcd(*extra_args: str) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.start(1, extra_args=extra_args)
    try:
        yield cluster
    finally:
        cluster.stop()


def machine() -> str:
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 1024 / 1024
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cores} cores ({model}), {mem_gb:.0f} GiB"
