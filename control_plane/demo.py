"""`make run`: the embedded default. A local etcd member (data under .run/), one control plane
replica and a demo federation of simulated providers (fake NVML) in several countries; one GPU
fails with XID 79 partway. Prints what to try next; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoNode:
    provider: str
    node_id: str
    country: str
    region: str
    latitude: float
    longitude: float
    profile: str
    price: float
    events: tuple[str, ...] = ()


NODES = [
    DemoNode("neocloud-berlin", "de-ber-1", "DE", "eu-central", 52.52, 13.40, "h100-sxm-8", 2.49),
    DemoNode("neocloud-berlin", "de-ber-2", "DE", "eu-central", 52.52, 13.40, "h200-8", 3.60),
    DemoNode("nordic-gpu", "fi-hel-1", "FI", "eu-north", 60.17, 24.94, "a100-80g-8", 1.69),
    DemoNode("nordic-gpu", "se-sto-1", "SE", "eu-north", 59.33, 18.07, "l40s-4", 0.99),
    DemoNode(
        "gallic-compute", "fr-par-1", "FR", "eu-west", 48.86, 2.35, "h100-sxm-8", 2.79, ("45s:gpu3:xid=79",)
    ),
    DemoNode("atlantic-ai", "us-ash-1", "US", "us-east", 39.04, -77.49, "h100-sxm-8", 2.19),
    DemoNode("atlantic-ai", "ca-mtl-1", "CA", "ca-east", 45.50, -73.57, "a100-mig", 1.20),
]
PROVIDERS = sorted({n.provider for n in NODES})
DCGM_NODE = "de-ber-1"
# Tenant "acme" owns two hosts: its private pool, which no other tenant sees; its leases fill
# them first and burst into the federation when they are full. Internal price 0.
POOL_TENANT = "acme"
POOL = [
    DemoNode("acme-own", "acme-gpu-1", "DE", "eu-central", 50.11, 8.68, "l40s-4", 0.0),
    DemoNode("acme-own", "acme-gpu-2", "DE", "eu-central", 50.11, 8.68, "l40s-4", 0.0),
]


def _etcd_binary() -> str:
    path = os.environ.get("ETCD_BIN") or shutil.which("etcd")
    if not path:
        sys.exit("no etcd binary: install Debian's etcd-server (make run does) or set ETCD_BIN")
    return path


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.data = Path(args.data_dir).resolve()
        self.logs = self.data / "logs"

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child's lifetime)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT
        )
        self.procs.append((name, proc))
        return proc

    def start(self) -> dict[str, str]:
        a = self.args
        if a.fresh and self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True, exist_ok=True)
        etcd_dir = self.data / "etcd"
        self.spawn(
            "etcd",
            [
                _etcd_binary(),
                "--name",
                "demo",
                "--data-dir",
                str(etcd_dir),
                "--listen-client-urls",
                f"http://127.0.0.1:{a.etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{a.etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{a.etcd_peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{a.etcd_peer_port}",
                "--initial-cluster",
                f"demo=http://127.0.0.1:{a.etcd_peer_port}",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
        )
        _wait_port(a.etcd_port)
        endpoint = f"127.0.0.1:{a.port}"
        self.spawn(
            "control-plane",
            [
                sys.executable,
                "-m",
                "control_plane",
                "--listen",
                endpoint,
                "--etcd-endpoints",
                f"127.0.0.1:{a.etcd_port}",
                "--etcd-prefix",
                "/gpufed",
                "--metrics-listen",
                f"127.0.0.1:{a.metrics_port}",
                "--console-listen",
                f"127.0.0.1:{a.console_port}",
                # Usage records past the retention (90 days) are exported here, then deleted.
                "--usage-export-dir",
                str(self.data / "usage-export"),
                "--replica-id",
                "demo-1",
            ],
            env={"GPUFED_ADMIN_TOKEN": a.admin_token, "GPUFED_LOG_FORMAT": "json"},
        )
        _wait_port(a.port)

        from gpufed.client import Client

        with Client(endpoint, a.admin_token, insecure=True) as admin:
            tenant = admin.create_token("tenant", "demo-developer").secret
            pool_tenant = admin.create_token("tenant", POOL_TENANT).secret
            provider_tokens = {p: admin.create_token("provider", p).secret for p in PROVIDERS}
            for p in {n.provider for n in POOL}:
                provider_tokens[p] = admin.create_token("provider", p, private_to=POOL_TENANT).secret
        for n in NODES + POOL:
            cmd = [
                sys.executable,
                "-m",
                "node_daemon",
                "--insecure",  # the demo's replica serves plaintext on loopback
                "--control-plane",
                endpoint,
                "--provider",
                n.provider,
                "--node-id",
                n.node_id,
                "--country",
                n.country,
                "--region",
                n.region,
                "--latitude",
                str(n.latitude),
                "--longitude",
                str(n.longitude),
                "--price-per-gpu-hour",
                str(n.price),
                # Idle GPUs sold as interruptible capacity at 40 % (preempted with notice).
                "--interruptible-price",
                f"{n.price * 0.4:.2f}",
                "--fake-nvml",
                n.profile,
                "--report-interval",
                "2",
                "--label",
                f"provider-tier={'premium' if n.price > 2.5 else 'standard'}",
                # The demo's hook answers plausible access details and touches nothing.
                "--lease-hook",
                str(ROOT / "hooks" / "demo.py"),
                "--state-dir",
                str(self.data / "daemons" / n.node_id),
            ]
            for ev in n.events:
                cmd += ["--fake-event", ev]
            if n.node_id == DCGM_NODE:  # dcgm-exporter's metrics, as a provider scrapes them
                cmd += ["--metrics-listen", f"127.0.0.1:{a.dcgm_port}"]
            self.spawn(
                f"daemon-{n.node_id}",
                cmd,
                env={"GPUFED_TOKEN": provider_tokens[n.provider], "GPUFED_LOG_FORMAT": "json"},
            )
        env = {
            "GPUFED_ENDPOINT": endpoint,
            "GPUFED_TOKEN": tenant,
            "GPUFED_ADMIN_TOKEN": a.admin_token,
            "GPUFED_ACME_TOKEN": pool_tenant,  # the tenant with a private pool
            "GPUFED_INSECURE": "1",  # plaintext to the loopback replica; TLS everywhere else
        }
        (self.data / "demo.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
        with Client(endpoint, tenant, insecure=True) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(c.list_nodes(state=1)) < len(NODES):
                time.sleep(0.2)
        return env

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def banner(env: dict[str, str], args: argparse.Namespace, data: Path) -> str:
    gpufed = f"{Path(sys.executable).parent}/gpufed"
    return f"""
