"""The one authorization table: which kinds of principal may call each gpufed RPC.

The RPC wrapper (control_plane.rpc) checks it before any servicer code runs; a method missing
from the table is refused (fail closed), so a new RPC cannot ship without its row. What a
principal may see *within* an allowed call (its own leases, its own nodes' telemetry) is the
application's business: scoped by tenant or provider there.

Privileged methods are those whose every call is an audit event (gpufed.audit), besides denials.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.auth import Kind, Principal
from control_plane.domain import errors

T, P, A, R = Kind.TENANT, Kind.PROVIDER, Kind.ADMIN, Kind.PEER


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one RPC, and what they see within it (enforced by the application layer,
    which scopes each read and write to the caller; docs/api.md renders this table)."""

    kinds: frozenset[Kind]
    scope: str


def _rule(scope: str, *kinds: Kind) -> Rule:
    return Rule(frozenset(kinds), scope)


ALL_OFFERS = "all public capacity; a tenant's views never name another tenant's leases"
OWN_LEASES = "a tenant: its own leases (another's is NOT_FOUND); an admin: any"
OWN_RESERVATIONS = "a tenant: its own reservations (another's is NOT_FOUND); an admin: any"
TABLE: dict[str, Rule] = {
    "NodeService.Connect": _rule("its own nodes (hello.provider = the token's provider)", P),
    # Discovery is for developers and operators; a provider reads its own nodes (their health,
    # repairs, which lease holds a GPU: what its daemons already know) and usage records.
    "DiscoveryService.SearchOffers": _rule(ALL_OFFERS, T, A),
    "DiscoveryService.GetNode": _rule(ALL_OFFERS + "; a provider: its own nodes only", T, P, A),
    "DiscoveryService.ListNodes": _rule(ALL_OFFERS + "; a provider: its own nodes only", T, P, A),
    "DiscoveryService.ListProviders": _rule(ALL_OFFERS, T, A),
    "DiscoveryService.SummarizeCapacity": _rule(ALL_OFFERS, T, A),
    "DiscoveryService.WatchCapacity": _rule(ALL_OFFERS, T, A),
    "LeaseService.CreateLease": _rule("leases for itself, within its quota", T),
    "LeaseService.GetLease": _rule(OWN_LEASES, T, A),
    "LeaseService.ListLeases": _rule(OWN_LEASES, T, A),
    "LeaseService.RenewLease": _rule("its own leases", T),
    "LeaseService.KeepAlive": _rule("its own leases", T),
    "LeaseService.ReleaseLease": _rule("its own leases", T),
    "LeaseService.WatchLease": _rule(OWN_LEASES, T, A),
    "ReservationService.CreateReservation": _rule("reservations for itself", T),
    "ReservationService.GetReservation": _rule(OWN_RESERVATIONS, T, A),
    "ReservationService.ListReservations": _rule(OWN_RESERVATIONS, T, A),
    "ReservationService.CancelReservation": _rule(OWN_RESERVATIONS, T, A),
    "ReservationService.WatchReservation": _rule(OWN_RESERVATIONS, T, A),
    "TelemetryService.GetNodeTelemetry": _rule(
        "a tenant: only the GPUs it holds now; a provider: only its own nodes; an admin: any", T, P, A
    ),
    "AdminService.CordonNode": _rule("any node", A),
    "AdminService.UncordonNode": _rule("any node", A),
    "AdminService.DrainNode": _rule("any node", A),
    "AdminService.RevokeLease": _rule("any lease", A),
    "AdminService.ListUsageRecords": _rule(
        "a tenant: its own records; a provider: its own; an admin: any", T, P, A
    ),
    "AdminService.CreateToken": _rule("any principal", A),
    "AdminService.ListTokens": _rule("every token, without secrets", A),
    "AdminService.DeleteToken": _rule("any token", A),
    "AdminService.SetQuota": _rule("any tenant or provider", A),
    "AdminService.GetQuota": _rule("a tenant or provider: its own; an admin: any", T, P, A),
    "AdminService.SetBurstPolicy": _rule("a tenant: its own; an admin: any", T, A),
    "AdminService.GetBurstPolicy": _rule("a tenant: its own; an admin: any", T, A),
    "AdminService.GetCaller": _rule("who its own token acts as", T, P, A),
    "AdminService.ListAuditEvents": _rule("this replica's recent audit events", A),
    "AdminService.SetGpuHealthy": _rule("any node's GPUs", A),
    "PeerService.ForwardNodeTelemetry": _rule("telemetry of nodes streaming to this replica", R, A),
}

# Operators' acts: every call is an audit event (gpufed.audit).
PRIVILEGED = frozenset(
    {
        "AdminService.CordonNode",
        "AdminService.UncordonNode",
        "AdminService.DrainNode",
        "AdminService.RevokeLease",
        "AdminService.CreateToken",
        "AdminService.DeleteToken",
        "AdminService.SetQuota",
        "AdminService.SetGpuHealthy",
    }
)
# Every call of these is audited too, besides denials: grants and releases. (Expiries are
# audited by the leader, which sees them; see control_plane.app.leader.)
AUDITED = PRIVILEGED | {
    "LeaseService.CreateLease",
    "LeaseService.ReleaseLease",
    "ReservationService.CreateReservation",
    "ReservationService.CancelReservation",
    "AdminService.SetBurstPolicy",
}


def authorize(method: str, principal: Principal) -> None:
    """PERMISSION_DENIED unless the table lets this kind of principal call `method`."""
    rule = TABLE.get(method)
    if rule is None:
        raise errors.permission_denied("NO_AUTHORIZATION_RULE", f"{method} has no authorization rule")
    if principal.kind not in rule.kinds:
        wanted = " or ".join(sorted(k.value for k in rule.kinds))
        raise errors.permission_denied(
            "WRONG_TOKEN_KIND", f"{method} needs a {wanted} token, not a {principal.kind.value} token"
        )


def render_markdown() -> str:
    """The table as docs/api.md shows it (scripts/render_authorization.py writes it there)."""
    kinds = [T, P, A, R]
    lines = [
        "| RPC | " + " | ".join(k.value for k in kinds) + " | scope |",
        "|---|" + "---|" * len(kinds) + "---|",
    ]
    for method, rule in TABLE.items():
        marks = " | ".join("yes" if k in rule.kinds else "" for k in kinds)
        audited = " (audited)" if method in AUDITED else ""
        lines.append(f"| `{method}`{audited} | {marks} | {rule.scope} |")
    return "\n".join(lines) + "\n"
