"""The RPC edge of errors: domain errors become AIP-193 statuses, a status code plus one ErrorInfo
with an UPPER_SNAKE reason, so every client, grpcurl included, sees the reason."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from control_plane.domain.errors import Code, DomainError

DOMAIN = "gpufed.v1"
_CODES = {c: grpc.StatusCode[c.name] for c in Code}


def grpc_code(code: Code) -> grpc.StatusCode:
    return _CODES[code]


def to_status(err: DomainError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc_code(err.code)
    proto = status_pb2.Status(code=code.value[0], message=err.message, details=[detail])
    status: grpc.Status = rpc_status.to_status(proto)
    return status
