"""An index fed by hand, for the unit tests of the index and of searches over it."""

from __future__ import annotations

from control_plane.adapters.index import Inventory
from gpufed.v1 import common_pb2

P = "/g"


def add_node(
    inv: Inventory,
    provider: str,
    node_id: str,
    country: str,
    price: float,
    gpus: int = 4,
    lat: float = 0.0,
    lon: float = 0.0,
    alive: bool = True,
    rev: int = 1,
) -> None:
    n = common_pb2.Node(
        provider=provider,
        node_id=node_id,
        price_per_gpu_hour=price,
        location=common_pb2.Location(country_code=country, latitude=lat, longitude=lon),
    )
    for i in range(gpus):
        n.gpus.add(
            uuid=f"{node_id}-g{i}",
            index=i,
            model="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 << 30,
            health=common_pb2.GPU_HEALTH_HEALTHY,
        )
    inv.apply(f"{P}/nodes/{provider}/{node_id}".encode(), n.SerializeToString(), rev)
    if alive:
        inv.apply(f"{P}/alive/{provider}/{node_id}".encode(), b"r1/s1", rev + 1)
