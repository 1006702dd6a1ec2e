"""Registration: a hello is validated whole, merged into the record keeping the operator's
state, and health only gets worse within a session."""

from __future__ import annotations

import math

import pytest
from google.protobuf import timestamp_pb2

from control_plane.domain import registration
from control_plane.domain.errors import Code, DomainError
from gpufed.v1 import common_pb2, node_pb2
from tests.hostile import maximal_hello

T0 = timestamp_pb2.Timestamp(seconds=100)
T1 = timestamp_pb2.Timestamp(seconds=200)


def hello(**kw: object) -> node_pb2.NodeHello:
    h = node_pb2.NodeHello(
        provider="neo",
        node_id="fra-1",
        location=common_pb2.Location(country_code="DE", latitude=50.1, longitude=8.7),
        price_per_gpu_hour=2.5,
    )
    for i in range(2):
        h.gpus.add(uuid=f"GPU-{i}", index=i, model="NVIDIA H100 80GB HBM3")
    for k, v in kw.items():
        setattr(h, k, v) if not isinstance(v, common_pb2.Location) else h.location.CopyFrom(v)
    return h


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"provider": "other"}, Code.PERMISSION_DENIED, "PROVIDER_MISMATCH"),
        ({"node_id": "Bad_Id"}, Code.INVALID_ARGUMENT, "INVALID_NODE_ID"),
        ({"location": common_pb2.Location(country_code="XX")}, Code.INVALID_ARGUMENT, "INVALID_COUNTRY_CODE"),
        (
            {"location": common_pb2.Location(country_code="DE", latitude=91)},
            Code.INVALID_ARGUMENT,
            "INVALID_COORDINATES",
        ),
        ({"price_per_gpu_hour": math.nan}, Code.INVALID_ARGUMENT, "INVALID_PRICE"),
        ({"currency_code": "usd"}, Code.INVALID_ARGUMENT, "INVALID_CURRENCY"),
    ],
)
def test_a_bad_hello_is_refused_with_its_reason(change: dict[str, object], code: Code, reason: str) -> None:
    with pytest.raises(DomainError) as e:
        registration.validate_hello(hello(**change), "neo")
    assert (e.value.code, e.value.reason) == (code, reason)


def test_inventory_must_be_one_to_sixty_four_distinct_gpus() -> None:
    empty = hello()
    del empty.gpus[:]
    repeated = hello()
    repeated.gpus[1].uuid = repeated.gpus[0].uuid
    too_many = hello()
    for i in range(2, registration.MAX_GPUS_PER_NODE + 1):
        too_many.gpus.add(uuid=f"GPU-{i}", index=i, model="M")
    for h in (empty, repeated, too_many):
        with pytest.raises(DomainError) as e:
            registration.validate_hello(h, "neo")
        assert e.value.reason == "INVALID_INVENTORY"
    registration.validate_hello(hello(), "neo")


def test_a_new_record_is_healthy_and_stamped_now() -> None:
    record = registration.record_from_hello(hello(), None, T0)
    assert record.name == "providers/neo/nodes/fra-1" and record.location.country_code == "DE"
    assert all(g.health == common_pb2.GPU_HEALTH_HEALTHY for g in record.gpus)
    assert record.register_time == T0 == record.update_time and record.currency_code == "USD"


def test_a_hello_keeps_the_operators_state_and_touches_update_time_only_on_a_change() -> None:
    first = registration.record_from_hello(hello(), None, T0)
    first.state = common_pb2.NODE_STATE_CORDONED
    first.state_reason = "maintenance"
    same = registration.record_from_hello(hello(), first, T1)
    assert registration.same_record(first, same) and same.update_time == T0
    assert same.state == common_pb2.NODE_STATE_CORDONED and same.state_reason == "maintenance"
    dearer = registration.record_from_hello(hello(price_per_gpu_hour=3.0), first, T1)
    assert not registration.same_record(first, dearer)
    assert dearer.update_time == T1 and dearer.register_time == T0


