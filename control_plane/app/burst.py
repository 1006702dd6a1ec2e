"""Burst policies: how far each tenant's leases may go into the federation (price cap, countries).

Stored at burst/{tenant} (JSON) and watched into every replica's index, so a search or grant
reads the policy from memory.
"""

from __future__ import annotations

from control_plane.adapters.index import Inventory
from control_plane.adapters.store import EtcdStore, delete
from control_plane.auth import Kind, Principal
from control_plane.domain import errors, pools, schema
from gpufed.clock import SYSTEM, Clock
from gpufed.logs import get_logger
from gpufed.v1 import admin_pb2

audit = get_logger("gpufed.audit")


class BurstPolicies:
    def __init__(self, store: EtcdStore, inventory: Inventory, clock: Clock = SYSTEM) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.clock = clock

    def of(self, tenant: str) -> pools.Burst:
        return pools.from_json(self.inv.burst.get(tenant))[0]

    def _own(self, tenant: str, caller: Principal) -> None:
        if caller.kind is Kind.TENANT and caller.name != tenant:
            raise errors.permission_denied(
                "OTHER_PRINCIPAL", "a tenant token reads and sets only its own policy"
            )

    def get(self, name: str, caller: Principal) -> admin_pb2.BurstPolicy:
        tenant = pools.parse_policy_name(name)
        self._own(tenant, caller)
        burst, at = pools.from_json(self.inv.burst.get(tenant))
        out = admin_pb2.BurstPolicy(
            name=f"burstPolicies/{tenant}",
            max_price_per_gpu_hour=burst.max_price,
            countries=sorted(burst.countries or ()),
        )
        if at:
            out.update_time.FromNanoseconds(at)
        return out

    async def set(self, policy: admin_pb2.BurstPolicy, caller: Principal) -> admin_pb2.BurstPolicy:
        tenant = pools.parse_policy_name(policy.name)
        self._own(tenant, caller)
        burst = pools.validate_policy(policy)
        key = self.keys.burst(tenant)
        if burst == pools.Burst():
            revision = int((await self.store.txn([], [delete(key)])).header.revision)  # no limits
        else:
            revision = await self.store.put(
                key, pools.to_json(burst, self.clock.time_ns(), schema.writes_version(self.inv.schema))
            )
        await self.inv.wait_for_revision(revision, timeout=1.0)
        audit.info(
            "burst policy set",
            principal=str(caller),
            policy=policy.name,
            max_price=burst.max_price,
            countries=sorted(burst.countries or ()),
        )
        return self.get(policy.name, caller)
