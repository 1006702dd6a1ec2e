"""Daemon configuration: flags, GPUFED_* environment variables, or a TOML file, in the one
precedence of gpufed.settings (flags win, then the environment, then the file)."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufed import __version__
from gpufed.settings import Settings, csv, truthy
from node_daemon.fake_nvml import PROFILES


@dataclass
class DaemonConfig:
    control_planes: list[str] = field(default_factory=lambda: ["127.0.0.1:50051"])
    provider: str = ""
    node_id: str = ""
    region: str = ""
    country: str = ""
    zone: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    price_per_gpu_hour: float = 0.0
    interruptible_price_per_gpu_hour: float = 0.0
    # The share of this node's GPUs reservations may hold at once (None: all).
    reservable_fraction: float | None = None
    currency: str = "USD"
    labels: dict[str, str] = field(default_factory=dict)
    report_interval: float = 2.0
    fake_nvml: str = ""
    fake_scenario: str = ""
    fake_events: list[str] = field(default_factory=list)
    fake_seed: int = 0
    token: str = ""
    tls: bool = False
    insecure: bool = False  # plaintext to the control plane (loopback only, one warning)
    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    backlog: int = 300
    lease_hook: str = ""  # executable run on each lease's start and end (docs/providers.md)
    lease_hook_timeout: float = 120.0
    state_dir: str = ""  # where the leases handed to the hook are kept across restarts
    # A new boot id is a reboot: it clears a GPU's RESET_GPU / REBOOT_SYSTEM repair.
    boot_id: str = ""
    metrics_listen: str = ""  # HOST:PORT of the dcgm-exporter-compatible /metrics; empty: off
    # dcgm-exporter's label for the host: `hostname` since its #655 (May 2026), `Hostname` before.
    metrics_hostname_label: str = "hostname"


HOSTNAME_LABELS = ("hostname", "Hostname")


def read_boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """The kernel's id of this boot (a reboot changes it); empty where there is none."""
    try:
        with open(path) as f:
            return f.read().strip()[:64]
    except OSError:
        return ""


