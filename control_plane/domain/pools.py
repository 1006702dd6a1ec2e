"""Private pools: which capacity a tenant's search or lease looks at, in which order.

A node registered with a provider token private to a tenant is in that tenant's pool
(`Node.pool_tenant`): visible and leasable by it and by operators only (filters.visible). A
tenant with a pool chooses per call (common.proto PoolChoice); the default is its own pool
first and the federation only for what the pool cannot hold.
"""

from __future__ import annotations

from control_plane.domain import errors
from gpufed.v1 import common_pb2

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
