"""Resource names (AIP-122) and identifier rules."""

from __future__ import annotations

import re

from control_plane.domain import errors
from control_plane.domain.errors import shown

# DNS-label-like ids: lower case, digits, inner dots and dashes.
_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LEASE_ID = re.compile(r"^[0-9a-f]{16}$")


# A principal (tenant, provider, operator) is a DNS label without dots, as CreateToken documents.
_PRINCIPAL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def valid_principal(value: str) -> bool:
    return bool(_PRINCIPAL.fullmatch(value))


def valid_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


def node_name(provider: str, node_id: str) -> str:
    return f"providers/{provider}/nodes/{node_id}"


def parse_node_name(name: str) -> tuple[str, str]:
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "providers"
        or parts[2] != "nodes"
        or not (valid_id(parts[1]) and valid_id(parts[3]))
    ):
        raise errors.invalid(
            "INVALID_NODE_NAME",
            f"node name must be providers/{{provider}}/nodes/{{node_id}}, got {shown(name)}",
            field="name",
        )
    return parts[1], parts[3]


def lease_name(lease_id: str) -> str:
    return f"leases/{lease_id}"


def parse_lease_name(name: str) -> str:
    """The lease id of leases/{id}; INVALID_ARGUMENT if malformed."""
    prefix, _, lease_id = name.partition("/")
    if prefix != "leases" or not _LEASE_ID.fullmatch(lease_id):
        raise errors.invalid(
            "INVALID_LEASE_NAME",
            f"lease name must be leases/{{16 hex digits}}, got {shown(name)}",
            field="name",
        )
    return lease_id


def validate_request_id(request_id: str) -> None:
    """Optional (AIP-155): empty means the request is not idempotent."""
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise errors.invalid(
            "INVALID_REQUEST_ID",
            "request_id must be 1..128 characters of letters, digits and . _ : -",
            field="request_id",
        )


def reservation_name(reservation_id: str) -> str:
    return f"reservations/{reservation_id}"


def parse_reservation_name(name: str) -> str:
    """The id of reservations/{id}; INVALID_ARGUMENT if malformed."""
    prefix, _, reservation_id = name.partition("/")
    if prefix != "reservations" or not _LEASE_ID.fullmatch(reservation_id):
        raise errors.invalid(
            "INVALID_RESERVATION_NAME",
            f"reservation name must be reservations/{{16 hex digits}}, got {shown(name)}",
            field="name",
        )
    return reservation_id