def _env_list(name: str) -> list[str]:
    v = os.environ.get(name, "")
    return [x.strip() for x in v.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> DaemonConfig:
    p = argparse.ArgumentParser(
        prog="gpufed-node-daemon", description="gpufed node daemon: streams this host's GPUs"
    )
    p.add_argument("--version", action="version", version=f"gpufed-node-daemon {__version__}")
    p.add_argument("--config", default=os.environ.get("GPUFED_DAEMON_CONFIG", ""), help="TOML file")
    p.add_argument("--control-plane", action="append", help="HOST:PORT, repeatable (GPUFED_CONTROL_PLANES)")
    p.add_argument("--provider", help="provider name (GPUFED_PROVIDER)")
    p.add_argument("--node-id", help="node id (GPUFED_NODE_ID; default: hostname)")
    p.add_argument("--region")
    p.add_argument("--country", help="ISO 3166-1 alpha-2 code")
    p.add_argument("--zone")
    p.add_argument("--latitude", type=float)
    p.add_argument("--longitude", type=float)
    p.add_argument("--price-per-gpu-hour", type=float)
    p.add_argument(
        "--reservable-fraction",
        type=float,
        help="share of this node's GPUs reservations may hold at once, 0..1 (default: all)",
    )
    p.add_argument(
        "--interruptible-price",
        type=float,
        help="per GPU-hour for interruptible capacity (preempted with notice); default: the same price",
    )
    p.add_argument("--currency")
    p.add_argument("--label", action="append", help="KEY=VALUE, repeatable")
    p.add_argument(
        "--report-interval", type=float, help="seconds (default 2; the control plane may change it)"
    )
    p.add_argument("--fake-nvml", choices=sorted(PROFILES), help="simulate this machine instead of NVML")
    p.add_argument("--fake-scenario", help="TOML file of fault events for the fake NVML")
    p.add_argument("--fake-event", action="append", help="fault event, e.g. 30s:gpu3:xid=79 (repeatable)")
    p.add_argument("--fake-seed", type=int)
    p.add_argument("--tls", action="store_true", default=None, help="TLS with the system roots (the default)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext, for a replica on loopback (GPUFED_INSECURE=1)",
    )
    p.add_argument("--ca-cert")
    p.add_argument("--client-cert", help="PEM, for mTLS")
    p.add_argument("--client-key", help="PEM, for mTLS")
    p.add_argument("--lease-hook", help="executable run on each lease's start and end (GPUFED_LEASE_HOOK)")
    p.add_argument(
        "--lease-hook-timeout",
        type=float,
        help="seconds before a hook run fails (GPUFED_LEASE_HOOK_TIMEOUT; 120)",
    )
    p.add_argument(
        "--state-dir",
        help="keeps the leases handed to the hook across restarts (GPUFED_STATE_DIR; default "
        "/var/lib/gpufed-node-daemon with --lease-hook)",
    )
    p.add_argument(
        "--metrics-listen",
        help="HOST:PORT for dcgm-exporter-compatible Prometheus metrics at /metrics "
        "(GPUFED_METRICS_LISTEN; off by default; dcgm-exporter's own port is 9400)",
    )
    p.add_argument(
        "--metrics-hostname-label",
        choices=HOSTNAME_LABELS,
        help="the host's label on /metrics (GPUFED_METRICS_HOSTNAME_LABEL): hostname, as current "
        "dcgm-exporter (default), or Hostname for dashboards written before its May 2026 rename "
        "(NVIDIA/dcgm-exporter#655)",
    )
    p.add_argument(
        "--boot-id", help="this boot's id (GPUFED_BOOT_ID; default /proc/sys/kernel/random/boot_id)"
    )
    a = p.parse_args(argv)

    settings = Settings.from_file(a.config)
    file = settings.file
    pick = settings.get
    labels = dict(file.get("labels", {}))
    for item in _env_list("GPUFED_LABELS") + (a.label or []):
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"label {item!r} must be KEY=VALUE")
        labels[k] = v
    planes = pick(a.control_plane, "GPUFED_CONTROL_PLANES", "control_planes", ["127.0.0.1:50051"], csv)
    cfg = DaemonConfig(
        control_planes=list(planes),
        provider=pick(a.provider, "GPUFED_PROVIDER", "provider", ""),
        node_id=pick(a.node_id, "GPUFED_NODE_ID", "node_id", "") or socket.gethostname().lower(),
        region=pick(a.region, "GPUFED_REGION", "region", ""),
        country=pick(a.country, "GPUFED_COUNTRY", "country", "").upper(),
        zone=pick(a.zone, "GPUFED_ZONE", "zone", ""),
        latitude=pick(a.latitude, "GPUFED_LATITUDE", "latitude", 0.0, float),
        longitude=pick(a.longitude, "GPUFED_LONGITUDE", "longitude", 0.0, float),
        price_per_gpu_hour=pick(
            a.price_per_gpu_hour, "GPUFED_PRICE_PER_GPU_HOUR", "price_per_gpu_hour", 0.0, float
        ),
        interruptible_price_per_gpu_hour=pick(
            a.interruptible_price, "GPUFED_INTERRUPTIBLE_PRICE", "interruptible_price", 0.0, float
        ),
        reservable_fraction=pick(
            a.reservable_fraction, "GPUFED_RESERVABLE_FRACTION", "reservable_fraction", None, float
        ),
        currency=pick(a.currency, "GPUFED_CURRENCY", "currency", "USD"),
        labels=labels,
        report_interval=pick(a.report_interval, "GPUFED_REPORT_INTERVAL", "report_interval", 2.0, float),
        fake_nvml=pick(a.fake_nvml, "GPUFED_FAKE_NVML", "fake_nvml", ""),
        fake_scenario=pick(a.fake_scenario, "GPUFED_FAKE_SCENARIO", "fake_scenario", ""),
        fake_events=pick(a.fake_event, "", "fake_events", [], list),
        fake_seed=pick(a.fake_seed, "GPUFED_FAKE_SEED", "fake_seed", 0, int),
        token=pick(None, "GPUFED_TOKEN", "token", ""),
        tls=pick(a.tls, "GPUFED_TLS", "tls", False, truthy),
        insecure=pick(a.insecure, "GPUFED_INSECURE", "insecure", False, truthy),
        ca_cert=pick(a.ca_cert, "GPUFED_CA_CERT", "ca_cert", ""),
        client_cert=pick(a.client_cert, "GPUFED_CLIENT_CERT", "client_cert", ""),
        client_key=pick(a.client_key, "GPUFED_CLIENT_KEY", "client_key", ""),
        lease_hook=pick(a.lease_hook, "GPUFED_LEASE_HOOK", "lease_hook", ""),
        lease_hook_timeout=pick(
            a.lease_hook_timeout, "GPUFED_LEASE_HOOK_TIMEOUT", "lease_hook_timeout", 120.0, float
        ),
        state_dir=pick(a.state_dir, "GPUFED_STATE_DIR", "state_dir", ""),
        boot_id=pick(a.boot_id, "GPUFED_BOOT_ID", "boot_id", "") or read_boot_id(),
        metrics_listen=pick(a.metrics_listen, "GPUFED_METRICS_LISTEN", "metrics_listen", ""),
        metrics_hostname_label=pick(
            a.metrics_hostname_label, "GPUFED_METRICS_HOSTNAME_LABEL", "metrics_hostname_label", "hostname"
        ),
    )
    if cfg.metrics_hostname_label not in HOSTNAME_LABELS:
        p.error(f"metrics_hostname_label must be one of {', '.join(HOSTNAME_LABELS)}")
    if cfg.lease_hook and not cfg.state_dir:
        cfg.state_dir = "/var/lib/gpufed-node-daemon"
    if cfg.lease_hook and not os.access(cfg.lease_hook, os.X_OK):
        p.error(f"--lease-hook {cfg.lease_hook}: not an executable file")
    if not cfg.provider:
        p.error("--provider (or GPUFED_PROVIDER) is required")
    if not cfg.country:
        p.error("--country (or GPUFED_COUNTRY) is required")
    return cfg
