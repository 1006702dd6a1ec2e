"""Scale-out: lease cycles/s with N replicas, one per core, beside the raw etcd baselines (a) one
CAS Txn and (b) LeaseGrant + CAS Txn + LeaseRevoke, measured in the same run at the same total
concurrency. etcd runs on its own cores, each replica pinned to one (`--cpus`), and the clients
in processes of their own (one per replica, `--clients` threads each), so the figure is the
replicas', not the load generator's.

    python -m bench.scaleout                       # every core there is, N = 1, 2, 4, ...
    python -m bench.scaleout --etcd-cpus 0-3 --replica-cpus 4-15 --clients 8 --duration 15

On a 2-core machine it runs N = 1 (etcd on core 0, the replica on core 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import ADMIN_TOKEN, fresh_etcd, load_nodes, machine
from bench.leases import baseline_cas, baseline_lifecycle, gpufed_cycles
from tests.harness import PEER_TOKEN, ROOMY_ENV, free_port, wait_port

PREFIX = "/scaleout"


def cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def default_layout(cpus: list[int]) -> tuple[list[int], list[int]]:
    """etcd on a quarter of the cores (at least one), replicas on the rest (one core on a
    two-core machine each; a single core is shared)."""
    if len(cpus) == 1:
        return cpus, cpus
    n_etcd = max(1, len(cpus) // 4)
    return cpus[:n_etcd], cpus[n_etcd:]


def replica(endpoint: str, cpu: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        **ROOMY_ENV,
        "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN,
        "GPUFED_PEER_TOKEN": PEER_TOKEN,
        "GPUFED_LOG_LEVEL": "WARNING",
    }
    args = [sys.executable, "-m", "control_plane", "--listen", f"127.0.0.1:{port}", "--cpus", str(cpu)]
    args += ["--etcd-endpoints", endpoint, "--etcd-prefix", PREFIX]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 60)
    return proc, f"127.0.0.1:{port}"


def client_process(address: str, token: str, workers: int, duration: float) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "bench.scaleout", "--client", address, token, str(workers), str(duration)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def run_client(address: str, token: str, workers: int, duration: float) -> None:
    """In a client process: closed-loop lease cycles against one replica; JSON on stdout."""
    r = gpufed_cycles(address, token, workers, duration)
    print(json.dumps({"ops": len(r.latencies), "elapsed": r.elapsed, "row": r.row(), "errors": r.errors}))


def run(
    etcd_cpus: list[int], replica_cpus: list[int], clients: int = 8, duration: float = 12.0, nodes: int = 1000
) -> dict[str, Any]:
    from gpufed.client import Client

    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(replica_cpus)]
    out: dict[str, Any] = {
        "machine": machine(),
        "etcd_cpus": etcd_cpus,
        "replica_cpus": replica_cpus,
        "clients_per_replica": clients,
        "curve": [],
    }
    with fresh_etcd() as etcd:
        member = etcd.members[0]
        assert member.proc is not None
        os.sched_setaffinity(member.proc.pid, etcd_cpus)
        endpoint = etcd.endpoints[0]
        load_nodes(endpoint, PREFIX, nodes)
        for n in counts:
            procs = [replica(endpoint, cpu) for cpu in replica_cpus[:n]]
            try:
                with Client(procs[0][1], ADMIN_TOKEN) as admin:
                    token = admin.create_token("tenant", f"scaleout{n}").secret
                time.sleep(1.0)  # every replica's index has the nodes
                a = baseline_cas(endpoint, n * clients, duration)
                b = baseline_lifecycle(endpoint, n * clients, duration)
                started = [client_process(addr, token, clients, duration) for _, addr in procs]
                results = [json.loads(p.communicate(timeout=duration + 120)[0]) for p in started]
                rate = sum(r["ops"] / r["elapsed"] for r in results)
                out["curve"].append(
                    {
                        "replicas": n,
                        "clients": n * clients,
                        "gpufed_cycles_per_s": round(rate, 1),
                        "a_cas_per_s": round(a.rate, 1),
                        "b_lifecycle_per_s": round(b.rate, 1),
                        "gpufed_over_b": round(rate / b.rate, 3) if b.rate else None,
                        "p99_ms": max(r["row"]["p99_ms"] for r in results),
                        "errors": {k: v for r in results for k, v in r["errors"].items()},
                    }
                )
            finally:
                for proc, _ in procs:
                    proc.terminate()
                for proc, _ in procs:
                    proc.wait(30)
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout")
    p.add_argument(
        "--client", nargs=4, metavar=("ADDRESS", "TOKEN", "WORKERS", "SECONDS"), help=argparse.SUPPRESS
    )
    p.add_argument("--etcd-cpus", default="", help="cores for etcd, e.g. 0-3 (default: a quarter)")
    p.add_argument("--replica-cpus", default="", help="cores for replicas, one each (default: the rest)")
    p.add_argument("--clients", type=int, default=8, help="client threads per replica")
    p.add_argument("--duration", type=float, default=12.0)
    a = p.parse_args()
    if a.client:
        run_client(a.client[0], a.client[1], int(a.client[2]), float(a.client[3]))
        return 0
    etcd_cpus, replica_cpus = default_layout(sorted(os.sched_getaffinity(0)))
    if a.etcd_cpus:
        etcd_cpus = cpu_list(a.etcd_cpus)
    if a.replica_cpus:
        replica_cpus = cpu_list(a.replica_cpus)
    print(json.dumps(run(etcd_cpus, replica_cpus, a.clients, a.duration), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
