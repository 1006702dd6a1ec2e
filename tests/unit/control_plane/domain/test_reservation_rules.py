"""Reservation requests are bounded, windows are whole seconds from now on, and the lease a window
becomes keeps the booked GPUs and prices until the window's end."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import reservation_rules
from control_plane.domain.errors import DomainError
from gpufed.v1 import lease_pb2, reservation_pb2

S = 1_000_000_000
NOW = 1_900_000_000 * S


def _req(start_s: float, duration_s: int, **kw: object) -> reservation_pb2.CreateReservationRequest:
    req = reservation_pb2.CreateReservationRequest(**{"gpu_count": 2, **kw})  # type: ignore[arg-type]
    req.start_time.FromNanoseconds(int(start_s * S))
    req.duration.seconds = duration_s
    return req


def _reason(req: reservation_pb2.CreateReservationRequest) -> str:
    with pytest.raises(DomainError) as e:
        reservation_rules.validate_create(req, NOW)
    return e.value.reason


def test_a_window_is_from_now_to_180_days_ahead_and_10_s_to_31_days_long() -> None:
    now_s = NOW / S
    spec = reservation_rules.validate_create(_req(now_s + 3600, 7200), NOW)
    assert (spec.start_ns, spec.end_ns) == (NOW + 3600 * S, NOW + 3600 * S + 7200 * S)
    late_clock = reservation_rules.validate_create(_req(now_s - 30, 60), NOW)
    assert late_clock.start_ns == NOW  # a start a little in the past is now
    assert _reason(_req(now_s - 3600, 60)) == "INVALID_START_TIME"
    assert _reason(_req(now_s + 181 * 86400, 60)) == "INVALID_START_TIME"
    assert _reason(_req(now_s + 60, 9)) == "INVALID_DURATION"
    assert _reason(_req(now_s + 60, 32 * 86400)) == "INVALID_DURATION"
    no_start = reservation_pb2.CreateReservationRequest(
        gpu_count=1, duration=duration_pb2.Duration(seconds=60)
    )
    assert _reason(no_start) == "INVALID_START_TIME"
    bad = _req(now_s + 60, 60)
    bad.start_time.nanos = -1
    assert _reason(bad) == "INVALID_TIMESTAMP"


def test_a_reservation_holds_whole_gpus_within_one_gang() -> None:
    now_s = NOW / S
    assert _reason(_req(now_s + 60, 60, gpu_count=0)) == "INVALID_GPU_COUNT"
    assert _reason(_req(now_s + 60, 60, gpu_count=65)) == "GANG_TOO_LARGE"
    mig = _req(now_s + 60, 60)
    mig.filter.mig_profile = "1g.10gb"
    assert _reason(mig) == "MIG_NOT_RESERVABLE"
    assert _reason(_req(now_s + 60, 60, allow_mixed=True)) == "MIXED_NEEDS_SPREAD"


def test_the_window_becomes_a_lease_at_the_booked_prices_until_its_end() -> None:
    booked = reservation_pb2.Reservation(
        name="reservations/00000000000000aa",
        tenant="t",
        state=reservation_rules.SCHEDULED,
        gpu_count=2,
        price_per_hour=5.0,
        currency_code="EUR",
    )
    booked.start_time.FromNanoseconds(NOW)
    booked.end_time.FromNanoseconds(NOW + 3600 * S)
    booked.gpus.add(node="providers/p/nodes/a", uuid="g0", price_per_gpu_hour=2.5)
    booked.gpus.add(node="providers/p/nodes/b", uuid="g1", price_per_gpu_hour=2.5)
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(NOW + S // 2)
    lease = reservation_rules.as_lease(booked, "00000000000000bb", {"providers/p/nodes/b"}, at)
    assert lease.reservation == booked.name and lease.expire_time == booked.end_time
    assert lease.max_expire_time == booked.end_time
    assert lease.price_per_hour == 5.0 and [g.uuid for g in lease.gpus] == ["g0", "g1"]
    assert lease.state == lease_pb2.LEASE_STATE_PROVISIONING  # node b has a hook to answer
    assert [d.node for d in lease.access_details] == ["providers/p/nodes/a"]
    assert lease.ttl.seconds == 3600  # what is left of the window, rounded up
    started = reservation_rules.started(booked, lease)
    assert started.state == reservation_rules.ACTIVE and started.lease == lease.name
    ended = reservation_rules.ended(started, reservation_pb2.RESERVATION_END_REASON_COMPLETED, at, "x" * 5000)
    assert ended.state == reservation_rules.ENDED and len(ended.message) == 1024


def test_a_search_window_needs_a_length_and_starts_no_earlier_than_now() -> None:
    assert reservation_rules.search_window(None, None, NOW) is None
    length = duration_pb2.Duration(seconds=3600)
    assert reservation_rules.search_window(None, length, NOW) == (NOW, NOW + 3600 * S)
    past = timestamp_pb2.Timestamp(seconds=NOW // S - 100)
    assert reservation_rules.search_window(past, length, NOW) == (NOW, NOW + 3600 * S)
    for start, d in [
        (timestamp_pb2.Timestamp(seconds=NOW // S), None),
        (None, duration_pb2.Duration(seconds=1)),
        (timestamp_pb2.Timestamp(seconds=NOW // S + 200 * 86400), length),
    ]:
        with pytest.raises(DomainError) as e:
            reservation_rules.search_window(start, d, NOW)
        assert e.value.reason == "INVALID_WINDOW"
