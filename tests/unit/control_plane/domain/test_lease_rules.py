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


def test_a_lease_on_a_hooked_node_provisions_and_is_active_once_every_node_answered() -> None:
    spec = lease_rules.validate_create(
        lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=2, placement=lease_pb2.PLACEMENT_SPREAD)
    )
    hooked, plain = cand("a", 1.0, 1), cand("b", 1.0, 1)
    hooked.node.lease_hook = True
    picks = place([hooked, plain], 2, lease_pb2.PLACEMENT_SPREAD, rng=random.Random(0))
    assert picks is not None
    lease = lease_rules.build_lease("abc", "t", spec, picks, timestamp_pb2.Timestamp(seconds=1000))
    # The plain node has nothing to hand over; the hooked one must answer first.
    assert lease.state == lease_pb2.LEASE_STATE_PROVISIONING and not lease.HasField("active_time")
    assert [d.node for d in lease.access_details] == ["providers/p/nodes/b"]
    details = lease_pb2.AccessDetails(node="providers/p/nodes/a", ssh="ssh u@a")
    active = lease_rules.provisioned(lease, details, timestamp_pb2.Timestamp(seconds=1003))
    assert active.state == lease_pb2.LEASE_STATE_ACTIVE and active.active_time.seconds == 1003
    # A repeated answer replaces the node's details and keeps the start of billing.
    again = lease_rules.provisioned(
        active,
        lease_pb2.AccessDetails(node="providers/p/nodes/a", ssh="x"),
        timestamp_pb2.Timestamp(seconds=1009),
    )
    assert [d.ssh for d in again.access_details if d.node.endswith("/a")] == [
        "x"
    ] and again.active_time.seconds == 1003


def test_a_lease_on_nodes_without_hooks_is_active_and_billed_from_its_grant() -> None:
    spec = lease_rules.validate_create(lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=1))
    picks = place([cand("a", 1.0, 1)], 1, 0, rng=random.Random(0))
    assert picks is not None
    lease = lease_rules.build_lease("abc", "t", spec, picks, timestamp_pb2.Timestamp(seconds=1000))
    assert lease.state == lease_pb2.LEASE_STATE_ACTIVE and lease.active_time.seconds == 1000


def test_an_access_request_is_validated_with_the_create() -> None:
    req = lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=1)
    req.access.ssh_public_keys.append("ssh-rsa AAAA")
    with pytest.raises(ApiError) as e:
        lease_rules.validate_create(req)
    assert e.value.reason == "INVALID_SSH_KEY" and e.value.field == "access.ssh_public_keys[0]"
