"""Request timestamps outside Timestamp's own range are INVALID_ARGUMENT, never an exception."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from control_plane.domain.errors import DomainError
from control_plane.domain.times import MAX_SECONDS, timestamp_ns


@pytest.mark.parametrize(("seconds", "nanos"), [(10**13, 0), (0, 2_000_000_000), (0, -1), (-(10**12), 0)])
def test_out_of_range_timestamps_are_refused_with_their_field(seconds: int, nanos: int) -> None:
    with pytest.raises(DomainError) as e:
        timestamp_ns(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "end_time")
    assert (e.value.reason, e.value.field) == ("INVALID_TIMESTAMP", "end_time")


def test_timestamps_in_range_are_nanoseconds() -> None:
    assert timestamp_ns(timestamp_pb2.Timestamp(seconds=2, nanos=5), "t") == 2_000_000_005
    assert timestamp_ns(timestamp_pb2.Timestamp(seconds=MAX_SECONDS), "t") == MAX_SECONDS * 10**9
