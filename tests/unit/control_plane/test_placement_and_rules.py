"""Placement, lease rules, usage records, names and page tokens: pure functions."""

from __future__ import annotations

import random

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import lease_rules, pagination
from control_plane.domain.names import parse_lease_name, parse_node_name
from control_plane.domain.offers import Candidate
from control_plane.domain.placement import MAX_GANG, max_nodes_for, place
from control_plane.domain.usage import usage_records
from control_plane.errors import ApiError
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
        assert 2 + n + 2 * nodes <= 128 and nodes >= 1


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=0), "INVALID_GPU_COUNT"),
        (lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=MAX_GANG + 1), "GANG_TOO_LARGE"),
        (lease_pb2.CreateLeaseRequest(request_id="r r", gpu_count=1), "INVALID_REQUEST_ID"),
        (
            lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=1, ttl=duration_pb2.Duration(seconds=4)),
            "INVALID_TTL",
        ),
        (
            lease_pb2.CreateLeaseRequest(
                request_id="r", gpu_count=1, ttl=duration_pb2.Duration(seconds=30, nanos=5)
            ),
            "INVALID_TTL",
        ),
    ],
)
def test_create_validation(req: lease_pb2.CreateLeaseRequest, reason: str) -> None:
    with pytest.raises(ApiError) as e:
        lease_rules.validate_create(req)
    assert e.value.reason == reason


def test_defaults_and_lease_record() -> None:
    spec = lease_rules.validate_create(lease_pb2.CreateLeaseRequest(request_id="job-1", gpu_count=2))
    assert spec.ttl_s == 60 and spec.placement == lease_pb2.PLACEMENT_SINGLE_NODE
    picks = place([cand("a", 1.5, 4)], 2, 0, rng=random.Random(0))
    assert picks is not None
    now = timestamp_pb2.Timestamp(seconds=1000)
    lease = lease_rules.build_lease("abc", "t", spec, picks, now)
    assert lease.name == "leases/abc" and lease.price_per_hour == 3.0
    assert lease.expire_time.seconds == 1060 and len(lease.gpus) == 2


def test_usage_records_one_per_provider_with_quoted_cost() -> None:
    lease = lease_pb2.Lease(
        name="leases/x", tenant="t", currency_code="USD", create_time=timestamp_pb2.Timestamp(seconds=0)
    )
    lease.gpus.add(provider="a", uuid="1", price_per_gpu_hour=2.0)
    lease.gpus.add(provider="a", uuid="2", price_per_gpu_hour=2.0)
    lease.gpus.add(provider="b", uuid="3", price_per_gpu_hour=3.6)
    records = usage_records(lease, timestamp_pb2.Timestamp(seconds=1800))
    by = {r.provider: r for r in records}
    assert by["a"].gpu_seconds == 3600 and by["a"].quoted_cost == 2.0
    assert by["b"].gpu_seconds == 1800 and by["b"].quoted_cost == pytest.approx(1.8)
    assert by["a"].name == "usageRecords/x-a"


def test_names() -> None:
    assert parse_node_name("providers/neo/nodes/fra-1") == ("neo", "fra-1")
    assert parse_lease_name("leases/0123456789abcdef") == "0123456789abcdef"
    for bad in ("providers/Neo/nodes/x", "providers/neo/node/x", "nodes/x", "providers/neo/nodes/"):
        with pytest.raises(ApiError):
            parse_node_name(bad)


def test_page_tokens_are_opaque_and_bound_to_their_query() -> None:
    q = pagination.query_hash("a")
    start, end, token = pagination.paginate(120, "", 50, q)
    assert (start, end) == (0, 50) and token
    assert pagination.paginate(120, token, 50, q)[:2] == (50, 100)
    with pytest.raises(ApiError):
        pagination.decode_token(token, pagination.query_hash("b"))
    with pytest.raises(ApiError):
        pagination.decode_token("%%%", q)
    assert pagination.page_size(0) == 50 and pagination.page_size(5000) == 1000
