"""Replica configuration: flags, GPUFED_* environment variables and an optional TOML file, in the
one precedence of gpufed.settings."""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from control_plane.affinity import parse_cpu_list
from control_plane.domain.quotas import (
    PROVIDER_BOUNDS,
    TENANT_BOUNDS,
    ProviderLimits,
    TenantLimits,
    typed_limits,
)
from gpufed import __version__
from gpufed.settings import Settings, csv, truthy


@dataclass
class Config:
    listen: str = "127.0.0.1:50051"
    etcd_endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    etcd_prefix: str = "/gpufed"
    replica_id: str = ""
    advertise: str = ""
    metrics_listen: str = ""
    # HOST:PORT of the web console (control_plane/console); empty: off. A bare :PORT is loopback;
    # anywhere else it needs TLS (--tls-cert), as the gRPC listener does.
    console_listen: str = ""
    admin_token: str = ""
    peer_token: str = ""
    report_interval: float = 2.0
    grace_intervals: float = 3.0
    session_ttl: int = 5
    log_calls: bool = False
    search_cache: int = 1024
    cpus: frozenset[int] = frozenset()  # empty: wherever the OS schedules it
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""  # set: daemons connect with certificates to node_listen (mTLS)
    node_listen: str = ""
    trust_domain: str = "gpufed.dev"
    peer_ca: str = ""  # CA of the other replicas' certificates (default: client_ca, else system roots)
    insecure: bool = False  # allows plaintext on a non-loopback address
    no_bootstrap_token: bool = False  # ignore GPUFED_ADMIN_TOKEN (real admin tokens exist)
    etcd_ca: str = ""  # set: etcd is reached over TLS (https:// endpoints need it)
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""  # etcd user authentication (the password: GPUFED_ETCD_PASSWORD or the file)
    etcd_password: str = ""
    # SIGTERM: health NOT_SERVING and daemons told to move at once; new streams refused; after
    # shutdown_delay (for load balancers to notice) the streams end and in-flight RPCs drain;
    # the replica is gone within shutdown_grace.
    shutdown_grace: float = 15.0
    shutdown_delay: float = 2.0
    # Least seconds between two node-record writes of one node's non-UNHEALTHY health changes.
    health_write_interval: float = 10.0
    # A lease still PROVISIONING this many seconds after its grant ends PROVISIONING_FAILED
    # (the leader checks): a daemon that died mid-hook must not hold GPUs forever.
    provision_timeout: float = 900.0
    # Usage records that ended longer ago than this are exported (to usage_export_dir, which all
    # replicas should share: any of them may lead) and deleted by the leader. No dir: kept.
    usage_retention_days: float = 90.0
    # Ended leases (and spent request ids) stay readable this long, then etcd deletes them.
    lease_history_hours: float = 24.0
    # Requests waiting for capacity in the whole federation (CreateLease with max_wait).
    max_queued: int = 20_000
    # The queue's fair share: each GPU a tenant holds moves its waiting requests this much later.
    queue_share_s: float = 30.0
    # How long before its end an interruptible lease is told it will be preempted (WatchLease
    # PREEMPTING): by a reservation's start, or for an on-demand request.
    preemption_notice_s: float = 120.0
    # How long a booked reservation's node may be offline before it is moved (or AT_RISK): a
    # restarting daemon is not a lost node. A draining node moves its reservations at once.
    reservation_grace_s: float = 60.0
    usage_export_dir: str = ""
    # Failed authentications one client address may make per minute before AUTH_THROTTLED.
    auth_failures_per_minute: int = 30
    # Default quotas, for principals without their own (AdminService.SetQuota).
    tenant_quota: TenantLimits = field(default_factory=TenantLimits)
    provider_quota: ProviderLimits = field(default_factory=ProviderLimits)

    def __post_init__(self) -> None:
        if not self.replica_id:
            self.replica_id = f"r-{uuid.uuid4().hex[:8]}"


class ConfigError(Exception):
    """The replica cannot start as configured; the message says what to change (exit 2)."""


