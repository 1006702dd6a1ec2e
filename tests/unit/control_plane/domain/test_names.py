"""Resource names."""

from __future__ import annotations

import pytest

from control_plane.domain.errors import DomainError as ApiError
from control_plane.domain.names import parse_lease_name, parse_node_name


def test_names() -> None:
    assert parse_node_name("providers/neo/nodes/fra-1") == ("neo", "fra-1")
    assert parse_lease_name("leases/0123456789abcdef") == "0123456789abcdef"
    for bad in ("providers/Neo/nodes/x", "providers/neo/node/x", "nodes/x", "providers/neo/nodes/"):
        with pytest.raises(ApiError):
            parse_node_name(bad)
