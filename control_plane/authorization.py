"""The one authorization table: which kinds of principal may call each gpufed RPC.

The RPC wrapper (control_plane.rpc) checks it before any servicer code runs; a method missing
from the table is refused (fail closed), so a new RPC cannot ship without its row. What a
principal may see *within* an allowed call (its own leases, its own nodes' telemetry) is the
application's business: scoped by tenant or provider there.

Privileged methods are those whose every call is an audit event (gpufed.audit), besides denials.
"""

from __future__ import annotations

from control_plane.auth import Kind, Principal
from control_plane.domain import errors

T, P, A, R = Kind.TENANT, Kind.PROVIDER, Kind.ADMIN, Kind.PEER

TABLE: dict[str, frozenset[Kind]] = {
    "NodeService.Connect": frozenset({P}),
    # Discovery is for developers and operators; providers see their usage records instead.
    "DiscoveryService.SearchOffers": frozenset({T, A}),
    "DiscoveryService.GetNode": frozenset({T, A}),
    "DiscoveryService.ListNodes": frozenset({T, A}),
    "DiscoveryService.ListProviders": frozenset({T, A}),
    "DiscoveryService.SummarizeCapacity": frozenset({T, A}),
    "DiscoveryService.WatchCapacity": frozenset({T, A}),
    "LeaseService.CreateLease": frozenset({T}),
    "LeaseService.GetLease": frozenset({T, A}),
    "LeaseService.ListLeases": frozenset({T, A}),
    "LeaseService.RenewLease": frozenset({T}),
    "LeaseService.KeepAlive": frozenset({T}),
    "LeaseService.ReleaseLease": frozenset({T}),
    "LeaseService.WatchLease": frozenset({T, A}),
    # A tenant sees the GPUs it holds, a provider its own nodes (scoped in app/telemetry).
    "TelemetryService.GetNodeTelemetry": frozenset({T, P, A}),
    "AdminService.CordonNode": frozenset({A}),
    "AdminService.UncordonNode": frozenset({A}),
    "AdminService.DrainNode": frozenset({A}),
    "AdminService.RevokeLease": frozenset({A}),
    "AdminService.ListUsageRecords": frozenset({A, P}),
    "AdminService.CreateToken": frozenset({A}),
    "AdminService.ListTokens": frozenset({A}),
    "AdminService.DeleteToken": frozenset({A}),
    "PeerService.ForwardNodeTelemetry": frozenset({R, A}),
}

PRIVILEGED = frozenset(
    {
        "AdminService.CordonNode",
        "AdminService.UncordonNode",
        "AdminService.DrainNode",
        "AdminService.RevokeLease",
        "AdminService.CreateToken",
        "AdminService.DeleteToken",
    }
)


def authorize(method: str, principal: Principal) -> None:
    """PERMISSION_DENIED unless the table lets this kind of principal call `method`."""
    kinds = TABLE.get(method)
    if kinds is None:
        raise errors.permission_denied("NO_AUTHORIZATION_RULE", f"{method} has no authorization rule")
    if principal.kind not in kinds:
        wanted = " or ".join(sorted(k.value for k in kinds))
        raise errors.permission_denied(
            "WRONG_TOKEN_KIND", f"{method} needs a {wanted} token, not a {principal.kind.value} token"
        )
