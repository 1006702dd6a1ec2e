"""Paired comparison of lease cycles between two code trees, for measuring one change on a noisy
machine: `python -m bench.compare_trees OLD_TREE NEW_TREE [--clients 1,32] [--rounds 4]`.

One etcd; a replica started from each tree (its own key prefix, 1,000 nodes each); every round
measures baseline (b) once and then both replicas at each concurrency, alternating which goes
first. Prints the median cycles/(b) and the median replica CPU per cycle of each tree. To get an
old tree: `git worktree add /tmp/old HEAD` before the change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Any

from bench.common import ADMIN_TOKEN, cpu_seconds, fresh_etcd, load_nodes
from bench.leases import baseline_lifecycle, gpufed_cycles
from gpufed.client import Client
from tests.harness import ROOMY_ENV, free_port, wait_port, wait_until


def start_replica(
    tree: str, endpoint: str, prefix: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A replica process running the code of `tree`, and its address."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "control_plane", "--listen", f"127.0.0.1:{port}"),
            *("--etcd-endpoints", endpoint, "--etcd-prefix", prefix),
        ],
        cwd=tree,
        env={
            **os.environ,
            "PYTHONPATH": tree,
            "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN,
            "GPUFED_LOG_LEVEL": "WARNING",
            **ROOMY_ENV,  # quotas out of the way (trees without them ignore these)
            **(env or {}),
        },
        stdout=subprocess.DEVNULL,
    )
    wait_port(port, 30)
    return proc, f"127.0.0.1:{port}"


def compare(trees: dict[str, str], clients: list[int], rounds: int, seconds: float) -> dict[str, Any]:
    with fresh_etcd() as etcd:
        endpoint = etcd.endpoints[0]
        procs: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
        try:
            for tag, tree in trees.items():
                load_nodes(endpoint, f"/{tag}", 1000)
                proc, address = start_replica(tree, endpoint, f"/{tag}")
                with Client(address, ADMIN_TOKEN) as admin:
                    token = admin.create_token("tenant", "bench").secret
                    wait_until(lambda a=admin: len(a.list_nodes(state=1)) == 1000, timeout=120)
                procs[tag] = (proc, address, token)
                gpufed_cycles(address, token, 4, 2.0)  # warm-up
            ratios: dict[tuple[int, str], list[float]] = {(n, t): [] for n in clients for t in trees}
            cpu: dict[tuple[int, str], list[float]] = {(n, t): [] for n in clients for t in trees}
            for r in range(rounds):
                for n in clients:
                    b = baseline_lifecycle(endpoint, n, seconds)
                    for tag in list(trees) if r % 2 == 0 else list(reversed(trees)):
                        proc, address, token = procs[tag]
                        before = cpu_seconds(proc.pid)
                        g = gpufed_cycles(address, token, n, seconds)
                        cpu[(n, tag)].append(
                            (cpu_seconds(proc.pid) - before) / max(1, len(g.latencies)) * 1000
                        )
                        ratios[(n, tag)].append(g.rate / b.rate)
            return {
                f"{n} clients, {tag}": {
                    "ratio_to_b_median": round(statistics.median(ratios[(n, tag)]), 3),
                    "replica_cpu_ms_per_cycle_median": round(statistics.median(cpu[(n, tag)]), 3),
                }
                for n in clients
                for tag in trees
            }
        finally:
            for proc, _, _ in procs.values():
                proc.terminate()
                proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_trees")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--clients", default="1,32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=2.5)
    a = p.parse_args()
    out = compare(
        {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)},
        [int(x) for x in a.clients.split(",")],
        a.rounds,
        a.seconds,
    )
    for row, figures in out.items():
        print(row, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