def test_health_only_gets_worse_within_a_session() -> None:
    node = registration.record_from_hello(hello(), None, T0)
    reason = [common_pb2.HealthReason(code="XID_79")]
    assert registration.apply_health(node, {"GPU-0": (common_pb2.GPU_HEALTH_UNHEALTHY, reason)})
    assert (
        node.gpus[0].health == common_pb2.GPU_HEALTH_UNHEALTHY
        and node.gpus[0].health_reasons[0].code == "XID_79"
    )
    assert not registration.apply_health(node, {"GPU-0": (common_pb2.GPU_HEALTH_HEALTHY, [])})
    assert not registration.apply_health(node, {"GPU-1": (common_pb2.GPU_HEALTH_UNSPECIFIED, [])})
    assert registration.apply_health(node, {"GPU-1": (common_pb2.GPU_HEALTH_DEGRADED, [])})


def test_with_mtls_the_certificate_must_name_the_tokens_provider() -> None:
    registration.check_certificate("neo", ["spiffe://gpufed.dev/provider/neo"], "gpufed.dev")
    for uris, reason in [
        ([], "CLIENT_CERTIFICATE_REQUIRED"),
        (["spiffe://gpufed.dev/provider/other"], "CERTIFICATE_PROVIDER_MISMATCH"),
        (["spiffe://elsewhere.example/provider/neo"], "CERTIFICATE_PROVIDER_MISMATCH"),
        (["spiffe://gpufed.dev/provider/neo-evil"], "CERTIFICATE_PROVIDER_MISMATCH"),
    ]:
        with pytest.raises(DomainError) as e:
            registration.check_certificate("neo", uris, "gpufed.dev")
        assert (e.value.code, e.value.reason) == (Code.PERMISSION_DENIED, reason)


def test_what_a_daemon_copies_into_the_record_is_bounded() -> None:
    bad_health = hello()
    bad_health.gpus[0].health = 7  # type: ignore[assignment]
    many = hello()
    for i in range(registration.MAX_REASONS + 1):
        many.gpus[0].health_reasons.add(code=f"R{i}")
    long_reason = hello()
    long_reason.gpus[0].health_reasons.add(code="X" * 65)
    long_version = hello(driver_version="9" * 65)
    for h, reason in [
        (bad_health, "INVALID_HEALTH"),
        (many, "INVALID_HEALTH"),
        (long_reason, "INVALID_HEALTH"),
        (long_version, "INVALID_HELLO"),
    ]:
        with pytest.raises(DomainError) as e:
            registration.validate_hello(h, "neo")
        assert e.value.reason == reason


def test_a_report_is_bounded_in_samples_and_health() -> None:
    report = common_pb2.NodeReport()
    for i in range(registration.MAX_GPUS_PER_NODE + 1):
        report.gpus.add(uuid=f"GPU-{i}")
    with pytest.raises(DomainError) as e:
        registration.reported_health(report)
    assert e.value.reason == "INVALID_REPORT"
    one = common_pb2.NodeReport()
    one.gpus.add(uuid="GPU-0", health=9)
    with pytest.raises(DomainError) as e:
        registration.reported_health(one)
    assert e.value.reason == "INVALID_HEALTH"
    fine = common_pb2.NodeReport()
    fine.gpus.add(uuid="GPU-0", health=common_pb2.GPU_HEALTH_DEGRADED).health_reasons.add(code="THERMAL")
    assert registration.reported_health(fine)["GPU-0"][0] == common_pb2.GPU_HEALTH_DEGRADED


def test_a_maximal_hello_makes_a_record_within_the_documented_bound() -> None:
    hello = maximal_hello()
    registration.validate_hello(hello, "p" * 63)
    now = timestamp_pb2.Timestamp(seconds=2**40, nanos=999_999_999)
    record = registration.record_from_hello(hello, None, now)
    record.state, record.state_reason = common_pb2.NODE_STATE_DRAINING, "s" * 256
    record.drain_deadline.CopyFrom(now)
    assert record.ByteSize() <= registration.MAX_NODE_RECORD_BYTES
    assert record.ByteSize() == 109_547  # the figure docs/operations.md computes with


def test_fields_unknown_to_the_api_never_reach_the_record() -> None:
    hello = maximal_hello()
    junk = node_pb2.NodeHello.FromString(hello.SerializeToString() + b"\xfa\x3f\x10" + b"x" * 16)
    gpu = junk.gpus[0]
    gpu.MergeFromString(b"\xfa\x3f\x04junk")  # an unknown field inside a GPU too
    now = timestamp_pb2.Timestamp(seconds=1)
    record = registration.record_from_hello(junk, None, now)
    assert record.ByteSize() == registration.record_from_hello(hello, None, now).ByteSize()
