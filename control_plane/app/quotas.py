"""Quotas as the replica applies them: limits from the watched overrides over the defaults,
exact counts for leases and nodes, token buckets and stream slots per replica.

Where each limit holds:
- GPUs held and active leases: exact across replicas. The grant Txn compares the tenant's
  holds unchanged since the revision they were counted at (control_plane.app.lease_txns).
- Nodes: exact as well; a new node's record is created only if none of the provider's node
  records was created since the count.
- CreateLease rate and concurrent streams: per replica (a client spread over N replicas gets N
  times the rate), as local rate limits are; documented in docs/operations.md.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from collections.abc import Container, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from control_plane.adapters.index import Inventory
from control_plane.adapters.store import EtcdStore, delete
from control_plane.auth import Kind, Principal
from control_plane.domain import errors, quotas, schema
from control_plane.domain.quotas import ProviderLimits, TenantLimits, TokenBucket
from gpufed.clock import SYSTEM, Clock
from gpufed.logs import get_logger
from gpufed.v1 import admin_pb2

audit = get_logger("gpufed.audit")
# Buckets are per principal; principals are authenticated tokens, so this only bounds memory
# against a very large number of tokens (an evicted bucket starts full again).
MAX_BUCKETS = 100_000


@dataclass(slots=True)
class _Gate:
    """One tenant's grants on this replica that the index cannot count yet."""

    inflight: dict[str, int] = field(default_factory=dict)  # lease id (node name) -> GPUs
    committed: list[tuple[int, int]] = field(default_factory=list)  # (revision, GPUs), oldest first

    def prune(self, indexed: int) -> None:
        while self.committed and self.committed[0][0] <= indexed:
            self.committed.pop(0)

    def uncounted(self, counted_at: int, counted: Container[str]) -> tuple[int, int]:
        """(leases, GPUs) of this replica's grants a count at revision `counted_at` of the
        names `counted` misses. A grant still in flight may be in the count already (the
        watch can apply its write before the Txn's answer settles the reservation): it is
        left out by name, never counted twice. Pure: only the index's own revision may prune
        (a fresher etcd read must not drop grants the index has not seen yet)."""
        late = [g for rev, g in self.committed if rev > counted_at]
        flying = [g for name, g in self.inflight.items() if name not in counted]
        return len(flying) + len(late), sum(flying) + sum(late)


@dataclass(slots=True)
class Reservation:
    """Room held in a tenant's (or provider's, key "providers/{name}") quota until settled."""

    quotas: Quotas
    tenant: str
    gate: _Gate
    name: str  # the lease id (node name) the grant creates
    gpus: int
    revision: int  # the tenant's holds were counted at this revision

    def done(self, committed_revision: int) -> None:
        """The grant is settled: committed at `committed_revision`, or not (0)."""
        self.gate.inflight.pop(self.name, None)
        if committed_revision:
            bisect.insort(self.gate.committed, (committed_revision, self.gpus))
        self.quotas._forget_gate(self.tenant, self.gate)


# Provider streams beyond its node quota that a replica accepts: reconnects overlap briefly with
# the stream they replace.
PROVIDER_STREAM_SLACK = 64


