"""A small federation on loopback for integration tests: two replicas, five daemons over fake NVML
in five countries, half streaming to each replica."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpufed.client import Client
from node_daemon.fake_nvml import FakeNvml, parse_event
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    wait_until,
)

# provider, node, country, region, lat, lon, profile, price, labels, fault
NODES = [
    ("neo", "fra-1", "DE", "eu-central", 50.11, 8.68, "h100-sxm-8", 2.9, {"tier": "premium"}, None),
    ("neo", "par-1", "FR", "eu-west", 48.86, 2.35, "a100-80g-8", 1.8, {}, None),
    ("acme", "ams-1", "NL", "eu-west", 52.37, 4.90, "l40s-4", 0.9, {}, None),
    ("acme", "nyc-1", "US", "us-east", 40.71, -74.00, "h200-8", 3.5, {"tier": "premium"}, None),
    ("blue", "hel-1", "FI", "eu-north", 60.17, 24.94, "h100-sxm-8", 2.2, {}, "0:0:thermal"),
]


@dataclass
class Federation:
    replicas: list[ReplicaThread]
    daemons: dict[str, DaemonThread] = field(default_factory=dict)
    fakes: dict[str, FakeNvml] = field(default_factory=dict)
    tenant_token: str = ""
    provider_tokens: dict[str, str] = field(default_factory=dict)

    def client(self, i: int = 0, token: str | None = None) -> Client:
        return Client(self.replicas[i].address, token if token is not None else self.tenant_token)

    def admin(self, i: int = 0) -> Client:
        return Client(self.replicas[i].address, ADMIN_TOKEN)

    def stop(self) -> None:
        for d in self.daemons.values():
            d.stop()
        for r in self.replicas:
            r.stop()


def start_federation(
    etcd: EtcdCluster,
    prefix: str,
    report_interval: float = 0.5,
    nodes: list[tuple[Any, ...]] = NODES,
    **replica_kw: Any,
) -> Federation:
    replicas = [
        ReplicaThread(
            replica_config(etcd.endpoints, prefix, report_interval=report_interval, **replica_kw)
        ).start()
        for _ in range(2)
    ]
    fed = Federation(replicas)
    with fed.admin() as admin:
        fed.tenant_token = admin.create_token("tenant", "dev").secret
        for provider in sorted({n[0] for n in nodes}):
            fed.provider_tokens[provider] = admin.create_token("provider", provider).secret
    for i, (provider, node, country, region, lat, lon, profile, price, labels, fault) in enumerate(nodes):
        fake = FakeNvml(profile, host=f"{provider}/{node}", scenario=[parse_event(fault)] if fault else [])
        home = replicas[i % 2].address
        cfg = daemon_config(
            [home],
            fed.provider_tokens[provider],
            provider,
            node,
            country,
            region=region,
            latitude=lat,
            longitude=lon,
            price_per_gpu_hour=price,
            labels=labels,
            report_interval=report_interval,
        )
        fed.fakes[node] = fake
        fed.daemons[node] = DaemonThread(cfg, fake).start()
    names = {f"providers/{n[0]}/nodes/{n[1]}" for n in nodes}
    for r in replicas:
        with Client(r.address, ADMIN_TOKEN) as c:
            wait_until(lambda c=c: {n.name for n in c.list_nodes(state=1)} == names, timeout=20)
            # The thermal fault must have reached the record before tests look at health.
            wait_until(
                lambda c=c: all(
                    (c.get_node(f"providers/{p}/nodes/{n}").gpus[0].health == 2)
                    == (f is not None and "thermal" in f)
                    for p, n, *_, f in nodes
                ),
                timeout=20,
            )
    return fed
