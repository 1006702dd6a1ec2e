"""Errors meant for the caller, as plain exceptions: a status code, an UPPER_SNAKE reason, a
human message and, where one input is to blame, the field.

The domain and the application layer raise these; the RPC edge (control_plane.errors) turns them
into AIP-193 statuses with one ErrorInfo. Nothing here knows about gRPC: `Code` names the
canonical status codes the API uses, and the edge maps them by name.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The canonical status codes gpufed answers with. INTERNAL is the RPC edge's alone: an
    unexpected exception, a bug, never raised on purpose (and not retried by clients)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ABORTED = "ABORTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class DomainError(Exception):
    """An error for the caller: code, machine-readable reason, message, the field at fault."""

    def __init__(
        self,
        code: Code,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        # Set on RATE_LIMITED and the like: when a retry may succeed (a RetryInfo at the edge).
        self.retry_after_s: float | None = None

    @property
    def field(self) -> str:
        """The request field at fault ("" when the error is not about one field)."""
        return self.metadata.get("field", "")

    def __repr__(self) -> str:
        return f"DomainError({self.code.name}, {self.reason!r}, {self.message!r})"


MAX_SHOWN = 64


def shown(value: str) -> str:
    """A caller's value as an error message quotes it: repr, cut to MAX_SHOWN characters. A
    message must stay readable and small (gRPC's default metadata limit is 16 KB), whatever
    the input was."""
    if len(value) <= MAX_SHOWN:
        return repr(value)
    return f"{value[:MAX_SHOWN]!r}... ({len(value)} characters)"


def invalid(reason: str, message: str, *, field: str, **metadata: str) -> DomainError:
    """INVALID_ARGUMENT, always about one request field (AIP-193: a BadRequest violation names
    it; a path such as "filter.countries" or "hello.gpus")."""
    return DomainError(Code.INVALID_ARGUMENT, reason, message, {"field": field, **metadata})


def not_found(reason: str, message: str, **metadata: str) -> DomainError:
    return DomainError(Code.NOT_FOUND, reason, message, metadata)


def failed_precondition(reason: str, message: str, **metadata: str) -> DomainError:
    return DomainError(Code.FAILED_PRECONDITION, reason, message, metadata)


def exhausted(reason: str, message: str, **metadata: str) -> DomainError:
    return DomainError(Code.RESOURCE_EXHAUSTED, reason, message, metadata)


def permission_denied(reason: str, message: str, **metadata: str) -> DomainError:
    return DomainError(Code.PERMISSION_DENIED, reason, message, metadata)


def unauthenticated(reason: str, message: str) -> DomainError:
    return DomainError(Code.UNAUTHENTICATED, reason, message)


def aborted(reason: str, message: str, **metadata: str) -> DomainError:
    """A conflict the caller may retry (the state kept changing under a read-modify-write)."""
    return DomainError(Code.ABORTED, reason, message, metadata)


def deadline_exceeded(reason: str, message: str) -> DomainError:
    return DomainError(Code.DEADLINE_EXCEEDED, reason, message)


def unavailable(reason: str, message: str) -> DomainError:
    return DomainError(Code.UNAVAILABLE, reason, message)
