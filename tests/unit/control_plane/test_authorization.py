"""The one authorization table: every RPC of the API has a row, the wrapper refuses what the
row does not allow before any servicer code runs, and a method without a row is refused."""

from __future__ import annotations

import pytest

from control_plane.auth import Kind, Principal
from control_plane.authorization import AUDITED, PRIVILEGED, TABLE, authorize, render_markdown
from control_plane.domain.errors import Code, DomainError
from gpufed.v1 import admin_pb2, discovery_pb2, lease_pb2, node_pb2, peer_pb2, reservation_pb2, telemetry_pb2


def _api_methods() -> set[str]:
    out: set[str] = set()
    for module in (admin_pb2, discovery_pb2, lease_pb2, node_pb2, peer_pb2, reservation_pb2, telemetry_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out.update(f"{service.name}.{m.name}" for m in service.methods)
    return out


def test_every_rpc_of_the_api_has_exactly_one_row() -> None:
    assert set(TABLE) == _api_methods()
    assert set(PRIVILEGED) <= set(AUDITED) <= set(TABLE)
    assert all(TABLE[m].kinds == {Kind.ADMIN} for m in PRIVILEGED)
    assert all(rule.kinds and rule.scope for rule in TABLE.values())


@pytest.mark.parametrize(
    ("method", "kind", "allowed"),
    [
        ("LeaseService.CreateLease", Kind.TENANT, True),
        ("LeaseService.CreateLease", Kind.PROVIDER, False),
        ("LeaseService.CreateLease", Kind.PEER, False),
        ("DiscoveryService.SearchOffers", Kind.PEER, False),  # a peer's token reads nothing
        ("DiscoveryService.SearchOffers", Kind.PROVIDER, False),
        ("NodeService.Connect", Kind.TENANT, False),
        ("AdminService.DrainNode", Kind.TENANT, False),
        ("AdminService.ListUsageRecords", Kind.PROVIDER, True),
        ("AdminService.ListUsageRecords", Kind.TENANT, True),  # its own, scoped in app/admin
        ("AdminService.SetQuota", Kind.TENANT, False),
        ("AdminService.GetQuota", Kind.PROVIDER, True),  # its own, scoped in app/quotas
        ("PeerService.ForwardNodeTelemetry", Kind.TENANT, False),
        ("TelemetryService.GetNodeTelemetry", Kind.TENANT, True),  # scoped to its GPUs in app/telemetry
    ],
)
def test_the_table_decides(method: str, kind: Kind, allowed: bool) -> None:
    if allowed:
        authorize(method, Principal(kind, "x"))
        return
    with pytest.raises(DomainError) as e:
        authorize(method, Principal(kind, "x"))
    assert (e.value.code, e.value.reason) == (Code.PERMISSION_DENIED, "WRONG_TOKEN_KIND")


def test_a_method_without_a_row_is_refused() -> None:
    with pytest.raises(DomainError) as e:
        authorize("LeaseService.Unknown", Principal(Kind.ADMIN, "root"))
    assert e.value.reason == "NO_AUTHORIZATION_RULE"


def test_docs_api_md_shows_the_table_as_enforced() -> None:
    from scripts.render_authorization import DOC, rendered

    text = DOC.read_text()
    assert render_markdown() in text
    assert rendered(text) == text, "docs/api.md is stale: python scripts/render_authorization.py"
