"""CreateLease validation and the lease record."""

from __future__ import annotations

import random

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import lease_rules
from control_plane.domain.errors import DomainError as ApiError
from control_plane.domain.inventory import Candidate
from control_plane.domain.placement import MAX_GANG, place
from gpufed.v1 import common_pb2, lease_pb2


def cand(name: str, price: float, free: int) -> Candidate:
    node = common_pb2.Node(provider="p", node_id=name, price_per_gpu_hour=price, currency_code="USD")
    gpus = [node.gpus.add(uuid=f"{name}-{i}", index=i, model="M") for i in range(free)]
    return Candidate(f"providers/p/nodes/{name}", node, list(gpus), None, 1)


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
