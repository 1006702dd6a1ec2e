"""Replica configuration: flags, each with a GPUFED_* environment variable as its default."""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from control_plane.affinity import parse_cpu_list


@dataclass
class Config:
    listen: str = "127.0.0.1:50051"
    etcd_endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    etcd_prefix: str = "/gpufed"
    replica_id: str = ""
    advertise: str = ""
    metrics_listen: str = ""
    admin_token: str = ""
    peer_token: str = ""
    report_interval: float = 2.0
    grace_intervals: float = 3.0
    session_ttl: int = 5
    log_calls: bool = False
    search_cache: int = 1024
    cpus: frozenset[int] = frozenset()  # empty: wherever the OS schedules it

    def __post_init__(self) -> None:
        if not self.replica_id:
            self.replica_id = f"r-{uuid.uuid4().hex[:8]}"
        if not self.peer_token:
            # Replicas of one federation share the admin token; it also authenticates peers.
            self.peer_token = self.admin_token


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _cpu_list(text: str) -> frozenset[int]:
    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="gpufed-control-plane", description="gpufed control plane replica")
    p.add_argument(
        "--listen", default=_env("GPUFED_LISTEN", "127.0.0.1:50051"), help="gRPC address (GPUFED_LISTEN)"
    )
    p.add_argument(
        "--etcd-endpoints",
        default=_env("GPUFED_ETCD_ENDPOINTS", "127.0.0.1:2379"),
        help="comma-separated etcd endpoints (GPUFED_ETCD_ENDPOINTS)",
    )
    p.add_argument(
        "--etcd-prefix", default=_env("GPUFED_ETCD_PREFIX", "/gpufed"), help="key prefix (GPUFED_ETCD_PREFIX)"
    )
    p.add_argument(
        "--replica-id", default=_env("GPUFED_REPLICA_ID", ""), help="stable replica id (GPUFED_REPLICA_ID)"
    )
    p.add_argument(
        "--advertise",
        default=_env("GPUFED_ADVERTISE", ""),
        help="address other replicas reach this one at (GPUFED_ADVERTISE; default: --listen)",
    )
    p.add_argument(
        "--metrics-listen",
        default=_env("GPUFED_METRICS_LISTEN", ""),
        help="Prometheus HTTP address, e.g. 127.0.0.1:9464 (GPUFED_METRICS_LISTEN; empty: off)",
    )
    p.add_argument(
        "--report-interval",
        type=float,
        default=float(_env("GPUFED_REPORT_INTERVAL", "2.0")),
        help="seconds between node reports (GPUFED_REPORT_INTERVAL)",
    )
    p.add_argument(
        "--grace-intervals",
        type=float,
        default=float(_env("GPUFED_GRACE_INTERVALS", "3")),
        help="report intervals of silence before a node goes offline (GPUFED_GRACE_INTERVALS)",
    )
    p.add_argument(
        "--session-ttl",
        type=int,
        default=int(_env("GPUFED_SESSION_TTL", "5")),
        help="replica liveness ttl, s",
    )
    p.add_argument("--log-calls", action="store_true", default=_env("GPUFED_LOG_CALLS", "") == "1")
    p.add_argument(
        "--search-cache",
        type=int,
        default=int(_env("GPUFED_SEARCH_CACHE", "1024")),
        help="SearchOffers answers kept per index revision (GPUFED_SEARCH_CACHE; 0: off)",
    )
    p.add_argument(
        "--cpus",
        type=_cpu_list,
        default=_env("GPUFED_CPUS", ""),
        help="run only on these CPUs, e.g. 3 or 0-1 (GPUFED_CPUS; default: any). One replica per core, "
        "each pinned, costs less CPU per RPC than free-floating ones",
    )
    a = p.parse_args(argv)
    return Config(
        listen=a.listen,
        etcd_endpoints=[e.strip() for e in a.etcd_endpoints.split(",") if e.strip()],
        etcd_prefix=a.etcd_prefix,
        replica_id=a.replica_id,
        advertise=a.advertise,
        metrics_listen=a.metrics_listen,
        admin_token=os.environ.get("GPUFED_ADMIN_TOKEN", ""),
        peer_token=os.environ.get("GPUFED_PEER_TOKEN", ""),
        report_interval=a.report_interval,
        grace_intervals=a.grace_intervals,
        session_ttl=a.session_ttl,
        log_calls=a.log_calls,
        search_cache=a.search_cache,
        cpus=a.cpus,
    )