gpufed demo is up: 1 etcd member, 1 control plane, {len(NODES)} nodes of {len(PROVIDERS)} providers in
{len({n.country for n in NODES})} countries (fake NVML); tenant {POOL_TENANT} has a private pool of
{len(POOL)} nodes.
GPU 3 of gallic-compute/fr-par-1 fails with XID 79 after 45 s.

  control plane  {env["GPUFED_ENDPOINT"]}   (gRPC, reflection + health on)
  console        http://127.0.0.1:{args.console_port}/   (sign in with a token of {data / "demo.env"}:
                 GPUFED_TOKEN a tenant, GPUFED_ACME_TOKEN the tenant with a pool, GPUFED_ADMIN_TOKEN)
  metrics        http://127.0.0.1:{args.metrics_port}/metrics
  dcgm metrics   http://127.0.0.1:{args.dcgm_port}/metrics   (node {DCGM_NODE}, dcgm-exporter's names)
  logs           {data / "logs"}

Try, in another terminal:

  source {data / "demo.env"}
  {gpufed} offers search --model H100 --country DE,FR
  {gpufed} capacity
  {gpufed} offers search --mig-profile 1g.10gb                          # MIG instances (ca-mtl-1)
  {gpufed} offers search --near 50.1,8.7,800 --order-by distance
  {gpufed} lease create --count 4 --model H100 --country DE --hold      # Ctrl-C releases it
  {gpufed} lease create --count 1 --ssh-key ~/.ssh/id_ed25519.pub --wait # prints how to log in
  GPUFED_TOKEN=$GPUFED_ACME_TOKEN {gpufed} pool list                      # acme's own 2 nodes
  GPUFED_TOKEN=$GPUFED_ACME_TOKEN {gpufed} offers search --model L40S      # own first, then the federation
  {gpufed} lease list
  GPUFED_TOKEN=$GPUFED_ADMIN_TOKEN {gpufed} nodes get providers/gallic-compute/nodes/fr-par-1
  GPUFED_TOKEN=$GPUFED_ADMIN_TOKEN {gpufed} nodes telemetry providers/neocloud-berlin/nodes/de-ber-1
  GPUFED_TOKEN=$GPUFED_ADMIN_TOKEN {gpufed} admin usage
  grpcurl -plaintext -H "authorization: Bearer $GPUFED_TOKEN" \\
      -d '{{"filter": {{"gpu_model": "H100"}}}}' \\
      {env["GPUFED_ENDPOINT"]} gpufed.v1.DiscoveryService/SearchOffers

Ctrl-C stops everything.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m control_plane.demo", description=__doc__)
    p.add_argument("--port", type=int, default=int(os.environ.get("GPUFED_DEMO_PORT", "50051")))
    p.add_argument("--etcd-port", type=int, default=int(os.environ.get("GPUFED_DEMO_ETCD_PORT", "2379")))
    p.add_argument(
        "--etcd-peer-port", type=int, default=int(os.environ.get("GPUFED_DEMO_ETCD_PEER_PORT", "2380"))
    )
    p.add_argument(
        "--console-port", type=int, default=int(os.environ.get("GPUFED_DEMO_CONSOLE_PORT", "8080"))
    )
    p.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("GPUFED_DEMO_METRICS_PORT", "9464"))
    )
    p.add_argument("--dcgm-port", type=int, default=int(os.environ.get("GPUFED_DEMO_DCGM_PORT", "9400")))
    p.add_argument("--data-dir", default=str(ROOT / ".run"))
    p.add_argument(
        "--admin-token",
        default=os.environ.get("GPUFED_ADMIN_TOKEN") or secrets.token_urlsafe(32),
        help="the bootstrap admin token (default: a new random one, written to .run/demo.env)",
    )
    p.add_argument("--fresh", action="store_true", default=True, help="start from an empty etcd (default)")
    p.add_argument(
        "--keep-data", dest="fresh", action="store_false", help="reuse .run/etcd from a previous run"
    )
    args = p.parse_args(argv)
    demo = Demo(args)
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        env = demo.start()
        print(banner(env, args, demo.data), flush=True)
        while not stop["now"]:
            for name, proc in demo.procs:
                if proc.poll() is not None and name in ("etcd", "control-plane"):
                    print(f"{name} exited ({proc.returncode}); see {demo.logs / (name + '.log')}", flush=True)
                    stop["now"] = True
            time.sleep(0.3)
    finally:
        print("stopping…", flush=True)
        demo.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
