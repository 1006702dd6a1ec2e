"""What the index's capacity tallies cost and save, in-process: `Inventory.load` of N nodes x 8
GPUs with their liveness (a replica's cold start without etcd and gRPC), then SummarizeCapacity
of the whole federation from the tallies and by walking every node (a filter the tallies cannot
answer, max_price, forces the walk). `python -m bench.index_load [--nodes 100000]`."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from typing import Any

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import KeyValue
from control_plane.domain import offers
from control_plane.domain.filters import compile_filter
from gpufed.v1 import common_pb2

P = "/bench-index"


def listing(nodes: int) -> list[KeyValue]:
    kvs = []
    for i in range(nodes):
        n = common_pb2.Node(
            provider=f"p{i % 50}",
            node_id=f"n{i}",
            price_per_gpu_hour=2.0,
            location=common_pb2.Location(country_code=("DE", "FR", "US", "FI")[i % 4]),
        )
        for g in range(8):
            n.gpus.add(
                uuid=f"GPU-{i}-{g}",
                index=g,
                model="NVIDIA H100 80GB HBM3",
                memory_total_bytes=80 << 30,
                health=1,
            )
        kvs.append(KeyValue(f"{P}/nodes/p{i % 50}/n{i}".encode(), n.SerializeToString(), 1, 1, 0))
        kvs.append(KeyValue(f"{P}/alive/p{i % 50}/n{i}".encode(), b"r/s", 2, 2, 0))
    return kvs


def run(nodes: int = 100_000, rounds: int = 20) -> dict[str, Any]:
    kvs = listing(nodes)
    gc.collect()
    inv = Inventory(Keyspace(P))
    t = time.perf_counter()
    inv.load(kvs, 3)
    load_s = time.perf_counter() - t
    flt = compile_filter(common_pb2.GpuFilter())
    walk = dataclasses.replace(flt, max_price=1e9)
    assert offers.summarize(inv, flt) == offers.summarize(inv, walk)
    out: dict[str, Any] = {"nodes": nodes, "load_s": round(load_s, 2)}
    for name, f in (("tallies", flt), ("walk", walk)):
        t = time.perf_counter()
        for _ in range(rounds):
            offers.summarize(inv, f)
        out[f"summarize_{name}_ms"] = round((time.perf_counter() - t) / rounds * 1000, 3)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=100_000)
    print(json.dumps(run(p.parse_args().nodes), indent=2))
