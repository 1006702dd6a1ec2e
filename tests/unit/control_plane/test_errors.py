"""The edge's error mapping: one ErrorInfo always, a BadRequest violation for a field, a
RetryInfo when the error says when to come back."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from control_plane import errors as edge
from control_plane.domain import errors, quotas


def _details(err: errors.DomainError) -> list[object]:
    status = edge.to_status(err)
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    out: list[object] = []
    for d in proto.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out.append(msg)
    return out


def test_invalid_argument_names_its_field_in_a_bad_request() -> None:
    info, bad = _details(errors.invalid("INVALID_TTL", "ttl out of range", field="ttl"))
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "INVALID_TTL"
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("ttl", "ttl out of range")]


def test_rate_limited_says_when_to_retry() -> None:
    _info, retry = _details(quotas.rate_limited("slow down", 1.5))
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000


def test_other_errors_carry_only_the_error_info() -> None:
    (info,) = _details(errors.not_found("LEASE_NOT_FOUND", "no such lease"))
    assert isinstance(info, error_details_pb2.ErrorInfo)
