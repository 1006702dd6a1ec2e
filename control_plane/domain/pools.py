"""Private pools: which capacity a tenant's search or lease looks at, in which order.

A node registered with a provider token private to a tenant is in that tenant's pool
(`Node.pool_tenant`): visible and leasable by it and by operators only (filters.visible). A
tenant with a pool chooses per call (common.proto PoolChoice); the default is its own pool
first and the federation only for what the pool cannot hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from control_plane.domain import errors, schema
from control_plane.domain.errors import shown
from control_plane.domain.filters import Filter, country_codes
from control_plane.domain.names import valid_principal
from gpufed.v1 import admin_pb2, common_pb2

OWN_ONLY = common_pb2.POOL_CHOICE_OWN_ONLY
FEDERATION_ONLY = common_pb2.POOL_CHOICE_FEDERATION_ONLY
OWN_FIRST = common_pb2.POOL_CHOICE_OWN_FIRST
_CHOICES = frozenset(common_pb2.PoolChoice.values())


def validate_choice(choice: int, field: str = "pool") -> None:
    if choice not in _CHOICES:
        raise errors.invalid("INVALID_POOL", f"unknown pool choice {choice}", field=field)


def stages(choice: int, has_pool: bool, mixed: bool = False) -> list[str]:
    """The pool scopes (filters.Filter.pool) to try in order: the first that holds the whole
    lease wins; a search lists them one after the other. `mixed`: a SPREAD lease that allows own
    and federation GPUs together, tried last."""
    if choice == OWN_ONLY:
        return ["own"]
    if choice == FEDERATION_ONLY or not has_pool:
        return ["federation"]
    return ["own", "federation", *(["any"] if mixed else [])]


def kind_of(pool_tenant: str, tenant: str) -> int:
    """OWN for a GPU of the tenant's own pool, else FEDERATION."""
    return (
        common_pb2.POOL_KIND_OWN if pool_tenant and pool_tenant == tenant else common_pb2.POOL_KIND_FEDERATION
    )


# -- burst policy -------------------------------------------------------------------------------

MAX_BURST_COUNTRIES = 64
MAX_BURST_PRICE = 1e6


@dataclass(frozen=True, slots=True)
class Burst:
    """Limits on federation capacity: a price cap (0: none) and allowed countries (None: any)."""

    max_price: float = 0.0
    countries: frozenset[str] | None = None


def parse_policy_name(name: str) -> str:
    """The tenant of "burstPolicies/{tenant}"; INVALID_ARGUMENT if malformed."""
    prefix, _, tenant = name.partition("/")
    if prefix != "burstPolicies" or not valid_principal(tenant):
        raise errors.invalid(
            "INVALID_POLICY_NAME",
            f"the name must be burstPolicies/{{tenant}}, got {shown(name)}",
            field="name",
        )
    return tenant


def validate_policy(p: admin_pb2.BurstPolicy) -> Burst:
    price = p.max_price_per_gpu_hour
    if not (math.isfinite(price) and 0 <= price <= MAX_BURST_PRICE):
        raise errors.invalid(
            "INVALID_PRICE",
            f"max_price_per_gpu_hour must be in [0, {MAX_BURST_PRICE:g}]",
            field="policy.max_price_per_gpu_hour",
        )
    if len(p.countries) > MAX_BURST_COUNTRIES:
        raise errors.invalid(
            "TOO_MANY_COUNTRIES", f"at most {MAX_BURST_COUNTRIES} countries", field="policy.countries"
        )
    return Burst(price, country_codes(list(p.countries), "policy.countries") or None)


def to_json(b: Burst, at_ns: int, schema_version: int = schema.OLDEST_READ) -> bytes:
    record = {"max_price": b.max_price, "countries": sorted(b.countries or ()), "update_time_ns": at_ns}
    return json.dumps(schema.stamped(record, schema_version)).encode()


def from_json(raw: bytes | None) -> tuple[Burst, int]:
    if not raw:
        return Burst(), 0
    d = json.loads(raw)
    return Burst(float(d["max_price"]), frozenset(d["countries"]) or None), int(d["update_time_ns"])


def narrowed(flt: Filter, b: Burst) -> Filter | None:
    """The filter for federation capacity under the policy: the lower price cap and the common
    countries (None: no country is left, so no federation GPU may be used)."""
    caps = [x for x in (flt.max_price, b.max_price) if x]  # 0 means no cap
    price = min(caps, default=0.0)
    countries = flt.countries
    if b.countries is not None:
        countries = b.countries if countries is None else countries & b.countries
        if not countries:
            return None
    return dataclasses.replace(flt, max_price=price, countries=countries)


def scoped(flt: Filter, scope: str, burst: Burst) -> list[Filter]:
    """The filters whose candidates, one after the other, make up a scope: the own pool as
    asked; federation capacity within the burst policy too ("any": both, own first)."""
    own = dataclasses.replace(flt, pool="own")
    federation = narrowed(dataclasses.replace(flt, pool="federation"), burst)
    fed = [federation] if federation is not None else []
    if scope == "own":
        return [own]
    if scope == "federation":
        return fed
    return [own, *fed]
