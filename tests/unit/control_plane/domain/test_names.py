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


def test_names_match_whole_and_errors_quote_only_a_bounded_part() -> None:
    from control_plane.domain.names import valid_id

    assert not valid_id("x\n") and not valid_id("neo\n") and valid_id("neo")
    with pytest.raises(ApiError) as e:
        parse_node_name("providers/" + "a" * 100_000 + "/nodes/n")
    assert e.value.reason == "INVALID_NODE_NAME" and len(e.value.message) < 300
    with pytest.raises(ApiError):
        parse_lease_name("leases/0123456789abcdef\n")


@pytest.mark.parametrize("principal", ["x\n", "a.b", "-a", "A", "", "a" * 64])
def test_a_principal_is_a_dns_label_matched_whole(principal: str) -> None:
    from control_plane.domain.names import valid_principal

    assert not valid_principal(principal)
    assert valid_principal("acme-1")
