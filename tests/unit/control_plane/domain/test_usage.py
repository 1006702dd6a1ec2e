"""Usage records from ended leases."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from control_plane.domain.usage import usage_records
from gpufed.v1 import lease_pb2


def test_usage_records_one_per_provider_with_quoted_cost() -> None:
    lease = lease_pb2.Lease(
        name="leases/x",
        tenant="t",
        currency_code="USD",
        create_time=timestamp_pb2.Timestamp(seconds=0),
        active_time=timestamp_pb2.Timestamp(seconds=0),
    )
    lease.gpus.add(provider="a", uuid="1", price_per_gpu_hour=2.0)
    lease.gpus.add(provider="a", uuid="2", price_per_gpu_hour=2.0)
    lease.gpus.add(provider="b", uuid="3", price_per_gpu_hour=3.6)
    records = usage_records(lease, timestamp_pb2.Timestamp(seconds=1800))
    by = {r.provider: r for r in records}
    assert by["a"].gpu_seconds == 3600 and by["a"].quoted_cost == 2.0
    assert by["b"].gpu_seconds == 1800 and by["b"].quoted_cost == pytest.approx(1.8)
    assert by["a"].name == "usageRecords/x-a"


def test_a_lease_that_never_became_active_is_recorded_with_zero_seconds() -> None:
    lease = lease_pb2.Lease(name="leases/x", tenant="t", create_time=timestamp_pb2.Timestamp(seconds=0))
    lease.gpus.add(provider="a", uuid="1", price_per_gpu_hour=2.0)
    (record,) = usage_records(lease, timestamp_pb2.Timestamp(seconds=300))
    assert (record.gpu_seconds, record.quoted_cost) == (0, 0)
    assert record.start_time == record.end_time
