"""`make bench`: every benchmark, one after another, each on a fresh etcd; prints the results
and writes them to bench/results/latest.json. Copy the figures into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import (
    console,
    handoff,
    ingest,
    lease_latency,
    lease_path,
    leases,
    queue,
    report_cpu,
    reservations,
    scale,
    scaleout,
    search,
    tls,
)
from bench.common import machine
from gpufed.logs import configure_logging


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument(
        "--only",
        choices=[
            *("report_cpu", "search", "ingest", "lease_path", "lease_latency", "leases", "tls", "handoff"),
            *("queue", "reservations", "console", "scale", "scaleout"),
        ],
        action="append",
    )
    p.add_argument("--quick", action="store_true", help="shorter runs (smoke test of the benchmarks)")
    a = p.parse_args()
    configure_logging(level="WARNING")
    scale_factor = 0.3 if a.quick else 1.0
    results: dict[str, Any] = {
        "machine": machine(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "make bench" + (" (--quick)" if a.quick else ""),
    }
    wanted = a.only or [
        *("report_cpu", "search", "ingest", "lease_path", "lease_latency", "leases", "tls", "handoff"),
        *("queue", "reservations", "console", "scale", "scaleout"),
    ]
    if "report_cpu" in wanted:
        results["report_cpu"] = report_cpu.run(reports=int(3000 * scale_factor))
    if "search" in wanted:
        results["search"] = search.run(duration=10 * scale_factor, cache=True)
        results["search_uncached"] = search.run(duration=10 * scale_factor, cache=False)
    if "ingest" in wanted:
        results["ingest"] = ingest.run(duration=10 * scale_factor)
    if "lease_path" in wanted:
        results["lease_path"] = lease_path.run(n=int(3000 * scale_factor))
    if "lease_latency" in wanted:
        results["lease_latency"] = lease_latency.run(cycles=int(500 * scale_factor))
    if "leases" in wanted:
        results["leases"] = leases.run(duration=12 * scale_factor)
    if "tls" in wanted:
        results["tls"] = tls.run(duration=4 * scale_factor, connects=int(100 * scale_factor))
    if "handoff" in wanted:
        results["handoff"] = handoff.run(cycles=int(60 * scale_factor) or 1)
    if "console" in wanted:
        results["console"] = console.run(requests=int(200 * scale_factor) or 1)
    if "queue" in wanted:
        results["queue"] = queue.run((10, 1_000) if a.quick else (10, 10_000), samples=100)
    if "reservations" in wanted:
        results["reservations"] = reservations.run(
            nodes=1_000 if a.quick else 10_000,
            bookings=int(300 * scale_factor),
            searches=int(100 * scale_factor),
        )
    if "scale" in wanted:
        sizes = (1_000, 10_000) if a.quick else (1_000, 10_000, 100_000)
        results["scale"] = scale.run(sizes, searches=100 if a.quick else 300)
    if "scaleout" in wanted:
        etcd_cpus, replica_cpus = scaleout.default_layout(sorted(os.sched_getaffinity(0)))
        results["scaleout"] = scaleout.run(etcd_cpus, replica_cpus, duration=12 * scale_factor)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
