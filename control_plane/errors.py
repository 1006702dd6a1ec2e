"""API errors as AIP-193 wants them: a status code plus one ErrorInfo with an UPPER_SNAKE reason.

Domain code raises ApiError; the RPC wrapper (control_plane.rpc) turns it into a
google.rpc.Status with the ErrorInfo attached, so every client, grpcurl included, sees the reason.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "gpufed.v1"


class ApiError(Exception):
    """An error meant for the caller: code, machine-readable reason, human message."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        status: grpc.Status = rpc_status.to_status(proto)
        return status

    def __repr__(self) -> str:
        return f"ApiError({self.code.name}, {self.reason!r}, {self.message!r})"


def invalid(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def not_found(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def failed_precondition(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata)


def exhausted(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, metadata)


def permission_denied(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, reason, message, metadata)


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def unavailable(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, reason, message)
