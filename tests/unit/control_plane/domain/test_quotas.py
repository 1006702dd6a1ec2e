"""Quota rules: bounds of every limit, overrides merged over the defaults, the token bucket."""

from __future__ import annotations

import math

import pytest

from control_plane.domain import quotas
from control_plane.domain.errors import Code, DomainError
from control_plane.domain.quotas import ProviderLimits, TenantLimits, TokenBucket
from gpufed.v1 import admin_pb2


def _quota(name: str, **tenant: float) -> admin_pb2.Quota:
    q = admin_pb2.Quota(name=name)
    q.tenant.SetInParent()
    for k, v in tenant.items():
        setattr(q.tenant, k, v)
    return q


def test_set_fields_are_the_overrides_and_zero_means_the_default() -> None:
    kind, who, overrides = quotas.overrides_of(_quota("quotas/tenants/acme", max_gpus=16))
    assert (kind, who, overrides) == ("tenants", "acme", {"max_gpus": 16})
    limits = quotas.tenant_limits(TenantLimits(), overrides)
    assert limits.max_gpus == 16 and limits.max_leases == TenantLimits().max_leases


def test_rates_stay_fractional_and_counts_whole_whatever_the_default_held() -> None:
    limits = quotas.tenant_limits(
        TenantLimits(create_leases_per_second=10, max_gpus=5),
        {"create_leases_per_second": 0.5, "max_gpus": 7.0},
    )
    assert limits.create_leases_per_second == 0.5 and isinstance(limits.max_gpus, int)


@pytest.mark.parametrize(
    ("name", "values", "field"),
    [
        ("quotas/tenants/acme", {"max_gpus": 100_001}, "tenant.max_gpus"),
        ("quotas/tenants/acme", {"create_leases_per_second": math.nan}, "tenant.create_leases_per_second"),
        ("quotas/tenants/acme", {"create_leases_per_second": math.inf}, "tenant.create_leases_per_second"),
        ("quotas/tenants/Acme", {}, "name"),
        ("quotas/tenants/a.b", {}, "name"),
        ("quotas/teams/acme", {}, "name"),
        ("quotas/tenants/acme/x", {}, "name"),
    ],
)
def test_a_quota_out_of_bounds_is_invalid_with_its_field(
    name: str, values: dict[str, float], field: str
) -> None:
    with pytest.raises(DomainError) as e:
        quotas.overrides_of(_quota(name, **values))
    assert (e.value.code, e.value.reason, e.value.field) == (Code.INVALID_ARGUMENT, "INVALID_QUOTA", field)


def test_a_providers_quota_refuses_tenant_limits() -> None:
    q = _quota("quotas/providers/neo", max_gpus=3)
    with pytest.raises(DomainError) as e:
        quotas.overrides_of(q)
    assert e.value.field == "tenant"


def test_one_lease_past_either_limit_is_exhausted_with_its_reason() -> None:
    limits = TenantLimits(max_gpus=8, max_leases=2)
    quotas.check_lease(limits, 1, 4, 4)  # exactly at both limits
    with pytest.raises(DomainError) as e:
        quotas.check_lease(limits, 2, 0, 1)
    assert (e.value.code, e.value.reason) == (Code.RESOURCE_EXHAUSTED, "QUOTA_LEASES")
    with pytest.raises(DomainError) as e:
        quotas.check_lease(limits, 0, 5, 4)
    assert e.value.reason == "QUOTA_GPUS"


def test_a_known_node_may_reconnect_at_the_node_quota_but_not_a_new_one() -> None:
    limits = ProviderLimits(max_nodes=2, max_gpus_per_node=8)
    quotas.check_node(limits, 2, False, 8)
    with pytest.raises(DomainError) as e:
        quotas.check_node(limits, 2, True, 8)
    assert e.value.reason == "QUOTA_NODES"
    with pytest.raises(DomainError) as e:
        quotas.check_node(limits, 0, True, 9)
    assert e.value.reason == "QUOTA_NODE_GPUS"


def test_the_bucket_allows_its_burst_then_its_rate_and_says_when() -> None:
    b = TokenBucket.full(rate=2.0, burst=3, now=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)
    assert b.take(100.5) == 0.0  # one token came back in half a second
    assert b.take(200.0) == 0.0 and b.tokens == pytest.approx(2.0)  # refills only to the burst


def test_rate_limited_carries_its_retry_delay() -> None:
    err = quotas.rate_limited("too fast", 0.25)
    assert (err.code, err.reason, err.retry_after_s) == (Code.RESOURCE_EXHAUSTED, "RATE_LIMITED", 0.25)
