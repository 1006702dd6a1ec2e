"""Operator work: node states (cordon, drain), lease revocation, usage records and tokens."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import timestamp_pb2

from control_plane import auth
from control_plane.adapters.audit_ring import AuditRing
from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import MAX_NS
from control_plane.adapters.store import EtcdStore, KeyValue, delete, prefix_end
from control_plane.app.leases import Leases
from control_plane.domain import errors, pagination, registration, repair, schema
from control_plane.domain.errors import shown
from control_plane.domain.names import parse_lease_name, parse_node_name, valid_id, valid_principal
from control_plane.domain.times import timestamp_ns
from gpufed.clock import NS, SYSTEM, Clock, now_ts, timestamp
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2

NodeState = common_pb2.NodeState
MAX_DRAIN_GRACE_S = 7 * 24 * 3600
MAX_REASON = 256
# Keys one ListUsageRecords page may read past its filter before it answers with what it has.
USAGE_SCAN_LIMIT = 2000
MAX_AUDIT_PAGE = 500
KINDS = {
    admin_pb2.TOKEN_KIND_TENANT: auth.Kind.TENANT,
    admin_pb2.TOKEN_KIND_PROVIDER: auth.Kind.PROVIDER,
    admin_pb2.TOKEN_KIND_ADMIN: auth.Kind.ADMIN,
}
_KIND_PB = {v: k for k, v in KINDS.items()}


def _ts(iso: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(iso.replace("+00:00", "Z"))
    return ts


class Admin:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        leases: Leases,
        clock: Clock = SYSTEM,
        audit_ring: AuditRing | None = None,
        replica_id: str = "",
    ) -> None:
        self.audit_ring = audit_ring or AuditRing()
        self.replica_id = replica_id
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.leases = leases
        self.clock = clock

    # -- nodes ----------------------------------------------------------------------------------

    async def set_state(
        self, name: str, state: int, reason: str, grace_s: float | None = None
    ) -> common_pb2.Node:
        """Write the operator state of a node (UNSPECIFIED: uncordon). A drain gets a deadline of
        now + grace, when the leader ends the leases still on the node."""
        parse_node_name(name)  # INVALID_ARGUMENT before any other check
        if len(reason) > MAX_REASON:
            raise errors.invalid(
                "INVALID_REASON", f"reason is at most {MAX_REASON} characters", field="reason"
            )
        if grace_s is not None and not 0 <= grace_s <= MAX_DRAIN_GRACE_S:
            raise errors.invalid(
                "INVALID_GRACE", f"grace must be in [0, {MAX_DRAIN_GRACE_S}] seconds", field="grace"
            )
        now = self.clock.time_ns()

        def change(node: common_pb2.Node) -> None:
            node.state = state  # type: ignore[assignment]
            node.state_reason = reason if state else ""
            node.ClearField("drain_deadline")
            if grace_s is not None:
                node.drain_deadline.CopyFrom(timestamp(now + int(grace_s * NS)))

        return await self._change_node(name, change)

    async def _change_node(self, name: str, change: Callable[[common_pb2.Node], None]) -> common_pb2.Node:
        """An operator's change of a node record (compare-and-swap), once the index has it."""
        provider, node_id = parse_node_name(name)

        def update(kv: KeyValue | None) -> bytes:
            if kv is None:
                raise errors.not_found("NODE_NOT_FOUND", f"{name} is not registered", node=name)
            node = common_pb2.Node.FromString(kv.value)
            change(node)
            node.update_time.CopyFrom(now_ts(self.clock))
            return node.SerializeToString()

        updated = await self.store.update(
            self.keys.node(provider, node_id), update, what="the node record", reason="NODE_CHANGING"
        )
        await self.inv.wait_for_revision(updated.revision)
        view = self.inv.view(name)
        return view if view is not None else common_pb2.Node.FromString(updated.value or b"")

    async def set_gpu_healthy(self, name: str, gpu_uuid: str, reason: str, who: str) -> common_pb2.Node:
        """An operator's clear of a GPU's repair and faults (its MIG instances follow it); the
        replica streaming the node tells its daemon (control_plane.app.nodes)."""
        parse_node_name(name)
        if not 1 <= len(reason) <= MAX_REASON:
            raise errors.invalid("REASON_REQUIRED", f"say why, in 1..{MAX_REASON} characters", field="reason")

        def change(node: common_pb2.Node) -> None:
            gpu = next((g for g in node.gpus if g.uuid == gpu_uuid and not g.parent_uuid), None)
            if gpu is None:
                raise errors.not_found("GPU_NOT_FOUND", f"{name} has no GPU {shown(gpu_uuid)}", node=name)
            repair.set_healthy(gpu, who, reason, now_ts(self.clock))
            registration.follow_parents(node)

        return await self._change_node(name, change)

    # -- leases and usage -----------------------------------------------------------------------

    async def revoke(self, name: str, reason: str) -> lease_pb2.Lease:
        if len(reason) > MAX_REASON:
            raise errors.invalid(
                "INVALID_REASON", f"reason is at most {MAX_REASON} characters", field="reason"
            )
        return await self.leases.end(parse_lease_name(name), lease_pb2.LEASE_END_REASON_REVOKED, reason)

    async def usage(
        self, p: auth.Principal, request: admin_pb2.ListUsageRecordsRequest
    ) -> tuple[list[admin_pb2.UsageRecord], str]:
        provider, tenant = request.provider, request.tenant
        if provider and not valid_id(provider):
            raise errors.invalid(
                "INVALID_PROVIDER", f"{shown(provider)} is not a valid provider name", field="provider"
            )
        if tenant and not valid_principal(tenant):
            raise errors.invalid(
                "INVALID_TENANT", f"{shown(tenant)} is not a valid tenant name", field="tenant"
            )
        if p.kind == auth.Kind.PROVIDER:
            if provider and provider != p.name:
                raise errors.permission_denied("OTHER_PROVIDER", "a provider token sees only its own usage")
            provider = p.name
        elif p.kind == auth.Kind.TENANT:
            if tenant and tenant != p.name:
                raise errors.permission_denied("OTHER_TENANT", "a tenant token sees only its own usage")
            tenant = p.name
        size = pagination.page_size(request.page_size)
        start_ns = timestamp_ns(request.start_time, "start_time") if request.HasField("start_time") else 0
        end_ns = timestamp_ns(request.end_time, "end_time") if request.HasField("end_time") else MAX_NS
        query = pagination.query_hash("usage", provider, tenant, str(start_ns), str(end_ns))
        after = pagination.decode_cursor(request.page_token, query)
        # The caller's own range: its provider's records, else its tenant's, else (an operator
        # asking for everything) every provider's, by provider and end time.
        if provider and p.kind != auth.Kind.TENANT:
            top, by_time = self.keys.usage_dir(provider), True
        elif tenant:
            top, by_time = self.keys.tenant_usage_dir(tenant), True
        else:
            top, by_time = self.keys.usage_dir(), False
        lo = top + (f"{start_ns:020d}" if by_time else "")
        hi = (top + f"{end_ns:020d}").encode() if by_time else prefix_end(top.encode())
        start = (top + after + "\0") if after else lo
        records: list[admin_pb2.UsageRecord] = []
        last, scanned = "", 0
        while len(records) < size and scanned < USAGE_SCAN_LIMIT:
            kvs, more = await self.store.get_range(start, hi, min(USAGE_SCAN_LIMIT, size - len(records) + 1))
            for kv in kvs:
                scanned += 1
                r = admin_pb2.UsageRecord.FromString(kv.value)
                if len(records) == size:
                    return records, pagination.encode_cursor(query, last)
                last = kv.key.decode()[len(top) :]
                if (
                    (not tenant or r.tenant == tenant)
                    and (not provider or r.provider == provider)
                    and start_ns <= r.end_time.ToNanoseconds() < end_ns
                ):
                    records.append(r)
            if not more or not kvs:
                return records, ""
            start = top + last + "\0"
        # A page filled (or scanned as far as one page may): the rest from where it stopped.
        return records, pagination.encode_cursor(query, last)

    # -- tokens ---------------------------------------------------------------------------------

    def audit_events(self, page_size: int, page_token: str) -> admin_pb2.ListAuditEventsResponse:
        """This replica's recent audit events, newest first, a page at a time (AIP-158)."""
        ring, replica = self.audit_ring, self.replica_id
        if not 0 <= page_size <= MAX_AUDIT_PAGE:
            raise errors.invalid(
                "INVALID_PAGE_SIZE", f"page_size must be in 0..{MAX_AUDIT_PAGE}", field="page_size"
            )
        query = pagination.query_hash("audit", replica)
        last = pagination.decode_cursor(page_token, query)
        if last and not last.isdigit():
            raise errors.invalid("INVALID_PAGE_TOKEN", "page_token is malformed", field="page_token")
        entries, more = ring.before(int(last) if last else None, page_size or 50)
        out = admin_pb2.ListAuditEventsResponse(replica=replica)
        for e in entries:
            ev = out.events.add(**e.fields)
            ev.time.seconds, ev.time.nanos = divmod(e.time_ns, 1_000_000_000)
            ev.details.extend(e.details)
        if more is not None:
            out.next_page_token = pagination.encode_cursor(query, str(more))
        return out

    @staticmethod
    def caller(p: auth.Principal) -> admin_pb2.GetCallerResponse:
        """Who a token acts as (the peer token, which no client holds, shows as UNSPECIFIED)."""
        return admin_pb2.GetCallerResponse(
            kind=_KIND_PB.get(p.kind, admin_pb2.TOKEN_KIND_UNSPECIFIED),
            principal=p.name,
            private_to=p.private_to,
        )

    async def create_token(
        self, kind_pb: int, principal: str, private_to: str = ""
    ) -> tuple[admin_pb2.Token, str]:
        kind = KINDS.get(kind_pb)  # type: ignore[call-overload]
        if kind is None:
            raise errors.invalid("INVALID_TOKEN_KIND", "kind must be TENANT, PROVIDER or ADMIN", field="kind")
        if not valid_principal(principal):
            raise errors.invalid(
                "INVALID_PRINCIPAL",
                f"{shown(principal)} must be a DNS label (a-z, 0-9, -)",
                field="principal",
            )
        if private_to and kind is not auth.Kind.PROVIDER:
            raise errors.invalid(
                "PRIVATE_TO_NOT_PROVIDER",
                "only a provider token can be private to a tenant",
                field="private_to",
            )
        if private_to and not valid_principal(private_to):
            raise errors.invalid(
                "INVALID_PRINCIPAL",
                f"{shown(private_to)} must be a tenant name (a DNS label)",
                field="private_to",
            )
        secret, record = auth.new_token(kind, principal, self.clock, private_to)
        await self.store.put(
            self.keys.token(record.token_id), record.to_json(schema.writes_version(self.inv.schema))
        )
        token = admin_pb2.Token(
            name=f"tokens/{record.token_id}",
            kind=kind_pb,  # type: ignore[arg-type]
            principal=record.principal,
            create_time=_ts(record.create_time),
            private_to=record.private_to,
        )
        return token, secret

    async def list_tokens(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[admin_pb2.Token], str]:
        """Tokens in id order, one page by key."""
        size = pagination.page_size(page_size)
        query = pagination.query_hash("tokens")
        after = pagination.decode_cursor(page_token, query)
        top = self.keys.dir("tokens")
        start = top + after + "\0" if after else top
        kvs, more = await self.store.get_range(start, prefix_end(top.encode()), size)
        tokens = []
        for kv in kvs:
            token_id = self.keys.relative(kv.key)[1]
            rec = auth.TokenRecord.from_json(token_id, kv.value)
            tokens.append(
                admin_pb2.Token(
                    name=f"tokens/{token_id}",
                    kind=_KIND_PB[rec.kind],
                    principal=rec.principal,
                    create_time=_ts(rec.create_time),
                    private_to=rec.private_to,
                )
            )
        last = self.keys.relative(kvs[-1].key)[1] if kvs else ""
        return tokens, pagination.encode_cursor(query, last) if more else ""

    async def delete_token(self, name: str) -> None:
        prefix, _, token_id = name.partition("/")
        if prefix != "tokens" or not token_id.isalnum():
            raise errors.invalid("INVALID_TOKEN_NAME", "token name must be tokens/{id}", field="name")
        resp = await self.store.txn([], [delete(self.keys.token(token_id))])
        if not resp.responses[0].response_delete_range.deleted:
            raise errors.not_found("TOKEN_NOT_FOUND", f"{name} does not exist")
        # Read your writes: once this returns, this replica refuses the token.
        await self.inv.wait_for_revision(resp.header.revision)
