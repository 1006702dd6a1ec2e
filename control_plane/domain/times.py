"""Timestamps from requests, validated against google.protobuf.Timestamp's own range."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from control_plane.domain import errors

# 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z, as timestamp.proto defines them.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799


def timestamp_ns(ts: timestamp_pb2.Timestamp, field: str) -> int:
    """Nanoseconds since the epoch; INVALID_ARGUMENT (reason INVALID_TIMESTAMP) outside the range."""
    if not (MIN_SECONDS <= ts.seconds <= MAX_SECONDS and 0 <= ts.nanos <= 999_999_999):
        raise errors.invalid(
            "INVALID_TIMESTAMP",
            f"{field} must be between 0001-01-01 and 9999-12-31 with nanos in [0, 999999999]",
            field=field,
        )
    return ts.seconds * 1_000_000_000 + ts.nanos


def ns_of(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the epoch of a stored (already valid) timestamp."""
    return ts.seconds * 1_000_000_000 + ts.nanos


def at_ns(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)