class Quotas:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        tenant_default: TenantLimits | None = None,
        provider_default: ProviderLimits | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.tenant_default = tenant_default or TenantLimits()
        self.provider_default = provider_default or ProviderLimits()
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # tenant -> CreateLease
        self._connects: OrderedDict[str, TokenBucket] = OrderedDict()  # node name -> hellos
        self._renewals: OrderedDict[str, TokenBucket] = OrderedDict()  # tenant -> renewals
        self._reads: OrderedDict[str, TokenBucket] = OrderedDict()  # tenant -> list/summary reads
        self.streams: dict[str, int] = {}
        self._gates: dict[str, _Gate] = {}  # tenant -> its grants in flight on this replica

    # -- limits ---------------------------------------------------------------------------------

    def _record(self, kind: str, principal: str) -> dict[str, Any]:
        raw = self.inv.quotas.get(f"{kind}/{principal}")
        if raw is None:
            return {}
        try:
            found = json.loads(raw)
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def _overrides(self, kind: str, principal: str) -> dict[str, float]:
        limits = self._record(kind, principal).get("limits")
        return limits if isinstance(limits, dict) else {}

    def tenant(self, name: str) -> TenantLimits:
        return quotas.tenant_limits(self.tenant_default, self._overrides(quotas.TENANTS, name))

    def provider(self, name: str) -> ProviderLimits:
        return quotas.provider_limits(self.provider_default, self._overrides(quotas.PROVIDERS, name))

    # -- counted limits -------------------------------------------------------------------------

    async def lease_counts(self, tenant: str, fresh: bool) -> tuple[int, int, int]:
        """(active leases, GPUs held, the revision they were counted at): from the index, or
        (fresh) from the tenant's holds in etcd, which the index may lag behind on a release."""
        leases, gpus, revision, _ = await self._holds(tenant, fresh)
        return leases, gpus, revision

    async def _holds(self, tenant: str, fresh: bool) -> tuple[int, int, int, Container[str]]:
        """lease_counts, and the lease ids counted."""
        if not fresh:
            leases, gpus = self.inv.tenant_holds(tenant)
            return leases, gpus, self.inv.revision, self.inv.tenant_leases.get(tenant, {})
        kvs, revision = await self.store.get_prefix(self.keys.holds_dir(tenant))
        ids = {kv.key.rsplit(b"/", 1)[-1].decode() for kv in kvs}
        return len(kvs), sum(int(kv.value or b"0") for kv in kvs), revision, ids

    async def reserve_lease(self, tenant: str, lease_id: str, gpus: int) -> Reservation:
        """Room for one more lease of `gpus` GPUs within the tenant's quota; RESOURCE_EXHAUSTED
        QUOTA_LEASES / QUOTA_GPUS otherwise. The reservation carries the revision the count is
        complete at for the other replicas' grants, which the grant Txn compares unchanged.

        This replica's own grants it counts itself, exactly: those in flight (grants of one
        tenant share group commits, and etcd checks each nested Txn against the state before
        the batch) and those committed but not yet in the index. So one tenant's concurrent
        grants here neither wait for each other nor fail each other's compares."""
        gate = self._gates.get(tenant)
        if gate is None:
            gate = self._gates[tenant] = _Gate()
        limits = self.tenant(tenant)
        leases, held, revision, ids = await self._holds(tenant, fresh=False)
        gate.prune(revision)
        own_leases, own_gpus = gate.uncounted(revision, ids)
        try:
            quotas.check_lease(limits, leases + own_leases, held + own_gpus, gpus)
        except errors.DomainError:
            # The index may not have seen a release yet: only etcd may say no.
            leases, held, revision, ids = await self._holds(tenant, fresh=True)
            # While this waited, the gate may have emptied and been dropped (and another made):
            # count and reserve on the one in place now, never on one nobody else sees.
            gate = self._gates.setdefault(tenant, gate)
            own_leases, own_gpus = gate.uncounted(revision, ids)
            quotas.check_lease(limits, leases + own_leases, held + own_gpus, gpus)
        gate.inflight[lease_id] = gpus
        return Reservation(self, tenant, gate, lease_id, gpus, revision)

    def _forget_gate(self, tenant: str, gate: _Gate) -> None:
        gate.prune(self.inv.revision)
        if not gate.inflight and not gate.committed and self._gates.get(tenant) is gate:
            del self._gates[tenant]

    def reserve_node(self, provider: str, node_name: str, gpus: int) -> Reservation | None:
        """Room for the node within the provider's quota: a reservation for a node the index
        does not know (its creation compares the other replicas' markers unchanged since the
        count, like a tenant's holds), None for a known one; RESOURCE_EXHAUSTED otherwise."""
        limits = self.provider(provider)
        is_new = node_name not in self.inv.nodes
        key = f"providers/{provider}"
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        revision = self.inv.revision
        gate.prune(revision)
        own, _ = gate.uncounted(revision, self.inv.nodes)
        try:
            quotas.check_node(limits, self.inv.provider_nodes(provider) + own, is_new, gpus)
        finally:
            self._forget_gate(key, gate)
        if not is_new:
            return None
        gate = self._gates.setdefault(key, gate)
        gate.inflight[node_name] = 0
        return Reservation(self, key, gate, node_name, 0, revision)

    # -- rates and streams ----------------------------------------------------------------------

    def _take(self, buckets: OrderedDict[str, TokenBucket], key: str, rate: float, burst: int) -> float:
        """0.0 when `key`'s bucket had a token; else the seconds until it will."""
        now = self.clock.monotonic()
        bucket = buckets.get(key)
        if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
            bucket = buckets[key] = TokenBucket.full(rate, burst, now)
            if len(buckets) > MAX_BUCKETS:
                buckets.popitem(last=False)
        buckets.move_to_end(key)
        return bucket.take(now)

    def take_create(self, tenant: str) -> None:
        limits = self.tenant(tenant)
        self._take_tenant(
            self._buckets, tenant, limits.create_leases_per_second, limits.create_leases_burst, "CreateLease"
        )

    def take_renewal(self, tenant: str) -> None:
        limits = self.tenant(tenant)
        self._take_tenant(
            self._renewals, tenant, limits.renewals_per_second, limits.renewal_burst, "renewals"
        )

    def take_read(self, tenant: str) -> None:
        limits = self.tenant(tenant)
        self._take_tenant(
            self._reads, tenant, limits.reads_per_second, limits.read_burst, "list and summary calls"
        )

    def _take_tenant(
        self, buckets: OrderedDict[str, TokenBucket], tenant: str, rate: float, burst: int, what: str
    ) -> None:
        wait = self._take(buckets, tenant, rate, burst)
        if wait:
            raise quotas.rate_limited(f"tenant {tenant} passed its rate of {rate:g} {what}/s", wait)

    def take_connect(self, provider: str, node: str) -> None:
        limits = self.provider(provider)
        rate = limits.connects_per_minute / 60
        wait = self._take(self._connects, node, rate, limits.connect_burst)
        if wait:
            raise quotas.rate_limited(
                f"{node} passed its provider's {limits.connects_per_minute} connects per minute", wait
            )

    def report_bucket(self, provider: str) -> TokenBucket:
        limits = self.provider(provider)
        return TokenBucket.full(limits.reports_per_second, limits.report_burst, self.clock.monotonic())

    def stream_slot(self, caller: Principal | None) -> AbstractContextManager[None]:
        """What a streaming RPC holds while it runs: one of a tenant's stream slots, or one of a
        provider's (its node quota plus PROVIDER_STREAM_SLACK: one stream per node, with room
        for reconnects that overlap the stream they replace); operators' are not counted."""
        if caller is None:
            return nullcontext()
        if caller.kind is Kind.TENANT:
            return self.stream(f"tenant {caller.name}", self.tenant(caller.name).max_streams)
        if caller.kind is Kind.PROVIDER:
            limit = self.provider(caller.name).max_nodes + PROVIDER_STREAM_SLACK
            return self.stream(f"provider {caller.name}", limit)
        return nullcontext()

    @contextmanager
    def stream(self, who: str, limit: int) -> Iterator[None]:
        """One of `who`'s concurrent streams on this replica; TOO_MANY_STREAMS past `limit`."""
        open_now = self.streams.get(who, 0)
        if open_now >= limit:
            raise errors.exhausted(
                "TOO_MANY_STREAMS",
                f"{who} has {open_now} streams open on this replica, its quota is {limit}",
                limit=str(limit),
            )
        self.streams[who] = open_now + 1
        try:
            yield
        finally:
            left = self.streams[who] - 1
            if left:
                self.streams[who] = left
            else:
                del self.streams[who]

    # -- admin ----------------------------------------------------------------------------------

    async def set(self, quota: admin_pb2.Quota) -> admin_pb2.Quota:
        kind, principal, overrides = quotas.overrides_of(quota)
        key = self.keys.quota(kind, principal)
        if overrides:
            record = schema.stamped(
                {"limits": overrides, "update_time_ns": self.clock.time_ns()},
                schema.writes_version(self.inv.schema),
            )
            revision = await self.store.put(key, json.dumps(record, sort_keys=True).encode())
        else:  # nothing set: back to the defaults
            revision = int((await self.store.txn([], [delete(key)])).header.revision)
        await self.inv.wait_for_revision(revision, timeout=1.0)
        audit.info("quota set", quota=quota.name, limits=overrides)
        return self.effective(kind, principal)

    def effective(self, kind: str, principal: str) -> admin_pb2.Quota:
        out = admin_pb2.Quota(name=f"quotas/{kind}/{principal}")
        at = self._record(kind, principal).get("update_time_ns")
        if isinstance(at, int):
            out.update_time.FromNanoseconds(at)
        # The limits' field names are the proto's.
        if kind == quotas.TENANTS:
            out.tenant.CopyFrom(admin_pb2.TenantQuota(**asdict(self.tenant(principal))))
        else:
            out.provider.CopyFrom(admin_pb2.ProviderQuota(**asdict(self.provider(principal))))
        return out

    def get(self, name: str, caller: Principal) -> admin_pb2.GetQuotaResponse:
        """The effective quota and its use; a tenant or provider reads only its own."""
        kind, principal = quotas.parse_quota_name(name)
        own = {Kind.TENANT: quotas.TENANTS, Kind.PROVIDER: quotas.PROVIDERS}.get(caller.kind)
        if own is not None and (own, caller.name) != (kind, principal):
            raise errors.permission_denied(
                "OTHER_PRINCIPAL", f"a {caller.kind} token reads only its own quota"
            )
        out = admin_pb2.GetQuotaResponse(quota=self.effective(kind, principal))
        if kind == quotas.TENANTS:
            out.active_leases, out.held_gpus = self.inv.tenant_holds(principal)
        else:
            out.nodes = self.inv.provider_nodes(principal)
        return out
