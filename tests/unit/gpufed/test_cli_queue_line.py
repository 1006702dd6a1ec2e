"""The live line of `gpufed lease create --wait MAX_WAIT`: position, time waited, time left."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from gpufed.cli.common import duration_s
from gpufed.cli.leases import _waited
from gpufed.v1 import lease_pb2


def test_the_queue_line_shows_position_time_waited_and_time_left() -> None:
    lease = lease_pb2.Lease(
        name="leases/abc",
        queue_position=3,
        create_time=timestamp_pb2.Timestamp(seconds=1000),
        wait_expire_time=timestamp_pb2.Timestamp(seconds=1000 + 2 * 3600),
    )
    assert _waited(lease, 1080.0) == "leases/abc queued: position 3, waited 1m20s, gives up in 1h58m40s"
    assert _waited(lease, 99999.0).endswith("gives up in 0m00s")


def test_max_wait_durations_parse_with_units() -> None:
    assert [duration_s(t) for t in ("90", "90s", "30m", "2h", "1d")] == [90, 90, 1800, 7200, 86400]
