"""The RPC edge of errors: domain errors become AIP-193 statuses, a status code plus one ErrorInfo
with an UPPER_SNAKE reason, so every client, grpcurl included, sees the reason. An error about one
field adds a BadRequest field violation; one that says when to come back adds a RetryInfo."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from control_plane.domain.errors import Code, DomainError

DOMAIN = "gpufed.v1"
_CODES = {c: grpc.StatusCode[c.name] for c in Code}


def grpc_code(code: Code) -> grpc.StatusCode:
    return _CODES[code]


def _packed(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def to_status(err: DomainError) -> grpc.Status:
    details = [_packed(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))]
    if err.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    if err.retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(max(1, int(err.retry_after_s * 1e9)))
        details.append(_packed(info))
    code = grpc_code(err.code)
    proto = status_pb2.Status(code=code.value[0], message=err.message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status