MIN_BOOTSTRAP_TOKEN = 32


def read_pem(path: str, what: str) -> bytes | None:
    """The file's bytes, None for no path; ConfigError when it cannot be read."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from e


def check_tokens(admin_token: str, peer_token: str) -> None:
    """The bootstrap admin token must be long enough to resist guessing, and the peer credential
    its own: a replica that forwards with the admin token hands every peer operator power."""
    if admin_token and len(admin_token) < MIN_BOOTSTRAP_TOKEN:
        raise ConfigError(
            f"GPUFED_ADMIN_TOKEN must be at least {MIN_BOOTSTRAP_TOKEN} characters "
            "(or leave it unset, or pass --no-bootstrap-token, once real admin tokens exist)"
        )
    if peer_token and len(peer_token) < MIN_BOOTSTRAP_TOKEN:
        raise ConfigError(f"GPUFED_PEER_TOKEN must be at least {MIN_BOOTSTRAP_TOKEN} characters")
    if peer_token and peer_token == admin_token:
        raise ConfigError("GPUFED_PEER_TOKEN must differ from GPUFED_ADMIN_TOKEN")


def _cpu_list(text: str) -> frozenset[int]:
    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Flags > GPUFED_* environment > the TOML file of --config > defaults (gpufed.settings)."""
    p = argparse.ArgumentParser(prog="gpufed-control-plane", description="gpufed control plane replica")
    p.add_argument("--version", action="version", version=f"gpufed-control-plane {__version__}")
    p.add_argument("--config", help="TOML file with any of the settings below (GPUFED_CONFIG_FILE)")
    p.add_argument("--listen", help="gRPC address (GPUFED_LISTEN; default 127.0.0.1:50051)")
    p.add_argument("--etcd-endpoints", help="comma-separated etcd endpoints (GPUFED_ETCD_ENDPOINTS)")
    p.add_argument("--etcd-prefix", help="key prefix (GPUFED_ETCD_PREFIX; default /gpufed)")
    p.add_argument("--replica-id", help="stable replica id (GPUFED_REPLICA_ID)")
    p.add_argument(
        "--advertise", help="address other replicas reach this one at (GPUFED_ADVERTISE; default: --listen)"
    )
    p.add_argument(
        "--metrics-listen",
        help="Prometheus HTTP address, e.g. 127.0.0.1:9464 (GPUFED_METRICS_LISTEN; empty: off)",
    )
    p.add_argument(
        "--console-listen",
        help="the web console's address, e.g. 127.0.0.1:8080 or :8080 for loopback "
        "(GPUFED_CONSOLE_LISTEN; empty: off); HTTPS with --tls-cert, which it needs off loopback",
    )
    p.add_argument(
        "--report-interval", type=float, help="seconds between node reports (GPUFED_REPORT_INTERVAL)"
    )
    p.add_argument(
        "--grace-intervals",
        type=float,
        help="report intervals of silence before a node goes offline (GPUFED_GRACE_INTERVALS)",
    )
    p.add_argument("--session-ttl", type=int, help="replica liveness ttl, s (GPUFED_SESSION_TTL)")
    p.add_argument("--log-calls", action="store_true", default=None, help="log every RPC (GPUFED_LOG_CALLS)")
    p.add_argument(
        "--search-cache",
        type=int,
        help="SearchOffers answers kept per index revision (GPUFED_SEARCH_CACHE; 0: off)",
    )
    p.add_argument(
        "--cpus",
        type=_cpu_list,
        help="run only on these CPUs, e.g. 3 or 0-1 (GPUFED_CPUS; default: any). One replica per core, "
        "each pinned, costs less CPU per RPC than free-floating ones",
    )
    p.add_argument(
        "--tls-cert", help="PEM certificate chain of the gRPC listeners (GPUFED_TLS_CERT); reloaded on change"
    )
    p.add_argument("--tls-key", help="PEM private key (GPUFED_TLS_KEY)")
    p.add_argument(
        "--client-ca",
        help="PEM CA of daemon certificates: NodeService then needs mTLS on --node-listen (GPUFED_CLIENT_CA)",
    )
    p.add_argument(
        "--peer-ca", help="PEM CA of other replicas' certificates (GPUFED_PEER_CA; default --client-ca)"
    )
    p.add_argument("--node-listen", help="mTLS address for daemons, with --client-ca (GPUFED_NODE_LISTEN)")
    p.add_argument(
        "--trust-domain",
        help="SPIFFE trust domain of provider certificates, spiffe://DOMAIN/provider/NAME "
        "(GPUFED_TRUST_DOMAIN)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plaintext on a non-loopback address (a flag or the file's `insecure`, no variable)",
    )
    p.add_argument("--etcd-ca", help="PEM CA of the etcd members: TLS to etcd (GPUFED_ETCD_CA)")
    p.add_argument(
        "--etcd-cert", help="PEM client certificate for etcd's --client-cert-auth (GPUFED_ETCD_CERT)"
    )
    p.add_argument("--etcd-key", help="PEM key of --etcd-cert (GPUFED_ETCD_KEY)")
    p.add_argument(
        "--etcd-user",
        help="etcd user (GPUFED_ETCD_USER); its password from GPUFED_ETCD_PASSWORD, never a flag",
    )
    p.add_argument(
        "--no-bootstrap-token",
        action="store_true",
        default=None,
        help="ignore GPUFED_ADMIN_TOKEN once admin tokens exist in etcd (GPUFED_NO_BOOTSTRAP_TOKEN=1)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds from SIGTERM to exit at most (GPUFED_SHUTDOWN_GRACE; default 15)",
    )
    p.add_argument(
        "--shutdown-delay",
        type=float,
        help="seconds NOT_SERVING before streams end, for load balancers (GPUFED_SHUTDOWN_DELAY; default 2)",
    )
    p.add_argument(
        "--provision-timeout",
        type=float,
        help="seconds a lease may stay PROVISIONING before it ends PROVISIONING_FAILED "
        "(GPUFED_PROVISION_TIMEOUT; default 900)",
    )
    p.add_argument(
        "--usage-retention-days",
        type=float,
        help="usage records older than this are exported and deleted by the leader "
        "(GPUFED_USAGE_RETENTION_DAYS; default 90)",
    )
    p.add_argument(
        "--lease-history-hours",
        type=float,
        help="ended leases and spent request ids stay readable this long (GPUFED_LEASE_HISTORY_HOURS; 24)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        help="requests waiting for capacity in the whole federation, 1..1000000 (GPUFED_MAX_QUEUED; 20000)",
    )
    p.add_argument(
        "--preemption-notice",
        type=float,
        help="seconds of notice an interruptible lease gets before preemption, 1..3600"
        " (GPUFED_PREEMPTION_NOTICE; 120)",
    )
    p.add_argument(
        "--reservation-grace",
        type=float,
        help="seconds a reserved node may be offline before its reservations move, 1..3600"
        " (GPUFED_RESERVATION_GRACE; 60)",
    )
    p.add_argument(
        "--queue-share",
        type=float,
        help="seconds each GPU a tenant holds moves its waiting requests back (GPUFED_QUEUE_SHARE; 30)",
    )
    p.add_argument(
        "--usage-export-dir",
        help="where the leader exports expired usage records as JSON lines; shared by every replica "
        "(GPUFED_USAGE_EXPORT_DIR; default none: records are kept)",
    )
    p.add_argument(
        "--health-write-interval",
        type=float,
        help="least seconds between two health writes of one node, but for UNHEALTHY, which is "
        "written at once (GPUFED_HEALTH_WRITE_INTERVAL; default 10)",
    )
    p.add_argument(
        "--auth-failures-per-minute",
        type=int,
        help="failed authentications per client address and minute before AUTH_THROTTLED "
        "(GPUFED_AUTH_FAILURES_PER_MINUTE; default 30)",
    )
    for name in TENANT_BOUNDS:
        p.add_argument(f"--quota-tenant-{name.replace('_', '-')}", type=float, dest=f"qt_{name}")
    for name in PROVIDER_BOUNDS:
        p.add_argument(f"--quota-provider-{name.replace('_', '-')}", type=float, dest=f"qp_{name}")
    a = p.parse_args(argv)
    s = Settings.from_file(a.config or os.environ.get("GPUFED_CONFIG_FILE", ""))
    d = Config(replica_id="-")  # the defaults
    no_bootstrap = s.get(
        a.no_bootstrap_token, "GPUFED_NO_BOOTSTRAP_TOKEN", "no_bootstrap_token", False, truthy
    )
    cfg = Config(
        listen=s.get(a.listen, "GPUFED_LISTEN", "listen", d.listen),
        etcd_endpoints=s.get(
            csv(a.etcd_endpoints) if a.etcd_endpoints else None,
            "GPUFED_ETCD_ENDPOINTS",
            "etcd_endpoints",
            d.etcd_endpoints,
            csv,
        ),
        etcd_prefix=s.get(a.etcd_prefix, "GPUFED_ETCD_PREFIX", "etcd_prefix", d.etcd_prefix),
        replica_id=s.get(a.replica_id, "GPUFED_REPLICA_ID", "replica_id", ""),
        advertise=s.get(a.advertise, "GPUFED_ADVERTISE", "advertise", ""),
        metrics_listen=s.get(a.metrics_listen, "GPUFED_METRICS_LISTEN", "metrics_listen", ""),
        console_listen=s.get(a.console_listen, "GPUFED_CONSOLE_LISTEN", "console_listen", ""),
        admin_token="" if no_bootstrap else s.get(None, "GPUFED_ADMIN_TOKEN", "admin_token", ""),
        peer_token=s.get(None, "GPUFED_PEER_TOKEN", "peer_token", ""),
        report_interval=s.get(
            a.report_interval, "GPUFED_REPORT_INTERVAL", "report_interval", d.report_interval
        ),
        grace_intervals=s.get(
            a.grace_intervals, "GPUFED_GRACE_INTERVALS", "grace_intervals", d.grace_intervals
        ),
        session_ttl=s.get(a.session_ttl, "GPUFED_SESSION_TTL", "session_ttl", d.session_ttl),
        log_calls=s.get(a.log_calls, "GPUFED_LOG_CALLS", "log_calls", False, truthy),
        search_cache=s.get(a.search_cache, "GPUFED_SEARCH_CACHE", "search_cache", d.search_cache),
        cpus=s.get(a.cpus, "GPUFED_CPUS", "cpus", frozenset(), lambda v: _cpu_list(str(v))),
        tls_cert=s.get(a.tls_cert, "GPUFED_TLS_CERT", "tls_cert", ""),
        tls_key=s.get(a.tls_key, "GPUFED_TLS_KEY", "tls_key", ""),
        client_ca=s.get(a.client_ca, "GPUFED_CLIENT_CA", "client_ca", ""),
        peer_ca=s.get(a.peer_ca, "GPUFED_PEER_CA", "peer_ca", ""),
        node_listen=s.get(a.node_listen, "GPUFED_NODE_LISTEN", "node_listen", ""),
        trust_domain=s.get(a.trust_domain, "GPUFED_TRUST_DOMAIN", "trust_domain", d.trust_domain),
        # No environment variable: GPUFED_INSECURE is the clients' switch, and a shell that set it
        # for a client must not make a replica serve plaintext to the network.
        insecure=s.get(a.insecure, "", "insecure", False, truthy),
        no_bootstrap_token=no_bootstrap,
        etcd_ca=s.get(a.etcd_ca, "GPUFED_ETCD_CA", "etcd_ca", ""),
        etcd_cert=s.get(a.etcd_cert, "GPUFED_ETCD_CERT", "etcd_cert", ""),
        etcd_key=s.get(a.etcd_key, "GPUFED_ETCD_KEY", "etcd_key", ""),
        etcd_user=s.get(a.etcd_user, "GPUFED_ETCD_USER", "etcd_user", ""),
        etcd_password=s.get(None, "GPUFED_ETCD_PASSWORD", "etcd_password", ""),
        shutdown_grace=s.get(a.shutdown_grace, "GPUFED_SHUTDOWN_GRACE", "shutdown_grace", d.shutdown_grace),
        shutdown_delay=s.get(a.shutdown_delay, "GPUFED_SHUTDOWN_DELAY", "shutdown_delay", d.shutdown_delay),
        provision_timeout=s.get(
            a.provision_timeout, "GPUFED_PROVISION_TIMEOUT", "provision_timeout", d.provision_timeout
        ),
        usage_retention_days=s.get(
            a.usage_retention_days,
            "GPUFED_USAGE_RETENTION_DAYS",
            "usage_retention_days",
            d.usage_retention_days,
            float,
        ),
        usage_export_dir=s.get(a.usage_export_dir, "GPUFED_USAGE_EXPORT_DIR", "usage_export_dir", ""),
        lease_history_hours=s.get(
            a.lease_history_hours,
            "GPUFED_LEASE_HISTORY_HOURS",
            "lease_history_hours",
            d.lease_history_hours,
            float,
        ),
        max_queued=s.get(a.max_queued, "GPUFED_MAX_QUEUED", "max_queued", d.max_queued, int),
        preemption_notice_s=s.get(
            a.preemption_notice, "GPUFED_PREEMPTION_NOTICE", "preemption_notice", d.preemption_notice_s, float
        ),
        reservation_grace_s=s.get(
            a.reservation_grace, "GPUFED_RESERVATION_GRACE", "reservation_grace", d.reservation_grace_s, float
        ),
        queue_share_s=s.get(a.queue_share, "GPUFED_QUEUE_SHARE", "queue_share", d.queue_share_s, float),
        health_write_interval=s.get(
            a.health_write_interval,
            "GPUFED_HEALTH_WRITE_INTERVAL",
            "health_write_interval",
            d.health_write_interval,
        ),
        auth_failures_per_minute=s.get(
            a.auth_failures_per_minute,
            "GPUFED_AUTH_FAILURES_PER_MINUTE",
            "auth_failures_per_minute",
            d.auth_failures_per_minute,
        ),
        tenant_quota=_limits(s, a, "qt", "tenant", TENANT_BOUNDS, TenantLimits()),
        provider_quota=_limits(s, a, "qp", "provider", PROVIDER_BOUNDS, ProviderLimits()),
    )
    if not 1 <= cfg.max_queued <= 1_000_000:
        raise ConfigError("--max-queued must be in 1..1000000")
    if not 0 <= cfg.queue_share_s <= 86_400:
        raise ConfigError("--queue-share must be in 0..86400 seconds")
    if not 1 <= cfg.reservation_grace_s <= 3600:
        raise ConfigError("--reservation-grace must be in 1..3600 seconds")
    if not 1 <= cfg.preemption_notice_s <= 3600:
        raise ConfigError("--preemption-notice must be in 1..3600 seconds")
    return cfg


L = TypeVar("L", TenantLimits, ProviderLimits)


def _limits(
    s: Settings, a: argparse.Namespace, dest: str, kind: str, bounds: dict[str, tuple[float, float]], d: L
) -> L:
    """Default quotas: --quota-{kind}-{field}, GPUFED_QUOTA_{KIND}_{FIELD} or quota_{kind}_{field}."""
    values: dict[str, Any] = {}
    for name, (low, high) in bounds.items():
        setting = f"quota_{kind}_{name}"
        default = getattr(d, name)
        env = "GPUFED_" + setting.upper()
        try:
            value = s.get(getattr(a, f"{dest}_{name}"), env, setting, float(default), float)
        except ValueError as e:
            raise ConfigError(f"--quota-{kind}-{name.replace('_', '-')}: {e}") from e
        if not (low <= value <= high):
            raise ConfigError(f"--quota-{kind}-{name.replace('_', '-')} must be in {low:g}..{high:g}")
        values[name] = value
    return replace(d, **typed_limits(type(d), values))
