"""Placement: which GPUs a lease gets."""

from __future__ import annotations

import random

from control_plane.domain.inventory import Candidate
from control_plane.domain.placement import MAX_GANG, max_nodes_for, place
from gpufed.v1 import common_pb2, lease_pb2


def cand(name: str, price: float, free: int) -> Candidate:
    node = common_pb2.Node(provider="p", node_id=name, price_per_gpu_hour=price, currency_code="USD")
    gpus = [node.gpus.add(uuid=f"{name}-{i}", index=i, model="M") for i in range(free)]
    return Candidate(f"providers/p/nodes/{name}", node, list(gpus), None, 1)


def test_single_node_takes_the_cheapest_then_the_tightest_fit() -> None:
    picks = place(
        [cand("a", 1.0, 8), cand("b", 1.0, 3), cand("c", 0.5, 2)],
        3,
        lease_pb2.PLACEMENT_SINGLE_NODE,
        rng=random.Random(0),
    )
    assert picks is not None and picks[0].candidate.node.node_id == "b"
    assert place([cand("a", 1.0, 2)], 3, lease_pb2.PLACEMENT_SINGLE_NODE) is None


def test_single_node_skips_contended_gpus() -> None:
    picks = place([cand("a", 1.0, 4)], 3, 0, avoid=frozenset({"a-0"}), rng=random.Random(1))
    assert picks is not None and "a-0" not in picks[0].gpu_uuids
    assert place([cand("a", 1.0, 4)], 4, 0, avoid=frozenset({"a-0"})) is None


def test_spread_uses_the_fewest_nodes() -> None:
    picks = place(
        [cand("a", 1.0, 2), cand("b", 2.0, 8), cand("c", 1.0, 4)],
        10,
        lease_pb2.PLACEMENT_SPREAD,
        rng=random.Random(0),
    )
    assert picks is not None
    assert [p.candidate.node.node_id for p in picks] == ["b", "c"]
    assert sum(len(p.gpu_uuids) for p in picks) == 10


def test_a_gang_always_fits_one_etcd_transaction() -> None:
    for n in range(1, MAX_GANG + 1):
        nodes = max_nodes_for(n)
        assert 4 + n + 3 * nodes <= 128 and nodes >= 1  # fixed, allocations, per node
