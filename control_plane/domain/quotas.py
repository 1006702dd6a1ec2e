"""Quotas: the limits of a tenant and of a provider, their bounds, and the token bucket.

Pure: values in, decisions out. Where the counts come from (the index, etcd) and where the
buckets live (one per principal per replica) is control_plane.app.quotas.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from control_plane.domain import errors
from control_plane.domain.names import valid_principal
from gpufed.v1 import admin_pb2


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_gpus: int = 256
    max_leases: int = 128
    create_leases_per_second: float = 20.0
    create_leases_burst: int = 100
    max_streams: int = 64
    # Renewals (RenewLease, each KeepAlive request): 128 leases at the 5 s ttl renewed every
    # ttl/3, as the SDK does, are 77/s.
    renewals_per_second: float = 100.0
    renewal_burst: int = 1000
    # ListNodes, ListProviders and SummarizeCapacity: each may read every node of the index.
    reads_per_second: float = 20.0
    read_burst: int = 100
    # Requests waiting for capacity (CreateLease with max_wait).
    max_queued: int = 32
    # GPU-hours booked ahead (reservations not yet ended: gpu_count x window).
    max_reserved_gpu_hours: int = 10_000


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    max_nodes: int = 1000
    max_gpus_per_node: int = 64
    reports_per_second: float = 5.0
    report_burst: int = 50
    connects_per_minute: int = 6

    @property
    def connect_burst(self) -> int:
        return max(3, self.connects_per_minute // 6)


# field -> (lowest, highest): the bounds the proto documents.
TENANT_BOUNDS: dict[str, tuple[float, float]] = {
    "max_gpus": (1, 100_000),
    "max_leases": (1, 100_000),
    "create_leases_per_second": (0.01, 10_000),
    "create_leases_burst": (1, 100_000),
    "max_streams": (1, 10_000),
    "renewals_per_second": (0.01, 100_000),
    "renewal_burst": (1, 1_000_000),
    "reads_per_second": (0.01, 100_000),
    "read_burst": (1, 1_000_000),
    "max_queued": (1, 100_000),
    "max_reserved_gpu_hours": (1, 10_000_000),
}
PROVIDER_BOUNDS: dict[str, tuple[float, float]] = {
    "max_nodes": (1, 100_000),
    "max_gpus_per_node": (1, 1024),
    "reports_per_second": (0.01, 1000),
    "report_burst": (1, 10_000),
    "connects_per_minute": (1, 6000),
}

TENANTS, PROVIDERS = "tenants", "providers"


def parse_quota_name(name: str) -> tuple[str, str]:
    """("tenants" | "providers", principal) of quotas/{kind}/{principal}."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "quotas" or parts[1] not in (TENANTS, PROVIDERS):
        raise errors.invalid(
            "INVALID_QUOTA",
            "quota name must be quotas/tenants/{tenant} or quotas/providers/{provider}, "
            f"got {errors.shown(name)}",
            field="name",
        )
    if not valid_principal(parts[2]):
        raise errors.invalid(
            "INVALID_QUOTA", f"invalid principal {errors.shown(parts[2])} in the quota name", field="name"
        )
    return parts[1], parts[2]


def _checked(msg: object, bounds: dict[str, tuple[float, float]], where: str) -> dict[str, float]:
    """The set (non-zero) fields of a TenantQuota / ProviderQuota, each within its bounds."""
    out: dict[str, float] = {}
    for name, (low, high) in bounds.items():
        value = getattr(msg, name)
        if value == 0:
            continue
        if not (low <= value <= high):  # NaN fails both comparisons
            raise errors.invalid(
                "INVALID_QUOTA", f"{where}.{name} must be in {low:g}..{high:g}", field=f"{where}.{name}"
            )
        out[name] = value
    return out


def overrides_of(quota: admin_pb2.Quota) -> tuple[str, str, dict[str, float]]:
    """(kind, principal, the fields it sets), validated: what SetQuota stores."""
    kind, principal = parse_quota_name(quota.name)
    if kind == TENANTS:
        if quota.HasField("provider"):
            raise errors.invalid("INVALID_QUOTA", "a tenant's quota has no provider limits", field="provider")
        return kind, principal, _checked(quota.tenant, TENANT_BOUNDS, "tenant")
    if quota.HasField("tenant"):
        raise errors.invalid("INVALID_QUOTA", "a provider's quota has no tenant limits", field="tenant")
    return kind, principal, _checked(quota.provider, PROVIDER_BOUNDS, "provider")


def typed_limits(cls: type[TenantLimits] | type[ProviderLimits], values: dict[str, float]) -> dict[str, Any]:
    """The values as their fields declare them (rates float, counts int); unknown names dropped."""
    kinds = {f.name: float if f.type in (float, "float") else int for f in fields(cls)}
    return {k: kinds[k](v) for k, v in values.items() if k in kinds}


def tenant_limits(default: TenantLimits, overrides: dict[str, float]) -> TenantLimits:
    return replace(default, **typed_limits(TenantLimits, overrides))


def provider_limits(default: ProviderLimits, overrides: dict[str, float]) -> ProviderLimits:
    return replace(default, **typed_limits(ProviderLimits, overrides))


def check_lease(limits: TenantLimits, leases: int, gpus: int, wanted_gpus: int) -> None:
    """RESOURCE_EXHAUSTED when one more lease of `wanted_gpus` would pass the tenant's quota."""
    if leases + 1 > limits.max_leases:
        raise errors.exhausted(
            "QUOTA_LEASES",
            f"the tenant holds {leases} active leases, its quota is {limits.max_leases}",
            limit=str(limits.max_leases),
        )
    if gpus + wanted_gpus > limits.max_gpus:
        raise errors.exhausted(
            "QUOTA_GPUS",
            f"the tenant holds {gpus} GPUs, {wanted_gpus} more would pass its quota of {limits.max_gpus}",
            limit=str(limits.max_gpus),
        )


def check_node(limits: ProviderLimits, nodes: int, is_new: bool, gpus: int) -> None:
    if gpus > limits.max_gpus_per_node:
        raise errors.exhausted(
            "QUOTA_NODE_GPUS",
            f"the hello lists {gpus} GPUs, the provider's quota is {limits.max_gpus_per_node} per node",
            limit=str(limits.max_gpus_per_node),
        )
    if is_new and nodes + 1 > limits.max_nodes:
        raise errors.exhausted(
            "QUOTA_NODES",
            f"the provider has {nodes} nodes, its quota is {limits.max_nodes}",
            limit=str(limits.max_nodes),
        )


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `burst`; times are the caller's monotonic seconds."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> float:
        """0.0 when a token was taken; otherwise the seconds until one will be there."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def rate_limited(what: str, retry_after_s: float) -> errors.DomainError:
    err = errors.exhausted("RATE_LIMITED", f"{what}; retry in {retry_after_s:.2f} s")
    err.retry_after_s = retry_after_s
    return err
